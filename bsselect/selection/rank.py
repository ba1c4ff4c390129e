"""Step-time fit, the optimal-batch formula, and the ranking of sweep trials. Pure: no torch.

Model (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):

- Step time ``t(b) = tau_f + tau_d * b``: a fixed overhead per step plus time per sample.
- Steps to a target ``S(b) = S_min * (1 + B_noise / b)``, equivalently the per-step loss drop
  ``dL(b) = dL_max / (1 + B_noise / b)``.
- Time to the target ``T(b) = S(b) * t(b)`` is minimised at ``b_opt = sqrt(B_noise*tau_f/tau_d)``.

Real step times are not exactly linear, so trials are ranked by ``(1 + B_hat/b) * t_measured(b)``
(time to the target in units of S_min steps) and the closed form is reported beside it, with a
one-line verdict on whether the two agree and, if not, the likely reason. How the learning
rate follows the batch size is in ``lr_scaling``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import Enum
from statistics import median
from typing import Any, Callable, Iterable, Mapping, Sequence

from .choice import Choice, NoiseInterval, choose, noise_interval
from .steptime import ShapeFit, TimeInterval, physical_fit
from .trial_types import TrialResult, TrialStatus

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
        notes.append(f"step time fell as the batch grew (slope {_fmt_s(slope)}/sample); "
                     "per-sample time clipped to 0")
    elif intercept < 0:
        tau_f, tau_d, f_clip = 0.0, median(t / b for b, t in points), True
        notes.append(f"per-step overhead fitted negative ({_fmt_s(intercept)}); clipped to 0 and "
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


# --------------------------------------------------------------------------- ranking


class BHatSource(str, Enum):
    """Where the noise scale used for ranking came from."""

    b_noise = "b_noise"  # fitted from the trials' per-step loss drops (fit_noise_model)
    b_simple = "b_simple"  # gradient noise scale measured in the trials (pooled)
    given = "given"  # supplied by the caller


@dataclass(frozen=True)
class BHat:
    """The noise-scale estimate to rank with, and both candidates it was chosen from.

    ``interval`` is its uncertainty (``choice.noise_interval``; None when none was recorded)
    and ``from_sizes`` the batch sizes of the trials it was pooled over."""

    value: float | None
    source: BHatSource | None
    b_simple: float | None
    noise_fit: BNoiseFit
    interval: NoiseInterval | None = None
    from_sizes: tuple[int, ...] = ()


def pooled_b_simple(trials: Iterable[TrialResult]) -> float | None:
    """One noise scale from every ok trial's measurement: ``mean tr(Sigma) / mean |G|^2``.

    As within one measurement (docs/method.md, "Fits": average the two unbiased estimates separately,
    then divide), so a trial whose |G|^2 is still indistinguishable from zero (at the noise
    floor, where its own ratio explodes) adds its evidence instead of an outlier. This is the
    harmonic mean of the trials' ``b_simple`` weighted by their ``tr(Sigma)``. Journals from
    before the estimates were kept have only ``b_simple``: then their harmonic mean. None
    when nothing was measured or the pooled |G|^2 is not positive.
    """
    pooled = pooled_trials(trials)
    if pooled and pooled[0].grad_sq_norm is not None:
        grad = sum(t.grad_sq_norm for t in pooled) / len(pooled)  # type: ignore[misc]
        trace = sum(t.trace_sigma for t in pooled) / len(pooled)  # type: ignore[misc]
        return trace / grad if grad > 0 and trace > 0 else None
    values = [t.b_simple for t in pooled]
    return len(values) / sum(1.0 / v for v in values) if values else None  # type: ignore[operator]


def pooled_trials(trials: Iterable[TrialResult]) -> list[TrialResult]:
    """The ok trials ``pooled_b_simple`` pools: those that kept |G|^2 and tr(Sigma), or, when
    none did (older journals), those with a positive ``b_simple``."""
    ok = [t for t in trials if t.ok]
    pairs = [t for t in ok if t.grad_sq_norm is not None and t.trace_sigma is not None]
    return pairs or [t for t in ok if t.b_simple is not None and t.b_simple > 0]


def pooled_interval(trials: Sequence[TrialResult]) -> NoiseInterval | None:
    """``choice.noise_interval`` of the pooled estimates: the means of |G|^2 and tr(Sigma) over
    ``trials`` and their standard errors ``sqrt(sum se_i^2) / k``. None when a trial lacks
    its standard errors (older journals) or the pooled estimate is not positive."""
    rows = [(t.grad_sq_norm, t.grad_sq_norm_se, t.trace_sigma, t.trace_sigma_se)
            for t in trials]
    if not rows or any(v is None for row in rows for v in row):
        return None
    k = len(rows)
    grad = sum(r[0] for r in rows) / k  # type: ignore[misc]
    trace = sum(r[2] for r in rows) / k  # type: ignore[misc]
    grad_se = math.sqrt(sum(r[1] ** 2 for r in rows)) / k  # type: ignore[operator]
    trace_se = math.sqrt(sum(r[3] ** 2 for r in rows)) / k  # type: ignore[operator]
    return noise_interval(grad, grad_se, trace, trace_se)


def noise_fit_of(trials: Iterable[TrialResult]) -> BNoiseFit:
    """``fit_noise_model`` on the ok trials' per-step loss drops."""
    ok = [t for t in trials if t.ok]
    return fit_noise_model([t.batch_size for t in ok], [t.loss_drop_per_step for t in ok])


