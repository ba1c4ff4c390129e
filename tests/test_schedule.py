"""``bsselect schedule``: the pure decisions exhaustively, the measurement on tiny real tasks
(tests/tasks/sweep_tasks.py) in process, resume from a journal cut short, and the command in
a subprocess for its JSON and exit codes. Nothing asserts on a duration or on which batch
comes out fastest (that depends on the machine's step times)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from bsselect.errors import UsageError
from bsselect.selection.lr_scaling import LrScaling
from bsselect.selection.schedule import (BatchSchedule, Branch, Prediction, SchedulePoint,
                                         ScheduleSettings, Stage, branch_sizes, critical_batch,
                                         fastest_batch, growth_exponent, informative,
                                         no_worse_than_fixed, plan_stages, point_fastest,
                                         point_ratios, predict_fixed, relative_samples,
                                         run_schedule, stage_batches, stage_lengths)
from bsselect.selection.trial_types import TrialResult, TrialStatus
from bsselect.selection.lr_scaling import trial_lr
from bsselect.selection.steptime import TimeInterval

TASKS = Path(__file__).parent / "tasks" / "sweep_tasks.py"
sys.path.insert(0, str(TASKS.parent))
import sweep_tasks  # noqa: E402

CPU = torch.device("cpu")


# --- pure decisions ----------------------------------------------------------------------------

def test_critical_batch_is_the_largest_within_tolerance_of_the_smallest():
    drops = {8: 1.0, 16: 0.95, 32: 0.91, 64: 0.5, 128: None}
    assert critical_batch(drops, 0.1) == 32
    assert critical_batch(drops, 0.04) == 8
    assert critical_batch(drops, 0.06) == 16
    # the reference is the smallest batch that made progress; a later recovery still counts
    assert critical_batch({8: None, 16: -0.1, 32: 0.4, 64: 0.39, 128: 0.1}, 0.1) == 64
    assert critical_batch({8: 1.0, 16: 0.2, 32: 0.95}, 0.1) == 32
    assert critical_batch({8: None, 16: 0.0}, 0.1) is None


def test_fastest_batch_takes_the_largest_positive_rate_and_the_larger_batch_on_ties():
    assert fastest_batch({8: 1.0, 16: 3.0, 32: 2.0}) == 16
    assert fastest_batch({8: 2.0, 16: 2.0}) == 16
    assert fastest_batch({8: None, 16: -1.0}) is None
    assert fastest_batch({}) is None


@pytest.mark.parametrize("fastest", list(itertools.product([None, 8, 16, 32, 64], repeat=4)))
def test_stage_batches_never_shrink_and_stay_powers_of_two(fastest):
    out = stage_batches(list(fastest), 32)
    assert len(out) == len(fastest)
    assert all(b > 0 and b & (b - 1) == 0 for b in out)
    assert out == sorted(out)
    known = [b for b in fastest if b]
    if known:  # isotonic: within the range of what was measured
        assert min(known) <= out[0] and out[-1] <= max(known)
        if known == sorted(known) and None not in fastest:
            assert out == list(fastest)  # already non-decreasing: kept as measured
    else:
        assert out == [32] * len(fastest)


def test_stage_batches_one_noisy_point_does_not_set_the_rest():
    # 128 at the second point, then 16s: pooled with them (log2 mean 4.75 -> 32), not
    # carried forward as 128
    assert stage_batches([16, 128, 16, 16, 16], 32) == [16, 32, 32, 32, 32]
    assert stage_batches([None, None, 16, 32], 64) == [16, 16, 16, 32]
    assert stage_batches([16, 32, 128, 64, 128], 32) == [16, 32, 128, 128, 128]


def test_stage_batches_round_to_the_sizes_measured():
    """Sizes that are not powers of two (5 ranks: 40, 80, 160): rounding to powers of two
    took every point's 80 for 64, and the plan for 40 (review)."""
    assert stage_batches([80, 80, 80], 40, sizes=[40, 80, 160]) == [80, 80, 80]
    assert stage_batches([40, 80, 160], 40, sizes=[40, 80, 160]) == [40, 80, 160]
    assert stage_batches([48, 48], 48, sizes=[48, 64]) == [48, 48]
    assert stage_batches([26, 262], 26, sizes=[26, 262]) == [26, 262]


def test_stage_batches_weigh_points_by_the_run_they_cover():
    # an early outlier covering 1/16 of the run pools into the later points' level
    assert stage_batches([256, 32, 32, 32, 32], 32, [1, 1, 2, 4, 8]) == [32] * 5
    assert stage_batches([256, 32, 32, 32, 32], 32) == [64] * 5  # unweighted: 2^5.6
    # weights only matter where the sequence must pool
    assert stage_batches([16, 32, 64], 32, [1, 100, 1]) == [16, 32, 64]
    with pytest.raises(ValueError):
        stage_batches([16, 32], 32, [1.0])


def _trial(b: int, drop: float | None, status: TrialStatus = TrialStatus.ok) -> TrialResult:
    if drop is None:
        return TrialResult(batch_size=b, lr=0.1, status=TrialStatus.diverged, steps=1,
                           samples=b, wall_s=0.0, error="x")
    return TrialResult(batch_size=b, lr=0.1, status=status, steps=4, samples=4 * b, wall_s=0.0,
                       train_loss_start=2.0, train_loss_end=2.0 - drop, step_time_s=0.01)


