"""After an out-of-memory error, memory is released once the exception is gone, and every
measured attempt starts from an empty cache.

Inside an ``except`` block the exception's traceback still holds the failed step's frames,
and so its tensors: ``empty_cache()`` there frees none of them, and the next attempt starts on
a cache fragmented by them. On an H100 that made the measured probe answer 69 where 112 trains
(docs/benchmarks-cuda.md). The seam: ``release_memory`` and the backend's ``release``, each
recording whether the failed attempt's tensor is still alive when it is called."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.memory import capacity, probe
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.measured import run_two_steps
from bsselect.memory.probe import Meter, Method, measure_points
from bsselect.selection import trials

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def failing_step(refs: list):
    """A measurement that holds a tensor in its frame and runs out of memory above b = 16."""
    def peak(b: int) -> int:
        held = torch.empty(1024)
        refs.append(weakref.ref(held))
        if b > 16:
            raise torch.OutOfMemoryError(OOM)
        return 1000 * b
    return peak


def recorder(refs: list, seen: list):
    return lambda: seen.append(refs[-1]() is not None)


def test_refine_releases_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    monkeypatch.setattr(capacity, "release_memory", recorder(refs, alive))
    result = capacity.refine_max_batch(failing_step(refs), 10**9, [(8, 8000), (16, 16000)],
                                       first_guess=64)
    assert result.batch_size == 16 and "oom" in [s.outcome for s in result.path]
    assert alive and not any(alive), "released while the failed step's tensor was alive"


def test_probe_points_release_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    monkeypatch.setattr(probe, "release_memory", recorder(refs, alive))
    points = measure_points(Meter(Method.measured, failing_step(refs)), [8, 16, 32, 64])
    assert points == [(8, 8000), (16, 16000)]
    assert alive == [False]


def test_a_trial_that_ran_out_releases_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    step = failing_step(refs)
    monkeypatch.setattr(trials, "_train", lambda setup, b, lr, on_step: step(b))
    monkeypatch.setattr(trials, "release_memory", recorder(refs, alive))
    result = trials.run_trial(None, 64, 0.1)
    assert result.status is trials.TrialStatus.oom and alive == [False]


class RecordingAllocator(CappedCpuAllocator):
    """The CPU test allocator, recording each release and whether the last model lives."""

    def __init__(self, events: list, models: list) -> None:
        super().__init__(2**40)
        self.events, self.models = events, models

    def release(self) -> None:
        self.events.append(("release", any(m() is not None for m in self.models)))


def test_every_measured_attempt_starts_from_a_released_cache():
    events, models = [], []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)

    def model():
        m = torch.nn.Linear(8, 2)
        events.append(("model", None))
        models.append(weakref.ref(m))
        return m

    task = Task(model=model, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.1)
    backend = RecordingAllocator(events, models)
    for b in (4, 8):
        run_two_steps(task, b, backend)
    kinds = [k for k, _ in events]
    # release, model, (steps), release; and again: each model is built right after a
    # release, and no release sees a model alive (the attempt's own is deleted first).
    assert kinds == ["release", "model", "release", "release", "model", "release"]
    assert not any(alive for kind, alive in events if kind == "release")
