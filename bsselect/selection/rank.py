"""The ranking of sweep trials: the noise scale they are ranked by (``B_hat``), each batch
size's predicted time to the target, the pick, and a one-line verdict. Pure: no torch.

Real step times are not exactly linear, so trials are ranked by ``(1 + B_hat/b) * t_measured(b)``
(time to the target in units of ``S_min`` steps, ``formula``) and the closed form
``b_opt = sqrt(B_noise*tau_f/tau_d)`` is reported beside it, with a verdict on whether the two
agree and, if not, the likely reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Mapping, Sequence

from .choice import Choice, NoiseInterval, choose, noise_interval
from .formula import BNoiseFit, StepTimeFit, b_opt, fit_noise_model, fit_step_time, format_seconds
from .pareto import StepsFit, steps_to_loss_fit
from .steptime import ShapeFit, TimeInterval, physical_fit
from .trial_types import TrialResult, TrialStatus

# --------------------------------------------------------------------------- ranking


class BHatSource(str, Enum):
    """Where the noise scale used for ranking came from."""

    b_noise = "b_noise"  # fitted from the trials' per-step loss drops (fit_noise_model)
    b_simple = "b_simple"  # gradient noise scale measured in the trials (pooled)
    b_steps = "b_steps"  # steps to common loss levels against 1/b (pareto.steps_to_loss_fit)
    given = "given"  # supplied by the caller


@dataclass(frozen=True)
class BHat:
    """The noise-scale estimate to rank with, and the candidates it was chosen from.

    ``interval`` is its uncertainty (``choice.noise_interval`` for ``B_simple``, the spread
    over loss levels for ``B_steps``; None when none was recorded) and ``from_sizes`` the
    batch sizes of the trials it came from."""

    value: float | None
    source: BHatSource | None
    b_simple: float | None
    noise_fit: BNoiseFit
    interval: NoiseInterval | None = None
    from_sizes: tuple[int, ...] = ()
    steps_fit: StepsFit | None = None


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


def steps_fit_of(trials: Iterable[TrialResult]) -> StepsFit:
    """``pareto.steps_to_loss_fit`` on the ok trials' training-loss curves (start loss: the
    highest of their measured start losses; they all start from the same weights)."""
    ok = [t for t in trials if t.ok and t.loss_curve and t.train_loss_start is not None]
    curves = {t.batch_size: [(p.step, p.loss) for p in t.loss_curve if p.loss is not None]
              for t in ok}
    return steps_to_loss_fit(curves, max((t.train_loss_start for t in ok), default=math.nan))


def choose_b_hat(trials: Sequence[TrialResult]) -> BHat:
    """The larger of two measurements of the noise scale from the same trials, else ``B_noise``
    fitted from the per-step loss drops, else None:

    - ``B_simple`` (McCandlish et al. 2018, eq. 2.8), pooled over every ok trial that measured
      it (``pooled_b_simple``), with its interval (``pooled_interval``);
    - ``B_steps``, the same paper's empirical definition: steps to common loss levels against
      ``1/b`` over the trials' own loss curves (``pareto``), with the spread over the levels.

    The larger, because both are read earlier in training than the run they are for goes,
    and the noise scale grows as training goes on (ibid. sec. 3; Merrill et al. 2025): on the
    selection benchmark's 17 tasks the full runs' implied noise scale is above both on 13, by
    1.1x-166x. The first fresh held-out set's worst regret went from 7.99 (``B_simple``
    alone, which picked 8 where 256 was best) to 1.59 (docs/benchmarks-sweep.md).

    Measured, not fitted, first: with equal-sample trials the small batches get further and
    flatten out, which inflates the fitted B_noise by 5x to 20,000x on the built-in examples.
    ``B_simple`` is pooled over all the trials, not only the better-trained half (tried: on
    linreg that half sits at the noise floor, its pooled |G|^2 is not positive, and the
    fallback picked 2048, regret 36)."""
    fit = noise_fit_of(trials)
    pooled = pooled_trials(trials)
    simple = pooled_b_simple(pooled)
    steps = steps_fit_of(trials)
    if steps.b_noise is not None and (simple is None or steps.b_noise > simple):
        interval = NoiseInterval(steps.lo, steps.b_noise, steps.hi)  # type: ignore[arg-type]
        sizes = sorted({b for level in steps.levels if level.b_noise is not None
                        for b, _ in level.steps})
        return BHat(steps.b_noise, BHatSource.b_steps, simple, fit, interval, tuple(sizes),
                    steps)
    if simple is not None:
        return BHat(simple, BHatSource.b_simple, simple, fit, pooled_interval(pooled),
                    tuple(sorted(t.batch_size for t in pooled)), steps)
    if fit.b_noise is not None:
        return BHat(fit.b_noise, BHatSource.b_noise, simple, fit, steps_fit=steps)
    return BHat(None, None, simple, fit, steps_fit=steps)


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
    # b_opt is inside the tried range but over sqrt(2) from every tried size: its nearest is
    # in the tied set, yet the grid does not test b_opt itself
    between_sizes = "between_sizes"


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
    b_steps: float | None = None
    b_steps_bound: bool = False  # B_steps is a lower bound (perfect scaling measured)
    loss_rose: tuple[int, ...] = ()  # ok trials whose loss rose, left out of the pick

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
            "b_steps": self.b_steps,
            "b_steps_lower_bound": self.b_steps_bound,
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
            "loss_rose_batch_sizes": list(self.loss_rose),
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
    if len({t.batch_size for t in ok}) != len(ok):   # the pick depended on their order (review)
        raise ValueError("rank_trials takes one ok trial per batch size, got "
                         f"{sorted(t.batch_size for t in ok)}")
    timed = {t.batch_size: (times[t.batch_size] if times and t.batch_size in times else
                            TimeInterval(t.step_time_s, t.step_time_s, t.step_time_s))
             for t in ok if t.step_time_s is not None or (times and t.batch_size in times)}
    sizes = sorted(timed)
    fit = fit_step_time(sizes, [timed[b].mid for b in sizes])
    # The constrained shape is fitted to the interleaved rounds' sizes alone where there are
    # two or more: a size the sweep did not time again (``choice.contenders``: far from the
    # fastest) keeps its trial's step time, which saw another window of the machine's load.
    rounds = [b for b in sizes if times and b in times]
    shaped = rounds if len(rounds) >= 2 else sizes
    shape = physical_fit(shaped, [timed[b].mid for b in shaped], [timed[b].lo for b in shaped])
    fitted = {b: timed[b].scaled(shape.at(b) / timed[b].mid) if b in shaped else timed[b]
              for b in sizes}
    # Measured evidence over the model: a trial whose training loss rose (from a warm start
    # or a checkpoint: from initialisation that is no_progress) trains worse than one whose
    # loss fell, whatever (1 + B/b)·t(b) predicts for it. A sweep from a checkpoint picked b
    # whose trial raised the loss 35% (review). The pick is among those that lowered it.
    risen = _risen(ok)
    rose = tuple(sorted(b for b in fitted if b in risen))
    eligible = {b: t for b, t in fitted.items() if b not in rose} or fitted
    if len(eligible) == len(fitted):
        rose = ()  # every trial rose: nothing to prefer; the verdict says so
    pick = None
    if b_hat is not None and eligible:
        pick = choose(eligible, b_interval or NoiseInterval.exact(b_hat))
    steps = steps_fit_of(trials)
    rows = _ordered_rows(trials, pick, fitted)
    ranking = tuple(r.batch_size for r in rows if r.status is TrialStatus.ok)
    ctx = _Context(
        ok_sizes=tuple(sorted({t.batch_size for t in ok})),
        fit=fit,
        noise_fit=noise_fit_of(trials),
        b_simple=pooled_b_simple(trials),
        b_steps=steps.b_noise,
        b_steps_bound=steps.bound,
        b_hat=b_hat,
        source=b_hat_source if b_hat is not None else None,
        b_opt=_b_opt_or_inf(b_hat, fit),
        recommended=ranking[0] if ranking else None,
        statuses=Counter(t.status.value for t in trials),
        choice=pick,
        interval=b_interval if b_hat is not None else None,
        b_hat_sizes=tuple(b_hat_sizes),
        rose=rose,
        all_rose=bool(ok) and len(risen) == len(ok),
    )
    kind, text = _verdict(ctx)
    nearest = _nearest(ctx.b_opt, ctx.ok_sizes)
    return Ranking(rows, ranking, ctx.recommended, text, kind, fit, ctx.noise_fit, ctx.b_simple,
                   b_hat, ctx.source, ctx.b_opt if ctx.b_opt != math.inf else None, nearest,
                   _best(ok, lambda t: t.loss_drop_per_s, higher=True),
                   _best(ok, lambda t: t.val_loss, higher=False),
                   pick.tied if pick else (), pick.best if pick else None, ctx.interval,
                   tuple(b_hat_sizes), shape, ctx.b_steps, ctx.b_steps_bound, rose)


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


def _risen(ok: Sequence[TrialResult]) -> set[int]:
    """The batch sizes of the ok trials that ended with a higher training loss than they
    started with (a negative ``loss_drop_per_s``)."""
    return {t.batch_size for t in ok
            if t.loss_drop_per_s is not None and t.loss_drop_per_s < 0}


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
    b_steps: float | None
    b_steps_bound: bool
    b_hat: float | None
    source: BHatSource | None
    b_opt: float | None
    recommended: int | None
    statuses: Counter[str]
    choice: Choice | None
    interval: NoiseInterval | None
    b_hat_sizes: tuple[int, ...]
    rose: tuple[int, ...] = ()  # ok trials whose loss rose, left out of the pick
    all_rose: bool = False      # every ok trial's loss rose


def interval_label(source: BHatSource | str | None) -> str:
    """What ``B_hat``'s interval is: the range over the loss levels for ``B_steps``, else the
    90% interval of the estimates' standard errors."""
    return "over loss levels" if source == BHatSource.b_steps else "90%"