def _point(samples: int, drops: dict[int, float | None], fastest: int | None) -> SchedulePoint:
    branches = tuple(Branch(_trial(b, d), d, None if d is None else d / b) for b, d in drops.items())
    return SchedulePoint(samples, samples // 32, branches, None, None, fastest)


def test_relative_samples_and_the_prediction_for_a_fixed_batch():
    p0 = _point(0, {32: 1.0, 64: 0.5, 128: None}, 32)
    p1 = _point(100, {32: 1.0, 64: 1.0, 128: 0.25}, 64)
    assert relative_samples(p0, 64, 32) == 2.0
    assert relative_samples(p0, 128, 32) == math.inf
    # where the base batch's branch made no progress the point measures no ratio (was: 1.0)
    assert relative_samples(_point(0, {32: None, 64: 0.5}, 64), 64, 32) is None
    assert stage_lengths([p0, p1], 400) == [100, 300]
    pred = predict_fixed([p0, p1], 400, 64, 32, step_time_s=0.5)
    assert pred.samples == pytest.approx(100 * 2 + 300 * 1)
    assert pred.steps == pytest.approx(500 / 64)
    assert pred.time_s == pytest.approx(500 / 64 * 0.5)
    assert predict_fixed([p0, p1], 400, 32, 32, 0.25).samples == 400
    assert math.isinf(predict_fixed([p0, p1], 400, 128, 32, 1.0).time_s)


def test_a_point_where_the_base_batch_lost_ground_rules_no_batch_in_or_out():
    """Review F4 (bench logreg): at run sample 1,024 every branch's drop was noise around 0
    and the base batch 32's was -0.038; 64's -0.033 made 64 "not predictable" for the whole
    run (inf) while 32 kept r = 1 by definition, and 16's +0.01 was credited with the base
    run's progress (r = 1). Such a point says nothing about relative rates: it takes the
    ratios of the point before, for every batch alike."""
    points = [_point(0, {16: 0.14, 32: 0.11, 64: 0.09}, 16),
              _point(512, {16: 0.087, 32: 0.042, 64: 0.056}, 16),
              _point(1024, {16: 0.0097, 32: -0.038, 64: -0.033}, 16),
              _point(2048, {16: 0.066, 32: 0.032, 64: 0.024}, 16)]
    assert [informative(p, 32) for p in points] == [True, True, False, True]
    assert relative_samples(points[2], 64, 32) is None
    assert relative_samples(points[2], 16, 32) is None
    assert relative_samples(points[2], 32, 32) == 1.0  # the base run's progress, by definition
    assert point_ratios(points, 64, 32) == pytest.approx(
        [0.11 / 0.09, 0.042 / 0.056, 0.042 / 0.056, 0.032 / 0.024])
    assert point_ratios(points, 16, 32)[2] == pytest.approx(0.042 / 0.087)
    pred = predict_fixed(points, 4096, 64, 32, step_time_s=1.0)
    lengths = [512, 512, 1024, 2048]
    assert math.isfinite(pred.samples)  # was inf: one noise point ruled 64 out
    assert pred.samples == pytest.approx(sum(L * r for L, r in zip(
        lengths, point_ratios(points, 64, 32))))
    # a batch that lost ground where the base batch made progress is still not finite
    lost = [*points[:3], _point(2048, {16: 0.066, 32: 0.032, 64: -0.02}, 16)]
    assert math.isinf(predict_fixed(lost, 4096, 64, 32, 1.0).samples)
    # before the first informative point: its ratios; none informative: only b0 is predicted
    first_silent = [points[2], points[3]]
    assert point_ratios(first_silent, 64, 32) == pytest.approx([0.032 / 0.024] * 2)
    assert point_ratios([points[2]], 64, 32) == [math.inf]
    assert predict_fixed([points[2]], 4096, 32, 32, 1.0).samples == 4096 - 1024
    assert point_fastest(points[2], 32, {b: TimeInterval(1, 1, 1) for b in (16, 32, 64)}) \
        is None


def _timed_point(drops: dict[int, float], steps: dict[int, int]) -> SchedulePoint:
    branches = tuple(Branch(dataclasses.replace(_trial(b, d), steps=steps[b]), d, None)
                     for b, d in drops.items())
    return SchedulePoint(512, 16, branches, None, None, None)


def test_the_fastest_batch_does_not_follow_timing_noise():
    """Two runs of one command and seed gave different plans (review F4: a split at 2,048 or
    4,096): the drops are the same every run, the step times are not. Batch sizes whose drop
    per second can be the largest within the timing rounds' spread are tied, and the tied
    batch with the largest drop is the fastest, whichever clock reading came out ahead."""
    point = _timed_point({16: 0.066, 32: 0.032, 64: 0.024}, {16: 32, 32: 16, 64: 8})
    picks = set()
    for t32 in (0.95, 1.0, 1.05):  # 32's step time moves within its rounds' spread
        times = {16: TimeInterval(0.45, 0.5, 0.55), 32: TimeInterval(0.9, t32, 1.1),
                 64: TimeInterval(1.8, 2.0, 2.2)}
        # drop per second at mid: 16 0.0041, 32 0.0020: 16 ahead beyond the spread
        picks.add(point_fastest(point, 32, times))
    assert picks == {16}
    # 16 and 32 within each other's spread: the larger drop (16's) whichever mid is faster
    near = _timed_point({16: 0.064, 32: 0.060, 64: 0.01}, {16: 32, 32: 16, 64: 8})
    for t16, t32 in ((0.5, 0.90), (0.5, 1.0), (0.45, 1.0)):
        times = {16: TimeInterval(0.4, t16, 0.55), 32: TimeInterval(0.85, t32, 1.1),
                 64: TimeInterval(1.8, 2.0, 2.2)}
        assert point_fastest(near, 32, times) == 16
    # clearly apart: the clock decides, as it should
    times = {16: TimeInterval(0.99, 1.0, 1.01), 32: TimeInterval(0.99, 1.0, 1.01),
             64: TimeInterval(0.99, 1.0, 1.01)}
    assert point_fastest(near, 32, times) == 32  # 0.060 / 16 steps > 0.064 / 32 steps


def test_a_plan_and_a_fixed_batch_are_predicted_by_one_rule():
    """Whatever the drops (a branch's drop at a late point is noise around 0, either sign),
    a plan that is one batch throughout is predicted exactly as that fixed batch: the same
    finite number, or not finite for both — never a saving over itself."""
    import random

    rng = random.Random(7)
    sizes, b0, horizon = (16, 32, 64), 32, 1000
    times = {16: 0.1, 32: 0.15, 64: 0.25}
    for _ in range(2000):
        points = []
        for k, samples in enumerate((0, 125, 250, 500)):
            drops = {b: rng.choice([None, -0.01, 0.0, rng.uniform(0.01, 1.0)]) for b in sizes}
            points.append(_point(samples, drops, rng.choice([None, *sizes])))
        stages = plan_stages(points, horizon, b0, times, lambda b: b / 320)
        assert all(relative_samples(p, b0, b0) == 1.0 for p in points)
        total = sum(st.steps for st in stages)
        if len(stages) == 1:
            b = stages[0].batch_size
            fixed = predict_fixed(points, horizon, b, b0, times[b])
            assert (total == pytest.approx(fixed.steps) if math.isfinite(fixed.steps)
                    else math.isinf(total))
        for st in stages:
            json.dumps(st.to_json(), allow_nan=False)  # not-finite stages are JSON-safe


def test_batch_schedule_refuses_samples_it_cannot_place():
    schedule = BatchSchedule((Stage(0.0, 0, 32, 0.1, 100.0, 3.0, 0.1),), 0, 0.1)
    for bad in (math.inf, math.nan, -1, "10"):
        with pytest.raises(ValueError):
            schedule.lr_at(bad)
        with pytest.raises(ValueError):
            schedule.batch_size_at(bad)
    assert schedule.batch_size_at(0) == 32 and schedule.lr_at(50.5) == pytest.approx(0.1)


def test_plan_stages_merges_equal_batches_and_predicts_each_stage():
    points = [_point(0, {32: 1.0, 64: 0.5}, 32), _point(100, {32: 1.0, 64: 1.0}, 64),
              _point(200, {32: 1.0, 64: 0.8}, 64)]
    times = {32: 0.1, 64: 0.15}
    stages = plan_stages(points, 400, 32, times, lambda b: b / 320)
    assert [s.batch_size for s in stages] == [32, 64]
    first, second = stages
    assert (first.start_samples, first.samples, first.steps) == (0, 100, 100 / 32)
    assert second.start_samples == 100 and second.base_samples == 100
    assert second.samples == pytest.approx(100 * 1.0 + 200 * 1.25)
    assert second.steps == pytest.approx(350 / 64)
    assert second.time_s == pytest.approx(350 / 64 * 0.15)
    assert second.lr == pytest.approx(0.2)


def test_growth_exponent_recovers_a_power_law_and_needs_two_points():
    xs = [0, 100, 200, 400, 800]
    assert growth_exponent(xs, [None, 10, 10 * 2 ** 0.5, 20, 20 * 2 ** 0.5]) == pytest.approx(0.5)
    assert growth_exponent(xs, [5, None, None, None, 7]) is None  # 0 samples: not on a log axis
    assert growth_exponent([100, 100], [1, 2]) is None
    assert growth_exponent(xs[1:], [3.7] * 4) == 0.0  # exactly: 8e-17 in the JSON (review)


def test_batch_schedule_follows_stages_and_ramps_like_the_trials():
    stages = (Stage(0, 0, 64, 0.2, 640, 10, 1.0), Stage(640, 100, 128, 0.4, 1280, 10, 1.0))
    sched = BatchSchedule(stages, lr_ramp_samples=256, base_lr=0.1)
    assert sched.batch_size_at(0) == 64 and sched.batch_size_at(639) == 64
    assert sched.batch_size_at(640) == 128
    for step in range(8):  # the first stage ramps from the task's lr exactly as a trial does
        assert sched.lr_at(step * 64) == pytest.approx(trial_lr(step, 0.2, 64, 0.1, 0, 256))
    assert sched.lr_at(640) == pytest.approx(0.2 + 0.2 * 0.5)  # ramp of 2 steps at 128
    assert sched.lr_at(640 + 128) == pytest.approx(0.4)
    assert BatchSchedule(stages).lr_at(0) == 0.2  # no ramp asked


@pytest.mark.parametrize("kwargs, message", [
    (dict(horizon=0), "--horizon"), (dict(points=1), "--points"),
    (dict(tolerance=1.5), "--tolerance"), (dict(noise_measurements=3), "--noise-measurements"),
    (dict(branch_samples=-1), "--branch-samples"),
    # 10**8 points built a list of 10**8 samples (memory without bound; CLI review 8)
    (dict(points=10**8), "at most 11 of them"),
])
def test_settings_refuse_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ScheduleSettings(**{"horizon": 1024, **kwargs})


def test_points_are_geometric_and_branch_sizes_take_enough_steps():
    s = ScheduleSettings(horizon=1600)
    assert s.point_samples() == [0, 100, 200, 400, 800] and s.branch == 100
    assert branch_sizes([8, 16, 32, 64], 100, 32) == ([8, 16, 32], [64])
    assert branch_sizes([8, 16], 100, 32) == ([8, 16, 32], [])  # the base batch is kept


# --- on a real tiny task --------------------------------------------------------------------

def _settings(**kw) -> ScheduleSettings:
    return ScheduleSettings(**{"horizon": 2048, "lr_scaling": LrScaling.linear,
                               "noise_measurements": 4, "lr_ramp_samples": 64, **kw})


def test_run_schedule_on_a_tiny_task(tmp_path):
    task = sweep_tasks.tiny()
    result = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                          device=CPU, journal_path=tmp_path / "j.jsonl", threads=1)
    js = result.to_json()
    assert [p["samples"] for p in js["points"]] == [0, 128, 256, 512, 1024]
    assert result.batch_sizes == (8, 16, 32)
    for p in result.points:
        assert [br.trial.batch_size for br in p.branches] == [8, 16, 32]
        for br in p.branches:
            assert br.trial.samples >= 128  # the equal sample budget, whole batches
            if br.trial.ok:
                assert br.drop == pytest.approx(br.trial.train_loss_start - br.trial.train_loss_end)
        assert p.noise is not None and p.noise["measurements"] == 4
    later = [p.branches[0].trial.train_loss_start for p in result.points]
    assert later[-1] < later[0]  # the base run trained between the points
    for p in result.points:  # a point where the base batch lost ground decides nothing
        if not informative(p, task.base_batch_size):
            assert p.fastest_batch_size is None
            assert any(f"run sample {p.samples:,}" in n for n in result.notes)
        elif p.fastest_batch_size is not None:
            assert p.drop_of(p.fastest_batch_size) > 0
    sizes = [s.batch_size for s in result.schedule.stages]
    assert sizes == sorted(sizes) and set(sizes) <= {8, 16, 32}
    assert sum(s.samples for s in result.schedule.stages) == pytest.approx(js["predicted"]["samples"])
    assert js["fixed"][str(task.base_batch_size)]["samples"] == pytest.approx(2048)
    json.dumps(js, allow_nan=False)  # JSON-safe


