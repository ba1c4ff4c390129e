"""Replay the schedule's choice between its plan and a fixed batch on saved measurements.

    PYTHONPATH=. python3 benchmarks/replay_schedule_rules.py \
        benchmarks/results/schedule-{old,fresh,fresh2}-ba5c245.json.gz      # seconds

Each file is ``bench_schedule.py``'s JSON: per task and condition, every point's branches (loss
drops over the equal sample budget) and the timing rounds. From those alone (no training) the
planning is run again — ``point_fastest``, ``plan_stages``, ``predict_fixed`` — and the final
choice made by each rule below. The stored plan must come out again under the shipped rule
(checked: a mismatch is printed). A plan that is one batch size is scored from the oracle (a
one-stage schedule at ``b`` is the oracle's full run at ``b``); a plan equal to the one the
benchmark ran is scored by that run; any other multi-stage plan needs a live run ("live").

Rules:

- ``point``: the shipped rule until session 17 (``no_worse_than_fixed``): the plan unless a
  fixed batch's predicted time at the fitted step times is lower (point estimates).
- ``tied``: every candidate (the plan, each fixed batch) gets its predicted time at the
  step times' interval ends (``lo``, ``hi``: the timing rounds' spread); the candidates whose
  ``lo`` is at most the fastest one's ``hi`` are tied, and among them the one that needs the
  fewest samples wins (the measured sample efficiency, which no clock enters; the plan on
  equal samples) — ``point_fastest``'s rule, one level up.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib  # noqa: E402

from bsselect.selection.schedule import _fit_times  # noqa: E402
from bsselect.selection.schedule_plan import (  # noqa: E402
    Branch, SchedulePoint, no_worse_than_fixed, plan_stages, point_fastest, predict_fixed)
from bsselect.selection.timing import RoundTiming  # noqa: E402
from bsselect.selection.trial_types import TrialResult, TrialStatus  # noqa: E402


def read(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def points_of(js: dict) -> list[SchedulePoint]:
    out = []
    for p in js["points"]:
        branches = []
        for br in p["branches"]:
            trial = TrialResult(batch_size=br["batch_size"], lr=br["lr"],
                                status=TrialStatus(br["status"]), steps=br["steps"],
                                samples=br["samples"], wall_s=0.0,
                                train_loss_start=br["loss_start"], train_loss_end=br["loss_end"])
            branches.append(Branch(trial, br["drop"], br["drop_per_s"]))
        out.append(SchedulePoint(p["samples"], p["base_steps"], tuple(branches), None,
                                 p["critical_batch_size"], None, p.get("checkpoint")))
    return out


def plan_of(stages) -> tuple:
    return tuple((round(s.base_samples), s.batch_size) for s in stages)


def replay(js: dict):
    b0 = js["base_batch_size"]
    sizes = js["batch_sizes"]
    timing = [RoundTiming.from_dict(t) for t in js["timing"]]
    intervals = _fit_times(timing, sizes)
    mid = {b: t.mid for b, t in intervals.items()}
    pts = points_of(js)
    fastest = [point_fastest(p, b0, intervals) for p in pts]
    same_fastest = fastest == [p["fastest_batch_size"] for p in js["points"]]
    pts = [dataclasses.replace(p, fastest_batch_size=f) for p, f in zip(pts, fastest)]
    horizon = js["horizon_samples"]
    lr_of = {b: 0.0 for b in sizes}
    measured = plan_stages(pts, horizon, b0, mid, lambda b: lr_of[b])
    fixed = {b: predict_fixed(pts, horizon, b, b0, mid[b]) for b in sizes}
    shipped, _, _ = no_worse_than_fixed(measured, fixed, lambda b: lr_of[b])
    # the tied rule
    cands = {"plan": (measured, sum(s.samples for s in measured),
                      sum(s.steps * intervals[s.batch_size].lo for s in measured),
                      sum(s.steps * intervals[s.batch_size].mid for s in measured),
                      sum(s.steps * intervals[s.batch_size].hi for s in measured))}
    for b, p in fixed.items():
        cands[b] = (None, p.samples, p.steps * intervals[b].lo, p.time_s,
                    p.steps * intervals[b].hi)
    finite = {k: v for k, v in cands.items() if math.isfinite(v[3])}
    best = min(finite, key=lambda k: finite[k][3])
    tied = [k for k, v in finite.items() if v[2] <= finite[best][4]]
    win = min(tied, key=lambda k: (finite[k][1], k != "plan"))
    tied_plan = plan_of(measured) if win == "plan" else ((0, win),)
    return dict(same_fastest=same_fastest, fastest=fastest, fixed=fixed,
                stored=tuple((round(s["base_samples"]), s["batch_size"]) for s in js["stages"]),
                point=plan_of(shipped), tied=tied_plan, plan=plan_of(measured),
                tied_set=sorted(str(k) for k in tied))


def score(plan: tuple, ot: dict, best: int, b0: int, stored: tuple, row: dict) -> str:
    if len(plan) == 1:
        b = plan[0][1]
        t = ot[b]["time_s"]
        return f"{t / ot[best]['time_s']:.2f} / {t / ot[b0]['time_s']:.2f}"
    if plan == stored:
        return f"{row['time_vs_best']:.2f} / {row['time_vs_base']:.2f} (run)"
    return "live"


def fmt_plan(plan: tuple) -> str:
    return " → ".join(f"{b}" + (f"@{s:,}" if s else "") for s, b in plan)


def main(paths: list[str]) -> None:
    oracles: dict[str, dict] = {}
    accuracy: list[str] = []
    print("| file | task | condition | best b | plan (points' fastest) | point rule: plan,"
          " T/best / T/base | tied rule: plan, T/best / T/base | tied set |")
    print("|---|---|---|---:|---|---|---|---|")
    for path in paths:
        doc = read(path)
        if doc["oracle"] not in oracles:
            oracles[doc["oracle"]] = {e["name"]: e for e in read(doc["oracle"])["examples"]}
        by_name = oracles[doc["oracle"]]
        for ex in doc["results"]:
            ot = lib.oracle_times(by_name[ex["name"]])
            best = lib.best_batch(ot)
            for cond, row in ex.get("conditions", {}).items():
                js = row["schedule"]
                r = replay(js)
                b0 = js["base_batch_size"]
                if not r["same_fastest"] or r["point"] != r["stored"]:
                    print(f"  MISMATCH {path} {ex['name']} {cond}: stored {r['stored']}, "
                          f"replayed {r['point']}, fastest {r['fastest']}")
                print(f"| {Path(path).name.split('.')[0]} | {ex['name']} | {cond} | {best} | "
                      f"{fmt_plan(r['plan'])} | {fmt_plan(r['point'])}: "
                      f"{score(r['point'], ot, best, b0, r['stored'], row)} | "
                      f"{fmt_plan(r['tied'])}: {score(r['tied'], ot, best, b0, r['stored'], row)}"
                      f" | {', '.join(r['tied_set'])} |")
                if cond == "quiet":
                    base = r["fixed"][b0].samples
                    cells = []
                    for b in js["batch_sizes"]:
                        pred = r["fixed"][b].samples / base
                        true = ot[b]["samples"] / ot[b0]["samples"]
                        cells.append(f"{b}: {pred:.2f}/{true:.2f}" if math.isfinite(pred * true)
                                     else f"{b}: {pred:.2f}/{true:.2f}".replace("inf", "∞"))
                    accuracy.append(f"| {ex['name']} | {b0} | {', '.join(cells)} |")
    print("\nSamples to the horizon relative to the base batch's: predicted from the branches "
          "(quiet run) / the oracle's full runs to the target")
    print("\n| task | base b | b: predicted / full runs |\n|---|---:|---|")
    print("\n".join(accuracy))


if __name__ == "__main__":
    main(sys.argv[1:])
