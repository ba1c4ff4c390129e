"""The CPU allocator's own account of memory: the ground truth the simulation is checked against.

With ``profile_memory=True`` the profiler records every allocation and free of PyTorch's CPU
allocator as a ``[memory]`` event carrying a signed byte delta, including buffers that kernels
allocate inside themselves. Replaying the deltas in time order gives the live bytes at every
moment, hence the exact peak. Two conditions make the replay exact, and both are met here:
everything that is freed inside the window was allocated inside it (the profiler drops frees of
blocks it never saw allocated), so profiling starts before the batch and the model exist; and
events are ordered by their nanosecond timestamps (a thread's own events never tie out of order).

Memory that bypasses PyTorch's allocator (MKL's or oneDNN's private scratchpads, Python
objects) is not device memory in the sense DESIGN.md uses, and is not counted either here or in
the simulation.

This module also measures single CPU kernels (``kernel_high_water_bytes``) so the simulation can
add the scratch that fake tensors cannot see.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._pytree import tree_flatten

from ..errors import TaskError, one_line
from ..step import make_batch, train_step
from ..task import Task
from .simulated import (
    Phase,
    StepPeak,
    live_at_step_start,
    optimizer_state_tensors,
    storage_bytes,
    with_phase_marks,
    young_gc_only,
)

_STEP = "bsselect::step2"
_BACKWARD = "bsselect::backward"
_OPTIMIZER = "bsselect::optimizer"


def _mark(name: str) -> None:
    """A zero-length profiler range: its start time marks a phase boundary."""
    with record_function(name):
        pass


def allocator_deltas(prof: profile) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocator event, in time order."""
    events = prof.profiler.kineto_results.events()  # kineto keeps nanoseconds; FunctionEvents round
    cpu = torch._C._autograd.DeviceType.CPU
    deltas = [(e.start_ns(), e.nbytes()) for e in events
              if e.name() == "[memory]" and e.device_type() == cpu]
    return sorted(deltas, key=lambda d: d[0])  # stable: ties keep recording order


def _range_ns(prof: profile, name: str) -> list[tuple[int, int]]:
    events = prof.profiler.kineto_results.events()
    return sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == name)


def replay_phases(
    deltas: Sequence[tuple[int, int]], step: tuple[int, int], boundaries: dict[Phase, int]
) -> tuple[int, dict[Phase, int]]:
    """Live bytes when ``step`` begins and the peak live bytes in each phase of it.

    ``boundaries`` maps BACKWARD and OPTIMIZER to the time (ns) they begin; FORWARD begins with
    the step. A phase's peak includes the level it starts at.
    """
    start_ns, end_ns = step
    level = sum(d for t, d in deltas if t < start_ns)
    start_bytes = level
    peaks = {phase: 0 for phase in Phase}
    phase = Phase.FORWARD
    peaks[phase] = level
    for t, delta in deltas:
        if not start_ns <= t <= end_ns:
            continue
        now = _phase_at(t, boundaries)
        if now is not phase:
            phase = now
            peaks[phase] = max(peaks[phase], level)
        level += delta
        peaks[phase] = max(peaks[phase], level)
    return start_bytes, peaks


def _phase_at(t_ns: int, boundaries: dict[Phase, int]) -> Phase:
    if t_ns >= boundaries.get(Phase.OPTIMIZER, 1 << 63):
        return Phase.OPTIMIZER
    if t_ns >= boundaries.get(Phase.BACKWARD, 1 << 63):
        return Phase.BACKWARD
    return Phase.FORWARD


def _first_within(ranges: list[tuple[int, int]], step: tuple[int, int]) -> Optional[int]:
    starts = [s for s, _ in ranges if step[0] <= s <= step[1]]
    return min(starts) if starts else None


