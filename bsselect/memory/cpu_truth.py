"""The CPU allocator's own account of memory: the ground truth the simulation is checked against.

With ``profile_memory=True`` the profiler records every allocation and free of PyTorch's CPU
allocator as a ``[memory]`` event carrying a signed byte delta, including buffers that kernels
allocate inside themselves. Replaying the deltas in time order gives the live bytes at every
moment, hence the exact peak. Two conditions make the replay exact, and both are met here:
everything that is freed inside the window was allocated inside it (the profiler drops frees of
blocks it never saw allocated), so profiling starts before the batch and the model exist; and
events are ordered by their nanosecond timestamps, ties in the order they were recorded. The
replay checks itself: the bytes live when step 2 begins equal the parameters, step 1's
gradients, the optimizer state and the batch (tests/test_memory_simulated.py).

Memory that bypasses PyTorch's allocator (MKL's or oneDNN's private scratchpads, Python
objects) is not device memory in the sense docs/method.md uses, and is not counted either here or in
the simulation.

``allocator_log`` and ``high_water`` are the same account for a stretch of code, which
``calibration`` uses to measure single CPU kernels.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..errors import TaskError, one_line
from ..oom import is_oom_error
from ..precision import make_scaler, parameter_dtype
from ..step import StepSettings, make_batch, train_step
from ..task import Task
from .optim_impl import run_as_on
from .fake import young_gc_only
from .simulated import Phase, StepPeak, step_peak, with_phase_marks

_STEP = "bsselect::step2"
_BACKWARD = "bsselect::backward"
_OPTIMIZER = "bsselect::optimizer"


def _mark(name: str) -> None:
    """A zero-length profiler range: its start time marks a phase boundary."""
    with record_function(name):
        pass


def allocator_deltas(events: Sequence[Any]) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocator event, in time order."""
    cpu = torch._C._autograd.DeviceType.CPU
    deltas = [(e.start_ns(), e.nbytes()) for e in events
              if e.name() == "[memory]" and e.device_type() == cpu]
    return sorted(deltas, key=lambda d: d[0])  # stable: ties keep the recording order


def _kineto_events(prof: profile) -> list[Any]:
    # Kineto's own events keep nanosecond timestamps (FunctionEvents round to microseconds,
    # which reorders an allocation and a free that happen within one).
    return prof.profiler.kineto_results.events()


def _range_ns(events: Sequence[Any], name: str) -> list[tuple[int, int]]:
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


def _phase_boundaries(events: Sequence[Any], step: tuple[int, int]) -> dict[Phase, int]:
    """When (ns) backward and the optimizer step began inside ``step``, from the marks."""
    boundaries = {}
    for phase, name in ((Phase.BACKWARD, _BACKWARD), (Phase.OPTIMIZER, _OPTIMIZER)):
        starts = [s for s, _ in _range_ns(events, name) if step[0] <= s <= step[1]]
        if starts:
            boundaries[phase] = min(starts)
    return boundaries


MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, before it adapts upwards


@lru_cache(maxsize=1)
def return_freed_memory_to_the_os() -> bool:
    """Keep glibc from holding on to freed blocks (issue 13: a packed LSTM's measured probe
    grew to 14.6 GB resident for a step whose peak is 49 MB). glibc raises its mmap
    threshold each time a large block is freed, after which blocks of that size come from
    the heap and stay in the process when freed; the profiler's memory events keep the
    allocation pattern fragmented enough that they are never trimmed. Fixing the threshold
    (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_=131072`` would) returns
    every large block to the OS when it is freed. True where it was set (glibc only)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside: the profiler's C++ side prints a
    ``USDT: ... profiler_start`` / ``profiler_stop`` line to it at each start and stop, which
    would litter the tool's output (a measured probe starts it a dozen times)."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding app): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def memory_profile() -> Iterator[profile]:
    """``torch.profiler.profile`` over the CPU with memory events, started and stopped
    without the profiler's own lines on stderr (errors from inside still raise)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)


