"""After an out-of-memory error, memory is released once the exception is gone, and every
measured attempt starts from an empty cache.

Inside an ``except`` block the exception's traceback still holds the failed step's frames,
and so its tensors: ``empty_cache()`` there frees none of them, and the next attempt starts on
a cache fragmented by them. On an H100 that made the measured probe answer 69 where 112 trains
(docs/benchmarks-cuda.md). The seam: ``release_memory`` and the backend's ``release``, each
recording whether the failed attempt's tensor is still alive when it is called."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.device import Budget
from bsselect.errors import TaskError
from bsselect.memory import capacity, probe
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.measured import run_two_steps
from bsselect.memory.probe import Meter, Method, measure_points
from bsselect.selection import noise, schedule, sweep, trials

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
    # release, and no release sees a model alive (the attempt's own is deleted first). These
    # attempts succeed; test_every_model_after_an_oom_... runs ones that run out.
    assert kinds == ["release", "model", "release", "release", "model", "release"]
    assert not any(alive for kind, alive in events if kind == "release")


def test_sweep_timing_failure_releases_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    step = failing_step(refs)
    monkeypatch.setattr(sweep, "time_batch_sizes", lambda setup, sizes, on_step: step(64))
    monkeypatch.setattr(sweep, "timing_plan", lambda ok: (8, 16))
    monkeypatch.setattr(sweep, "release_memory", recorder(refs, alive))
    ok = {b: SimpleNamespace(ok=True) for b in (8, 16)}
    timing, note = sweep._time_ok_trials(None, ok, sweep.SweepHooks())
    assert timing == {} and "interleaved timing failed" in note and alive == [False]


def test_trial_noise_fallback_releases_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    step = failing_step(refs)
    monkeypatch.setattr(noise, "default_batch_sizes",
                        lambda task, b_small=None: (b_small or 32, 64))
    monkeypatch.setattr(trials, "_estimate_noise",
                        lambda setup, model, bs, bb, seed: step(bs))
    monkeypatch.setattr(trials, "release_memory", recorder(refs, alive))
    assert trials.measure_trial_noise(SimpleNamespace(task=None, seed=0), None, 8) == 8000
    assert alive == [False]  # one release, after the 32 ran out


def test_schedule_noise_point_releases_after_the_exception_is_gone(monkeypatch):
    refs, alive = [], []
    step = failing_step(refs)
    monkeypatch.setattr(schedule, "default_batch_sizes", lambda task: (32, 64))
    monkeypatch.setattr(noise, "estimate_noise", lambda *a, **k: step(64))
    monkeypatch.setattr(schedule, "release_memory", recorder(refs, alive))
    data = object()  # the trials' items are the task's: no held-out split to leave out
    setup = SimpleNamespace(task=SimpleNamespace(train_data=data), train_data=data,
                            precision=None)
    failed: list[str] = []
    assert schedule._noise_at(setup, None, 2, 0, failed) is None and alive == [False]
    assert failed == []  # out of memory: no failure to report, the point stands without it


def _agreed_oom(step):
    """What torchrun's agreement raises on every rank: a new OOM from the rank's own."""
    def run(setup, sizes, on_step):
        try:
            step(64)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(f"rank 0: {exc}") from exc
    return run


@pytest.mark.parametrize("agreed", [False, True], ids=["one process", "torchrun"])
def test_schedule_timing_failure_frees_the_step_before_it_is_reported(monkeypatch, agreed):
    """The schedule ends with a TaskError whose cause is the OOM; that cause (and, under
    torchrun, the rank's own OOM it was raised from) must not keep the failed step's frames
    and tensors alive while the caller holds the error."""
    refs, alive = [], []
    step = failing_step(refs)
    monkeypatch.setattr(schedule, "time_batch_sizes",
                        _agreed_oom(step) if agreed
                        else lambda setup, sizes, on_step: step(64))
    monkeypatch.setattr(schedule, "release_memory", recorder(refs, alive))
    with pytest.raises(TaskError, match="timing the batch sizes") as caught:
        schedule._timing(None, [8, 64], schedule.ScheduleHooks())
    assert alive == [False]
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert refs[-1]() is None  # still freed while the error is held


def test_every_model_after_an_oom_is_built_on_a_released_cache(monkeypatch):
    """The measured probe end to end on the capped CPU allocator, with attempts that really
    run out of memory (in the series and in the refinement)."""
    models, events = [], []

    def alive():
        return any(m() is not None for m in models)

    class Recording(CappedCpuAllocator):
        def release(self):
            events.append(("release", alive()))

    for mod in (capacity, probe):
        real = mod.release_memory
        monkeypatch.setattr(mod, "release_memory",
                            lambda real=real: (events.append(("release", alive())), real()))

    def model():
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 2))
        events.append(("model", alive()))
        models.append(weakref.ref(m))
        return m

    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    task = Task(model=model, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.1)
    cap = 4 * 2**20
    backend = Recording(cap)
    result = probe.run_probe(task, task_name="t", device=torch.device("cpu"),
                             budget=Budget(cap, "cap"), method=Method.measured, margin=0.0,
                             batch_sizes=(8, 16, 32, 4096), backend=backend)
    assert backend.ooms >= 2  # the series and the refinement both ran out
    assert "oom" in [s["outcome"] for s in result.confirmation]
    for i, (kind, _) in enumerate(events):
        if kind == "model":
            assert i > 0 and events[i - 1] == ("release", False), events[:i + 1]


class _AllocatorFailsAbove16(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 16:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 1073741824 bytes. Error code 12")
        return self.lin(x)


def test_a_cpu_allocator_failure_ends_the_measured_series_instead_of_the_probe():
    """On the CPU's measured path a real allocator failure is an OOM like any other (it was
    wrapped in a TaskError that ended the probe with an error)."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    task = Task(model=_AllocatorFailsAbove16, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.1)
    result = probe.run_probe(task, task_name="t", device=torch.device("cpu"),
                             budget=Budget(2**30, "x"), method=Method.measured,
                             batch_sizes=(8, 16, 32, 64))
    assert result.max_batch == 16
