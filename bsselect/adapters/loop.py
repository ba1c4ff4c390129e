"""The largest batch for a plain training loop: the user's own one-step function.

    from bsselect import find_batch_size

    def step(batch_size: int) -> None:          # one full training step at that batch
        x, y = next_batch(batch_size)
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)

    fit = find_batch_size(step)                  # memory: the device's free memory
    train(batch_size=fit.max_batch)

Accelerate's ``find_executable_batch_size`` calls the whole training function and halves the
batch on every out-of-memory error; the answer is a power-of-two fraction of where it started,
and each failure costs a run. Here each batch size runs the step twice (the second has the
optimizer state of the first, as in training) and its peak is read from the allocator; a line
through the peaks gives the answer, which is then run and refined in a bracket (the probe's
confirm-and-refine search, ``capacity.refine_max_batch``) until it is the largest that fits.

What is measured: on an accelerator, the allocator's peak (``max_memory_allocated``: the
model, optimizer state and everything the step holds); on the CPU, the peak of what the step
allocates above what was live when it began (from the CPU allocator's events), so ``memory``
there budgets the step's own allocations. On the CPU the default budget is half the available
RAM (as a measured ``probe``'s: the steps allocate for real), and before each real step one
predicted above half the RAM available now is refused as out of memory (the probe's host
guard), whatever ``memory`` says; the answer is then a lower bound (``exact=False``). The
decorator form calls the function once more, at the answer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import DoesNotFitError, TaskError, UsageError, one_line
from ..oom import is_oom_error, release_memory


@dataclass(frozen=True)
class LoopFit:
    """``find_batch_size``'s answer and what it measured (bytes)."""

    max_batch: int
    max_batch_pow2: int
    budget_bytes: int
    margin: float
    device: str
    what: str                               # "allocator peak" | "step's own allocations"
    points: tuple[tuple[int, int], ...]     # (batch, peak) measured for the line
    checked: tuple[dict, ...]               # the confirm-and-refine path
    fixed_bytes: Optional[int]              # the line's; None with one batch size (max_batch=1)
    per_sample_bytes: Optional[int]
    # False when the search stopped before a batch that did not fit (its tries ran out, or
    # it reached max_batch): max_batch is then "at least", as probe's max_batch_exact says.
    exact: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_peak(call: Callable[[], Any]) -> int:
    """Peak bytes ``call`` allocates above the level at its start (CPU allocator events)."""
    from ..memory.cpu_truth import allocator_deltas, memory_profile, return_freed_memory_to_the_os

    return_freed_memory_to_the_os()
    with memory_profile() as prof:
        call()
    level = peak = 0
    for _, delta in allocator_deltas(prof.profiler.kineto_results.events()):
        level += delta
        peak = max(peak, level)
    return peak


def _called(step: Callable[[int], Any], batch_size: int) -> None:
    """``step(batch_size)``; TaskError where it returned a generator or a coroutine, which
    never ran (review: "memory does not grow with the batch size")."""
    import inspect

    done = step(batch_size)
    if inspect.isgenerator(done) or inspect.iscoroutine(done):
        if inspect.iscoroutine(done):
            done.close()
        raise TaskError(f"step({batch_size}) returned a {type(done).__name__} without running: "
                        "give a plain function that trains one step (not a generator or an "
                        "async def)")


def measure_step(step: Callable[[int], Any], batch_size: int, device: torch.device,
                 backend: Any = None) -> int:
    """Peak bytes of two calls ``step(batch_size)``: on a device's allocator the larger of the
    two (the second, with the optimizer's state, unless the first allocated more: a codebook
    initialised from the first batch, review), on the CPU the second's; OOM errors
    propagate. Starts from an empty cache, as a fresh process would
    (``measured.run_two_steps``)."""
    release_memory()
    if backend is not None:
        backend.release()
    counted = getattr(backend, "oom_count", None)
    ooms = counted() if counted is not None else None
    try:
        if backend is not None:
            with backend.session():
                backend.reset_peak()
                _called(step, batch_size)
                backend.synchronize()
                first = backend.peak_bytes()
                backend.reset_peak()
                _called(step, batch_size)
                backend.synchronize()
                if ooms is not None and (counted() or 0) > ooms:
                    # The step caught an out-of-memory error itself (a loop that skips such a
                    # batch): its peak is of what it did instead, not of a step (review).
                    raise torch.OutOfMemoryError(
                        f"step({batch_size}) caught an out-of-memory error itself (the "
                        "allocator counted one): taken as out of memory")
                return max(first, backend.peak_bytes())
        # The CPU allocator's peak is read above the level at the call's start, which
        # after the first call holds what it kept (the optimizer's state): the second's.
        _called(step, batch_size)
        return _cpu_peak(lambda: _called(step, batch_size))
    except Exception as exc:
        if is_oom_error(exc):
            raise
        raise TaskError(f"step({batch_size}) failed: {one_line(exc)}") from exc
    finally:
        release_memory()
        if backend is not None:
            backend.release()