def choose_b_hat(trials: Sequence[TrialResult]) -> BHat:
    """Prefer the ``B_simple`` measured in the trials, pooled over every ok trial that
    measured it (``pooled_b_simple``) with its interval (``pooled_interval``); fall back to
    ``B_noise`` fitted from the trials' per-step loss drops; else None.

    Measured, not fitted, first: with equal-sample trials the small batches get further and
    flatten out, which inflates the fitted B_noise by 5x to 20,000x on the built-in examples
    (docs/benchmarks-sweep.md). The fit is still reported as a diagnostic.

    Pooled over all the trials, not only the better-trained half (tried, and kept as the
    benchmark's ``b_simple_trained`` rule): on linreg
    the better-trained half sits at the noise floor, where its pooled |G|^2 is not positive,
    and the fallback to the fitted B_noise then picked 2048 (regret 36); pooled over all it
    picks 64-128 (docs/benchmarks-sweep.md)."""
    fit = noise_fit_of(trials)
    pooled = pooled_trials(trials)
    simple = pooled_b_simple(pooled)
    if simple is not None:
        return BHat(simple, BHatSource.b_simple, simple, fit, pooled_interval(pooled),
                    tuple(sorted(t.batch_size for t in pooled)))
    if fit.b_noise is not None:
        return BHat(fit.b_noise, BHatSource.b_noise, simple, fit)
    return BHat(None, None, simple, fit)


class VerdictKind(str, Enum):
    """What the verdict line says; the text gives the numbers. Every verdict names the
    recommended batch size first; the kinds say how the closed form relates to it."""

    agree = "agree"  # b_opt rounds into the set of batch sizes tied with the best
    no_ok_trials = "no_ok_trials"
    no_b_hat = "no_b_hat"  # no noise scale: ranked by measured loss drop per second
    no_step_fit = "no_step_fit"  # the closed form is undefined (step-time line missing/clipped)
    outside_range = "outside_range"  # b_opt is beyond the tried batch sizes
    nonlinear_step_time = "nonlinear_step_time"  # the line misprices some batch size
    line_misprices = "line_misprices"  # the line is within tolerance but moves the optimum


@dataclass(frozen=True)
class RankedTrial:
    """One row of the ranking table.

    ``predicted_time_s = (1 + B_hat/b) * t(b)`` with ``t(b)`` the step time after the physical
    fit (``fitted_step_time_s``): predicted wall time to the target divided by S_min, seconds
    (lower is better), ``predicted_lo_s``-``predicted_hi_s`` its interval (hi may be None:
    unbounded); ``relative_time`` is that over the best row's; ``tied``: tied with the best.
    """

    batch_size: int
    status: TrialStatus
    predicted_time_s: float | None
    relative_time: float | None
    step_time_s: float | None
    loss_drop_per_s: float | None
    val_loss: float | None
    val_metric: float | None
    wall_s: float
    fitted_step_time_s: float | None = None
    predicted_lo_s: float | None = None
    predicted_hi_s: float | None = None
    tied: bool = False


