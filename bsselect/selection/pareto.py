"""The noise scale from the trials' own loss curves: steps to a common loss against batch size.

McCandlish et al. (2018, sec. 2.2 and fig. 4) define the critical batch size empirically: at a
fixed loss ``L``, the runs at different batch sizes trace the Pareto front
``S(b) = S_min (1 + B/b)`` of steps against samples, and ``B = E_min / S_min`` is read off a
fit of steps to ``L`` against ``1/b`` (slope ``S_min B``, intercept ``S_min``). The sweep's
equal-sample trials already record their training-loss curves, so this costs no extra steps:
at a few loss levels that at least ``MIN_TRIALS`` trials reach, the steps each trial took to
reach the level are fitted robustly (Theil–Sen) against ``1/b``, and the levels' estimates are
summarised by their median. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Sequence

# Loss levels, as fractions of the way from the lowest loss reached by MIN_TRIALS trials
# (0) back to the start loss (1): the lower half, where the trials have trained longest.
LEVEL_FRACTIONS = (0.6, 0.5, 0.4, 0.3)
MIN_TRIALS = 3  # a line through fewer points cannot tell a slope from noise
SMOOTHING = 9  # points of the centred moving average over a mini-batch loss curve


@dataclass(frozen=True)
class LevelFit:
    """One loss level: the steps each batch size took to reach it and the fitted ``B``
    (None unless both the fit's intercept and its slope are positive)."""

    level: float
    steps: tuple[tuple[int, float], ...]  # (batch_size, steps to the level)
    b_noise: float | None


@dataclass(frozen=True)
class StepsFit:
    """``b_noise``: the median over ``levels`` of their fitted B (None when no level gave
    one); ``lo``/``hi``: the smallest and largest of them."""

    b_noise: float | None
    lo: float | None
    hi: float | None
    levels: tuple[LevelFit, ...]


def _smoothed(values: Sequence[float], width: int) -> list[float]:
    half = width // 2
    return [sum(w) / len(w) for w in
            (values[max(0, i - half): i + half + 1] for i in range(len(values)))]


def _steps_to(curve: Sequence[tuple[int, float]], level: float) -> float | None:
    """Steps until the smoothed loss first reaches ``level``, interpolated linearly between
    the recorded points around the crossing (whole steps would add half a step on average,
    which biases ``B`` low when the levels are reached in a few steps). None when it never
    does, or when it does within the first ``SMOOTHING // 2`` points: their moving average
    has a window cut short at the start that reaches ahead only, so they cross early."""
    for i, (step, loss) in enumerate(curve):
        if loss <= level:
            if i < SMOOTHING // 2:
                return None
            p_step, p_loss = curve[i - 1]
            return p_step + (step - p_step) * (p_loss - level) / (p_loss - loss)
    return None


def _theil_sen_ratio(points: Sequence[tuple[float, float]]) -> float | None:
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 != x1]
    if not slopes:
        return None
    slope = median(slopes)
    intercept = median(y - slope * x for x, y in points)
    if intercept <= 0 or slope <= 0:  # no S_min, or no trade-off measured: no B
        return None
    return slope / intercept


def steps_to_loss_fit(curves: dict[int, Sequence[tuple[int, float]]],
                      start_loss: float) -> StepsFit:
    """``curves``: batch size -> that trial's training-loss curve as (step, loss) points,
    non-finite losses left out; ``start_loss``: the loss before training."""
    smooth = {}
    for b, curve in curves.items():
        pts = sorted(curve)
        losses = _smoothed([loss for _, loss in pts], SMOOTHING)
        smooth[b] = [(step, loss) for (step, _), loss in zip(pts, losses)]
    lows = sorted(min(loss for _, loss in c) for c in smooth.values() if c)
    if len(lows) < MIN_TRIALS or not start_loss > lows[MIN_TRIALS - 1]:
        return StepsFit(None, None, None, ())
    floor = lows[MIN_TRIALS - 1]
    levels = []
    for f in LEVEL_FRACTIONS:
        level = floor + f * (start_loss - floor)
        steps = tuple((b, s) for b in sorted(smooth)
                      if (s := _steps_to(smooth[b], level)) is not None)
        fit = _theil_sen_ratio([(1.0 / b, s) for b, s in steps]) if len(steps) >= MIN_TRIALS \
            else None
        levels.append(LevelFit(level, steps, fit))
    values = [lv.b_noise for lv in levels if lv.b_noise is not None]
    if not values:
        return StepsFit(None, None, None, tuple(levels))
    return StepsFit(median(values), min(values), max(values), tuple(levels))