def test_every_branch_of_a_point_trains_the_same_samples(tmp_path):
    """A branch of 200 samples took whole steps: 200, 208 and 224 samples at 8, 16 and 32,
    and the larger batches' drops were compared on up to 12% more data (review)."""
    task = sweep_tasks.tiny()
    result = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32, 4096],
                          settings=_settings(branch_samples=200, noise_measurements=0),
                          device=CPU, journal_path=tmp_path / "j.jsonl", threads=1)
    for p in result.points:
        assert {br.trial.samples for br in p.branches if br.trial.ok} == {224}
    assert any("each branch trains 224 samples: 200 rounded up" in n for n in result.notes)
    # A size past the training set is left out, and said (it was left out in silence).
    assert result.batch_sizes == (8, 16, 32)
    assert any(n.startswith("batch sizes [4096] left out: larger than the") for n in result.notes)


@pytest.mark.parametrize("dropout", [False, True])
def test_resume_reruns_only_what_the_journal_lacks(tmp_path, dropout):
    """With dropout too: the base run has its own random stream, so skipping journaled
    branches on resume does not move it (review: a resumed plan mixed branches from two base
    states, 0.63x the steps against 1.0x uninterrupted)."""
    task = sweep_tasks.tiny()
    if dropout:
        inner = task.model
        task = dataclasses.replace(task, model=lambda: torch.nn.Sequential(
            torch.nn.Dropout(0.3), inner()))
    path = tmp_path / "j.jsonl"
    first = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                         device=CPU, journal_path=path, threads=1)
    lines = path.read_text().splitlines()
    # keep the header and the first point's noise and branches; cut the next line in half
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    again = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                         device=CPU, journal_path=path, resume=True, threads=1)
    assert again.resumed == 3
    for a, b in zip(first.points, again.points):  # the base run and branches are deterministic
        assert [x.drop for x in a.branches] == pytest.approx([x.drop for x in b.branches])
        assert a.samples == b.samples
    with pytest.raises(UsageError, match="already exists"):
        run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                     device=CPU, journal_path=path, threads=1)
    with pytest.raises(UsageError):  # other settings: refused, not mixed
        run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32],
                     settings=_settings(horizon=4096), device=CPU, journal_path=path,
                     resume=True, threads=1)