@dataclass(frozen=True)
class Ranking:
    """Trials ranked best first, the fits behind the ranking, and the verdict.

    ``rows`` holds every trial (ok ones in ranking order, then the rest by batch size);
    ``ranking`` the batch sizes of the ok rows only, the recommendation first.
    ``tied_with_best`` are the batch sizes whose predicted time is within uncertainty of the
    best's (``choice``), ``best_point`` the lowest point prediction; the recommendation is
    ``choice.Choice.RULE`` among the tied. ``b_opt_batch_size`` is ``b_opt`` rounded (in log2)
    to the nearest tried ok batch size; ``speed_winner`` has the best measured
    loss_drop_per_s and ``val_winner`` the lowest val_loss (diagnostics).
    """

    rows: tuple[RankedTrial, ...]
    ranking: tuple[int, ...]
    recommended_batch_size: int | None
    verdict: str
    verdict_kind: VerdictKind
    step_fit: StepTimeFit
    noise_fit: BNoiseFit
    b_simple: float | None
    b_hat: float | None
    b_hat_source: BHatSource | None
    b_opt: float | None
    b_opt_batch_size: int | None
    speed_winner: int | None
    val_winner: int | None
    tied_with_best: tuple[int, ...] = ()
    best_point: int | None = None
    b_hat_interval: NoiseInterval | None = None
    b_hat_sizes: tuple[int, ...] = ()
    shape: ShapeFit | None = None

    def fit_dict(self) -> dict[str, Any]:
        """docs/contract.md's ``sweep`` ``fit`` object (tau_f_s, tau_d_s, b_simple, b_noise, b_opt),
        then siblings."""
        interval = self.b_hat_interval
        return {
            "tau_f_s": self.step_fit.tau_f_s,
            "tau_d_s": self.step_fit.tau_d_s,
            "b_simple": self.b_simple,
            "b_noise": self.noise_fit.b_noise,
            "b_opt": self.b_opt,
            "r2": self.step_fit.r2,
            "b_hat": self.b_hat,
            "b_hat_source": self.b_hat_source.value if self.b_hat_source else None,
            "b_hat_interval": None if interval is None else [
                interval.lo, interval.hi if math.isfinite(interval.hi) else None],
            "b_hat_from_batch_sizes": list(self.b_hat_sizes),
            "b_opt_batch_size": self.b_opt_batch_size,
            "step_time_shape": None if self.shape is None else (
                "non-decreasing, per-sample non-increasing" if self.shape.per_sample_constrained
                else "non-decreasing"),
            "step_time_shape_note": None if self.shape is None else self.shape.note,
            "tied_with_best": list(self.tied_with_best),
            "best_point": self.best_point,
            "verdict": self.verdict,
        }


def rank_trials(
    trials: Sequence[TrialResult],
    b_hat: float | None,
    b_hat_source: BHatSource = BHatSource.given,
    *,
    times: Mapping[int, TimeInterval] | None = None,
    b_interval: NoiseInterval | None = None,
    b_hat_sizes: Sequence[int] = (),
) -> Ranking:
    """Rank ok trials by predicted time to the target ``(1 + B_hat/b) * t(b)`` (McCandlish et
    al. 2018: steps to a target grow as ``1 + B_noise/b``, each step costs ``t(b)``).

    ``t(b)``: the trials' ``step_time_s`` (or ``times``, intervals from the interleaved timing
    rounds), after ``steptime.physical_fit``. ``b_interval`` is the uncertainty of ``b_hat``
    (default: none). The batch sizes tied with the best and the pick among them come from
    ``choice.choose``; the pick heads the ranking. Without ``b_hat`` the ranking is by
    loss_drop_per_s, val_loss and batch size. Non-ok trials go last.
    ``choose_b_hat(trials)`` picks ``b_hat``, its source and interval.
    """
    if b_hat is not None and not (math.isfinite(b_hat) and b_hat >= 0):
        raise ValueError(f"b_hat must be a finite number >= 0, got {b_hat}")
    if b_interval is not None and (b_hat is None or not math.isclose(
            b_interval.value, b_hat, rel_tol=1e-9, abs_tol=1e-12)):
        raise ValueError(f"b_interval {b_interval} does not belong to b_hat {b_hat}")
    ok = [t for t in trials if t.ok]
    timed = {t.batch_size: (times[t.batch_size] if times and t.batch_size in times else
                            TimeInterval(t.step_time_s, t.step_time_s, t.step_time_s))
             for t in ok if t.step_time_s is not None or (times and t.batch_size in times)}
    sizes = sorted(timed)
    fit = fit_step_time(sizes, [timed[b].mid for b in sizes])
    shape = physical_fit(sizes, [timed[b].mid for b in sizes], [timed[b].lo for b in sizes])
    fitted = {b: timed[b].scaled(shape.at(b) / timed[b].mid) for b in sizes}
    pick = None
    if b_hat is not None and fitted:
        pick = choose(fitted, b_interval or NoiseInterval.exact(b_hat))
    rows = _ordered_rows(trials, pick, fitted)
    ranking = tuple(r.batch_size for r in rows if r.status is TrialStatus.ok)
    ctx = _Context(
        ok_sizes=tuple(sorted({t.batch_size for t in ok})),
        fit=fit,
        noise_fit=noise_fit_of(trials),
        b_simple=pooled_b_simple(trials),
        b_hat=b_hat,
        source=b_hat_source if b_hat is not None else None,
        b_opt=_b_opt_or_inf(b_hat, fit),
        recommended=ranking[0] if ranking else None,
        statuses=Counter(t.status.value for t in trials),
        choice=pick,
        interval=b_interval if b_hat is not None else None,
        b_hat_sizes=tuple(b_hat_sizes),
    )
    kind, text = _verdict(ctx)
    nearest = _nearest(ctx.b_opt, ctx.ok_sizes)
    return Ranking(rows, ranking, ctx.recommended, text, kind, fit, ctx.noise_fit, ctx.b_simple,
                   b_hat, ctx.source, ctx.b_opt if ctx.b_opt != math.inf else None, nearest,
                   _best(ok, lambda t: t.loss_drop_per_s, higher=True),
                   _best(ok, lambda t: t.val_loss, higher=False),
                   pick.tied if pick else (), pick.best if pick else None, ctx.interval,
                   tuple(b_hat_sizes), shape)


