"""``bsselect schedule`` against full training runs to a target: docs/benchmarks-schedule.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_schedule.py \
        --oracle benchmarks/results/sweep-ramp-93f9bcf.json.gz [--examples a,b] [--json out.json]

For every task of the selection benchmark (``bench_selection.py``: its tasks, targets and
oracle of full runs at every fixed power-of-two batch size, read from a saved results file):

1. **The schedule** — ``bsselect.selection.schedule.run_schedule`` with its defaults except the horizon:
   the samples the base configuration (the task's batch size and lr) takes to reach the
   target in the oracle (the length of the run the user is planning), on a quiet machine and
   with one busy process holding a core (started and stopped here).
2. **Scheduled runs** — the schedule followed (``BatchSchedule.batch_size_at`` / ``lr_at``)
   from the oracle's initial weights, for the oracle's seeds (3; tiny-lm 1, gru-lm 2), until the
   validation loss reaches the target (same evaluation cadence and crossing rule as
   ``bench_selection.full_run``). Stage 0 draws from the oracle's seeded batch stream and
   RNG, so a one-stage schedule at b is exactly the oracle's run at b; each later stage from
   its own seeded stream.
3. **Score** — steps to target (median over seeds) and time to target
   ``T = sum over steps of t(b)`` with ``t(b)`` the oracle's interleaved min-of-medians CPU
   step time (the same clock as the oracle's ``T(b) = steps(b) * t(b)``), over those of the
   best fixed batch (the oracle's minimum ``T``) and of the base batch.

Which tasks were looked at while the rule was written: the tuning half (``split`` in the
oracle); the held-out half is reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib  # noqa: E402
from bench_selection import (CONFIG, CPU, EVAL_BS, TASKS, clock, log, read_json,  # noqa: E402
                             start_busy, stop_busy)

from bsselect.errors import UsageError  # noqa: E402
from bsselect.selection.schedule import BatchSchedule, ScheduleSettings, run_schedule  # noqa: E402
from bsselect.selection.sweep import (RAMP_BASE_STEPS, SweepSettings, make_setup,  # noqa: E402
                                      resolve_lr_scaling)
from bsselect.selection.timing import default_threads  # noqa: E402
from bsselect.selection.trials import evaluate  # noqa: E402
from bsselect.selection.trials import (DIVERGENCE_FACTOR, BudgetKind, TrialBudget, cycle_batches,
                                       trial_seed)
from bsselect.step import to_device, train_step  # noqa: E402


def scheduled_run(task, ex: dict, schedule: BatchSchedule, seed: int, t: dict[int, float]
                  ) -> dict:
    cfg = CONFIG[ex["name"]]
    scaling = resolve_lr_scaling(task, None)
    settings = SweepSettings(budget=TrialBudget(BudgetKind.samples, 1), lr_scaling=scaling,
                             seed=seed,
                             lr_ramp_samples=RAMP_BASE_STEPS * task.base_batch_size)
    setup, _ = make_setup(task, settings, CPU)
    # As bench_selection.full_run: a one-stage schedule at b is the oracle's run at b.
    torch.manual_seed(trial_seed(seed, schedule.stages[0].batch_size))
    model = task.model().to(CPU)
    model.load_state_dict(setup.initial_state)
    model.train()
    opt = task.make_optimizer(model.parameters(), task.lr)
    loss_start, _ = evaluate(model, task, setup.eval_train, CPU, EVAL_BS, metric=False)
    val0, _ = evaluate(model, task, setup.val_data, CPU, EVAL_BS, metric=False)
    evals = [[0, 0, 0.0, 0.0, val0]]
    streams: dict[int, Any] = {}
    step = samples = 0
    clock = 0.0
    per_batch: dict[int, int] = {}
    next_eval = cfg["eval_every"]
    status = "ok"
    while samples < cfg["calib_samples"]:
        b = schedule.batch_size_at(samples)
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(samples)
        k = schedule._index(samples)
        if k not in streams:  # stage k: its own seeded stream (stage 0: the oracle's)
            streams[k] = cycle_batches(dataclasses.replace(setup, seed=seed + 1000 * k), b)
        x, y = to_device(next(streams[k]), CPU)
        loss = float(train_step(model, opt, task, x, y))
        step += 1
        samples += len(y)
        clock += t[b]
        per_batch[b] = per_batch.get(b, 0) + 1
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(loss_start, 1e-12):
            status = "diverged"
            break
        if samples >= next_eval:
            next_eval = (samples // cfg["eval_every"] + 1) * cfg["eval_every"]
            val, _ = evaluate(model, task, setup.val_data, CPU, EVAL_BS, metric=False)
            evals.append([step, samples, clock, 0.0, val])
            if val <= ex["target"]:
                break
    crossing = lib.crossing(evals, ex["target"]) if status == "ok" else None
    return dict(seed=seed, status=status, steps=step, samples=samples, per_batch=per_batch,
                to_target=crossing)


def bench(ex: dict, seeds: int) -> dict:
    name = ex["name"]
    task = TASKS[name]()
    ot = lib.oracle_times(ex)
    best = lib.best_batch(ot)
    b0 = task.base_batch_size
    horizon = ot[b0]["samples"]
    t = {b: ot[b]["step_cpu_s"] for b in ex["batch_sizes"]}
    out: dict[str, Any] = dict(name=name, split=ex["split"], best_fixed=best,
                               best_steps=ot[best]["steps"], best_time_s=ot[best]["time_s"],
                               base_steps=ot[b0]["steps"], base_time_s=ot[b0]["time_s"],
                               horizon=horizon, conditions={})
    if not math.isfinite(horizon):
        out["skipped"] = f"the base batch {b0} never reached the target"
        return out
    settings = ScheduleSettings(horizon=int(horizon), lr_scaling=resolve_lr_scaling(task, None),
                                lr_ramp_samples=RAMP_BASE_STEPS * b0)
    for condition in ("quiet", "loaded"):
        busy = start_busy() if condition == "loaded" else None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                c0, w0 = clock()
                result = run_schedule(task, task_name=name, batch_sizes=ex["batch_sizes"],
                                      settings=settings, device=CPU,
                                      journal_path=Path(tmp) / "s.jsonl",
                                      threads=default_threads())
                c1, w1 = clock()
                cost = dict(cpu_s=c1 - c0, wall_s=w1 - w0)
        except UsageError as exc:  # the defaults refuse a run too short to branch (the user's
            # answer too): recorded as the tool's answer, not a benchmark failure
            out["skipped"] = f"refused with the defaults: {exc}"
            log(f"== {name}: {out['skipped']}")
            return out
        finally:
            if busy is not None:
                stop_busy(busy)
        js = result.to_json()
        stages = [(None if s["start_samples"] is None else round(s["start_samples"]),
                   s["batch_size"]) for s in js["stages"]]
        log(f"== {name} {condition}: stages {stages} "
            f"({cost['wall_s']:.1f} s); fastest per point "
            f"{[p['fastest_batch_size'] for p in js['points']]}, critical "
            f"{[p['critical_batch_size'] for p in js['points']]}")
        # the oracle's seeds (fewer on the LM tasks), so that medians compare like with like
        runs = [scheduled_run(task, ex, result.schedule, seed, t)
                for seed in range(min(seeds, len(ex["runs"])))]
        steps = lib.median_inf(r["to_target"]["step"] if r["to_target"] else lib.INF for r in runs)
        time_s = lib.median_inf(r["to_target"]["cpu_s"] if r["to_target"] else lib.INF
                                for r in runs)
        row = dict(schedule=js, cost=cost, runs=runs, steps=steps, time_s=time_s,
                   steps_vs_best=steps / ot[best]["steps"],
                   time_vs_best=time_s / ot[best]["time_s"],
                   steps_vs_base=steps / ot[b0]["steps"], time_vs_base=time_s / ot[b0]["time_s"])
        out["conditions"][condition] = row
        log(f"   scheduled runs: steps {steps:.1f} ({row['steps_vs_best']:.2f}x best fixed {best}),"
            f" time {time_s:.3f} s ({row['time_vs_best']:.2f}x); predicted "
            f"{js['vs_best_fixed']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oracle", type=Path, required=True,
                    help="bench_selection.py results (its full runs are the oracle)")
    ap.add_argument("--examples", default=None)
    ap.add_argument("--seeds", type=int, default=3,
                    help="at most this many of the oracle's seeds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    oracle = read_json(args.oracle)
    names = args.examples.split(",") if args.examples else [e["name"] for e in oracle["examples"]]
    by_name = {e["name"]: e for e in oracle["examples"]}
    start = time.perf_counter()
    results = [bench(by_name[n], args.seeds) for n in names]
    doc = dict(command=" ".join(sys.argv), oracle=str(args.oracle), results=results,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            torch=torch.__version__),
               total_wall_s=time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=float))
    print(render(doc))


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def render(doc: dict) -> str:
    lines = ["| task | split | best fixed b (steps, T) | condition | stages (from sample: b) | "
             "steps / best | T / best | T / base b | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    met: dict[str, int] = {}
    for r in doc["results"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['split']} | — | — | {r['skipped']} | | | | |")
            continue
        task_met = True
        for cond, c in r["conditions"].items():
            stages = ", ".join(f"{fmt(s['start_samples'], '.0f')}: {s['batch_size']}"
                               for s in c["schedule"]["stages"])
            ok = c["steps_vs_best"] <= 0.85 and c["time_vs_best"] <= 1.0
            task_met &= ok
            lines.append(f"| {r['name']} | {r['split']} | {r['best_fixed']} ({r['best_steps']:.0f},"
                         f" {r['best_time_s']:.3f} s) | {cond} | {stages} | "
                         f"{fmt(c['steps_vs_best'])} | {fmt(c['time_vs_best'])} | "
                         f"{fmt(c['time_vs_base'])} | {'yes' if ok else 'no'} |")
        met[r["split"]] = met.get(r["split"], 0) + task_met
    lines.append("")
    lines.append("Tasks meeting both bars (<= 0.85x steps and <= 1.0x time of the best fixed "
                 "batch) in both conditions: "
                 + ", ".join(f"{split} {n}" for split, n in met.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
