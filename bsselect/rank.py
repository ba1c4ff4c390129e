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
from typing import Callable, Iterable, Sequence

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
    """The noise-scale estimate to rank with, and both candidates it was chosen from."""

    value: float | None
    source: BHatSource | None
    b_simple: float | None
    noise_fit: BNoiseFit


def pooled_b_simple(trials: Iterable[TrialResult]) -> float | None:
    """One noise scale from every ok trial's measurement: ``mean tr(Sigma) / mean |G|^2``.

    As within one measurement (DESIGN.md: average the two unbiased estimates separately,
    then divide), so a trial whose |G|^2 is still indistinguishable from zero (at the noise
    floor, where its own ratio explodes) adds its evidence instead of an outlier. This is the
    harmonic mean of the trials' ``b_simple`` weighted by their ``tr(Sigma)``. Journals from
    before the estimates were kept have only ``b_simple``: then their harmonic mean. None
    when nothing was measured or the pooled |G|^2 is not positive.
    """
    ok = [t for t in trials if t.ok]
    pairs = [(t.grad_sq_norm, t.trace_sigma) for t in ok
             if t.grad_sq_norm is not None and t.trace_sigma is not None]
    if pairs:
        grad = sum(g for g, _ in pairs) / len(pairs)
        trace = sum(tr for _, tr in pairs) / len(pairs)
        return trace / grad if grad > 0 and trace > 0 else None
    values = [t.b_simple for t in ok if t.b_simple is not None and t.b_simple > 0]
    return len(values) / sum(1.0 / v for v in values) if values else None


def noise_fit_of(trials: Iterable[TrialResult]) -> BNoiseFit:
    """``fit_noise_model`` on the ok trials' per-step loss drops."""
    ok = [t for t in trials if t.ok]
    return fit_noise_model([t.batch_size for t in ok], [t.loss_drop_per_step for t in ok])


def choose_b_hat(trials: Sequence[TrialResult]) -> BHat:
    """Prefer the ``B_simple`` measured in the trials (pooled); fall back to ``B_noise`` fitted
    from the trials' per-step loss drops; else None.

    Measured, not fitted, first: with equal-sample trials the small batches get further and
    flatten out, which inflates the fitted B_noise by 5x to 20,000x on the built-in examples
    (docs/benchmarks-sweep.md). The fit is still reported as a diagnostic."""
    fit, simple = noise_fit_of(trials), pooled_b_simple(trials)
    if simple is not None:
        return BHat(simple, BHatSource.b_simple, simple, fit)
    if fit.b_noise is not None:
        return BHat(fit.b_noise, BHatSource.b_noise, simple, fit)
    return BHat(None, None, simple, fit)


class VerdictKind(str, Enum):
    """What the verdict line says; the text gives the numbers."""

    agree = "agree"  # b_opt rounds to the empirically best batch size
    no_ok_trials = "no_ok_trials"
    no_b_hat = "no_b_hat"  # no noise scale: ranked by measured loss drop per second
    no_step_fit = "no_step_fit"  # step time known at < 2 batch sizes: no b_opt
    unverified = "unverified"  # no trial measured a loss drop or validation loss
    outside_range = "outside_range"  # b_opt is beyond the tried batch sizes
    nonlinear_step_time = "nonlinear_step_time"
    b_simple_underestimates = "b_simple_underestimates"
    larger_batches_faster = "larger_batches_faster"
    smaller_batches_faster = "smaller_batches_faster"


@dataclass(frozen=True)
class RankedTrial:
    """One row of the ranking table.

    ``predicted_time_s = (1 + B_hat/b) * step_time_s``: predicted wall time to the target
    divided by S_min, seconds (lower is better); ``relative_time`` is that over the best row's.
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


@dataclass(frozen=True)
class Ranking:
    """Trials ranked best first, the fits behind the ranking, and the verdict.

    ``rows`` holds every trial (ok ones best first, then the rest by batch size); ``ranking``
    the batch sizes of the ok rows only, best first. ``b_opt_batch_size`` is ``b_opt`` rounded
    (in log2) to the nearest tried ok batch size; ``speed_winner`` has the best measured
    loss_drop_per_s and ``val_winner`` the lowest val_loss.
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

    def fit_dict(self) -> dict[str, float | int | str | None]:
        """DESIGN.md's ``sweep`` ``fit`` object (tau_f_s, tau_d_s, b_simple, b_noise, b_opt),
        then siblings."""
        return {
            "tau_f_s": self.step_fit.tau_f_s,
            "tau_d_s": self.step_fit.tau_d_s,
            "b_simple": self.b_simple,
            "b_noise": self.noise_fit.b_noise,
            "b_opt": self.b_opt,
            "r2": self.step_fit.r2,
            "b_hat": self.b_hat,
            "b_hat_source": self.b_hat_source.value if self.b_hat_source else None,
            "b_opt_batch_size": self.b_opt_batch_size,
            "verdict": self.verdict,
        }