def _ordered_rows(trials: Sequence[TrialResult], pick: Choice | None,
                  fitted: Mapping[int, TimeInterval]) -> tuple[RankedTrial, ...]:
    def key(t: TrialResult) -> tuple[bool, bool, float, float, float, int]:
        p = pick.predicted.get(t.batch_size) if pick else None
        return (not (pick and t.batch_size == pick.pick), p is None,
                p.mid if p is not None else 0.0, -_or(t.loss_drop_per_s, -math.inf),
                _or(t.val_loss, math.inf), t.batch_size)

    ok = sorted((t for t in trials if t.ok), key=key)
    rest = sorted((t for t in trials if not t.ok), key=lambda t: t.batch_size)
    best = pick.predicted[pick.best].mid if pick else None
    rows = []
    for t in ok + rest:
        p = pick.predicted.get(t.batch_size) if (pick and t.ok) else None
        f = fitted.get(t.batch_size) if t.ok else None
        rows.append(RankedTrial(
            t.batch_size, t.status, p.mid if p else None,
            p.mid / best if p is not None and best else None, t.step_time_s, t.loss_drop_per_s,
            t.val_loss, t.val_metric, t.wall_s, f.mid if f else None, p.lo if p else None,
            p.hi if p is not None and math.isfinite(p.hi) else None,
            bool(pick and t.ok and t.batch_size in pick.tied)))
    return tuple(rows)


def _or(value: float | None, default: float) -> float:
    return value if value is not None and math.isfinite(value) else default


def _best(
    trials: Sequence[TrialResult], value: Callable[[TrialResult], float | None], higher: bool
) -> int | None:
    """Batch size of the trial with the best finite ``value`` (ties: the smaller batch)."""
    scored = [(v, t.batch_size) for t in trials
              if (v := value(t)) is not None and math.isfinite(v)]
    if not scored:
        return None
    return min(scored, key=lambda vb: (-vb[0] if higher else vb[0], vb[1]))[1]


def _b_opt_or_inf(b_hat: float | None, fit: StepTimeFit) -> float | None:
    """``b_opt``, or infinity when step time does not grow with b (bigger is always faster);
    None when the overhead had to be clipped (the line does not describe the step time)."""
    if fit.tau_f_clipped:
        return None
    if b_hat is not None and b_hat > 0 and fit.tau_d_s == 0.0 and fit.tau_f_s:
        return math.inf
    return b_opt(b_hat, fit.tau_f_s, fit.tau_d_s)


def _nearest(target: float | None, sizes: Sequence[int]) -> int | None:
    """The size closest to ``target`` in log2 (ties: the larger); 0 -> smallest, inf -> largest."""
    if target is None or not sizes:
        return None
    if target <= 0:
        return min(sizes)
    if target == math.inf:
        return max(sizes)
    return min(sizes, key=lambda b: (abs(math.log2(b / target)), -b))


@dataclass(frozen=True)
class _Context:
    """Everything the verdict looks at; ``b_opt`` is math.inf when unbounded."""

    ok_sizes: tuple[int, ...]
    fit: StepTimeFit
    noise_fit: BNoiseFit
    b_simple: float | None
    b_hat: float | None
    source: BHatSource | None
    b_opt: float | None
    recommended: int | None
    statuses: Counter[str]
    choice: Choice | None
    interval: NoiseInterval | None
    b_hat_sizes: tuple[int, ...]