def find_batch_size(step: Callable[[int], Any], *, memory: Any = None, margin: float = 0.2,
                    batch_sizes: Sequence[int] = (8, 16, 32, 64), device: str = "auto",
                    max_batch: Optional[int] = None, backend: Any = None) -> LoopFit:
    """The largest batch whose step fits ``memory`` after ``margin`` (see the module's doc).
    ``step(b)`` runs one training step at batch ``b``; ``max_batch`` caps the search (your
    dataset's size, say). ``backend``: an ``AllocatorBackend`` (tests pass a capped CPU one)."""
    from ..api import _bytes, device_of
    from ..device import default_budget
    from ..memory.capacity import check_batch_sizes, check_margin, usable_bytes

    margin = check_margin(margin)
    sizes = check_batch_sizes(batch_sizes)
    if len(sizes) < 2:
        raise UsageError("find_batch_size needs at least two batch sizes to fit a line")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        sizes = [b for b in sizes if b <= max_batch]
        if len(sizes) < 2:  # two sizes under the cap for the line, whatever was asked
            sizes = sorted({max(1, max_batch // 2), max_batch}) if max_batch >= 2 else [1]
    dev = backend.device if backend is not None else device_of(device)
    if dev.type == "meta":  # raw "Cannot access accelerator device" from the allocator (review)
        raise UsageError("find_batch_size runs your real step, and the meta device has shapes "
                         "but no values; pass device='cpu' or an accelerator. For memory "
                         "without one: bsselect.probe(task, method='simulated')")
    if backend is None and dev.type != "cpu":
        from ..memory.measured import AcceleratorAllocator

        backend = AcceleratorAllocator(dev)
    size = _bytes(memory, "memory")
    if size is not None:
        budget = size
    elif dev.type == "cpu" and backend is None:
        from ..memory.probe import HOST_HEADROOM

        budget = int(default_budget(dev).bytes * HOST_HEADROOM)  # real steps on the host
    else:
        budget = default_budget(dev).bytes
    usable = usable_bytes(budget, margin)
    from ..device import callers_rng

    with callers_rng(dev):  # the caller's RNG stream goes on as if the search had not run
        return _search(step, sizes, dev, backend, budget, margin, usable, max_batch)


def _search(step: Callable[[int], Any], sizes: list[int], dev: torch.device, backend: Any,
            budget: int, margin: float, usable: float, max_batch: Optional[int]) -> LoopFit:
    from ..memory.capacity import (fit_memory, largest_pow2_at_most, refine_max_batch,
                                   solve_max_batch)

    what = "allocator peak" if backend is not None else "step's own allocations"
    points, failed = [], None
    seen: dict[int, int] = {}   # every batch measured so far: its peak
    guarded: list[int] = []     # batches the host guard refused (CPU)

    def real_step(b: int) -> int:
        if backend is None and dev.type == "cpu":
            from ..memory.probe import check_host_headroom, host_prediction

            try:
                check_host_headroom(b, seen)
            except MemoryError:
                if host_prediction(b, seen) <= usable:   # refused, though it might fit
                    guarded.append(b)
                raise
        return measure_step(step, b, dev, backend)

    for b in sizes:
        try:
            seen[b] = real_step(b)
            points.append((b, seen[b]))
        except Exception as exc:  # noqa: BLE001 - an OOM ends the series
            if not is_oom_error(exc):
                raise
            failed = b  # the search's bracket ends below it (review: it was tried again)
            break
    if sizes == [1] and points:  # max_batch=1: the one batch there is fits
        (_, peak), = points
        if peak > usable:
            raise DoesNotFitError(f"batch 1 needs {peak:,} bytes, more than the "
                                  f"{int(usable):,} usable after the margin")
        return LoopFit(1, 1, budget, margin, str(dev), what, tuple(points), (), None, None,
                       exact=False)
    known: list[tuple[int, float]] = list(points)
    if failed is not None:
        known.append((failed, math.inf))  # out of memory: over any budget
    fit = None
    if len(points) == 1 and failed is not None:
        # The first size ran, the next did not: the bracket's search between them (review:
        # an error that said "pass smaller batch_sizes" where 8 fit and 16 did not).
        (ok, peak), = points
        if peak > usable:
            raise DoesNotFitError(f"batch {ok} needs {peak:,} bytes, more than the "
                                  f"{int(usable):,} usable after the margin")
        first = (ok + failed) // 2
    elif len(points) < 2:
        raise UsageError(f"only {len(points)} of the batch sizes {list(sizes)} ran without "
                         "running out of memory; pass smaller batch_sizes")
    else:
        fit = fit_memory(points, min_batch=1)
        # Flat: under a byte per sample (a constant peak fits a slope of rounding error).
        # When the fixed memory alone is over the budget, solve_max_batch says that instead.
        if fit.per_sample_bytes < 1 and fit.fixed_bytes < usable:
            raise UsageError(
                "the step's measured memory does not grow with the batch size ("
                + ", ".join(f"b={b}: {peak:,} bytes" for b, peak in points)
                + "): it may not use its batch_size argument, or allocate where this device's "
                "allocator does not see; pass larger batch_sizes= to measure further")
        first = solve_max_batch(budget, margin, fit)

    def measure(b: int) -> int:
        """A try of the search; a UsageError when a batch of at least twice a smaller one's
        size took no more memory: the step stopped using its batch size there (a slice of a
        1,000-item set; the search went on to 16,777,216, review)."""
        peak = real_step(b)
        below = [k for k in seen if k * 2 <= b]
        if below and peak <= seen[max(below)]:
            k = max(below)
            raise UsageError(
                f"the step's memory stopped growing with the batch size: b={k}: "
                f"{seen[k]:,} bytes, b={b}: {peak:,} bytes; it may use no more than a fixed "
                "number of items (a dataset smaller than the batch?): pass max_batch=")
        seen[b] = peak
        return peak

    result = refine_max_batch(measure, usable, known, first, ceiling=max_batch)
    if result.batch_size < 1:
        raise UsageError("no batch size fits the budget after the margin")
    best = min(result.batch_size, max_batch) if max_batch is not None else result.batch_size
    capped = max_batch is not None and best >= max_batch
    return LoopFit(best, largest_pow2_at_most(best), budget, margin,
                   str(dev), what, tuple(points),
                   tuple(asdict(s) for s in result.path),
                   None if fit is None else round(fit.fixed_bytes),
                   None if fit is None else round(fit.per_sample_bytes),
                   exact=result.exact and not capped and not guarded)


def fits_batch_size(_train: Any = None, **options: Any
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form: ``@fits_batch_size(step=one_step, memory="24GiB")`` on ``train(batch_size,
    ...)`` calls ``train`` with the batch ``find_batch_size(one_step, ...)`` found, as
    Accelerate's decorator does with its back-off. The fit is on ``train.bsselect_fit``."""
    if _train is not None:  # @fits_batch_size without its parentheses
        raise UsageError("write @fits_batch_size(step=one_step, ...): it needs the one-step "
                         "function to measure")
    step = options.pop("step", None)
    if step is None:
        raise UsageError("fits_batch_size needs step=, the one-step function to measure")
    import inspect

    known = set(inspect.signature(find_batch_size).parameters) - {"step"}
    unknown = sorted(set(options) - known)
    if unknown:  # at decoration, not when train() is first called
        raise UsageError(f"fits_batch_size got unknown option(s) {', '.join(unknown)}; it takes "
                         f"step= and {', '.join(sorted(known))}")

    def decorate(train: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(train, "__name__", "train")
        try:  # at decoration, not after a whole search (review)
            params = list(inspect.signature(train).parameters.values())
        except (ValueError, TypeError):
            params = None  # a signature it cannot read: the call says
        # A method (``def train(self, batch_size, ...)``): the batch size goes after self; it
        # went in as self (review).
        method = bool(params) and params[0].name in ("self", "cls")
        if params is not None:
            slot = params[1:] if method else params
            if not slot or slot[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                inspect.Parameter.VAR_POSITIONAL):
                raise UsageError(f"@fits_batch_size calls {name}(batch_size, ...): give it a "
                                 "first positional parameter for the batch size")
        batch_name = (slot[0].name if params is not None
                      and slot[0].kind is not inspect.Parameter.VAR_POSITIONAL else None)
        positional = None  # how many positional arguments train takes (None: any number)
        if params is not None and not any(p.kind is inspect.Parameter.VAR_POSITIONAL
                                          for p in slot):
            positional = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                        inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in slot)

        @functools.wraps(train)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if batch_name is not None and batch_name in kwargs:  # before the search (review)
                raise UsageError(f"@fits_batch_size passes {name}'s {batch_name}; call it "
                                 f"without {batch_name}=")
            given = len(args) - (1 if method and args else 0)
            if positional is not None and given + 1 > positional:
                # train(64) where train(batch_size) takes nothing more: the 64 was meant as
                # the batch size, as Accelerate's decorator also refuses
                raise UsageError(f"@fits_batch_size passes {name}'s {batch_name} first, and "
                                 f"{name} takes {positional} positional argument(s): call it "
                                 f"without the batch size ({given} given)")
            fit = find_batch_size(step, **options)
            wrapper.bsselect_fit = fit  # type: ignore[attr-defined]
            if method and args:
                return train(args[0], fit.max_batch, *args[1:], **kwargs)
            return train(fit.max_batch, *args, **kwargs)

        return wrapper

    return decorate