def test_resume_runs_a_failed_branch_again(tmp_path):
    """As sweep --resume: a branch the journal holds as failed (error, out of memory) runs
    again, and a note says so; the others are kept (review: kept, and called "made no
    progress")."""
    task = sweep_tasks.tiny()
    path = tmp_path / "j.jsonl"
    first = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                         device=CPU, journal_path=path, threads=1)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        if "branch" in record and record["branch"]["trial"]["batch_size"] == 16:
            record["branch"]["trial"].update(status="error", error="a bug since fixed")
            lines[i] = json.dumps(record)
            point = record["branch"]["point"]
            break
    path.write_text("\n".join(lines) + "\n")
    again = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                         device=CPU, journal_path=path, resume=True, threads=1)
    assert f"--resume ran again the branches the journal held as failed: point {point} b=16 " \
        "(error)" in " ".join(again.notes)
    branches = sum(1 for line in lines if "branch" in json.loads(line))
    assert again.resumed == branches - 1  # every other branch kept
    statuses = [b.trial.status.value for p in again.points for b in p.branches]
    assert statuses == [b.trial.status.value for p in first.points for b in p.branches]


def test_too_short_a_branch_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="can branch"):
        run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[64, 128],
                     settings=_settings(horizon=1024), device=CPU,
                     journal_path=tmp_path / "j.jsonl", threads=1)
    # The base batch is every point's reference, so the 4-step rule holds for it too: a
    # branch it takes 1 step of cannot decide the plan.
    with pytest.raises(UsageError, match="a branch of 16 samples gives the base batch size 16 "
                                         "fewer than 4 steps"):
        run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[8],
                     settings=_settings(horizon=256), device=CPU,
                     journal_path=tmp_path / "k.jsonl", threads=1)
    assert not (tmp_path / "k.jsonl").exists()  # refused before anything ran


