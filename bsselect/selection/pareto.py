"""The noise scale from the trials' own loss curves: steps to a common loss against batch size.

McCandlish et al. (2018, sec. 2.2 and fig. 4) define the critical batch size empirically: at a
fixed loss ``L``, the runs at different batch sizes trace the Pareto front
``S(b) = S_min (1 + B/b)`` of steps against samples, and ``B = E_min / S_min`` is read off a
fit of steps to ``L`` against ``1/b`` (slope ``S_min B``, intercept ``S_min``). The sweep's
equal-sample trials already record their training-loss curves, so this costs no extra steps:
at a few loss levels that at least ``MIN_TRIALS`` trials reach, the steps each trial took to
reach the level are fitted robustly (Theil–Sen) against ``1/b``, and the levels' estimates are
summarised by their median. A level whose steps fall as fast as ``1/b`` or faster (slope
positive, intercept ``S_min <= 0``: a larger batch at its scaled lr is at least as sample
efficient over the whole range measured) has no ``S_min`` to divide by: the model does not
hold under the scaled lr (typically an lr with headroom), and what the level does say is that
no sample efficiency is lost up to the largest batch measured at it. It gives that batch,
flagged as a bound (``LevelFit.bound``); nothing above it was measured, so nothing above it is
claimed (the summary's ``hi`` stays the largest value given). Pure: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Sequence

# Loss levels, as fractions of the way from the lowest loss reached by MIN_TRIALS trials
# (0) back to the start loss (1): the lower half, where the trials have trained longest.
LEVEL_FRACTIONS = (0.6, 0.5, 0.4, 0.3)
MIN_TRIALS = 3  # a line through fewer points cannot tell a slope from noise
SMOOTHING = 9  # steps of the centred moving average over a mini-batch loss curve


@dataclass(frozen=True)
class LevelFit:
    """One loss level: the steps each batch size took to reach it and the fitted ``B``
    (None unless the slope is positive; with an intercept <= 0, ``bound``: ``B`` is at least
    the largest batch measured at the level, and ``b_noise`` is that batch)."""

    level: float
    steps: tuple[tuple[int, float], ...]  # (batch_size, updates done to reach the level)
    b_noise: float | None
    bound: bool = False


@dataclass(frozen=True)
class StepsFit:
    """``b_noise``: the median over ``levels`` of their fitted B (None when no level gave
    one; with bound levels, ``_summary``); ``lo``/``hi``: the smallest and largest of them."""

    b_noise: float | None
    lo: float | None
    hi: float | None
    levels: tuple[LevelFit, ...]

    bound: bool = False  # ``b_noise`` is a bound level's batch: "at least"


def _smoothed(curve: Sequence[tuple[int, float]]) -> list[tuple[float, float, bool]]:
    """(updates done, smoothed loss, resolved) per point of a recorded curve.

    A point recorded at step ``s`` after the point at step ``p`` (0 for the first) holds the
    loss of the steps ``p+1 .. s`` (one step, or the mean of a thinned run of them,
    ``trial_types.thin_curve``), each taken in the forward pass before its update, so it
    stands at ``(p + s - 1) / 2`` updates done. The smoothed loss is the mean over the points
    within ``SMOOTHING // 2`` updates of it, weighted by the steps each holds: a window in
    steps, whatever the thinning. ``resolved`` is False where that window is cut short by
    either end of the curve, where a centred mean is biased."""
    if not curve:
        return []
    half = SMOOTHING // 2
    pts = []  # (updates done at the point's centre, steps it holds, loss)
    prev = 0
    for step, loss in curve:
        pts.append(((prev + step - 1) / 2, max(1, step - prev), loss))
        prev = step
    last = curve[-1][0] - 1  # the curve spans 0 .. last updates done
    out = []
    lo = hi = 0  # the window is pts[lo:hi]; the centres increase, so both only move forward
    for x, _, _ in pts:
        while pts[lo][0] < x - half:
            lo += 1
        while hi < len(pts) and pts[hi][0] <= x + half:
            hi += 1
        window = pts[lo:hi]
        mean = sum(w * v for _, w, v in window) / sum(w for _, w, _ in window)
        out.append((x, mean, x - half >= 0 and x + half <= last))
    return out


def _steps_to(curve: Sequence[tuple[float, float, bool]], level: float) -> float | None:
    """Updates done until the smoothed loss first reaches ``level``, interpolated linearly
    between the points around the crossing (whole points would add half a point on
    average, which biases ``B`` low when a level is reached in a few steps). None when it
    never does, or when the crossing is at a point whose window is cut short
    (``_smoothed``)."""
    for i, (x, loss, resolved) in enumerate(curve):
        if loss <= level:
            if i == 0 or not resolved:
                return None
            px, p_loss, _ = curve[i - 1]
            return px + (x - px) * (p_loss - level) / (p_loss - loss)
    return None


def _theil_sen_ratio(points: Sequence[tuple[float, float]]) -> tuple[float | None, bool]:
    """``(B, bound)`` from (1/b, steps) points: slope / intercept of a Theil–Sen line; with
    a positive slope but an intercept <= 0 (steps fall at least as fast as 1/b), the
    largest batch among the points as a lower bound (``bound`` True); no positive slope (no
    trade-off measured): None."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 != x1]
    if not slopes:
        return None, False
    slope = median(slopes)
    intercept = median(y - slope * x for x, y in points)
    if slope <= 0:
        return None, False
    if intercept <= 0:
        return None, True
    return slope / intercept, False