def _b_hat_text(c: _Context) -> str:
    """``B_hat = 319 (90%: 210-640; B_simple pooled over 7 trials, above B_steps 120)``."""
    parts = []
    if c.interval is not None and (c.interval.lo < c.interval.value or
                                   c.interval.hi > c.interval.value):
        parts.append(f"{interval_label(c.source)}: {_fmt_num(c.interval.lo)}-"
                     f"{_fmt_num(c.interval.hi)}")
    label = _SOURCE_LABEL[c.source] if c.source else "given"
    n = len(c.b_hat_sizes)
    if c.source is BHatSource.b_simple and n:
        label = f"B_simple pooled over {n} trial{'s' * (n > 1)}"
        if c.b_steps is not None:
            label += f", above B_steps {'≥ ' * c.b_steps_bound}{_fmt_num(c.b_steps)}"
    elif c.source is BHatSource.b_steps and c.b_steps_bound:
        label = (f"B_steps ≥ {_fmt_num(c.b_steps)}: in {n} trials the steps to common loss "
                 f"levels fell as fast as 1/b or faster up to b={_fmt_num(c.b_steps)}, no "
                 "slowdown from batch size measured at the scaled lr; nothing above it is "
                 "assumed")
    elif c.source is BHatSource.b_steps:
        label = f"B_steps, from steps to common loss levels in {n} trials"
        if c.b_simple is not None:
            label += f", above B_simple {_fmt_num(c.b_simple)}"
    parts.append(label)
    return f"B_hat = {_fmt_num(c.b_hat)} ({'; '.join(parts)})"