def test_points_within_one_base_step_are_measured_once(tmp_path):
    # horizon 2048, 10 points: 0, 4, 8, 16, ... samples; the base batch is 16, so 4, 8 and 16
    # are all reached by its first step.
    result = run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[8, 16, 32],
                          settings=_settings(points=10, noise_measurements=0), device=CPU,
                          journal_path=tmp_path / "j.jsonl", threads=1)
    steps = [p.base_steps for p in result.points]
    assert steps == sorted(set(steps)) and steps[:3] == [0, 1, 2]
    assert "2 of the 10 points fell on the base step of the point before" in " ".join(
        result.notes)


# --- the command ------------------------------------------------------------------------------

def test_cli_schedule_json_and_table(tmp_path):
    task = f"{TASKS}:tiny"
    proc = run_cli("schedule", task, "--horizon", "1024", "--batch-sizes", "8,16,32",
                   "--noise-measurements", "4", "--journal", str(tmp_path / "j.jsonl"),
                   "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    assert js["horizon_samples"] == 1024 and len(js["points"]) == 5
    assert js["stages"] and js["stages"][0]["start_samples"] == 0
    table = run_cli("schedule", task, "--horizon", "1024", "--batch-sizes", "8,16,32",
                    "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"),
                    "--threads", "1", "--overwrite")
    assert table.returncode == 0, table.stderr
    assert "Schedule" in table.stdout and "predicted for the schedule" in table.stdout
    # what is about to run, said before it runs (review: hours of work started in silence),
    # and which of the sizes asked for it leaves out (said only at the end, before: review)
    assert (f"planning {task}: horizon 1,024 samples, 5 points, branches of 64 samples at "
            f"batch sizes [8, 16] (32 left out: fewer than 4 steps per branch), journal "
            f"{tmp_path / 'j.jsonl'}"
            in " ".join(table.stderr.split()))


@pytest.mark.parametrize("args, code, text", [
    (["--points", "1"], 2, "--points must be at least 2"),
    (["--tolerance", "0"], 2, "--tolerance"),
    (["--resume", "--overwrite"], 2, "exclude each other"),
    (["--batch-sizes", "512,1024", "--horizon", "1024"], 2, "can branch"),
    (["--branch-samples", "0"], 2, "--branch-samples must be an integer >= 1"),
])
def test_cli_schedule_bad_input(tmp_path, args, code, text):
    proc = run_cli("schedule", f"{TASKS}:tiny", "--journal", str(tmp_path / "j.jsonl"), *args)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr and "Traceback" not in proc.stderr


def test_a_malformed_journal_record_is_measured_again_with_a_note(tmp_path):
    task = sweep_tasks.tiny()
    path = tmp_path / "j.jsonl"
    run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                 device=CPU, journal_path=path, threads=1)
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"branch": {"trial": {"batch_size": "x"}}})  # no point, bad trial
    path.write_text("\n".join(lines) + "\n")
    again = run_schedule(task, task_name="tiny", batch_sizes=[8, 16, 32], settings=_settings(),
                         device=CPU, journal_path=path, resume=True, threads=1)
    assert any("branch record of the journal was skipped" in n for n in again.notes)
    assert again.resumed == 14 and all(len(p.branches) == 3 for p in again.points)
    assert all(br.trial.val_loss is None for p in again.points for br in p.branches)


def test_report_says_a_schedule_journal_is_not_a_sweeps(tmp_path):
    path = tmp_path / "j.jsonl"
    run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[8, 16],
                 settings=_settings(noise_measurements=0), device=CPU, journal_path=path,
                 threads=1)
    proc = run_cli("report", str(path))
    assert proc.returncode == 2 and "bsselect schedule` journal" in proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr


# --- from the user's checkpoints --------------------------------------------------------------

def _base_run_checkpoints(tmp_path, settings: ScheduleSettings, batch_sizes, with_step=True):
    """The base run that ``run_schedule`` itself trains, saved at its points as a user's
    checkpoints would be (weights, optimizer state, step): the independent truth for the
    checkpoint route is the base-run route."""
    from bsselect.selection.schedule import ScheduleHooks, _base_run
    from bsselect.selection.sweep import SweepSettings, make_setup
    from bsselect.selection.trials import EVAL_BATCH, BudgetKind, TrialBudget

    task = sweep_tasks.tiny()
    sweep_like = SweepSettings(budget=TrialBudget(BudgetKind.samples, settings.branch),
                               lr_scaling=settings.lr_scaling, seed=settings.seed,
                               lr_ramp_samples=settings.lr_ramp_samples)
    setup, _ = make_setup(task, sweep_like, CPU, min(EVAL_BATCH, *batch_sizes))
    paths = []
    for samples, steps, _, mstate, ostate in _base_run(setup, settings.point_samples()[1:],
                                                       ScheduleHooks()):
        path = tmp_path / f"step-{steps}.pt"
        entry = {"model": mstate, "optimizer": ostate}
        if with_step:
            entry["step"] = steps
        torch.save(entry, path)
        paths.append(path)
    return paths


