"""The optimal-batch formula and the fits behind it. Pure: no torch.

Model (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):

- Step time ``t(b) = tau_f + tau_d * b``: a fixed overhead per step plus time per sample.
- Steps to a target ``S(b) = S_min * (1 + B_noise / b)``, equivalently the per-step loss drop
  ``dL(b) = dL_max / (1 + B_noise / b)``.
- Time to the target ``T(b) = S(b) * t(b)`` is minimised at ``b_opt = sqrt(B_noise*tau_f/tau_d)``.

``rank`` ranks the trials with these fits; how the learning rate follows the batch size is in
``lr_scaling``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import median
from typing import Sequence

# A step-time point further than this (relative) from the fitted line makes t(b) "not linear".
NONLINEAR_REL_RESIDUAL = 0.2
# Fewer batch sizes than this cannot tell a 1/dL-vs-1/b line from noise.
MIN_B_NOISE_POINTS = 3


# --------------------------------------------------------------------------- step-time fit


@dataclass(frozen=True)
class StepTimeFit:
    """Robust (Theil–Sen) fit of ``t(b) = tau_f_s + tau_d_s * b`` on median step times.

    ``tau_f_s`` is seconds per step, ``tau_d_s`` seconds per sample; both None when fewer than
    two batch sizes were timed (``note`` says why). A negative fitted overhead is clipped to 0
    (``tau_f_clipped``) and the slope refitted through the origin; a negative slope is clipped to
    0 (``tau_d_clipped``) and the overhead set to the median time. ``r2`` needs >= 3 points.
    ``max_rel_residual`` = max |t_i - fit(b_i)| / t_i, at ``worst_batch_size``.
    """

    tau_f_s: float | None
    tau_d_s: float | None
    r2: float | None
    max_rel_residual: float | None
    worst_batch_size: int | None
    n_points: int
    tau_f_clipped: bool = False
    tau_d_clipped: bool = False
    note: str | None = None
    points: tuple[tuple[int, float], ...] = ()  # (batch_size, median step time s) fitted

    def predict_s(self, batch_size: float) -> float | None:
        """Fitted step time at ``batch_size``, seconds (None without a fit)."""
        if self.tau_f_s is None or self.tau_d_s is None:
            return None
        return self.tau_f_s + self.tau_d_s * batch_size

    @property
    def linear(self) -> bool:
        """False when some timed batch size is off the line by more than NONLINEAR_REL_RESIDUAL."""
        return self.max_rel_residual is None or self.max_rel_residual <= NONLINEAR_REL_RESIDUAL


def fit_step_time(batch_sizes: Sequence[int], step_times_s: Sequence[float]) -> StepTimeFit:
    """Fit ``t(b) = tau_f + tau_d*b`` to step times (seconds) measured at ``batch_sizes``.

    Several times at one batch size are reduced to their median first; non-finite or
    non-positive times are dropped (and said so in ``note``). The slope is the Theil–Sen
    estimator (median of pairwise slopes, robust to ~29% outliers), the intercept the median of
    ``t_i - slope*b_i``.
    """
    bs, ts, dropped = _medians_by_batch(batch_sizes, step_times_s)
    notes = [f"dropped {dropped} non-finite or non-positive step times"] if dropped else []
    points = tuple(zip(bs, ts))
    if len(bs) < 2:
        notes.append(
            "no step times to fit" if not bs else
            f"step time measured at one batch size ({bs[0]}) only: cannot separate the per-step "
            "overhead from the per-sample time"
        )
        return StepTimeFit(None, None, None, None, None, len(bs), note="; ".join(notes),
                           points=points)
    slope, intercept = _theil_sen([float(b) for b in bs], ts)
    # Convex step times (a cache or threading cliff at large b) bend the line: a negative or
    # inflated overhead. The linear model still holds below the cliff, where b_opt lives: use
    # the longest prefix of batch sizes that a line with overhead >= 0 fits within 20%.
    upto = _linear_prefix(bs, ts)
    if upto < len(bs):
        slope, intercept = _theil_sen([float(b) for b in bs[:upto]], ts[:upto])
        notes.append(f"step time grows faster than linearly above b={bs[upto - 1]}; "
                     f"line fitted on b <= {bs[upto - 1]}")
    tau_f, tau_d, f_clip, d_clip = intercept, slope, False, False
    if slope < 0:
        tau_f, tau_d, d_clip = median(ts), 0.0, True
        notes.append(f"step time fell as the batch grew (slope {format_seconds(slope)}/sample); "
                     "per-sample time clipped to 0")
    elif intercept < 0:
        tau_f, tau_d, f_clip = 0.0, median(t / b for b, t in points), True
        notes.append(f"per-step overhead fitted negative ({format_seconds(intercept)}); clipped to 0 and "
                     "the per-sample time refitted through the origin")
    pred = [tau_f + tau_d * b for b in bs]
    rel = [abs(t - p) / t for t, p in zip(ts, pred)]
    worst = max(range(len(bs)), key=lambda i: rel[i])
    return StepTimeFit(tau_f, tau_d, _r2(ts, pred), rel[worst], bs[worst], len(bs), f_clip, d_clip,
                       "; ".join(notes) or None, points)


def _linear_prefix(bs: Sequence[int], ts: Sequence[float], tolerance: float = 0.2) -> int:
    """Length of the longest prefix (>= 2 points) that a Theil–Sen line with a non-negative
    intercept fits within ``tolerance`` relative error; all points when none does."""
    for upto in range(len(bs), 1, -1):
        x = [float(b) for b in bs[:upto]]
        slope, intercept = _theil_sen(x, ts[:upto])
        if intercept >= 0 and all(abs(t - (intercept + slope * b)) <= tolerance * t
                                  for b, t in zip(x, ts[:upto])):
            return upto
    return len(bs)


def _r2(y: Sequence[float], pred: Sequence[float]) -> float | None:
    """Coefficient of determination; None with < 3 points (two points always fit) or flat y."""
    if len(y) < 3:
        return None
    mean = sum(y) / len(y)
    ss_tot = sum((v - mean) ** 2 for v in y)
    if ss_tot == 0:
        return None
    return 1.0 - sum((v - p) ** 2 for v, p in zip(y, pred)) / ss_tot


def _theil_sen(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept): slope = median over pairs of (y_j - y_i)/(x_j - x_i), distinct x;
    intercept = median of y_i - slope*x_i (Theil 1950, Sen 1968)."""
    slopes = [(y[j] - y[i]) / (x[j] - x[i])
              for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
    slope = median(slopes)
    return slope, median(yi - slope * xi for xi, yi in zip(x, y))


def _medians_by_batch(
    batch_sizes: Sequence[int], values: Sequence[float | None]
) -> tuple[list[int], list[float], int]:
    """Distinct batch sizes (ascending), the median positive finite value at each, and how
    many values were dropped as None, non-finite or <= 0."""
    if len(batch_sizes) != len(values):
        raise ValueError(f"{len(batch_sizes)} batch sizes but {len(values)} values")
    groups: dict[int, list[float]] = defaultdict(list)
    dropped = 0
    for b, v in zip(batch_sizes, values):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be ints >= 1, got {b!r}")
        if v is None or not math.isfinite(v) or v <= 0:
            dropped += 1
        else:
            groups[b].append(float(v))
    bs = sorted(groups)
    return bs, [median(groups[b]) for b in bs], dropped


# --------------------------------------------------------------------------- noise-scale fit


@dataclass(frozen=True)
class BNoiseFit:
    """``B_noise`` fitted from the per-step loss drop of trials at several batch sizes.

    ``dl_max`` is the extrapolated per-step loss drop at infinite batch (loss units per step).
    ``b_noise`` is None when the data cannot give one; ``reason`` then says why.
    """

    b_noise: float | None
    dl_max: float | None
    n_points: int
    reason: str | None = None


def fit_noise_model(batch_sizes: Sequence[int], loss_drop_per_step: Sequence[float]) -> BNoiseFit:
    """Fit ``dL(b) = dL_max / (1 + B_noise/b)`` (McCandlish et al. 2018, eq. 2.7 and App. D).

    Inverting, ``1/dL = 1/dL_max + (B_noise/dL_max) * (1/b)`` is linear in ``1/b``, so with a
    Theil–Sen line ``1/dL = c0 + c1/b``: ``B_noise = c1/c0`` and ``dL_max = 1/c0``. Batch sizes
    whose loss did not drop (dL <= 0) are left out; at least MIN_B_NOISE_POINTS must remain.
    """
    bs, dls, dropped = _medians_by_batch(batch_sizes, loss_drop_per_step)
    skipped = f" ({dropped} trials without a positive loss drop left out)" if dropped else ""
    if len(bs) < MIN_B_NOISE_POINTS:
        return BNoiseFit(None, None, len(bs), f"need a positive per-step loss drop at >= "
                         f"{MIN_B_NOISE_POINTS} batch sizes, have {len(bs)}{skipped}")
    slope, intercept = _theil_sen([1.0 / b for b in bs], [1.0 / d for d in dls])
    if intercept <= 0:
        return BNoiseFit(None, None, len(bs), "the per-step loss drop still grows in proportion "
                         f"to b up to b={bs[-1]} (1/dL vs 1/b has intercept <= 0): B_noise is "
                         f"beyond the tried range{skipped}")
    if slope < 0:
        return BNoiseFit(None, 1.0 / intercept, len(bs), "the per-step loss drop shrinks as b "
                         "grows, which the noise-scale model cannot produce (is the learning "
                         f"rate scaled too far at large b?){skipped}")
    return BNoiseFit(slope / intercept, 1.0 / intercept, len(bs), skipped.strip(" ()") or None)


def fit_b_noise(batch_sizes: Sequence[int], loss_drop_per_step: Sequence[float]) -> float | None:
    """``B_noise`` from per-step loss drops, or None; ``fit_noise_model`` gives the reason."""
    return fit_noise_model(batch_sizes, loss_drop_per_step).b_noise


def b_opt(b_noise: float | None, tau_f_s: float | None, tau_d_s: float | None) -> float | None:
    """``b_opt = sqrt(B_noise * tau_f / tau_d)``, the minimiser of
    ``T(b) = S_min (1 + B_noise/b)(tau_f + tau_d b)``.

    None when an input is missing or non-finite, ``B_noise < 0``, ``tau_f < 0`` or
    ``tau_d <= 0`` (with ``tau_d = 0`` the optimum is unbounded: bigger is always faster).
    """
    if b_noise is None or tau_f_s is None or tau_d_s is None:
        return None
    if not all(math.isfinite(v) for v in (b_noise, tau_f_s, tau_d_s)):
        return None
    if b_noise < 0 or tau_f_s < 0 or tau_d_s <= 0:
        return None
    return math.sqrt(b_noise * tau_f_s / tau_d_s)


def grad_accum_steps(recommended: int, max_fitting_batch: int) -> int:
    """Micro-batches to accumulate so that ``recommended`` samples fit per optimizer step:
    ``ceil(recommended / max_fitting_batch)`` (1 when it fits as is)."""
    if recommended < 1 or max_fitting_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1, got recommended={recommended}, "
            f"max_fitting_batch={max_fitting_batch}"
        )
    return -(-recommended // max_fitting_batch)


def format_seconds(seconds: float | None) -> str:
    """``12.3 ms`` — three significant digits in s, ms or µs."""
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")