def sizes_text(sizes: Sequence[int]) -> str:
    """``8, 16, 32``: batch sizes in a message."""
    return ", ".join(str(b) for b in sizes)


def _verdict(c: _Context) -> tuple[VerdictKind, str]:
    """One story: the recommendation, why (tied set and rule), and how the closed form
    ``b_opt`` relates to it."""
    if not c.ok_sizes:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(c.statuses.items())) or "no trials"
        return VerdictKind.no_ok_trials, f"no trial finished ok ({counts}); nothing to recommend"
    if c.b_hat is None or c.source is None or c.choice is None:
        why = ("no B_hat given" if c.noise_fit.b_noise is not None or c.b_simple is not None
               or c.b_steps is not None
               else "no B_simple measured, fewer than three trials reached common loss levels "
                    f"for B_steps; B_noise: {c.noise_fit.reason}")
        return VerdictKind.no_b_hat, (
            f"no noise-scale estimate ({why}); ranked by measured loss drop per second, "
            f"best b={c.recommended}")
    ch = c.choice
    head = f"recommended b={ch.pick}: lowest predicted time to target (1 + B/b)·t(b) with " \
           f"{_b_hat_text(c)}"
    if len(ch.tied) > 1:
        others = [b for b in ch.tied if b != ch.pick]
        head += (f"; tied within uncertainty: {sizes_text(ch.tied)}, picked by the smallest "
                 f"worst-case slowdown ({ch.worst_regret[ch.pick]:.2f}x"
                 + (f", against {max(ch.worst_regret[b] for b in others):.2f}x or more for the "
                    "others" if others else "") + ")")
    if c.rose:
        head += (f"; not b={sizes_text(c.rose)}: the training loss rose in "
                 f"{'its trial' if len(c.rose) == 1 else 'their trials'}, where others fell")
    elif c.all_rose:
        head += ("; the training loss rose in every trial: the branch point may be past "
                 "what these learning rates can improve")
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
    if agrees and abs(math.log2(nearest / c.b_opt)) > 0.5 + 1e-9:
        # Sparse grids (8 and 512 only): "rounds to 8, it agrees" of a b_opt of 40 (review).
        near = 2 ** round(math.log2(c.b_opt))
        return VerdictKind.between_sizes, (
            f"{head}. {closed}, the nearest tried size but {_fold(nearest, c.b_opt)} from it: "
            f"the tried sizes do not test b_opt (add b={near} to test it)")
    if agrees:
        return VerdictKind.agree, f"{head}. {closed}: it agrees"
    if not c.fit.linear and c.fit.worst_batch_size is not None:
        b = c.fit.worst_batch_size
        return VerdictKind.nonlinear_step_time, (
            f"{head}. {closed}, not in the tied set: {follows} step time is not linear in b "
            f"(b={b}: measured {format_seconds(dict(c.fit.points)[b])}, line "
            f"{format_seconds(c.fit.predict_s(b))})")
    return VerdictKind.line_misprices, (
        f"{head}. {closed}, not in the tied set: {follows} the line t(b) = τ_f + τ_d·b is off "
        f"by up to {100 * (c.fit.max_rel_residual or 0):.0f}% (b={c.fit.worst_batch_size}), "
        "enough to move the optimum")


_SOURCE_LABEL = {
    BHatSource.b_noise: "B_noise fitted from the trials",
    BHatSource.b_simple: "B_simple pooled over the trials",
    BHatSource.b_steps: "from the trials' steps to common loss levels",
    BHatSource.given: "given",
}


def _fold(a: float, b: float) -> str:
    """``5.0x``: how many times the larger of two positive numbers is the smaller."""
    return f"{max(a, b) / min(a, b):.1f}x"


def _fmt_num(x: float | None) -> str:
    """``71.3``, ``1,234``, ``unbounded``; ``n/a`` for None."""
    if x is None:
        return "n/a"
    if x == math.inf:
        return "unbounded"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


