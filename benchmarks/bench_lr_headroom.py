"""Diagnostic: does the base configuration's learning rate leave headroom?

The sweep ranks batch sizes by ``(1 + B/b) t(b)``, McCandlish et al.'s steps-to-target model,
which holds when every batch size trains at its best learning rate. The sweep (and the
selection benchmark's oracle) instead scales the task's lr from its base batch size. Where the
base lr is well below what the gradient noise allows, a larger batch at a proportionally larger
lr takes the same samples to the target — perfect scaling far past the noise scale — and the
best batch is set by the lr's stability, not by ``B``. This trains the base batch size at 1, 2,
4 and 8 times the task's lr (the sweep's lr ramp, 3 seeds, the oracle's target and initial
weights) and prints samples to the target: if they fall as the lr rises, the base lr has
headroom and the oracle's implied noise scale measures it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lr_headroom.py \\
        --examples logreg,autoenc,spirals,topics --json /tmp/headroom.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import selection_lib as lib  # noqa: E402
from bench_noise_hessian import drive  # noqa: E402
from bench_selection import CPU, RAMP_BASE_STEPS, TASKS, full_run  # noqa: E402

from bsselect.selection.sweep import SweepSettings, make_setup, resolve_lr_scaling  # noqa: E402
from bsselect.selection.trials import BudgetKind, TrialBudget  # noqa: E402


def run(name: str, ex: dict, seeds: int, multiples: tuple[int, ...]) -> dict:
    """Per lr multiple: samples to the target (each seed) and, at the sweep's per-trial
    budget (a sweep trial is the first steps of such a run), the trial's training and
    validation loss: what a short trial at that lr would have shown."""
    task = TASKS[name]()
    b = task.base_batch_size
    target = ex["target"]
    trial_steps = max(1, round(ex["sweep_budget_samples"] / b))
    rows = []
    for k in multiples:
        samples, trial, curves = [], [], []
        for seed in range(seeds):
            settings = SweepSettings(budget=TrialBudget(BudgetKind.samples, b),
                                     lr_scaling=resolve_lr_scaling(task, None), seed=seed,
                                     lr_ramp_samples=RAMP_BASE_STEPS * b)
            setup, _ = make_setup(task, settings, CPU)
            rec, _ = full_run(task, setup, b, k * task.lr, target=target,
                              max_samples=ex["config"]["calib_samples"],
                              eval_every=ex["config"]["eval_every"],
                              checkpoints={"1": trial_steps})
            hit = lib.crossing(rec["evals"], target)
            samples.append(hit["samples"] if hit else float("inf"))
            curves.append([[e[1], e[4]] for e in rec["evals"]])  # (samples, val loss)
            cp = rec["checkpoints"]["1"]
            trial.append(dict(train_loss=cp.get("train_loss", float("inf")),
                              val_loss=cp.get("val_loss", float("inf")),
                              status=cp.get("status")))
        rows.append(dict(multiple=k, lr=k * task.lr, samples=samples,
                         median=lib.median_inf(samples), trial=trial, curves=curves))
        print(f"  {name} b={b} lr x{k}: samples to target {samples}; trial of {trial_steps} "
              f"steps: {trial}", flush=True)
    times = lib.oracle_times(ex)
    scaled = {bb: times[bb]["samples"] for bb in ex["batch_sizes"]}
    return dict(name=name, split=ex["split"], base_batch_size=b, base_lr=task.lr,
                lr_scaling=resolve_lr_scaling(task, None).value, rows=rows,
                oracle_samples=scaled, best=lib.best_batch(times),
                implied=lib.implied_b_noise(times))

def render(results: list[dict]) -> str:
    lines = ["| task | split | best b | implied B | lr multiples | samples to target at the base "
             "batch (median of seeds) | the oracle's samples to target at b x the same "
             "multiples (lr scaled) | short trial's val loss at the base batch |",
             "|---|---|---:|---:|---|---|---|---|"]
    for r in results:
        b = r["base_batch_size"]
        ks = [row["multiple"] for row in r["rows"]]
        at = " / ".join(lib.fmt(row["median"]) for row in r["rows"])
        scaled = " / ".join(lib.fmt(r["oracle_samples"].get(str(b * k),
                                                             r["oracle_samples"].get(b * k)))
                            for k in ks)
        trial = " / ".join(lib.fmt(median_of(row["trial"], "val_loss"), 4)
                           if row.get("trial") else "–" for row in r["rows"])
        lines.append(f"| {r['name']} | {r['split']} | {r['best']} | {lib.fmt(r['implied'])} | "
                     f"x{'/'.join(map(str, ks))} | {at} | {scaled} | {trial} |")
    return "\n".join(lines) + "\n"


HORIZONS = (16, 8, 4, 2)  # an lr test of 1/16, 1/8 ... of the base run


def loss_at(curve: list[list[float]], samples: float) -> float:
    """Validation loss at ``samples`` on a run's (samples, loss) evaluations, interpolated
    linearly; past the run's end (it stops at the target) its last value."""
    prev = None
    for x, v in curve:
        if x >= samples:
            if prev is None or x <= prev[0]:
                return v
            return prev[1] + (v - prev[1]) * (samples - prev[0]) / (x - prev[0])
        prev = (x, v)
    return curve[-1][1]


def render_scaling(results: list[dict]) -> str:
    """Does headroom at the base batch predict linear scaling? Per task: samples to the
    target at the base batch with 2x / 4x the lr (over 1x), the oracle's samples at 2x / 4x
    the batch at the scaled lr (over the base batch's), and the 2x-lr run's validation loss
    over the 1x run's at fractions of the 1x run's samples to the target (first seed): what
    an lr test of that length at the base batch would have shown."""
    lines = ["| task | lr scaling | best b | base batch at 2x / 4x the lr: samples over 1x | "
             "oracle at 2x / 4x the batch (scaled lr): samples over the base batch | "
             + " | ".join(f"2x-lr loss / 1x at 1/{h} of the run" for h in HORIZONS) + " |",
             "|---|---|---:|---|---|" + "---:|" * len(HORIZONS)]
    for r in results:
        rows = {row["multiple"]: row for row in r["rows"]}
        if not {1, 2, 4} <= set(rows) or not rows[1].get("curves"):
            continue
        b, base = r["base_batch_size"], rows[1]["median"]
        oracle = {int(k): v for k, v in r["oracle_samples"].items()}
        at_b0 = " / ".join(ratio(rows[k]["median"] / base) for k in (2, 4))
        scaled = " / ".join(ratio(oracle.get(k * b, math.inf) / oracle[b]) for k in (2, 4))
        ratios = []
        for h in HORIZONS:
            one = loss_at(rows[1]["curves"][0], base / h)
            two = loss_at(rows[2]["curves"][0], base / h)
            ratios.append(ratio(two / one))
        lines.append(f"| {r['name']} | {r.get('lr_scaling', '?')} | {r['best']} | {at_b0} | "
                     f"{scaled} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "∞"


def median_of(trials: list[dict], key: str) -> float:
    return lib.median_inf(t[key] for t in trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default="logreg,autoenc,spirals,topics")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--multiples", default="1,2,4,8", help="lr multiples to train")
    drive(parser, lambda args, name, ex: run(
        name, ex, args.seeds, tuple(int(k) for k in args.multiples.split(","))),
        lambda results: render(results) + "\n" + render_scaling(results))


if __name__ == "__main__":
    main()
