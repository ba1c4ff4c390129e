"""Measured peak memory of a real training step, read from the device allocator.

Any backend with allocator statistics fits the :class:`AllocatorBackend` seam: the real one
uses the device-agnostic ``torch.accelerator.memory`` API (CUDA, ROCm, XPU, MPS, ...); tests
use a CPU backend that raises out-of-memory above a cap, through the same seam.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Any, ContextManager, Protocol

import torch

from ..errors import TaskError, one_line
from ..oom import is_oom_error
from ..precision import make_scaler
from ..step import StepSettings, make_batch, to_device, train_step
from ..task import Task


class AllocatorBackend(Protocol):
    """What the measured path needs from a device's allocator."""

    device: torch.device

    def reset_peak(self) -> None: ...

    def peak_bytes(self) -> int: ...

    def synchronize(self) -> None: ...

    def release(self) -> None: ...

    def session(self) -> ContextManager[None]:
        """Entered around model creation and both steps."""
        ...

    # Optional: ``oom_count() -> int | None``, out-of-memory errors raised so far
    # (find_batch_size takes a step that caught one itself as out of memory).


class AcceleratorAllocator:
    """The current accelerator's caching allocator (``torch.accelerator.memory``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset_peak(self) -> None:
        torch.accelerator.memory.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        # allocated, not reserved: reserved includes cache the next step can reuse.
        return int(torch.accelerator.memory.max_memory_allocated(self.device))

    def synchronize(self) -> None:
        torch.accelerator.synchronize(self.device)

    def release(self) -> None:
        torch.accelerator.memory.empty_cache()

    def oom_count(self) -> int | None:
        """Out-of-memory errors the allocator has raised (``num_ooms``; None where the
        backend does not count them): a step that catches one itself still counts."""
        try:
            value = torch.accelerator.memory.memory_stats(self.device).get("num_ooms")
        except (RuntimeError, AttributeError, TypeError):  # a backend without statistics
            return None
        return None if value is None else int(value)

    def session(self) -> ContextManager[None]:
        return nullcontext()


def run_two_steps(task: Task, batch_size: int, backend: AllocatorBackend, seed: int = 0,
                  settings: StepSettings = StepSettings(), inputs: Any = None) -> int:
    """Two real training steps at ``batch_size`` (the micro-batch) on ``backend.device``; the
    peak allocator bytes of either (the second's, by then the optimizer state exists, unless
    the first allocated more). ``settings``: precision and accumulation as the run will use
    them; ``inputs``: which items (the largest, for worst-case inputs). OOM errors propagate
    to the caller."""
    # Each attempt starts from an empty cache, as in a fresh process: blocks cached by an
    # earlier attempt (one that ran out of memory above all) fragment this one, whose
    # parameters land inside them. On an H100 the measured probe answered 69 where 112 trains
    # (docs/benchmarks-cuda.md).
    gc.collect()
    backend.release()
    torch.manual_seed(seed)
    model = optimizer = x = y = None
    try:
        with backend.session():
            model = task.model().to(backend.device).train()  # as fake.build_fake_model
            optimizer = task.make_optimizer(model.parameters(), task.lr)
            x, y = to_device(make_batch(task, batch_size, seed, inputs), backend.device)
            # fp16: a scaler that always steps, as the simulation's. A real GradScaler skips
            # the first steps while its scale overflows, so the optimizer's state never came
            # into being, and the answer ran out of memory at the run's fifth step (review).
            options = dict(precision=settings.precision, accumulate=settings.accumulate,
                           scaler=make_scaler(settings.precision, backend.device.type,
                                              simulated=True))
            backend.reset_peak()
            train_step(model, optimizer, task, x, y, **options)
            backend.synchronize()
            first = backend.peak_bytes()  # a peak of step 1 alone (a codebook initialised
            backend.reset_peak()          # from the first batch) counts too (review)
            train_step(model, optimizer, task, x, y, **options)
            backend.synchronize()
            return max(first, backend.peak_bytes())
    except Exception as exc:
        if is_oom_error(exc):
            raise
        raise TaskError(f"a training step at batch {batch_size} failed: {one_line(exc)}") from exc
    finally:
        del model, optimizer, x, y
        backend.release()