def steps_to_loss_fit(curves: dict[int, Sequence[tuple[int, float]]],
                      start_loss: float) -> StepsFit:
    """``curves``: batch size -> that trial's training-loss curve as recorded
    (``trial_types.LossPoint``: step, loss; non-finite losses are left out); ``start_loss``: the
    loss before training. The levels reach from the lowest smoothed loss three trials reach
    up to the start: the higher of ``start_loss`` and the trials' first smoothed losses
    (training-mode losses can sit above an evaluation-mode start, with dropout)."""
    smooth = {b: _smoothed(sorted((step, loss) for step, loss in c if math.isfinite(loss)))
              for b, c in curves.items()}
    smooth = {b: c for b, c in smooth.items() if c}
    lows = sorted(min(loss for _, loss, _ in c) for c in smooth.values())
    if len(lows) < MIN_TRIALS:
        return StepsFit(None, None, None, ())
    top = max([c[0][1] for c in smooth.values()] + [start_loss] * math.isfinite(start_loss))
    floor = lows[MIN_TRIALS - 1]
    if not (math.isfinite(top) and math.isfinite(floor) and top > floor):
        return StepsFit(None, None, None, ())
    levels = []
    for f in LEVEL_FRACTIONS:
        level = floor + f * (top - floor)
        steps = tuple((b, s) for b in sorted(smooth)
                      if (s := _steps_to(smooth[b], level)) is not None)
        fit, bound = (_theil_sen_ratio([(1.0 / b, s) for b, s in steps])
                      if len(steps) >= MIN_TRIALS else (None, False))
        if bound:  # no slowdown measured up to the largest batch that reached the level
            fit = float(max(b for b, _ in steps))
        levels.append(LevelFit(level, steps, fit, bound))
    return _summary(tuple(levels))


def _summary(levels: tuple[LevelFit, ...]) -> StepsFit:
    """The levels' median, its range and whether it is a bound. Without bound levels: the
    plain median. With some: a bound level stands for "at least its batch", so the median is
    taken with bounds ranked above every ordinary value (``median_low``, no averaging of a
    bound with an estimate); when it lands on a bound, the result is the largest bound batch,
    flagged, else that ordinary value."""
    given = [lv for lv in levels if lv.b_noise is not None]
    if not given:
        return StepsFit(None, None, None, levels)
    values = [lv.b_noise for lv in given]
    lo, hi = min(values), max(values)
    if not any(lv.bound for lv in given):
        return StepsFit(median(values), lo, hi, levels)
    ranked = sorted((lv.bound, lv.b_noise) for lv in given)  # ordinary first, then bounds
    is_bound, value = ranked[(len(ranked) - 1) // 2]
    if is_bound:
        value = max(lv.b_noise for lv in given if lv.bound)
    return StepsFit(value, lo, hi, levels, bound=is_bound)