def rank_trials(
    trials: Sequence[TrialResult],
    b_hat: float | None,
    b_hat_source: BHatSource = BHatSource.given,
) -> Ranking:
    """Rank ok trials by ``(1 + B_hat/b) * t_measured(b)`` (McCandlish et al. 2018: steps to a
    target grow as ``1 + B_noise/b``, each step costs the measured median step time), then by
    loss_drop_per_s, val_loss and batch size; without ``b_hat`` by loss_drop_per_s first.
    Non-ok trials go last. ``choose_b_hat(trials)`` picks ``b_hat`` and its source.
    """
    if b_hat is not None and not (math.isfinite(b_hat) and b_hat >= 0):
        raise ValueError(f"b_hat must be a finite number >= 0, got {b_hat}")
    ok = [t for t in trials if t.ok]
    fit = fit_step_time([t.batch_size for t in ok if t.step_time_s is not None],
                        [t.step_time_s for t in ok if t.step_time_s is not None])
    rows = _ordered_rows(trials, b_hat)
    ranking = tuple(r.batch_size for r in rows if r.status is TrialStatus.ok)
    ctx = _Context(
        ok_sizes=tuple(sorted({t.batch_size for t in ok})),
        fit=fit,
        noise_fit=noise_fit_of(trials),
        b_simple=pooled_b_simple(trials),
        b_hat=b_hat,
        source=b_hat_source if b_hat is not None else None,
        b_opt=_b_opt_or_inf(b_hat, fit),
        speed_winner=_best(ok, lambda t: t.loss_drop_per_s, higher=True),
        val_winner=_best(ok, lambda t: t.val_loss, higher=False),
        recommended=ranking[0] if ranking else None,
        statuses=Counter(t.status.value for t in trials),
    )
    kind, text = _verdict(ctx)
    pick = _nearest(ctx.b_opt, ctx.ok_sizes)
    return Ranking(rows, ranking, ctx.recommended, text, kind, fit, ctx.noise_fit, ctx.b_simple,
                   b_hat, ctx.source, ctx.b_opt if ctx.b_opt != math.inf else None, pick,
                   ctx.speed_winner, ctx.val_winner)


def _ordered_rows(trials: Sequence[TrialResult], b_hat: float | None) -> tuple[RankedTrial, ...]:
    def predicted(t: TrialResult) -> float | None:
        if b_hat is None or t.step_time_s is None:
            return None
        return (1.0 + b_hat / t.batch_size) * t.step_time_s

    def key(t: TrialResult) -> tuple[bool, float, float, float, int]:
        p = predicted(t)
        return (p is None, p if p is not None else 0.0, -_or(t.loss_drop_per_s, -math.inf),
                _or(t.val_loss, math.inf), t.batch_size)

    ok = sorted((t for t in trials if t.ok), key=key)
    rest = sorted((t for t in trials if not t.ok), key=lambda t: t.batch_size)
    best = predicted(ok[0]) if ok else None
    rows = []
    for t in ok + rest:
        p = predicted(t) if t.ok else None
        relative = p / best if p is not None and best else None
        rows.append(RankedTrial(t.batch_size, t.status, p, relative, t.step_time_s,
                                t.loss_drop_per_s, t.val_loss, t.val_metric, t.wall_s))
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
    speed_winner: int | None
    val_winner: int | None
    recommended: int | None
    statuses: Counter[str]