def test_schedule_at_the_users_checkpoints_equals_the_base_runs_schedule(tmp_path):
    """Checkpoints of the base run at the base run's points give the same branches, noise
    points and plan as the base-run route: the checkpoints are read, matched and branched
    exactly (weights and momentum)."""
    from bsselect import api

    sizes = [8, 16, 32]
    base = api.schedule(f"{TASKS}:tiny", batch_sizes=sizes, noise_measurements=4, horizon=2048,
                        journal=tmp_path / "base.jsonl", threads=1, device="cpu")
    paths = _base_run_checkpoints(tmp_path, base.settings, sizes)
    result = api.schedule(f"{TASKS}:tiny", batch_sizes=sizes, noise_measurements=4,
                          from_checkpoints=[str(p) for p in reversed(paths)],  # any order
                          journal=tmp_path / "ck.jsonl", threads=1, device="cpu")
    assert result.settings.horizon == 2048  # twice the last checkpoint's 1,024 samples
    assert [p.samples for p in result.points] == [p.samples for p in base.points]
    assert [p.checkpoint for p in result.points] == [None] + [str(p) for p in paths]
    for a, b in zip(base.points, result.points):
        assert [x.drop for x in b.branches] == pytest.approx([x.drop for x in a.branches],
                                                             rel=1e-5)
        assert b.noise["b_simple"] == pytest.approx(a.noise["b_simple"], rel=1e-4)
    js = result.to_json()
    assert [c["samples"] for c in js["from_checkpoints"]] == [128, 256, 512, 1024]
    assert all(len(c["sha256"]) == 64 for c in js["from_checkpoints"])
    assert js["points"][1]["checkpoint"].endswith("step-8.pt")
    assert not any("optimizer" in n for n in result.notes)  # the momentum fitted
    header = json.loads((tmp_path / "ck.jsonl").read_text().splitlines()[0])
    assert header["settings"]["checkpoints"][-1][0] == 1024  # the resume key holds the files
    # --resume with the same files reruns nothing; with one file changed it is refused
    again = api.schedule(f"{TASKS}:tiny", batch_sizes=sizes, noise_measurements=4,
                         from_checkpoints=[str(p) for p in paths], resume=True,
                         journal=tmp_path / "ck.jsonl", threads=1, device="cpu")
    assert again.resumed == 15
    torch.save({"model": sweep_tasks.tiny().model().state_dict(), "step": 8}, paths[0])
    with pytest.raises(UsageError, match="different task or settings"):
        api.schedule(f"{TASKS}:tiny", batch_sizes=sizes, noise_measurements=4,
                     from_checkpoints=[str(p) for p in paths], resume=True,
                     journal=tmp_path / "ck.jsonl", threads=1, device="cpu")