def cpu_step_peak(task: Task, batch_size: int, *, seed: int = 0) -> StepPeak:
    """Peak bytes of training step 2 at ``batch_size``, measured on the real CPU allocator.

    The same step as ``simulate_step_peak``: build the model and optimizer, run step 1 (which
    creates optimizer state), then replay the allocator's events over step 2.
    """
    gc.collect()
    with young_gc_only(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, optimizer, batch = _real_steps(task, batch_size, seed)
    step = _range_ns(prof, _STEP)[0]
    boundaries = {}
    for phase, name in ((Phase.BACKWARD, _BACKWARD), (Phase.OPTIMIZER, _OPTIMIZER)):
        t = _first_within(_range_ns(prof, name), step)
        if t is not None:
            boundaries[phase] = t
    start_bytes, peaks = replay_phases(allocator_deltas(prof), step, boundaries)
    phase = max(Phase, key=lambda p: peaks[p])
    return StepPeak(
        batch_size=batch_size,
        peak_bytes=peaks[phase],
        param_bytes=storage_bytes(model.parameters()),
        optimizer_state_bytes=storage_bytes(optimizer_state_tensors(optimizer)),
        batch_bytes=storage_bytes(tree_flatten(batch)[0]),
        start_bytes=start_bytes,
        forward_peak_bytes=peaks[Phase.FORWARD],
        backward_peak_bytes=peaks[Phase.BACKWARD],
        optimizer_peak_bytes=peaks[Phase.OPTIMIZER],
        peak_phase=phase,
        kernel_workspace_bytes=None,  # the allocator cannot tell scratch from tensors
    )


def _real_steps(task: Task, batch_size: int, seed: int) -> tuple[Any, Any, Any]:
    try:
        batch = make_batch(task, batch_size, seed)
        model = task.model()
        optimizer = task.make_optimizer(model.parameters(), task.lr)
        marked, handles = with_phase_marks(
            task, optimizer, lambda: _mark(_BACKWARD), lambda: _mark(_OPTIMIZER)
        )
        x, y = batch
        train_step(model, optimizer, marked, x, y)
        gc.collect()
        with record_function(_STEP):
            train_step(model, optimizer, marked, x, y)
    except Exception as exc:
        raise TaskError(
            f"the CPU training step at batch size {batch_size} failed: {one_line(exc)}"
        ) from exc
    for handle in handles:
        handle.remove()
    return model, optimizer, batch


# --- single kernels -------------------------------------------------------------------------
#
# Some CPU kernels allocate scratch through PyTorch's allocator that no op returns, so fake
# tensors cannot see it: oneDNN convolution copies input, weight and output into blocked
# layouts (channels padded to the SIMD width) and computes into a blocked output before
# copying it out; the CPU flash-attention kernels keep per-thread buffers and, in backward,
# a float accumulator for grad_q. Which copies happen depends on the ISA, the oneDNN version
# and the shapes, so rather than re-deriving oneDNN's choices we ask the kernel: run it for
# real on inputs of the same shape but a small batch, record its allocations, and scale each
# allocation linearly in the batch (they are copies of batch-major tensors, or per-thread or
# per-weight buffers that do not depend on it).


@dataclass(frozen=True)
class KernelSpec:
    """Which arguments of a kernel carry its batch in dim 0 (positions, or keyword names,
    the latter only when their dim 0 matches), and the smallest batch that takes the same code
    path as larger ones (convolution: one item picks another backend)."""

    batched: tuple[Any, ...]
    min_items: int


_aten = torch.ops.aten
KERNELS: dict[Any, KernelSpec] = {
    _aten.convolution.default: KernelSpec((0,), min_items=2),
    _aten.convolution_backward.default: KernelSpec((0, 1), min_items=2),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: KernelSpec(
        (0, 1, 2, "attn_mask"), min_items=1),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: KernelSpec(
        (0, 1, 2, 3, 4, 5, "attn_mask"), min_items=1),
}

# Real memory a calibration may use. Below it the kernel runs at the exact batch; above it,
# at the two largest powers of two that fit, and the allocations are extrapolated.
CALIBRATION_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor argument without its values; ``shape`` leaves out the batch dim when batched.

    Kernels choose code paths by layout (oneDNN convolution follows channels-last strides,
    size-one dims included), so the strides are kept exactly when the batch is the outermost
    dim, which makes them independent of the batch size; otherwise the layout is rebuilt
    densely in the same dim order.
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    batched: bool
    exact_strides: bool

    def item_bytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize if self.batched else 0

    def real(self, items: int) -> torch.Tensor:
        shape = ((items,) if self.batched else ()) + self.shape
        if self.exact_strides:
            extent = self.offset + 1 + sum((n - 1) * st for n, st in zip(shape, self.stride))
            buffer = torch.zeros(max(extent, 1), dtype=self.dtype)
            return buffer.as_strided(shape, self.stride, self.offset)
        order = sorted(range(len(shape)), key=lambda d: (-self.stride[d], d))
        inverse = sorted(range(len(order)), key=lambda i: order[i])
        return torch.zeros([shape[d] for d in order], dtype=self.dtype).permute(inverse)


def _item_extent(t: torch.Tensor) -> int:
    """Elements one batch item spans in storage."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:]))


def _spec(value: Any, batched: bool, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        batched = batched and value.dim() > 0 and value.shape[0] == batch
        outermost = not batched or value.shape[0] == 1 or value.stride(0) >= _item_extent(value)
        shape = tuple(value.shape[1:] if batched else value.shape)
        return _TensorSpec(shape, tuple(value.stride()), value.storage_offset(), value.dtype,
                           batched, exact_strides=outermost)
    if isinstance(value, list):
        return tuple(value)
    return value


def _build(spec: Any, items: int) -> Any:
    if isinstance(spec, _TensorSpec):
        return spec.real(items)
    if isinstance(spec, tuple):
        return list(spec)
    return spec


@lru_cache(maxsize=512)
def _kernel_deltas(func: Any, args: tuple, kwargs: tuple, items: int, threads: int) -> tuple:
    """Signed allocator deltas while ``func`` runs once on real zeros with ``items`` in the
    batch. ``threads`` is part of the cache key: per-thread buffers scale with it."""
    real_args = [_build(a, items) for a in args]
    real_kwargs = {k: _build(v, items) for k, v in kwargs}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = func(*real_args, **real_kwargs)
        del out  # freed inside the window, as in the step; the replay only needs the maximum
    return tuple(d for _, d in allocator_deltas(prof))


def high_water(deltas: Sequence[int]) -> int:
    """The maximum of the running sum of ``deltas`` (and 0)."""
    level = peak = 0
    for d in deltas:
        level += d
        peak = max(peak, level)
    return peak


def _extrapolate(lo: tuple, hi: tuple, n_lo: int, n_hi: int, items: int) -> int:
    """High water at ``items`` from runs at ``n_lo`` < ``n_hi``: each allocation is affine in
    the batch. If the two runs allocate differently (the kernel changed algorithm), fall
    back to extrapolating the high water itself."""
    def at(a: int, b: int) -> int:
        return a + round((b - a) * (items - n_lo) / (n_hi - n_lo))

    if len(lo) == len(hi):
        return high_water([at(a, b) for a, b in zip(lo, hi)])
    return at(high_water(lo), high_water(hi))


def calibration_items(items: int, item_bytes: int, min_items: int) -> tuple[int, ...]:
    """Batch sizes to run a kernel at: ``items`` itself if affordable, else the two largest
    powers of two that are (never below ``min_items``)."""
    # Inputs, outputs, gradients and scratch are each about the size of the batched inputs.
    affordable = CALIBRATION_BUDGET_BYTES // max(1, 4 * item_bytes)
    if items <= max(affordable, 2 * min_items):
        return (items,)
    hi = 2 * min_items
    while hi * 2 <= affordable:
        hi *= 2
    return (hi // 2, hi)


def kernel_high_water_bytes(func: Any, args: Sequence[Any], kwargs: dict) -> Optional[int]:
    """Bytes the real CPU kernel for ``func`` holds at its high-water mark (outputs and
    scratch), for arguments shaped like ``args`` (fake tensors are fine); None for kernels
    without known hidden scratch, or if the kernel cannot be run."""
    spec = KERNELS.get(func)
    if spec is None or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        return None
    items = args[0].shape[0]
    arg_specs = tuple(_spec(a, i in spec.batched, items) for i, a in enumerate(args))
    kw_specs = tuple((k, _spec(v, k in spec.batched, items)) for k, v in sorted(kwargs.items()))
    item_bytes = sum(s.item_bytes() for s in tree_flatten([arg_specs, kw_specs])[0]
                     if isinstance(s, _TensorSpec))
    sizes = calibration_items(items, item_bytes, spec.min_items)
    try:
        runs = [_run_outside_modes(func, arg_specs, kw_specs, n) for n in sizes]
    except Exception:
        return None  # a kernel we cannot reproduce counts as its outputs only
    if len(sizes) == 1:
        return high_water(runs[0])
    return _extrapolate(runs[0], runs[1], sizes[0], sizes[1], items)


def _run_outside_modes(func: Any, args: tuple, kwargs: tuple, items: int) -> tuple:
    from torch.utils._python_dispatch import _disable_current_modes

    # Called from inside the simulation's dispatch: the fake mode must not see these tensors.
    with _disable_current_modes(), torch.no_grad():
        return _kernel_deltas(func, args, kwargs, items, torch.get_num_threads())