def _verdict(c: _Context) -> tuple[VerdictKind, str]:
    """Does ``b_opt``, rounded to a tried batch size, match the empirical winner?"""
    if not c.ok_sizes:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(c.statuses.items())) or "no trials"
        return VerdictKind.no_ok_trials, f"no trial finished ok ({counts}); nothing to recommend"
    if c.b_hat is None or c.source is None:
        why = ("no B_hat given" if c.noise_fit.b_noise is not None or c.b_simple is not None
               else f"no B_simple measured; B_noise: {c.noise_fit.reason}")
        return VerdictKind.no_b_hat, (
            f"no noise-scale estimate ({why}); ranked by measured loss drop per second, "
            f"best b={c.recommended}")
    b_hat = f"B_hat = {_fmt_num(c.b_hat)}, {_SOURCE_LABEL[c.source]}"
    if c.b_opt is None:
        return VerdictKind.no_step_fit, (
            f"no b_opt ({c.fit.note or 'step time does not determine it'}); ranked by "
            f"(1 + B_hat/b) * t(b) with {b_hat}")
    pick = _nearest(c.b_opt, c.ok_sizes)
    head = f"b_opt = {_fmt_num(c.b_opt)} ({b_hat}) rounds to b={pick}"
    winner = c.speed_winner if c.speed_winner is not None else c.val_winner
    if pick is None or winner is None:
        return VerdictKind.unverified, (
            f"{head}; no trial measured a loss drop or validation loss to check it against")
    if pick in (c.speed_winner, c.val_winner):
        by = _BEST_SPEED if pick == c.speed_winner else _BEST_VAL
        return VerdictKind.agree, f"formula and trials agree: {head}, which also had the {by}"
    by = _BEST_SPEED if winner == c.speed_winner else _BEST_VAL
    kind, why = _disagreement(c, c.b_opt, pick, winner)
    return kind, f"formula and trials disagree: {head} but b={winner} had the {by}; {why}"


_BEST_SPEED = "best loss drop per second"
_SOURCE_LABEL = {
    BHatSource.b_noise: "B_noise fitted from the trials",
    BHatSource.b_simple: "B_simple pooled over the trials",
    BHatSource.given: "given",
}
_BEST_VAL = "lowest validation loss"


def _disagreement(c: _Context, b_opt_: float, pick: int, winner: int) -> tuple[VerdictKind, str]:
    """The most likely reason, checked from the most to the least mechanical."""
    lo, hi = c.ok_sizes[0], c.ok_sizes[-1]
    if b_opt_ < lo / math.sqrt(2) or b_opt_ > hi * math.sqrt(2):
        if b_opt_ == math.inf:
            cause = " (step time does not grow with b, so bigger is always faster per sample)"
        elif c.fit.tau_f_clipped:
            cause = " (the per-step overhead fitted <= 0, which pushes b_opt to 0)"
        else:
            cause = "; try larger batches (gradient accumulation beyond what fits)" \
                if b_opt_ > hi else "; try smaller batches"
        return VerdictKind.outside_range, f"b_opt is outside the tried range {lo}-{hi}{cause}"
    if not c.fit.linear and c.fit.worst_batch_size is not None:
        b = c.fit.worst_batch_size
        return VerdictKind.nonlinear_step_time, (
            f"step time is not linear in b (b={b}: measured {_fmt_s(dict(c.fit.points)[b])}, "
            f"line {_fmt_s(c.fit.predict_s(b))}), so the closed form misprices some batch "
            "sizes; trust the measured ranking")
    if winner > pick and c.source is BHatSource.b_simple:
        bn = c.noise_fit.b_noise
        extra = f" (B_noise fitted from the trials: {_fmt_num(bn)})" if bn is not None else ""
        return VerdictKind.b_simple_underestimates, (
            f"larger batches made faster progress in these short trials than the measured "
            f"B_simple ({_fmt_num(c.b_simple)}) predicts{extra}; the noise scale may grow "
            "later in training")
    if winner > pick:
        return VerdictKind.larger_batches_faster, (
            f"larger batches made faster progress than B_hat = {_fmt_num(c.b_hat)} predicts: "
            "the noise scale is probably larger than estimated")
    return VerdictKind.smaller_batches_faster, (
        "smaller batches made faster progress in these short trials than predicted: a short "
        "trial's loss speed favours small batches (on the built-in examples it picked worse "
        "than the ranking), or the LR scaling overshoots at large b")


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