def test_cli_schedule_from_checkpoints_table_and_bad_input(tmp_path):
    paths = _base_run_checkpoints(tmp_path, _settings(), [8, 16, 32], with_step=False)
    task = f"{TASKS}:tiny"
    common = ["--batch-sizes", "8,16,32", "--noise-measurements", "0", "--threads", "1",
              "--journal", str(tmp_path / "j.jsonl")]
    # the file has no step: one line that says how to name it
    proc = run_cli("schedule", task, *common, "--from-checkpoint", str(paths[0]))
    assert proc.returncode == 2 and "does not say how far the run was" in proc.stderr
    assert f"{paths[0]}@2000" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "j.jsonl").exists()
    named = [f"{paths[1]}@16", f"{paths[3]}@64"]
    proc = run_cli("schedule", task, *common, "--from-checkpoint", named[0],
                   "--from-checkpoint", named[1])
    assert proc.returncode == 0, proc.stderr
    assert "2 checkpoints of your run and initialisation" in proc.stdout
    assert "(initialisation)" in proc.stdout and "step-64.pt" in proc.stdout
    for args, text in [
        (["--from-checkpoint", named[0], "--from-checkpoint", f"{paths[2]}@16"],
         "are both at step 16"),
        (["--from-checkpoint", named[1], "--horizon", "1024"], "is not before the end of"),
        (["--from-checkpoint", named[0], "--points", "3"], "leave --points out"),
        (["--from-checkpoint", named[0], "--from-checkpoint", f"{paths[1]}@64"],
         "hold the same weights"),  # one file at two steps: one point (review)
        (["--from-checkpoint", str(tmp_path / "nope.pt")], "no such file"),
        (["--from-checkpoint", f"{paths[1]}@-3"], "@-3 is not a step"),  # was "no such file"
    ]:
        proc = run_cli("schedule", task, *common, "--overwrite", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert text in proc.stderr and "Traceback" not in proc.stderr


def _stage(b: int, time_s: float, samples: float = 100.0) -> Stage:
    return Stage(0.0, 0, b, 0.1 * b, samples, samples / b, time_s)


@pytest.mark.parametrize("plan_times, fixed_times", list(itertools.product(
    [[0.5], [0.5, 0.4], [math.inf], [0.3, math.inf], [1.0, 1.0]],
    [{16: 1.0}, {16: 0.8, 32: 0.95}, {16: math.inf, 32: 0.9}, {8: 2.0, 16: 1.4, 32: 1.8}])))
def test_the_plan_offered_is_never_predicted_slower_than_a_fixed_batch(plan_times,
                                                                       fixed_times):
    stages = [_stage(16 * 2 ** i, t) for i, t in enumerate(plan_times)]
    fixed = {b: Prediction(100.0 / b if math.isfinite(t) else math.inf,
                           100.0 if math.isfinite(t) else math.inf, t)
             for b, t in fixed_times.items()}
    chosen, predicted, note = no_worse_than_fixed(stages, fixed, lambda b: 0.1 * b)
    best_time, best = min((t, b) for b, t in fixed_times.items())
    plan_time = sum(plan_times)
    if math.isfinite(plan_time) and plan_time <= best_time:  # kept as measured
        assert chosen == stages and note is None
        assert predicted.time_s == pytest.approx(plan_time)
    else:  # the best fixed batch, one stage, said
        assert [s.batch_size for s in chosen] == [best] and chosen[0].lr == pytest.approx(0.1 * best)
        assert predicted == fixed[best] and chosen[0].time_s == best_time
        assert note is not None and f"the fixed batch {best}" in note
        assert ("not predictable" in note) == (not math.isfinite(plan_time))
    assert predicted.time_s <= best_time


def test_a_plan_equal_to_a_fixed_batch_up_to_rounding_is_kept():
    # a one-stage plan sums its stages in another order than the fixed prediction
    parts = [0.1, 0.2, 0.3]
    plan = [_stage(32, t) for t in parts]
    fixed = {32: Prediction(3.0, 300.0, sum(reversed(parts)) - 1e-16)}
    chosen, _, note = no_worse_than_fixed(plan, fixed, lambda b: 0.1)
    assert chosen == plan and note is None


def test_no_fixed_prediction_at_all_is_a_programming_error():
    with pytest.raises(ValueError):
        no_worse_than_fixed([_stage(16, 1.0)], {16: Prediction(math.inf, math.inf, math.inf)},
                            lambda b: 0.1)


def test_a_step_named_by_hand_must_agree_with_the_files_own(tmp_path):
    from bsselect import api
    from bsselect.api import _run_checkpoints

    model = sweep_tasks.tiny().model()
    torch.save({"model": model.state_dict(), "global_step": torch.tensor(8)}, tmp_path / "t.pt")
    checkpoints, steps = _run_checkpoints([str(tmp_path / "t.pt")])  # a tensor step is read
    assert steps == [8]
    assert _run_checkpoints([f"{tmp_path / 't.pt'}@8"])[1] == [8]  # agreeing: fine
    with pytest.raises(UsageError, match="the checkpoint itself says step 8; leave @4 out"):
        _run_checkpoints([f"{tmp_path / 't.pt'}@4"])
    assert _run_checkpoints(None) == ([], [])
    with pytest.raises(UsageError, match="leave points= out"):
        api.schedule(f"{TASKS}:tiny", points=3, from_checkpoints=[str(tmp_path / "t.pt")])


def test_short_names_tell_same_named_files_apart():
    from bsselect.selection.schedule import short_names

    assert short_names(["/r/a/model.pt", "/r/b/model.pt", "/r/c/x.pt"]) == [
        "a/model.pt", "b/model.pt", "x.pt"]
    assert short_names(["/r/s/e=0/last.ckpt", "/r/t/e=0/last.ckpt"]) == [
        "s/e=0/last.ckpt", "t/e=0/last.ckpt"]
    assert short_names(["m.pt"]) == ["m.pt"]


def test_a_checkpoint_at_lr_zero_is_said(tmp_path):
    from bsselect import api

    task = sweep_tasks.tiny()
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), 0.0)  # a schedule decayed to 0
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 64},
               tmp_path / "end.pt")
    result = api.schedule(f"{TASKS}:tiny", batch_sizes=[8, 16, 32], noise_measurements=0,
                          from_checkpoints=[str(tmp_path / "end.pt")],
                          journal=tmp_path / "j.jsonl", threads=1, device="cpu")
    assert any("end.pt: the checkpoint's optimizer is at lr 0" in n for n in result.notes)
    from bsselect.selection.sweep import SweepHooks

    said = []
    api.sweep(f"{TASKS}:tiny", batch_sizes=[8, 16], budget="128", noise_measurements=0,
              from_checkpoint=tmp_path / "end.pt", journal=tmp_path / "k.jsonl",
              hooks=SweepHooks(warn=said.append))
    assert any("is at lr 0" in m and "pass --lr" in m for m in said)