def _b_hat_text(c: _Context) -> str:
    """``B_hat = 319 (90%: 210-640; B_simple pooled over 7 trials)``."""
    parts = []
    if c.interval is not None and (c.interval.lo < c.interval.value or
                                   c.interval.hi > c.interval.value):
        parts.append(f"90%: {_fmt_num(c.interval.lo)}-{_fmt_num(c.interval.hi)}")
    label = _SOURCE_LABEL[c.source] if c.source else "given"
    if c.source is BHatSource.b_simple and c.b_hat_sizes:
        n = len(c.b_hat_sizes)
        label = f"B_simple pooled over {n} trial{'s' * (n > 1)}"
    parts.append(label)
    return f"B_hat = {_fmt_num(c.b_hat)} ({'; '.join(parts)})"


def _sizes_text(sizes: Sequence[int]) -> str:
    return ", ".join(str(b) for b in sizes)


def _verdict(c: _Context) -> tuple[VerdictKind, str]:
    """One story: the recommendation, why (tied set and rule), and how the closed form
    ``b_opt`` relates to it."""
    if not c.ok_sizes:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(c.statuses.items())) or "no trials"
        return VerdictKind.no_ok_trials, f"no trial finished ok ({counts}); nothing to recommend"
    if c.b_hat is None or c.source is None or c.choice is None:
        why = ("no B_hat given" if c.noise_fit.b_noise is not None or c.b_simple is not None
               else f"no B_simple measured; B_noise: {c.noise_fit.reason}")
        return VerdictKind.no_b_hat, (
            f"no noise-scale estimate ({why}); ranked by measured loss drop per second, "
            f"best b={c.recommended}")
    ch = c.choice
    head = f"recommended b={ch.pick}: lowest predicted time to target (1 + B/b)·t(b) with " \
           f"{_b_hat_text(c)}"
    if len(ch.tied) > 1:
        others = [b for b in ch.tied if b != ch.pick]
        head += (f"; tied within uncertainty: {_sizes_text(ch.tied)}, picked by the smallest "
                 f"worst-case slowdown ({ch.worst_regret[ch.pick]:.2f}x"
                 + (f", against {max(ch.worst_regret[b] for b in others):.2f}x or more for the "
                    "others" if others else "") + ")")
    if c.b_opt is None:
        return VerdictKind.no_step_fit, (
            f"{head}. No closed form b_opt ({c.fit.note or 'step time does not determine it'}); "
            "the pick follows the measured step times")
    nearest = _nearest(c.b_opt, c.ok_sizes)
    closed = f"The closed form b_opt = √(B·τ_f/τ_d) = {_fmt_num(c.b_opt)} rounds to b={nearest}"
    agrees = nearest in ch.tied
    lo, hi = c.ok_sizes[0], c.ok_sizes[-1]
    follows = "the pick follows the measured step times because"
    if c.b_opt < lo / math.sqrt(2) or c.b_opt > hi * math.sqrt(2):
        where = ("the step time did not grow with b in the line fit, so b_opt is unbounded"
                 if c.b_opt == math.inf else f"b_opt lies outside the tried range {lo}-{hi}")
        if agrees:
            more = ("larger batches (gradient accumulation beyond what fits) may be faster still"
                    if c.b_opt > hi else "smaller batches may be faster still")
            return VerdictKind.outside_range, f"{head}. {closed}: it agrees, but {where}; {more}"
        return VerdictKind.outside_range, (
            f"{head}. {closed}, not in the tied set: {follows} {where}")
    if agrees:
        return VerdictKind.agree, f"{head}. {closed}: it agrees"
    if not c.fit.linear and c.fit.worst_batch_size is not None:
        b = c.fit.worst_batch_size
        return VerdictKind.nonlinear_step_time, (
            f"{head}. {closed}, not in the tied set: {follows} step time is not linear in b "
            f"(b={b}: measured {_fmt_s(dict(c.fit.points)[b])}, line "
            f"{_fmt_s(c.fit.predict_s(b))})")
    return VerdictKind.line_misprices, (
        f"{head}. {closed}, not in the tied set: {follows} the line t(b) = τ_f + τ_d·b is off "
        f"by up to {100 * (c.fit.max_rel_residual or 0):.0f}% (b={c.fit.worst_batch_size}), "
        "enough to move the optimum")


_SOURCE_LABEL = {
    BHatSource.b_noise: "B_noise fitted from the trials",
    BHatSource.b_simple: "B_simple pooled over the trials",
    BHatSource.given: "given",
}


def _fmt_num(x: float | None) -> str:
    """``71.3``, ``1,234``, ``unbounded``; ``n/a`` for None."""
    if x is None:
        return "n/a"
    if x == math.inf:
        return "unbounded"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt_s(seconds: float | None) -> str:
    """``12.3 ms`` — three significant digits in s, ms or µs."""
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")
