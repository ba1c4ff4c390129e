"""``probe``: how large a batch fits, measured on the device or simulated without it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from .. import distributed
from ..device import Budget
from ..errors import CannotSimulate, DoesNotFitError, UsageError
from ..oom import is_oom_error, release_memory
from ..step import StepSettings, tokens_per_sample
from ..task import Task
from ..units import json_document
from .capacity import (SIMULATED_TRIES, MemoryFit, check_batch_sizes, check_margin, fit_memory,
                       largest_pow2_at_most, refine_max_batch, solve_max_batch, usable_bytes)
from .targets import Target, Term, cuda_terms

if TYPE_CHECKING:
    from .inputs import InputScan
    from .measured import AllocatorBackend

DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128)


class Method(str, Enum):
    auto = "auto"
    measured = "measured"
    simulated = "simulated"


@dataclass(frozen=True)
class Point:
    batch_size: int
    peak_bytes: int          # peak of the step as measured/simulated on the probing device
    required_bytes: int      # peak plus the target's extra terms (= peak for target "same")


@dataclass(frozen=True)
class ProbeResult:
    task: str
    device: str
    method: str
    target: str
    margin: float
    budget_bytes: int
    budget_source: str
    fixed_bytes: int
    per_sample_bytes: int
    fit_residual_bytes: int
    max_batch: int
    max_batch_pow2: int
    points: tuple[Point, ...]
    terms: tuple[Term, ...] = ()          # target terms evaluated at max_batch
    confirmation: tuple[dict, ...] = ()   # measured path: the real steps run at the answer
    param_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    # How the measured step trains (StepSettings) and which items made its batches (InputScan).
    precision: str = "fp32"
    accumulate: int = 1                   # micro-steps per optimizer step
    optimizer_impl: str | None = None     # for-loop | foreach | fused (simulated)
    parameter_dtype: str | None = None    # the trainable parameters' (simulated): float32...
    inputs: str = "typical"               # worst-case | typical
    largest_item_elements: int | None = None
    items_scanned: int = 0
    uniform_items: bool | None = None     # every item the same size: worst case = typical
    inputs_note: str = ""
    train_items: int | None = None        # the task's training set: a batch cannot exceed it
    method_note: str = ""                 # why the method differs from the one asked for
    # The least-squares line's largest error against a measured peak (percent), and where;
    # above 1% the line is raised by fit_raised_bytes to lie on or above every peak.
    fit_max_error_pct: float = 0.0
    fit_max_error_batch: int | None = None
    fit_raised_bytes: int = 0
    # False: the confirming search stopped (12 real steps) before the bracket closed, so
    # max_batch is the largest batch checked to fit, and a larger one may fit too.
    max_batch_exact: bool = True
    # Why no larger batch was checked, where the simulation could not run one (the answer
    # is then a lower bound): capacity.RefineResult.stop.
    max_batch_stop: str | None = None
    sharding: str = ""                    # one rank of a sharded run (ShardPlan.describe())
    shard_ranks: int = 1                  # ranks the model is sharded over (FSDP2)
    tokens_per_sample: int | None = None  # a token batch's sequence length (LM tasks)
    # Sharded or checkpointed: the per-rank terms of the simulated peak at max_batch, as
    # check's (parameters, gradients, optimizer state, batch, activations and buffers).
    rank_terms: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data["points"] = [asdict(p) for p in self.points]
        data["terms"] = [asdict(t) for t in self.terms]
        # max_batch is per micro-step: the batch that must fit. Accumulation trains on more.
        data.update(micro_batch=self.max_batch, effective_batch=self.max_batch * self.accumulate,
                    global_batch=self.max_batch * self.accumulate * self.shard_ranks,
                    exceeds_dataset=self.exceeds_dataset)
        return json_document(data)

    def to_dict(self) -> dict:
        """The ``--json`` output (``to_json``'s name in the Python API)."""
        return self.to_json()

    @property
    def exceeds_dataset(self) -> bool:
        """The answer reaches the training set's size: memory does not limit the batch (real
        steps are not tried past it)."""
        return self.train_items is not None and self.max_batch >= self.train_items


@dataclass
class Meter:
    """Peak bytes of one full training step at a batch size, by one method."""

    method: Method
    peak: Callable[[int], int]
    extras: dict = field(default_factory=dict)  # simulated: param/optimizer bytes, StepPeak per b


def choose_method(method: Method, device: torch.device) -> Method:
    if method is Method.auto:
        return Method.simulated if device.type in ("cpu", "meta") else Method.measured
    return method


def model_uses_cudnn(task: Task) -> bool:
    """Whether the model runs cuDNN kernels that take a workspace on CUDA: convolutions and
    RNNs (cuDNN's RNN also keeps its own weight and reserve buffers: a 2-layer GRU measured
    92-114 MB above the simulation on an H200, docs/benchmarks-cuda.md)."""
    with torch.device("meta"):
        model = task.model()
    return any(isinstance(m, (nn.modules.conv._ConvNd, nn.RNNBase)) for m in model.modules())


def make_meter(task: Task, method: Method, device: torch.device, seed: int = 0,
               backend: "AllocatorBackend | None" = None,
               cpu_kernel_scratch: bool = True, settings: StepSettings = StepSettings(),
               inputs: "InputScan | None" = None) -> Meter:
    """The measuring function for ``method`` on ``device`` (or on ``backend``, any allocator
    with peak statistics — tests pass a CPU allocator with a cap). ``settings`` and
    ``inputs``: the step as the run trains it, on the items it is measured on."""
    if method is Method.simulated:
        from .simulated import simulate_step_peak

        meter = Meter(method, lambda b: 0)

        def simulated(b: int) -> int:
            step = simulate_step_peak(task, b, seed=seed, kernel_workspace=cpu_kernel_scratch,
                                      settings=settings, inputs=inputs)
            meter.extras["param_bytes"] = step.param_bytes
            meter.extras["optimizer_state_bytes"] = step.optimizer_state_bytes
            meter.extras["optimizer_impl"] = step.optimizer_impl
            meter.extras["parameter_dtype"] = step.parameter_dtype
            meter.extras.setdefault("steps", {})[b] = step
            meter.extras["recomputes"] = meter.extras.get("recomputes") or step.recomputes
            return step.peak_bytes

        meter.peak = simulated
        return meter
    if backend is None and device.type == "cpu":
        from .cpu_truth import cpu_step_peak

        seen: dict[int, int] = {}

        def host_guarded(b: int) -> int:
            check_host_headroom(b, seen)
            seen[b] = cpu_step_peak(task, b, seed=seed, settings=settings,
                                    inputs=inputs).peak_bytes
            return seen[b]

        return Meter(method, host_guarded)
    from .measured import AcceleratorAllocator, run_two_steps

    from contextlib import nullcontext

    from .recompute import recomputations, recomputed_under

    real = backend if backend is not None else AcceleratorAllocator(device)
    meter = Meter(method, lambda b: 0)

    def run(b: int) -> int:
        # Whether the real steps recompute checkpointed activations: the CUDA terms give such
        # a step more fragmentation headroom (review: a measured --target cuda probe of a
        # checkpointed model got the plain 15%).
        before = recomputations()
        with recomputed_under(nullcontext):
            peak = run_two_steps(task, b, real, seed, settings, inputs)
        meter.extras["recomputes"] = meter.extras.get("recomputes") or \
            recomputations() > before
        return peak

    meter.peak = run
    return meter


HOST_HEADROOM = 0.5  # a real step on the CPU may use at most this share of the available RAM


def host_prediction(batch_size: int, seen: dict[int, int]) -> float | None:
    """The peak of a real step at ``batch_size`` predicted from the steps measured so far (a
    line through the two largest; the largest alone, scaled, with one); None with none."""
    if not seen:
        return None
    sizes = sorted(seen)
    if len(sizes) == 1:
        return seen[sizes[0]] * batch_size / sizes[0]
    b0, b1 = sizes[-2], sizes[-1]
    slope = max(0.0, (seen[b1] - seen[b0]) / (b1 - b0))
    return seen[b1] + slope * (batch_size - b1)


def check_host_headroom(batch_size: int, seen: dict[int, int]) -> None:
    """Before a real step on the CPU: refuse it, as an out-of-memory result like any other,
    when the peak predicted from the steps measured so far (``host_prediction``) exceeds
    HOST_HEADROOM of the RAM available now. A measured probe must never push the host into
    the kernel's OOM killer."""
    from ..device import available_ram_bytes

    predicted = host_prediction(batch_size, seen)
    if predicted is None:
        return
    available = available_ram_bytes()
    if predicted > HOST_HEADROOM * available:
        from ..units import format_bytes

        raise MemoryError(f"out of memory (host guard): a real step at batch {batch_size} "
                          f"would need about {format_bytes(predicted)}, more than half of the "
                          f"{format_bytes(available)} of RAM available now")


def _required(point_peak: int, rounded: int | None, target: Target, uses_cudnn: bool,
              budget_is_total: bool, recomputes: bool = False) -> tuple[int, list[Term]]:
    if target is Target.same:
        return point_peak, []
    terms = cuda_terms(point_peak, rounded, uses_cudnn, budget_is_total=budget_is_total,
                       recomputes=recomputes)
    return point_peak + sum(t.bytes for t in terms), terms


def _rounded_at(batch_size: int, raw: list[tuple[int, int]], rounded: dict) -> int | None:
    """The 512-byte-rounded peak at ``batch_size``, from a line through the probed points'
    rounding overhead (it grows with the number and size of live tensors, so with b)."""
    pairs = [(b, rounded[b] - p) for b, p in raw if rounded.get(b) is not None]
    if len(pairs) < 2:
        return None
    line = fit_memory(pairs, min_batch=1)
    peak_line = fit_memory(raw)
    return int(peak_line.predict(batch_size) + max(0.0, line.predict(batch_size)))


def measure_points(meter: Meter, batch_sizes: Sequence[int],
                   on_point: Callable[[int, int], None] | None = None) -> list[tuple[int, int]]:
    """Peaks at each batch size; on the measured path an OOM ends the series early."""
    points: list[tuple[int, int]] = []
    for i, b in enumerate(batch_sizes):
        ran_out = False
        try:
            points.append((b, meter.peak(b)))
        except Exception as exc:
            if not (meter.method is Method.measured and is_oom_error(exc)):
                raise
            ran_out = True
        if ran_out:  # outside the except block, whose exception still holds the step's tensors
            release_memory()
            break
        if on_point:
            on_point(i + 1, len(batch_sizes))
    if len(points) < 2:
        raise DoesNotFitError(
            f"only {len(points)} of batch sizes {list(batch_sizes)} ran without running out "
            "of memory; probe smaller ones with --batch-sizes"
        )
    return points


def run_probe(
    task: Task,
    *,
    task_name: str,
    device: torch.device,
    budget: Budget,
    method: Method = Method.auto,
    margin: float = 0.2,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    target: Target = Target.same,
    budget_is_total: bool = True,
    confirm: bool = True,
    seed: int = 0,
    on_point: Callable[[int, int], None] | None = None,
    backend: "AllocatorBackend | None" = None,
    settings: StepSettings = StepSettings(),
    inputs: "InputScan | None" = None,
    method_note: str = "",
) -> ProbeResult:
    """Measure peaks, fit ``peak = fixed + per_sample*b``, solve for the largest batch that
    fits ``budget`` after ``margin``, then check that answer where it lands (real steps when
    measured, simulations when simulated) and refine it (``capacity.refine_max_batch``).

    Batch sizes are micro-batches when ``settings.accumulate > 1``; ``inputs`` picks the items
    (the largest for worst-case inputs; None: random). For ``target`` cuda the simulation
    runs the optimizer implementation CUDA would pick."""
    margin = check_margin(margin)
    sizes = check_batch_sizes(batch_sizes)
    train_items = len(task.train_data)  # type: ignore[arg-type]
    if len(sizes) < 2:
        raise UsageError("probe needs at least two batch sizes to fit a line")
    method = Method.measured if backend is not None else choose_method(method, device)
    # For another device, CPU kernels' internal scratch (oneDNN layouts) does not apply.
    if target is not Target.same and settings.target_device is None:
        settings = replace(settings, target_device=target.value)
    meter = make_meter(task, method, device, seed, backend,
                       cpu_kernel_scratch=target is Target.same, settings=settings,
                       inputs=inputs)
    # Under torchrun every measurement is agreed: an OOM on one rank ends the series on all.
    meter = distributed.agree_meter(meter)
    raw = measure_points(meter, sizes, on_point)
    uses_cudnn = target is not Target.same and model_uses_cudnn(task)
    rounded = _rounded(meter)
    recomputes = bool(meter.extras.get("recomputes"))
    points = tuple(
        Point(b, p, _required(p, rounded.get(b), target, uses_cudnn, budget_is_total,
                              recomputes)[0])
        for b, p in raw
    )
    fit: MemoryFit = fit_memory([(p.batch_size, p.required_bytes) for p in points])
    with distributed.agreement():  # "nothing fits" on one rank is an error on all
        best = solve_max_batch(budget.bytes, margin, fit)
    best = distributed.agree_min(best)  # the same start on every rank: none runs out
    confirmation: tuple[dict, ...] = ()
    checked_peaks: dict[int, int] = {}
    exact = not confirm  # unconfirmed: the line's answer, as exact as the line
    stop = None  # why a larger batch could not be simulated (the answer a lower bound)
    if confirm:
        # The line is only piecewise right (the peak moves between phases as b grows), so
        # the answer is checked where it lands: real steps when measured, a simulation (as
        # cheap at any b) when simulated, refined inside a bracket until it is exact.
        def required_at(b: int) -> int:
            peak = meter.peak(b)
            checked_peaks[b] = peak
            return _required(peak, _rounded(meter).get(b), target, uses_cudnn,
                             budget_is_total, recomputes)[0]

        # Real steps never jump more than 8x past a batch that ran; simulations may.
        # Under torchrun: the smallest budget of any rank, so all ranks search alike.
        usable = distributed.agree_min(int(usable_bytes(budget.bytes, margin)))
        real_steps = method is Method.measured
        ceiling = max(train_items, max(sizes)) if real_steps else None
        result = refine_max_batch(required_at, usable,
                                  [(p.batch_size, p.required_bytes) for p in points], best,
                                  max_jump=8 if real_steps else 2**40,
                                  max_tries=12 if real_steps else SIMULATED_TRIES,
                                  ceiling=ceiling, stops=() if real_steps else (CannotSimulate,))
        confirmation = tuple(asdict(s) for s in result.path)
        # Stopped at the data's size, not at a batch that did not fit: memory allows at least
        # this much, how much more is not known.
        exact = result.exact and not (ceiling is not None and result.batch_size >= ceiling)
        stop = result.stop
        if result.batch_size < 1:
            tried = ", ".join(f"{s.batch_size} {s.outcome}" for s in result.path)
            raise DoesNotFitError(f"no batch size fits the budget after the margin ({tried})")
        best = result.batch_size
    # The terms of the answer as measured where it landed (the line's prediction only when
    # nothing was measured there: confirm=False, or a probed point).
    at_best = checked_peaks.get(best) or dict(raw).get(best) or int(fit.predict(best))
    rounded_best = _rounded(meter).get(best) or _rounded_at(best, raw, rounded)
    terms = _required(at_best, rounded_best, target, uses_cudnn, budget_is_total,
                      recomputes)[1]
    return ProbeResult(
        rank_terms=_rank_terms(settings, meter, best),
        train_items=train_items,
        task=task_name, device=str(device), method=method.value, target=target.value,
        margin=margin, budget_bytes=budget.bytes, budget_source=budget.source,
        fixed_bytes=round(fit.fixed_bytes), per_sample_bytes=round(fit.per_sample_bytes),
        fit_residual_bytes=round(fit.residual_bytes), max_batch=best,
        max_batch_pow2=largest_pow2_at_most(best), points=points, terms=tuple(terms),
        confirmation=confirmation,
        param_bytes=meter.extras.get("param_bytes"),
        optimizer_state_bytes=meter.extras.get("optimizer_state_bytes"),
        **step_fields(settings, inputs), optimizer_impl=meter.extras.get("optimizer_impl"),
        parameter_dtype=meter.extras.get("parameter_dtype"), method_note=method_note,
        fit_max_error_pct=round(100 * fit.max_error_frac, 3),
        fit_max_error_batch=fit.max_error_batch, fit_raised_bytes=round(fit.raised_bytes),
        max_batch_exact=exact, max_batch_stop=stop,
        tokens_per_sample=tokens_per_sample(task, inputs, best),
        sharding=settings.shard.describe() if settings.shard is not None else "",
        shard_ranks=settings.shard.world_size if settings.shard is not None
        and settings.shard.fsdp else 1,
    )


def _rounded(meter: Meter) -> dict[int, int | None]:
    """The 512-byte-rounded peak of each simulated batch size (none when measured)."""
    return {b: step.rounded_peak_bytes for b, step in meter.extras.get("steps", {}).items()}


def _rank_terms(settings: StepSettings, meter: Meter, batch_size: int
                ) -> tuple[tuple[str, int], ...]:
    """check's per-rank terms of the simulated step at ``batch_size`` (sharded runs only)."""
    step = meter.extras.get("steps", {}).get(batch_size)
    if settings.shard is None or step is None:
        return ()
    from ..gate.check import shard_fields

    return shard_fields(settings.shard, step, None)["rank_terms"]


def step_fields(settings: StepSettings, inputs: "InputScan | None") -> dict:
    """ProbeResult/CheckResult fields that say how the step was measured."""
    fields = dict(precision=settings.precision.value, accumulate=settings.accumulate)
    if inputs is not None:
        fields.update(inputs=inputs.mode.value, items_scanned=inputs.items_scanned,
                      largest_item_elements=inputs.largest_item_elements,
                      uniform_items=inputs.uniform, inputs_note=inputs.how)
    return fields