def test_a_runs_checkpoint_directory_stands_for_the_checkpoints_in_it(tmp_path):
    """A Lightning dirpath: every checkpoint one level down, ordered by the run's steps, other
    files (and a Trainer's training_args.bin) ignored; an HF checkpoint directory itself is
    one point (a Trainer's output_dir: tests/test_checkpoint.py); a directory without any is
    one line, exit 2."""
    from safetensors.torch import save_file

    from bsselect.api import _run_checkpoints
    from bsselect.checkpoint import checkpoints_in

    task = sweep_tasks.tiny()
    run = tmp_path / "run"
    run.mkdir()
    state = task.model().state_dict()
    torch.save({"model": state, "global_step": 40}, run / "epoch=1-step=40.ckpt")
    torch.save({"model": state, "global_step": 8}, run / "epoch=0-step=8.ckpt")
    (run / "notes.txt").write_text("not a checkpoint")
    (run / "training_args.bin").write_bytes(b"not a checkpoint either")
    hf = tmp_path / "checkpoint-20"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"))
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    assert checkpoints_in(hf) is None  # a checkpoint itself, not a directory of them
    assert [p.name for p in checkpoints_in(run)] == ["epoch=0-step=8.ckpt",
                                                     "epoch=1-step=40.ckpt"]
    checkpoints, steps = _run_checkpoints([str(run), str(hf)])
    assert steps == [8, 20, 40] and checkpoints[1].format == "hf-trainer"
    proc = run_cli("sweep", f"{TASKS}:tiny", "--from-checkpoint", str(run),
                   "--journal", str(tmp_path / "s.jsonl"))  # the sweep branches from one
    assert proc.returncode == 2 and "is a directory of 2 checkpoints (epoch=0-step=8.ckpt, " \
        "epoch=1-step=40.ckpt), not one: pass one of them" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("schedule", f"{TASKS}:tiny", "--from-checkpoint", str(tmp_path / "empty"),
                   "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 2 and "holds no checkpoints" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failed_noise_measurement_leaves_the_schedule_standing(tmp_path):
    """A batch holding a tensor shared by its rows trains but cannot be cut into the noise
    measurement's sub-batches: the schedule stopped at its first point, exit 1, as the
    sweep's trials did (review). The points stand without a B_simple, and a note says why."""
    tasks = Path(__file__).parent / "tasks" / "sweep_tasks.py"
    proc = run_cli("schedule", f"{tasks}:shared_offset", "--horizon", "2048", "--points", "3",
                   "--batch-sizes", "8,16,32", "--journal", str(tmp_path / "s.jsonl"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [p["b_simple"] for p in out["points"]] == [None] * 3
    assert out["notes"][0].startswith("the noise measurement failed at 3 point(s) (TaskError: "
                                      "cannot split the batch into sub-batches")
    assert out["stages"]


def test_timing_rounds_spread_by_a_busy_machine_are_said():
    """Two of five rounds at 2.5x moved the fastest batch per point and the plan, with every
    branch's drop the same, and nothing said the clock was noisy (review)."""
    from bsselect.selection.schedule import timing_spread_note
    from bsselect.selection.steptime import summarize_rounds
    from bsselect.selection.timing import RoundTiming

    def timed(b, rounds):
        return RoundTiming(b, tuple(rounds), 8, summarize_rounds(rounds))

    quiet = [timed(64, [1.0e-3, 1.02e-3, 1.01e-3]), timed(128, [1.6e-3, 1.62e-3, 1.7e-3])]
    assert timing_spread_note(quiet) is None
    busy = quiet[:1] + [timed(128, [1.577e-3, 1.629e-3, 3.87e-3, 4.042e-3, 1.616e-3])]
    note = timing_spread_note(busy)
    assert note.startswith("timing rounds spread on a busy machine: b=128 1.58–4.04 ms;")
    assert "b=64" not in note


def test_a_failed_noise_point_is_said_again_on_resume(tmp_path, monkeypatch):
    """A resumed plan showed no B_simple at the points whose measurement had failed, and no
    longer said why (review): the journal keeps the reason."""
    import bsselect.selection.noise as noise_module

    def fails(*args, **kwargs):
        raise RuntimeError("the estimator broke")

    path = tmp_path / "j.jsonl"
    with monkeypatch.context() as m:  # the seam: the noise estimator, failing
        m.setattr(noise_module, "estimate_noise", fails)
        first = run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[8, 16],
                             settings=_settings(), device=CPU, journal_path=path, threads=1)
    said = [n for n in first.notes if n.startswith("the noise measurement failed")]
    assert said and "RuntimeError: the estimator broke" in said[0]
    again = run_schedule(sweep_tasks.tiny(), task_name="tiny", batch_sizes=[8, 16],
                         settings=_settings(), device=CPU, journal_path=path, resume=True,
                         threads=1)
    assert all(p.noise is None for p in again.points)
    assert [n for n in again.notes if n.startswith("the noise measurement failed")] == said


def test_the_api_refuses_options_of_the_wrong_type(tmp_path):
    """schedule() raised TypeError and AttributeError from deep inside for a string horizon or
    a float point count, and ran a float noise_measurements with no B_simple anywhere
    (review); the other commands' options too."""
    from bsselect import api

    for options in ({"horizon": "8192"}, {"horizon": 1024.5}, {"points": 3.0},
                    {"tolerance": "0.1"}, {"threads": "2"}, {"noise_measurements": 4.5},
                    {"min_batch": "8"}):
        with pytest.raises(UsageError, match=r"must be an? (integer|number), got "):
            api.schedule(f"{TASKS}:tiny", journal=tmp_path / "j.jsonl", **options)
    for options in ({"warm_start_steps": 2.0}, {"max_batch": "64"}):
        with pytest.raises(UsageError, match=r"must be an integer, got "):
            api.plan_sweep(f"{TASKS}:tiny", journal=tmp_path / "j.jsonl", **options)
    with pytest.raises(UsageError, match=r"^from_checkpoint= takes one path, got \['a.pt'\]$"):
        api.noise_scale(f"{TASKS}:tiny", from_checkpoint=["a.pt"])
