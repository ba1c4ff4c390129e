"""Interleaved timing rounds, with step functions whose cost the test controls, and the CPU
thread setting."""

from __future__ import annotations

import time

import pytest
import torch

from bsselect.selection.steptime import summarize_rounds
from bsselect.selection.timing import (MAX_STEPS_PER_ROUND, ROUND_S, ROUNDS, RoundTiming,
                                       cpu_threads, default_threads, interleaved_rounds,
                                       progress_units, steps_per_round, usable_cpus)

TRUE = {8: 0.010, 16: 0.012, 32: 0.016, 64: 0.024}  # seconds per step, quiet


class Machine:
    """A virtual clock: a step of batch b costs TRUE[b] times the load factor in force when
    it starts; ``load(t)`` says how busy the machine is at virtual time t."""

    def __init__(self, load):
        self.now = 0.0
        self.load = load
        self.log: list[int] = []

    def stepper(self, b: int):
        def step() -> float:
            cost = TRUE[b] * self.load(self.now)
            self.now += cost
            self.log.append(b)
            return cost
        return step

    def steppers(self):
        return {b: self.stepper(b) for b in TRUE}


def test_quiet_machine_recovers_the_true_step_times():
    m = Machine(lambda t: 1.0)
    result = interleaved_rounds(m.steppers())
    for b, timing in result.items():
        assert timing.step.mid == pytest.approx(TRUE[b])
        assert len(timing.round_medians) == ROUNDS


def test_rounds_visit_every_size_in_rotated_order():
    m = Machine(lambda t: 1.0)
    interleaved_rounds(m.steppers(), rounds=4, warmup=1)
    sizes = sorted(TRUE)
    firsts, seen, i = [], [], 4  # after the four warm-up steps
    per_round = {b: steps_per_round(TRUE[b]) for b in sizes}
    for r in range(4):
        order = sizes[r:] + sizes[:r]
        firsts.append(m.log[i])
        for b in order:
            k = per_round[b]
            run = m.log[i:i + k + (1 if k > 1 else 0)]
            assert set(run) == {b}
            i += len(run)
        seen.append(order)
    assert firsts == [8, 16, 32, 64]
    assert i == len(m.log)


def test_a_slow_minute_hits_every_batch_size_alike():
    # The machine is 3x slower for a stretch in the middle of the timing (another job).
    # Timed one size after another, that stretch lands on whichever sizes run then and
    # reorders them; interleaved, each size keeps its quiet time within a few percent.
    total = sum(TRUE[b] * (steps_per_round(TRUE[b]) + 2) for b in TRUE) * ROUNDS

    def busy(t):
        return 3.0 if 0.3 * total <= t <= 0.6 * total else 1.0

    m = Machine(busy)
    result = interleaved_rounds(m.steppers())
    for b in TRUE:
        assert result[b].step.mid == pytest.approx(TRUE[b], rel=0.05)
    # The same load on sequential timing (all rounds of one size, then the next) is wrong.
    m2 = Machine(busy)
    sequential = {}
    for b in sorted(TRUE):
        step = m2.stepper(b)
        medians = []
        for _ in range(ROUNDS):
            k = steps_per_round(TRUE[b])
            medians.append(sorted(step() for _ in range(k))[k // 2])
        sequential[b] = summarize_rounds(medians).mid
    assert max(sequential[b] / TRUE[b] for b in TRUE) > 2.0


def test_steps_per_round_targets_round_s():
    assert steps_per_round(ROUND_S / 3) == 3
    assert steps_per_round(1e-6) == MAX_STEPS_PER_ROUND
    assert steps_per_round(10.0) == 1
    assert steps_per_round(float("nan")) == MAX_STEPS_PER_ROUND


def test_agree_and_progress():
    m = Machine(lambda t: 1.0)
    calls = []
    result = interleaved_rounds(m.steppers(), agree=lambda v: 2 * v,
                                on_step=lambda: calls.append(1))
    assert result[8].step.mid == pytest.approx(2 * TRUE[8])  # the slowest rank's, say
    assert len(calls) == progress_units(len(TRUE))
    with pytest.raises(ValueError):
        interleaved_rounds(m.steppers(), rounds=0)
    assert interleaved_rounds({}) == {}


def test_round_timing_round_trips_through_its_dict():
    m = Machine(lambda t: 1.0 + 0.1 * (int(t * 100) % 3))
    for timing in interleaved_rounds(m.steppers()).values():
        again = RoundTiming.from_dict(timing.to_dict())
        assert again == timing


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None) as n:
        assert n == before
    with pytest.raises(ValueError):
        with cpu_threads(0):
            pass
    assert default_threads() == max(1, usable_cpus() // 2)
    assert default_threads(local_processes=64) == 1


class _Waits(torch.nn.Module):
    """A step that waits 40 ms without working (as a thread does while the scheduler runs
    another process), fed by a loader that waits 10 ms for its batch (a disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.04)
        return self.lin(x)


def _waiting_batches():
    while True:
        time.sleep(0.01)
        yield torch.ones(8, 4), torch.zeros(8, dtype=torch.long)


def test_a_cpu_step_counts_its_threads_work_and_the_wall_time_of_its_fetch():
    """With one thread on a CPU, a step is timed by the thread's CPU time, so the time a
    busy machine gives other processes is not charged to it, while the fetch of its batch
    keeps its wall time (a loader that waits on a disk waits in the user's run too). With
    more threads the work is spread over them, and the step is timed by the wall clock."""
    from torch.utils.data import TensorDataset

    from bsselect import Task
    from bsselect.selection.trials import THREAD_CPU, WALL, _timed_step, step_clock

    task = Task(model=_Waits, loss_fn=torch.nn.functional.cross_entropy,
                train_data=TensorDataset(torch.ones(8, 4), torch.zeros(8, dtype=torch.long)))
    model, cpu = _Waits(), torch.device("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = _waiting_batches()
    with cpu_threads(1):
        assert step_clock(cpu) == THREAD_CPU
        seconds = min(_timed_step(model, optimizer, task, batches, cpu, {})[2]
                      for _ in range(3))
    assert 0.01 <= seconds < 0.04  # the fetch's 10 ms, not the forward's 40 ms wait
    assert step_clock(torch.device("meta")) == WALL
    with cpu_threads(2):
        assert step_clock(cpu) == WALL
        seconds = min(_timed_step(model, optimizer, task, batches, cpu, {})[2]
                      for _ in range(3))
    assert seconds >= 0.05
