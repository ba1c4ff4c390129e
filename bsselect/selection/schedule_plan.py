"""The pure half of ``bsselect schedule``: what the branched trials at each point say (critical
and fastest batch), what each fixed batch size and a batch-size warm-up are predicted to cost,
and the schedule a training loop follows. No torch; the measurement is ``schedule``.
Tested exhaustively in tests/test_schedule.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .lr_scaling import trial_lr
from .steptime import TimeInterval, pava
from .trial_types import TrialResult


@dataclass(frozen=True)
class Branch:
    """One branched trial at a point: its loss drop over the equal sample budget and the
    drop per second of training at the fitted step time."""

    trial: TrialResult
    drop: float | None           # training-subset loss drop; None unless the trial is ok
    drop_per_s: float | None

    def to_json(self) -> dict[str, Any]:
        t = self.trial
        return {"batch_size": t.batch_size, "lr": t.lr, "status": t.status.value,
                "steps": t.steps, "samples": t.samples, "loss_start": t.train_loss_start,
                "loss_end": t.train_loss_end, "drop": self.drop, "drop_per_s": self.drop_per_s,
                "error": t.error}


@dataclass(frozen=True)
class SchedulePoint:
    samples: int                 # seen by the base run
    base_steps: int
    branches: tuple[Branch, ...]
    noise: dict[str, Any] | None  # B_simple at the point (``noise_run.estimate_json``), or None
    critical_batch_size: int | None
    fastest_batch_size: int | None
    checkpoint: str | None = None  # the user's checkpoint this point is (None: the base run)

    def drop_of(self, b: int) -> float | None:
        for br in self.branches:
            if br.trial.batch_size == b:
                return br.drop
        return None

    def to_json(self) -> dict[str, Any]:
        noise = self.noise or {}
        return {"samples": self.samples, "base_steps": self.base_steps,
                "checkpoint": self.checkpoint,
                "critical_batch_size": self.critical_batch_size,
                "fastest_batch_size": self.fastest_batch_size,
                "b_simple": noise.get("b_simple"), "b_simple_ci": noise.get("b_simple_ci"),
                "train_loss": self.branches[0].trial.train_loss_start if self.branches else None,
                "branches": [b.to_json() for b in self.branches]}


@dataclass(frozen=True)
class Stage:
    """A stage of the schedule: from ``start_samples`` (samples seen by the scheduled run) it
    trains at ``batch_size`` and ``lr``; it covers the progress the base run makes from
    ``base_samples`` on. ``steps``/``time_s``: predicted for the stage."""

    start_samples: float
    base_samples: int
    batch_size: int
    lr: float
    samples: float
    steps: float
    time_s: float

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) if isinstance(v, float) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class BatchSchedule:
    """A batch-size warm-up a training loop can follow: ``batch_size_at(samples)`` and
    ``lr_at(samples)`` for the samples seen so far. A stage whose lr is above the one before
    it (the first stage: above ``base_lr``, the task's) ramps up to it linearly over its first
    ``lr_ramp_samples`` samples, as the sweep's and the schedule's trials do."""

    stages: tuple[Stage, ...]
    lr_ramp_samples: int = 0
    base_lr: float | None = None

    def _index(self, samples: float) -> int:
        if isinstance(samples, bool) or not isinstance(samples, (int, float)) \
                or not math.isfinite(samples) or samples < 0:
            raise ValueError(f"samples must be a finite number >= 0, got {samples!r}")
        i = 0
        for k, st in enumerate(self.stages):
            if samples >= st.start_samples:
                i = k
        return i

    def batch_size_at(self, samples: float) -> int:
        return self.stages[self._index(samples)].batch_size

    def lr_at(self, samples: float) -> float:
        i = self._index(samples)
        stage = self.stages[i]
        before = self.stages[i - 1].lr if i else self.base_lr
        if before is None:
            return stage.lr
        step = math.floor(max(0.0, samples - stage.start_samples) / stage.batch_size)
        return trial_lr(step, stage.lr, stage.batch_size, before,
                        ramp_samples=self.lr_ramp_samples)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.stages]


@dataclass(frozen=True)
class Prediction:
    steps: float
    samples: float
    time_s: float

    def to_json(self) -> dict[str, Any]:
        return {"steps": _finite(self.steps), "samples": _finite(self.samples),
                "time_s": _finite(self.time_s)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def critical_batch(drops: dict[int, float | None], tolerance: float) -> int | None:
    """The largest batch whose loss drop is at least ``(1 - tolerance)`` of the smallest
    batch's (the smallest batch with a positive drop); None when no batch dropped."""
    ok = sorted(b for b, d in drops.items() if d is not None and d > 0)
    if not ok:
        return None
    ref = drops[ok[0]]
    assert ref is not None
    return max(b for b in ok if drops[b] is not None and drops[b] >= (1 - tolerance) * ref)


def fastest_batch(rates: dict[int, float | None]) -> int | None:
    """The batch with the largest positive loss drop per second (the larger one on a tie)."""
    ok = [(r, b) for b, r in rates.items() if r is not None and r > 0]
    return max(ok)[1] if ok else None


def informative(point: SchedulePoint, b0: int) -> bool:
    """Whether ``point`` says anything about relative rates: the base batch's own branch made
    progress there. Every ``r(b)`` is a ratio to ``drop(b0)``; where the base batch's branch
    lost ground (near a plateau every drop can be noise around 0), a batch that also lost
    ground is no worse than the base and one that gained is not measurably better, so the
    point rules no batch size in or out."""
    d0 = point.drop_of(b0)
    return d0 is not None and d0 > 0


def relative_samples(point: SchedulePoint, b: int, b0: int) -> float | None:
    """``r(b) = drop(b0) / drop(b)`` at ``point``: samples batch ``b`` needs for the progress
    ``b0`` makes in one sample (1 for ``b0`` itself, by definition; inf when ``b`` made no
    progress where ``b0`` did). None (not measured) for every ``b != b0`` at a point that is
    not ``informative``: the same rule for the base batch as for any other."""
    if b == b0:  # the base run's own progress, by definition
        return 1.0
    if not informative(point, b0):
        return None
    d0, d = point.drop_of(b0), point.drop_of(b)
    assert d0 is not None
    if d is None or d <= 0:
        return math.inf
    return d0 / d


def point_ratios(points: Sequence[SchedulePoint], b: int, b0: int) -> list[float]:
    """``relative_samples`` at each point, a point that is not ``informative`` taking the
    ratio of the last informative point before it (points before the first: the first's), as
    ``stage_batches`` does for the fastest batch. With no informative point, every ratio of
    ``b != b0`` is inf: nothing measured says what ``b`` costs."""
    measured = [relative_samples(p, b, b0) for p in points]
    known = [r for r in measured if r is not None]
    if not known:
        return [math.inf] * len(points)
    out: list[float] = []
    last = known[0]
    for r in measured:
        if r is not None:
            last = r
        out.append(last)
    return out


def point_fastest(point: SchedulePoint, b0: int,
                  step_times: dict[int, TimeInterval]) -> int | None:
    """The fastest batch at ``point`` without deciding by timing noise: the batch sizes whose
    loss drop per second (over the branch's steps at the fitted step time) can be the largest
    within the step times' intervals (``b`` at its fastest plausible step time against the
    best at its slowest: the timing rounds' spread; the sweep's run-to-run widening was tried
    here and taken back, not validated on the schedule's benchmark, docs/benchmarks-schedule.md)
    are tied, and among them the one with the largest loss drop at the equal sample budget
    wins (a measurement no clock enters; the larger batch on equal drops). None at a point
    that is not ``informative``, or where no timed batch made progress."""
    if not informative(point, b0):
        return None
    ok = [(br.drop, br.trial.steps, step_times[br.trial.batch_size], br.trial.batch_size)
          for br in point.branches
          if br.drop is not None and br.drop > 0 and br.trial.steps
          and br.trial.batch_size in step_times]
    if not ok:
        return None
    rate = {b: (d / (n * t.mid), d / (n * t.lo), d / (n * t.hi)) for d, n, t, b in ok}
    best = max(rate, key=lambda b: (rate[b][0], b))
    tied = [(d, b) for d, _, _, b in ok if b == best or rate[b][1] >= rate[best][2]]
    return max(tied)[1]


def stage_lengths(points: Sequence[SchedulePoint], horizon: int) -> list[int]:
    """Base-run samples between consecutive points, the last to ``horizon``."""
    starts = [p.samples for p in points]
    return [max(0, e - s) for s, e in zip(starts, starts[1:] + [horizon])]


def predict_fixed(points: Sequence[SchedulePoint], horizon: int, b: int, b0: int,
                  step_time_s: float) -> Prediction:
    lengths = stage_lengths(points, horizon)
    ratios = point_ratios(points, b, b0)
    samples = sum(L * r for r, L in zip(ratios, lengths) if L)
    steps = samples / b
    return Prediction(steps, samples, steps * step_time_s)


def stage_batches(fastest: Sequence[int | None], b0: int,
                  weights: Sequence[float] | None = None,
                  sizes: Sequence[int] | None = None) -> list[int]:
    """The batch of each point's stage: the closest non-decreasing sequence (weighted least
    squares on log2, ``steptime.pava``) to the points' fastest batches, rounded in log2 to
    the nearest of ``sizes`` (the batches measured; default: powers of two), so that the
    batch only grows and one noisy point does not set every later stage. Rounded to powers
    of two, sizes 40, 80, 160 (5 ranks) took every point's 80 for 64, and the plan its 40
    (review).
    ``weights`` (default: equal) are the shares of the run the points' stages cover, so a
    point counts as much as the part of training it governs. A point without a fastest batch
    takes the level of the last measured point before it (points before the first measured
    one: its level); with none measured, every stage is ``b0``."""
    w = list(weights) if weights is not None else [1.0] * len(fastest)
    if len(w) != len(fastest):
        raise ValueError("fastest and weights differ in length")
    known = [(i, math.log2(b)) for i, b in enumerate(fastest) if b]
    if not known:
        return [b0] * len(fastest)
    levels = pava([v for _, v in known], [max(w[i], 1e-12) for i, _ in known],
                  increasing=True)
    out: list[int] = []
    j = 0
    for i in range(len(fastest)):
        while j + 1 < len(known) and known[j + 1][0] <= i:
            j += 1
        # before the first measured point: the first measured level
        if sizes:  # the nearest in log2; halfway: the larger, as powers of two round
            b = min(sizes, key=lambda m: (abs(math.log2(m) - levels[j]), -m))
        else:
            b = 2 ** math.floor(levels[j] + 0.5)
        out.append(max(b, out[-1]) if out else b)
    return out


def plan_stages(points: Sequence[SchedulePoint], horizon: int, b0: int,
                step_times_s: dict[int, float], lr_of: Callable[[int], float]) -> list[Stage]:
    """One stage per point at ``stage_batches``' batch (the points weighted by the base-run
    samples their stages cover; restricted to the batches measured),
    neighbouring stages with the same batch merged; each stage's samples, steps and time are
    predicted from its point's relative sample efficiency."""
    stages: list[Stage] = []
    start = 0.0
    lengths = stage_lengths(points, horizon)
    measured = sorted(step_times_s)
    wanted = stage_batches([p.fastest_batch_size for p in points], b0,
                           [max(1, L) for L in lengths], measured)
    ratios = {b: point_ratios(points, b, b0) for b in measured}
    for k, (p, L, want) in enumerate(zip(points, lengths, wanted)):
        # non-decreasing, as ``wanted`` is: the largest measured batch up to it
        b = max([m for m in measured if m <= want] or [measured[0]])
        # A stage batch that made no progress in its point's branch (the smoothing can give
        # a point a batch that was not its fastest) is predicted as a fixed batch would be:
        # not finite, and said so (a note of ``run_schedule``), never credited with the base
        # run's progress. A point that is not ``informative`` takes the ratio of the point
        # before it (``point_ratios``), for the plan as for every fixed batch.
        r = ratios[b][k] if L else 1.0
        samples = L * r
        steps = samples / b
        stage = Stage(start, p.samples, b, lr_of(b), samples, steps, steps * step_times_s[b])
        if stages and stages[-1].batch_size == b:
            last = stages[-1]
            stages[-1] = dataclasses.replace(last, samples=last.samples + samples,
                                             steps=last.steps + steps,
                                             time_s=last.time_s + stage.time_s)
        else:
            stages.append(stage)
        start += samples
    return stages


def no_worse_than_fixed(stages: Sequence[Stage], fixed: dict[int, Prediction],
                        lr_of: Callable[[int], float]
                        ) -> tuple[list[Stage], Prediction, str | None]:
    """The plan to recommend: ``stages`` when their predicted time is finite and no more than
    the best fixed batch's (by the same prediction), else that fixed batch as one stage, with
    a note saying why. A warm-up the measurement itself predicts to be slower than a fixed
    batch, or cannot predict, is not offered as the answer. ``fixed`` must hold at least one
    finite prediction (the base batch's always is)."""
    predicted = Prediction(sum(s.steps for s in stages), sum(s.samples for s in stages),
                           sum(s.time_s for s in stages))
    finite = sorted((p.time_s, b) for b, p in fixed.items() if math.isfinite(p.time_s))
    if not finite:
        raise ValueError("no fixed batch has a finite prediction")
    best_time, best = finite[0]
    # the same sums in another order: a plan equal to a fixed batch is not "slower" by rounding
    if math.isfinite(predicted.time_s) and predicted.time_s <= best_time * (1 + 1e-9):
        return list(stages), predicted, None
    plan = " → ".join(str(s.batch_size) for s in stages)
    why = (f"predicted at {predicted.time_s:.3g} s, slower than" if
           math.isfinite(predicted.time_s) else "not predictable (a stage's batch made no "
           "progress in its point's branch), unlike")
    p = fixed[best]
    note = (f"the plan from the points' fastest batches ({plan}) is {why} the fixed batch "
            f"{best} ({best_time:.3g} s): the schedule is batch {best} throughout")
    return [Stage(0.0, 0, best, lr_of(best), p.samples, p.steps, p.time_s)], p, note


def growth_exponent(samples: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(value) on log(samples) over the points with samples > 0
    and value > 0: B grows as samples^k. None with fewer than two such points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(samples, values)
           if s > 0 and v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return None
    if len({y for _, y in pts}) == 1:
        return 0.0  # not the rounding of a mean of equal logs (8e-17 in the JSON: review)
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx
