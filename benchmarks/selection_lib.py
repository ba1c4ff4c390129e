"""Pure helpers for ``bench_selection.py``: target choice, time-to-target, regrets, selection
rules and markdown tables. No training happens here; everything works on the JSON-ready
records that ``bench_selection.py`` writes, so ``--from-json`` can re-analyse a saved run.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any, Iterable, Mapping, Sequence

from bsselect.selection.rank import pooled_b_simple, steps_fit_of
from bsselect.selection.sweep import SweepSettings, summarize
from bsselect.selection.timing import MAX_STEPS_PER_ROUND, ROUNDS, WARMUP_STEPS, steps_per_round
from bsselect.selection.trial_types import LossPoint, TrialResult, TrialStatus, thin_curve
from bsselect.selection.trials import MAX_CURVE_POINTS

INF = math.inf


# --------------------------------------------------------------------------- target


def smoothed(values: Sequence[float], width: int = 3) -> list[float]:
    """Centred moving average (shorter windows at the ends)."""
    half = width // 2
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def choose_target(val_losses: Sequence[float], drop_fraction: float) -> dict[str, float]:
    """``target = L_best + f * (L_0 - L_best)``: the loss at which a run has made ``1 - f`` of
    the calibration run's best loss drop. ``L_best`` is the minimum of the 3-eval moving
    average (so one lucky evaluation does not set it), ``L_0`` the validation loss at init."""
    finite = [v for v in val_losses if math.isfinite(v)]
    l0 = finite[0]
    best = min(smoothed(finite))
    return {"l0": l0, "l_best": best, "drop_fraction": drop_fraction,
            "target": best + drop_fraction * (l0 - best)}


def crossing(evals: Sequence[Sequence[float]], target: float) -> dict[str, float] | None:
    """First time the validation loss is <= ``target``, linearly interpolated between the
    last evaluation above it and the first at or below it. ``evals`` rows are
    ``(step, samples, cpu_s, wall_s, val_loss)``; returns the same quantities (fractional
    step) or None when the target was never reached."""
    prev = None
    for row in evals:
        if math.isfinite(row[4]) and row[4] <= target:
            if prev is None or prev[4] <= target:
                return dict(zip(("step", "samples", "cpu_s", "wall_s", "val_loss"), row))
            frac = (prev[4] - target) / (prev[4] - row[4])
            out = {k: prev[i] + frac * (row[i] - prev[i])
                   for i, k in enumerate(("step", "samples", "cpu_s", "wall_s"))}
            out["val_loss"] = target
            return out
        prev = row
    return None


def median_inf(values: Iterable[float]) -> float:
    """Median that treats inf as larger than everything (inf when most values are inf)."""
    vals = sorted(values)
    if not vals:
        return INF
    n = len(vals)
    if n % 2:
        return vals[n // 2]
    a, b = vals[n // 2 - 1], vals[n // 2]
    return INF if INF in (a, b) else (a + b) / 2


# --------------------------------------------------------------------------- oracle


def oracle_times(example: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """Per batch size: median over seeds of steps to target, and time to target
    ``T(b) = steps * t(b)`` with ``t(b)`` the interleaved min-of-medians thread-CPU step time;
    also the median raw (measured, in-run) CPU and wall seconds to target."""
    out: dict[int, dict[str, float]] = {}
    timing = {int(b): v for b, v in example["timing"].items()}
    for b in example["batch_sizes"]:
        runs = [seed_runs[str(b)] for seed_runs in example["runs"]]
        steps = median_inf(r["to_target"]["step"] if r["to_target"] else INF for r in runs)
        t_cpu = timing[b]["cpu_s"]
        out[b] = {
            "steps": steps,
            "samples": median_inf(r["to_target"]["samples"] if r["to_target"] else INF
                                  for r in runs),
            "step_cpu_s": t_cpu,
            "time_s": steps * t_cpu if math.isfinite(steps) else INF,
            "raw_cpu_s": median_inf(r["to_target"]["cpu_s"] if r["to_target"] else INF
                                    for r in runs),
            "raw_wall_s": median_inf(r["to_target"]["wall_s"] if r["to_target"] else INF
                                     for r in runs),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "reached": sum(r["to_target"] is not None for r in runs),
            "seeds": len(runs),
        }
    return out


def regret_interval(example: Mapping[str, Any], pick: int | None, *, draws: int = 2000,
                    level: float = 0.8, seed: int = 0) -> tuple[float, float] | None:
    """How well the oracle itself resolves ``pick``'s regret: a bootstrap over its seeds
    (each batch size's seeds drawn again with replacement, ``T(b)`` and the best size
    recomputed as ``oracle_times`` does), the central ``level`` interval of the regret. With
    3 seeds per size the bootstrap is coarse; an interval that reaches 1.0 says the oracle
    cannot tell this pick from the best. None with a single seed or no pick."""
    import random

    if pick is None or len(example["runs"]) < 2:
        return None
    rng = random.Random(seed)
    timing = {int(b): v["cpu_s"] for b, v in example["timing"].items()}
    steps = {b: [r[str(b)]["to_target"]["step"] if r[str(b)]["to_target"] else INF
                 for r in example["runs"]] for b in example["batch_sizes"]}
    regrets = []
    for _ in range(draws):
        t = {b: median_inf(rng.choice(v) for _ in v) * timing[b] for b, v in steps.items()}
        finite = [x for x in t.values() if math.isfinite(x)]
        regrets.append(t[pick] / min(finite) if finite and math.isfinite(t[pick]) else INF)
    regrets.sort()
    tail = (1 - level) / 2
    return regrets[int(tail * draws)], regrets[min(draws - 1, int((1 - tail) * draws))]


def best_batch(times: Mapping[int, Mapping[str, float]], key: str = "time_s") -> int | None:
    finite = [(v[key], b) for b, v in times.items() if math.isfinite(v[key])]
    return min(finite)[1] if finite else None


def regret(times: Mapping[int, Mapping[str, float]], pick: int | None,
           key: str = "time_s") -> float:
    """time-to-target(pick) / min over batch sizes; inf when the pick never reached it."""
    best = best_batch(times, key)
    if pick is None or best is None or pick not in times:
        return INF
    return times[pick][key] / times[best][key]


# --------------------------------------------------------------------------- rules


def settings_of(example: Mapping[str, Any], seed: int) -> SweepSettings:
    return SweepSettings.from_journal(dict(example["sweep_settings"], seed=seed))


def rank_summary(example: Mapping[str, Any], trials: Sequence[TrialResult], seed: int):
    """bsselect's own summary (fits, ranking, recommendation) for these trials."""
    sizes = example["batch_sizes"]
    return summarize(example["base_lr"], example["base_batch_size"], example["name"], "cpu",
                     trials, settings_of(example, seed), max(sizes), "--batch-sizes", "", (),
                     False)


def _curve_loss_at(trial: TrialResult, seconds: float) -> float | None:
    """Training loss at ``seconds`` into the trial: the mean of the curve points in the last
    quarter of [0, seconds] (the per-step mini-batch losses are noisy)."""
    pts = [p for p in trial.loss_curve if p.loss is not None and 0.75 * seconds <= p.wall_s
           <= seconds * 1.0000001]
    if not pts:
        return None
    return sum(p.loss for p in pts) / len(pts)


def rule_picks(example: Mapping[str, Any], trials: Sequence[TrialResult],
               seed: int) -> dict[str, int | None]:
    """What each selection rule picks from one sweep's trials.

    - ``sweep``: bsselect's recommendation, ``(1 + B_hat/b) * t(b)`` (its ranking).
    - ``b_opt``: the closed form ``sqrt(B_noise tau_f / tau_d)`` rounded to a tried size.
    - ``speed``: best measured ``loss_drop_per_s`` over the equal-sample trial.
    - ``val``: lowest validation loss after the equal-sample trial.
    - ``equal_time``: lowest training loss at the same point in time for every trial (the
      shortest ok trial's duration), read off the trials' loss curves.
    - ``b_simple``: ``(1 + B_simple/b) * t(b)`` with the trials' ``B_simple`` pooled
      (``bsselect.selection.rank.pooled_b_simple``; the sweep's own rule, unless it fell back to B_noise).
    - ``b_simple_median``: the same with the median of the trials' ``B_simple`` (the rule
      before the pooling).
    - ``b_simple_trained``: the same, pooled over the better-trained half of the trials only
      (``most_trained``; tried as the sweep's rule and dropped, docs/benchmarks-sweep.md).
    - ``b_simple_base``: the same with the ``B_simple`` of the base-batch trial alone (the
      pooled value when that one has none): the other trials then only need step times.
    - ``b_steps``: ``(1 + B/b) * t(b)`` with ``B`` from steps to common loss levels against
      1/b (``rank.steps_fit_of``; pre-registered for the fresh held-out tasks, session 9).
    - ``b_max``: the same with the larger of the pooled ``B_simple`` and that ``B``: both are
      measured earlier in training than the run goes, where the noise scale is smaller
      (pre-registered with ``b_steps``).
    - ``level<f>``: first to reach a common training-loss level (``level_pick``).
    - ``largest``: the largest tried batch (what fits); ``largest_ok``: the largest that did not
      diverge in the sweep; ``base``: the task's own base batch size.
    """
    summary = rank_summary(example, trials, seed)
    ok = [t for t in trials if t.ok]
    picks: dict[str, int | None] = {
        "sweep": summary.recommended_batch_size,
        "b_opt": summary.ranking.b_opt_batch_size,
        "speed": summary.ranking.speed_winner,
        "val": summary.ranking.val_winner,
        "largest": max(example["batch_sizes"]),
        "largest_ok": max((t.batch_size for t in ok), default=None),
        "base": example["base_batch_size"],
    }
    durations = [t.step_time_s * t.steps for t in ok if t.step_time_s]
    if durations:
        horizon = min(durations)
        scored = [(loss, t.batch_size) for t in ok
                  if (loss := _curve_time_loss(t, horizon)) is not None]
        picks["equal_time"] = min(scored)[1] if scored else None
    else:
        picks["equal_time"] = None
    b_simple = pooled_b_simple(trials)
    picks["b_simple"] = model_pick(trials, b_simple) if b_simple is not None else None
    b_median = median_b_simple(trials)
    picks["b_simple_median"] = model_pick(trials, b_median) if b_median is not None else None
    b_trained = pooled_b_simple(most_trained(trials))
    picks["b_simple_trained"] = model_pick(trials, b_trained) if b_trained is not None else None
    base = next((t for t in ok if t.batch_size == example["base_batch_size"]), None)
    b_base = base.b_simple if base is not None and base.b_simple else b_simple
    picks["b_simple_base"] = model_pick(trials, b_base) if b_base is not None else None
    for f in LEVEL_FRACTIONS:
        picks[f"level{f}"] = level_pick(trials, f)
    b_steps = steps_fit_of(trials).b_noise
    picks["b_steps"] = model_pick(trials, b_steps) if b_steps is not None else None
    both = [v for v in (b_simple, b_steps) if v is not None]
    picks["b_max"] = model_pick(trials, max(both)) if both else None
    return picks


def _curve_time_loss(trial: TrialResult, horizon_s: float) -> float | None:
    """Training loss at ``horizon_s`` seconds of steady-state training: the loss curve's time
    axis is rescaled to ``steps * step_time_s`` (so one-off warm-up stalls do not count)."""
    if not trial.loss_curve or not trial.step_time_s:
        return None
    scaled = TrialResult(**{**trial.to_dict(), "loss_curve": [
        (p.step, p.samples, p.step * trial.step_time_s, p.loss) for p in trial.loss_curve]})
    return _curve_loss_at(scaled, horizon_s)


def _smooth_curve(trial: TrialResult, window: int = 9) -> list[tuple[float, float]]:
    """(steady-state seconds, centred moving average of the mini-batch training loss) over
    the trial's recorded loss curve; time is ``step * step_time_s``."""
    pts = [(p.step * trial.step_time_s, p.loss) for p in trial.loss_curve if p.loss is not None]
    losses = smoothed([lv for _, lv in pts], window)
    return [(t, lv) for (t, _), lv in zip(pts, losses)]


def time_to_level(trial: TrialResult, level: float) -> float:
    """Seconds of steady-state training until the smoothed training loss first reaches
    ``level`` (inf when it never does within the trial)."""
    for t, loss in _smooth_curve(trial):
        if loss <= level:
            return t
    return INF


