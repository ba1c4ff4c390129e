"""Step times that hold on a busy machine. Pure: no torch.

Two pieces:

- ``summarize_rounds``: a batch size is timed in several short rounds, interleaved with the
  other batch sizes (``timing.interleaved_rounds``), so that a slow minute (another job, a
  frequency change) hits every batch size alike. Load only ever adds time, so the estimate is
  a low quantile of the per-round medians, and the spread of the rounds is kept as an interval.
- ``physical_fit``: a step-time curve with the physics of a training step in it. Over batch
  sizes ``b_1 < b_2 < ...`` the step time does not fall as the batch grows
  (``t_{i+1} >= t_i``), and the time per sample does not grow while the device is not yet
  saturated (``t_{i+1}/b_{i+1} <= t_i/b_i``). The fit is the weighted least-squares projection
  of the log step times onto both constraints (Dykstra's alternating projections, each one a
  pool-adjacent-violators pass), so one noisy point cannot make a larger batch look cheaper per
  step or a smaller batch cheaper per sample than the data as a whole allow. When the
  measurements clearly contradict the per-sample constraint (a cache or threading cliff above
  some batch size: even its fastest round costs more per sample than a smaller batch's
  typical step), only monotonicity is imposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ROUND_QUANTILE = 0.25  # the step time: this quantile of the per-round medians
HIGH_QUANTILE = 0.75   # upper end of the step-time interval (lower end: the fastest round)
# Per-sample time at a larger batch (its fastest round) above a smaller batch's by more than
# this (relative) is not noise: the per-sample constraint is dropped (see ``physical_fit``).
CLIFF_TOLERANCE = 0.10
_MAX_ITER = 20_000
_TOL = 1e-13


@dataclass(frozen=True)
class TimeInterval:
    """A time (or any positive quantity) with its plausible range, ``lo <= mid <= hi``."""

    lo: float
    mid: float
    hi: float

    def __post_init__(self) -> None:
        if not (self.lo <= self.mid <= self.hi):
            raise ValueError(f"need lo <= mid <= hi, got {self.lo}, {self.mid}, {self.hi}")

    def scaled(self, factor: float) -> "TimeInterval":
        return TimeInterval(self.lo * factor, self.mid * factor, self.hi * factor)

    @property
    def relative(self) -> tuple[float, float]:
        """(lo/mid, hi/mid)."""
        return (self.lo / self.mid, self.hi / self.mid) if self.mid > 0 else (1.0, 1.0)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``0 <= q <= 1``."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    v = sorted(values)
    pos = q * (len(v) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(v) - 1)
    return v[i] + (pos - i) * (v[j] - v[i])


def summarize_rounds(round_medians: Sequence[float]) -> TimeInterval:
    """Step time of one batch size from its per-round median step times: ``mid`` is the
    ROUND_QUANTILE quantile (load adds time, never removes it), ``lo`` the fastest round,
    ``hi`` the HIGH_QUANTILE quantile. Non-finite or non-positive values raise ValueError."""
    values = [float(v) for v in round_medians]
    if not values:
        raise ValueError("no timing rounds")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"step times must be finite and > 0, got {values}")
    return TimeInterval(min(values), quantile(values, ROUND_QUANTILE),
                        quantile(values, HIGH_QUANTILE))


# --------------------------------------------------------------------------- isotonic pieces


def pava(y: Sequence[float], w: Sequence[float], increasing: bool = True) -> list[float]:
    """Weighted least-squares projection of ``y`` onto non-decreasing (or non-increasing)
    sequences: the pool-adjacent-violators algorithm (Ayer et al. 1955), O(n)."""
    if len(y) != len(w):
        raise ValueError("y and w differ in length")
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([sign * yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([sign * mean] * count)
    return out


def _project_both(y: list[float], c: list[float], w: list[float]) -> list[float]:
    """Weighted projection of ``y`` onto {z non-decreasing} ∩ {z - c non-increasing}
    (Dykstra 1983; Boyle & Dykstra 1986): converges to the exact projection, not merely a
    point of the intersection."""
    n = len(y)
    x = list(y)
    p = [0.0] * n
    q = [0.0] * n
    for _ in range(_MAX_ITER):
        u = pava([x[i] + p[i] for i in range(n)], w, increasing=True)
        p = [x[i] + p[i] - u[i] for i in range(n)]
        shifted = pava([u[i] + q[i] - c[i] for i in range(n)], w, increasing=False)
        v = [shifted[i] + c[i] for i in range(n)]
        q = [u[i] + q[i] - v[i] for i in range(n)]
        change = max(abs(v[i] - x[i]) for i in range(n))
        x = v
        if change < _TOL:
            break
    # Both constraints to rounding: a last monotone pass cannot break the per-sample one by
    # more than the tolerance the loop stopped at.
    return pava(x, w, increasing=True)


@dataclass(frozen=True)
class ShapeFit:
    """Fitted step times (seconds) at ``batch_sizes`` (ascending); ``per_sample_constrained``
    is False when only monotonicity was imposed, ``note`` then says where and why."""

    batch_sizes: tuple[int, ...]
    fitted_s: tuple[float, ...]
    measured_s: tuple[float, ...]
    per_sample_constrained: bool
    note: str | None = None

    def at(self, batch_size: int) -> float:
        return self.fitted_s[self.batch_sizes.index(batch_size)]


def physical_fit(batch_sizes: Sequence[int], times_s: Sequence[float],
                 fastest_s: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None) -> ShapeFit:
    """Least squares on log step times subject to: step time non-decreasing in b, time per
    sample non-increasing in b. ``fastest_s`` (per batch size, e.g. the fastest timing round;
    default ``times_s``) decides whether a violation of the per-sample constraint is a real
    cliff (``per_sample_cliff``); then monotonicity alone is imposed. Batch sizes must be distinct ints >= 1; times finite and > 0."""
    n = len(batch_sizes)
    if n != len(times_s) or (fastest_s is not None and len(fastest_s) != n) or (
            weights is not None and len(weights) != n):
        raise ValueError("batch_sizes, times_s, fastest_s and weights differ in length")
    if n == 0:
        return ShapeFit((), (), (), True)
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be ints >= 1, got {b!r}")
    if len(set(batch_sizes)) != n:
        raise ValueError(f"batch sizes must be distinct, got {list(batch_sizes)}")
    for t in list(times_s) + list(fastest_s or []):
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"step times must be finite and > 0, got {t!r}")
    if weights is not None and any(not (math.isfinite(v) and v > 0) for v in weights):
        raise ValueError("weights must be finite and > 0")
    order = sorted(range(n), key=lambda i: batch_sizes[i])
    bs = [batch_sizes[i] for i in order]
    ts = [float(times_s[i]) for i in order]
    fast = [float((fastest_s or times_s)[i]) for i in order]
    w = [float((weights or [1.0] * n)[i]) for i in order]
    y = [math.log(t) for t in ts]
    c = [math.log(b) for b in bs]
    cliff = per_sample_cliff(bs, ts, fast)
    if cliff is not None:
        i, j = cliff
        fitted = [math.exp(v) for v in pava(y, w, increasing=True)]
        note = (f"time per sample grows with the batch (b={bs[j]}: fastest round "
                f"{fast[j] / bs[j] * 1e6:.3g} µs/sample; b={bs[i]}: {ts[i] / bs[i] * 1e6:.3g} "
                "µs/sample): fitted as non-decreasing only")
        return ShapeFit(tuple(bs), tuple(fitted), tuple(ts), False, note)
    fitted = [math.exp(v) for v in _project_both(y, c, w)]
    return ShapeFit(tuple(bs), tuple(fitted), tuple(ts), True)


def per_sample_cliff(bs: Sequence[int], ts: Sequence[float], fast: Sequence[float]
                     ) -> tuple[int, int] | None:
    """First pair ``i < j`` (ascending batch sizes) where even the fastest round at ``b_j``
    costs more per sample than the step time at ``b_i`` by more than CLIFF_TOLERANCE: the
    per-sample time really grows there (timing noise would have to slow every round of
    ``b_j``). None when there is no such pair."""
    for j in range(len(bs)):
        for i in range(j):
            if fast[j] / bs[j] > (1 + CLIFF_TOLERANCE) * ts[i] / bs[i]:
                return i, j
    return None
