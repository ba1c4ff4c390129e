"""How much of issue 12's regret is the target the oracle asks for (replay, no training).

    PYTHONPATH=. python3 benchmarks/replay_target.py \
        --oracles benchmarks/results/sweep-ramp-93f9bcf.json.gz \
                  benchmarks/results/sweep-fresh-b2d7097.json.gz \
                  benchmarks/results/sweep-fresh2-3a274f4.json.gz \
                  benchmarks/results/sweep-fresh3-40cf877.json.gz \
        --sweeps benchmarks/results/sweep-s16-{old,fresh,fresh2,fresh3}-0a40b20.json.gz

The oracle's target is ``l_best + f (l0 - l_best)``, ``f`` the task's ``drop_fraction`` (0.05
on 20 of 21 tasks: 5% of the way from the best validation loss any calibration run reached
back to the start, i.e. near convergence). Three tables, each from the saved full runs:

1. **The best batch size against the target.** The oracle re-scored with ``f`` from 0.5 (a
   short run) to 0.02, each cell ``best b: regret`` of the worst of the saved sweeps' picks
   (the shipped rule's picks, which do not change: they never see the target).
2. **What one seed resolves.** Each seed's own full runs as the pick (the batch size that
   reached the task's target first in that seed), scored against the median oracle: the
   regret a rule that saw whole runs, once per size, would still have.
3. **Whole curves, no target.** Each seed's validation curves cut at a horizon (a multiple of
   the sweep's budget at the base batch, in steady-state seconds ``steps * t(b)``), the pick
   the size first to reach ``L + 0.1 (l0 - L)``, ``L`` the lowest smoothed loss any size
   reached by the horizon: what trials long enough to see whole runs could do without being
   told the target.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib  # noqa: E402
from bench_selection import read_json  # noqa: E402

INF = math.inf
FRACTIONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
HORIZONS = (1, 2, 4, 8, 16)
LEVEL = 0.1


def retargeted(example: dict, fraction: float) -> dict:
    """The example with every run's ``to_target`` re-read at ``fraction`` of the way back."""
    cal = example["calibration"]
    target = cal["l_best"] + fraction * (cal["l0"] - cal["l_best"])
    out = copy.deepcopy(example)
    for seed_runs in out["runs"]:
        for run in seed_runs.values():
            run["to_target"] = lib.crossing(run["evals"], target)
    return out


def seed_picks(example: dict) -> list[int]:
    """Per seed, the batch size whose own full run reached the target first (steps x t(b))."""
    step_t = {int(b): v["cpu_s"] for b, v in example["timing"].items()}
    picks = []
    for seed_runs in example["runs"]:
        scored = []
        for b in example["batch_sizes"]:
            hit = seed_runs[str(b)]["to_target"]
            scored.append((hit["step"] * step_t[b] if hit else INF, -b))
        picks.append(-min(scored)[1])
    return picks


def curve_pick(example: dict, seed_runs: dict, horizon_s: float) -> int | None:
    """The size first to reach ``L + LEVEL (l0 - L)`` on the smoothed validation curves cut at
    ``horizon_s`` steady-state seconds (``L``: the lowest any size reached by then)."""
    step_t = {int(b): v["cpu_s"] for b, v in example["timing"].items()}
    curves = {}
    for b in example["batch_sizes"]:
        pts = [(row[0] * step_t[b], row[4]) for row in seed_runs[str(b)]["evals"]
               if row[0] * step_t[b] <= horizon_s]
        values = [v for _, v in pts]
        if pts and all(math.isfinite(v) for v in values):
            smooth = lib.smoothed(values, 3) if len(values) >= 3 else values
            curves[b] = list(zip((t for t, _ in pts), smooth))
    if not curves:
        return None
    l0 = max(c[0][1] for c in curves.values())
    low = min(v for c in curves.values() for _, v in c)
    level = low + LEVEL * (l0 - low)
    scored = [(next((t for t, v in c if v <= level), INF), -b) for b, c in curves.items()]
    return -min(scored)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oracles", nargs="+", required=True, type=Path)
    ap.add_argument("--sweeps", nargs="+", required=True, type=Path)
    args = ap.parse_args()
    picks: dict[str, list[int]] = {}
    for path in args.sweeps:
        for ex in read_json(path)["examples"]:
            picks[ex["name"]] = [sw["result"]["recommended_batch_size"] for sw in ex["sweeps"]]
    by_fraction: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    by_horizon: dict[int, list[float]] = {h: [] for h in HORIZONS}
    seed_worst: list[float] = []
    print("task | f | best b: worst regret of the saved picks, at f = "
          + " / ".join(map(str, FRACTIONS)) + " | one-seed oracle picks: regret"
          + " | whole curves at x" + "/".join(map(str, HORIZONS)) + " the sweep budget")
    for path in args.oracles:
        for ex in read_json(path)["examples"]:
            name = ex["name"]
            cells = []
            for f in FRACTIONS:
                times = lib.oracle_times(retargeted(ex, f))
                worst = max((lib.regret(times, p) for p in picks.get(name, []) if p), default=INF)
                by_fraction[f].append(worst)
                cells.append(f"{lib.best_batch(times)}: {lib.fmt_regret(worst)}")
            times = lib.oracle_times(ex)
            sp = seed_picks(ex)
            sr = [lib.regret(times, p) for p in sp]
            seed_worst.append(max(sr))
            step_t = {int(b): v["cpu_s"] for b, v in ex["timing"].items()}
            base = ex["base_batch_size"]
            budget_s = ex["sweep_budget_samples"] / base * step_t[base]
            hcells = []
            for h in HORIZONS:
                worst = max(lib.regret(times, curve_pick(ex, seed_runs, h * budget_s))
                            for seed_runs in ex["runs"])
                by_horizon[h].append(worst)
                hcells.append(lib.fmt_regret(worst))
            print(f"{name} | {ex['calibration']['drop_fraction']} | " + " / ".join(cells)
                  + " | " + ", ".join(f"{p}: {lib.fmt_regret(r)}" for p, r in zip(sp, sr))
                  + " | " + " / ".join(hcells))

    def summary(values: list[float]) -> str:
        return (f"median {statistics.median(values):.2f}, worst {lib.fmt_regret(max(values))}, "
                f"{sum(v > 1.25 for v in values)} tasks above 1.25")
    print()
    for f, values in by_fraction.items():
        print(f"saved picks, target at f = {f}: {summary(values)}")
    print(f"one-seed oracle: {summary(seed_worst)}")
    for h, values in by_horizon.items():
        print(f"whole curves at x{h} the sweep budget: {summary(values)}")


if __name__ == "__main__":
    main()