def level_pick(trials: Sequence[TrialResult], fraction: float) -> int | None:
    """Time to a common training-loss level inside the sweep: ``L_c = L_best + fraction *
    (L_start - L_best)`` with L_best the lowest end-of-trial loss (measured on the fixed train
    subset) of any ok trial; the pick reaches L_c first (by steady-state time,
    ``steps * step_time_s``; ties: the larger batch)."""
    ok = [t for t in trials if t.ok and t.step_time_s and t.loss_curve
          and t.train_loss_end is not None and t.train_loss_start is not None]
    if not ok:
        return None
    start = max(t.train_loss_start for t in ok)
    best = min(t.train_loss_end for t in ok)
    level = best + fraction * (start - best)
    scored = [(time_to_level(t, level), -t.batch_size) for t in ok]
    fastest = min(scored)
    return -fastest[1] if math.isfinite(fastest[0]) else None


def most_trained(trials: Iterable[TrialResult]) -> list[TrialResult]:
    """The ok trials that measured the noise scale, the better-trained half of them (by
    training loss at the end of the trial; ``ceil(n/2)``, ties: the larger batch).

    The noise scale grows as training goes on (McCandlish et al. 2018, sec. 3; Merrill et al.
    2025), and equal-sample trials end at different points: the large batches, which took few
    steps, are still near initialisation, where the noise scale is smallest. The run ahead is
    longer than any trial, so the ranking uses the trials that got furthest."""
    measured = [t for t in trials if t.ok and (
        (t.grad_sq_norm is not None and t.trace_sigma is not None) or t.b_simple is not None)]
    with_loss = [t for t in measured if t.train_loss_end is not None]
    if len(with_loss) < len(measured) or not measured:
        return measured
    ordered = sorted(with_loss, key=lambda t: (t.train_loss_end, -t.batch_size))
    return ordered[: -(-len(ordered) // 2)]


LEVEL_FRACTIONS = (0.5, 0.2, 0.1)
def median_b_simple(trials: Iterable[TrialResult]) -> float | None:
    """Median ``b_simple`` over ok trials that measured a positive one."""
    values = [t.b_simple for t in trials if t.ok and t.b_simple is not None and t.b_simple > 0]
    return median(values) if values else None


RULES = ("sweep", "b_opt", "speed", "val", "equal_time", "b_simple", "b_simple_median",
         "b_simple_trained", "b_simple_base", "b_steps", "b_max", "largest",
         "largest_ok", "base") + tuple(
    f"level{f}" for f in LEVEL_FRACTIONS)


def trials_from_sweep(sweep_json: Mapping[str, Any]) -> list[TrialResult]:
    return [TrialResult.from_dict(t) for t in sweep_json["trials"]]


def emulated_trials(example: Mapping[str, Any], seed_index: int, fraction: str,
                    step_times: Mapping[int, float]) -> list[TrialResult]:
    """Equal-sample sweep trials rebuilt from the full runs' checkpoints (a trial of budget B
    is exactly the first ceil(B/b) steps of the full run: same initial weights, data order
    and learning rate), with the robust step time ``step_times[b]`` instead of the trial's own
    wall clock."""
    out = []
    for b in example["batch_sizes"]:
        run = example["runs"][seed_index][str(b)]
        cp = run["checkpoints"].get(fraction)
        lr = run["lr"]
        if cp is None or cp["status"] != "ok":
            steps = cp["steps"] if cp else 0
            out.append(TrialResult(batch_size=b, status=TrialStatus.diverged, lr=lr, steps=steps,
                                   samples=steps * b, wall_s=0.0))
            continue
        t = step_times[b]
        drop = run["train_loss_start"] - cp["train_loss"]
        steps = cp["steps"]
        if drop < 0:
            out.append(TrialResult(batch_size=b, status=TrialStatus.diverged, lr=lr, steps=steps,
                                   samples=cp["samples"], wall_s=t * steps))
            continue
        curve = thin([(s, s * b, s * t, loss) for s, loss in run["train_curve"] if s <= steps])
        out.append(TrialResult(
            batch_size=b, status=TrialStatus.ok, lr=lr, steps=steps, samples=cp["samples"],
            wall_s=t * steps, step_time_s=t, samples_per_s=b / t,
            train_loss_start=run["train_loss_start"], train_loss_end=cp["train_loss"],
            loss_drop_per_s=drop / (t * steps), val_loss=cp["val_loss"],
            val_metric=cp.get("val_metric"), loss_curve=curve, b_simple=cp.get("b_simple"),
            grad_sq_norm=cp.get("grad_sq_norm"), trace_sigma=cp.get("trace_sigma"),
            loss_drop_per_sample=drop / cp["samples"], loss_drop_per_step=drop / steps))
    return out


def steps_run(trial: TrialResult, timed: bool = True) -> int:
    """Training steps a trial costs: its budget's steps, plus (ok trials the sweep timed
    again, ``timed``) the interleaved timing steps for its batch size
    (``bsselect.selection.timing``: warm-up, then ROUNDS rounds of ``steps_per_round`` steps,
    one more per round to re-warm when that is > 1)."""
    if not trial.ok or not timed:
        return trial.steps
    k = steps_per_round(trial.step_time_s or 0.0) if trial.step_time_s else MAX_STEPS_PER_ROUND
    return trial.steps + WARMUP_STEPS + ROUNDS * (k + (1 if k > 1 else 0))


def thin(curve: list, points: int = MAX_CURVE_POINTS) -> list:
    """The loss curve as a trial stores it (``trial_types.thin_curve``: MAX_CURVE_POINTS block
    means)."""
    return [tuple(p) for p in thin_curve([LossPoint(*p) for p in curve], points)]


def model_pick(trials: Sequence[TrialResult], b_noise: float) -> int | None:
    """argmin over ok trials of ``(1 + b_noise/b) * t(b)`` for a given ``b_noise``."""
    ok = [t for t in trials if t.ok and t.step_time_s]
    if not ok:
        return None
    return min(ok, key=lambda t: ((1 + b_noise / t.batch_size) * t.step_time_s,
                                  t.batch_size)).batch_size


def implied_b_noise(times: Mapping[int, Mapping[str, float]]) -> float | None:
    """``B_noise`` implied by the oracle itself: a Theil–Sen line through the measured steps
    to target against 1/b, ``S(b) = S_min + (S_min * B_noise) / b``; None when the intercept
    is not positive (no S_min) or fewer than 3 batch sizes reached the target."""
    pts = [(1.0 / b, v["steps"]) for b, v in times.items() if math.isfinite(v["steps"])]
    if len(pts) < 3:
        return None
    slopes = [(pts[j][1] - pts[i][1]) / (pts[j][0] - pts[i][0])
              for i in range(len(pts)) for j in range(i + 1, len(pts))]
    slope = median(slopes)
    intercept = median(y - slope * x for x, y in pts)
    if intercept <= 0 or slope < 0:
        return None
    return slope / intercept


# --------------------------------------------------------------------------- formatting


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == INF:
        return "∞"
    if isinstance(x, int):
        return str(x)
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.001):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def fmt_regret(x: float) -> str:
    if x == INF:
        return "∞"
    return f"{x:.2f}" + (" ✓" if x <= 1.15 else " ✗")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