def cpu_step_peak(task: Task, batch_size: int, *, seed: int = 0,
                  settings: StepSettings = StepSettings(), inputs: Any = None) -> StepPeak:
    """Peak bytes of training step 2 at ``batch_size``, measured on the real CPU allocator.

    The same step as ``simulate_step_peak``: build the model and optimizer, run step 1 (which
    creates optimizer state), then replay the allocator's events over step 2. All
    ``settings.accumulate`` micro-steps run here (the simulation runs two). Running out of
    memory raises the allocator's own error (``oom.is_oom_error``); any other failure of the
    step, a TaskError.
    """
    return_freed_memory_to_the_os()
    with young_gc_only(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with memory_profile() as prof:
            model, optimizer, batch, impl = _real_steps(task, batch_size, seed, settings, inputs)
    events = _kineto_events(prof)
    step = _range_ns(events, _STEP)[0]
    boundaries = _phase_boundaries(events, step)
    start_bytes, peaks = replay_phases(allocator_deltas(events), step, boundaries)
    # kernel_workspace_bytes stays None: the allocator cannot tell scratch from tensors.
    peak = step_peak(batch_size, model, optimizer, batch, start_bytes, peaks)
    return dataclasses.replace(peak, precision=settings.precision.value,
                               accumulate=settings.accumulate, optimizer_impl=impl.value,
                               parameter_dtype=parameter_dtype(model))


def _real_steps(task: Task, batch_size: int, seed: int, settings: StepSettings,
                inputs: Any) -> tuple[Any, Any, Any, Any]:
    try:
        batch = make_batch(task, batch_size, seed, inputs)
        model = task.model().train()  # a training step, as the simulation's (fake.py)
        if settings.shard is not None:  # one rank of a real FSDP2 run (under torchrun)
            from torch.distributed.device_mesh import init_device_mesh

            from .sharded import shard

            plan = settings.shard
            shard(model, plan, init_device_mesh("cpu", (plan.world_size,)) if plan.fsdp
                  else None)
        optimizer = task.make_optimizer(model.parameters(), task.lr)
        impl = run_as_on(optimizer, settings.target_device or "cpu")
        precision = settings.autocast_precision()
        options = dict(precision=precision, accumulate=settings.accumulate,
                       scaler=make_scaler(precision, "cpu"))
        marked, handles = with_phase_marks(
            task, optimizer, lambda: _mark(_BACKWARD), lambda: _mark(_OPTIMIZER)
        )
        x, y = batch
        train_step(model, optimizer, marked, x, y, **options)
        gc.collect()
        with record_function(_STEP):
            train_step(model, optimizer, marked, x, y, **options)
    except Exception as exc:
        if is_oom_error(exc):  # the caller's to handle: an OOM ends a measured series
            raise
        raise TaskError(
            f"the CPU training step at batch size {batch_size} failed: {one_line(exc)}"
        ) from exc
    for handle in handles:
        handle.remove()
    return model, optimizer, batch, impl


@contextmanager
def allocator_log() -> Iterator[list[int]]:
    """The CPU allocator's signed byte deltas while inside, in the order they happened.

    This uses the legacy (non-kineto) profiler: it starts in microseconds, where the first
    kineto session in a process takes seconds, and each thread's events come in recording
    order. It gives the same deltas as kineto for every kernel in ``KERNELS`` (checked against
    ``cpu_step_peak`` by the tests)."""
    from torch.autograd import _disable_profiler_legacy, _enable_profiler_legacy
    from torch.autograd.profiler_legacy import profile as legacy_profile

    deltas: list[int] = []
    _enable_profiler_legacy(legacy_profile(profile_memory=True).config())
    try:
        yield deltas
    finally:
        records = _disable_profiler_legacy()
        events = [(e.start_us(), thread, i, e.cpu_memory_usage())
                  for thread, events in enumerate(records) for i, e in enumerate(events)
                  if e.kind() == "memory_alloc"]
        deltas += [d for *_, d in sorted(events)]


def high_water(deltas: Sequence[int]) -> int:
    """The maximum of the running sum of ``deltas`` (and 0)."""
    level = peak = 0
    for d in deltas:
        level += d
        peak = max(peak, level)
    return peak
