"""How much a batch size's step time moves between runs, and the tie rule that follows from it
(no training: saved sweeps only).

    PYTHONPATH=. python3 benchmarks/replay_run_to_run.py \
        benchmarks/results/sweep-s15-{old,fresh,fresh2,fresh3}-3501ce9.json.gz

1. ``sigma_run`` per split: each sweep's interleaved-round step times (``summarize_rounds``'
   mid) at the batch sizes every sweep of the task timed, as logs centred on that sweep's mean
   over those sizes (the whole machine being slower or faster moves every size alike and
   changes no ranking); the standard deviation of a size's centred log over the task's sweeps
   (quiet and loaded), corrected for the centring (k/(k-1)), pooled as a root mean square over
   the split's sizes. ``choice.RUN_TO_RUN_SD`` is the tune split's value.
2. The saved sweeps re-ranked with ``choice.choose(run_sd=...)`` for several values (0 is the
   rule before the run-to-run spread): per split, the mean size of the tied set, the median
   and worst over tasks of each task's worst regret (oracle time to the target at the pick
   over the best size's), and the tasks where some sweep's pick is outside another sweep's
   tied set (issue 12's stability bar).
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection_lib as lib  # noqa: E402
from bench_selection import read_json  # noqa: E402

import bsselect.selection.rank as rank  # noqa: E402
from bsselect.selection import choice  # noqa: E402
from bsselect.selection.steptime import summarize_rounds  # noqa: E402
from bsselect.selection.sweep import summarize  # noqa: E402
from bsselect.selection.timing import RoundTiming  # noqa: E402
from bsselect.selection.trial_types import TrialResult  # noqa: E402

SPLITS = ("tune", "held-out", "fresh", "fresh-2", "fresh-3")
RUN_SDS = (0.0, 0.01, 0.02, 0.03, 0.04)


def centred_log_times(example) -> list[dict[int, float]]:
    """Per sweep: batch size -> log step time minus the sweep's mean over the common sizes."""
    per_sweep = [{rd["batch_size"]: summarize_rounds(rd["round_medians_s"]).mid
                  for rd in sw["result"]["timing"].get("rounds") or []}
                 for sw in example["sweeps"]]
    common = sorted(set.intersection(*(set(s) for s in per_sweep))) if per_sweep else []
    if len(common) < 2:
        return []
    out = []
    for s in per_sweep:
        mean = statistics.fmean(math.log(s[b]) for b in common)
        out.append({b: math.log(s[b]) - mean for b in common})
    return out


def sigma_run(examples) -> tuple[float, int]:
    """Pooled run-to-run standard deviation of a size's relative log step time, and the
    number of (task, size) pairs behind it."""
    variances = []
    for ex in examples:
        centred = centred_log_times(ex)
        if len(centred) < 2:
            continue
        k = len(centred[0])
        for b in centred[0]:
            variances.append(statistics.variance([c[b] for c in centred]) * k / (k - 1))
    if not variances:
        return math.nan, 0
    return math.sqrt(statistics.fmean(variances)), len(variances)


def replay(example, run_sd: float) -> tuple[list[int | None], list[set[int]]]:
    """Each saved sweep's pick and tied set, re-ranked with ``run_sd``."""
    rank.choose = functools.partial(choice.choose, run_sd=run_sd)
    picks, tied = [], []
    for sw in example["sweeps"]:
        r = sw["result"]
        trials = [TrialResult.from_dict(t) for t in r["trials"]]
        timing = [RoundTiming.from_dict(rd) for rd in r["timing"].get("rounds") or []]
        res = summarize(example["base_lr"], example["base_batch_size"], example["name"], "cpu",
                        trials, lib.settings_of(example, sw["seed"]), max(example["batch_sizes"]),
                        "--batch-sizes", "", (), False, timing=timing)
        picks.append(res.recommended_batch_size)
        tied.append(set(res.ranking.tied_with_best or ()))
    return picks, tied


def main() -> None:
    examples = [ex for path in sys.argv[1:] for ex in read_json(Path(path))["examples"]]
    print("run-to-run sd of a batch size's step time relative to the others' (log):")
    for split in SPLITS:
        sd, n = sigma_run([ex for ex in examples if ex["split"] == split])
        print(f"  {split:9s} {sd * 100:4.1f}%  ({n} task-sizes)")
    print(f"  (choice.RUN_TO_RUN_SD = {choice.RUN_TO_RUN_SD * 100:.1f}%: the tune split's)")
    print("\nre-ranked with run_sd: tied-set size, median / worst of the tasks' worst regret, "
          "tasks where a pick is outside another sweep's tied set")
    for run_sd in RUN_SDS:
        print(f"run_sd {run_sd * 100:.0f}%")
        for split in SPLITS:
            rows = []
            for ex in (e for e in examples if e["split"] == split):
                times = lib.oracle_times(ex)
                picks, tied = replay(ex, run_sd)
                stable = all(p in t for p in picks for t in tied)
                rows.append((ex["name"], picks, stable, max(lib.regret(times, p) for p in picks),
                             statistics.fmean(len(t) for t in tied)))
            if not rows:
                continue
            worst = [r[3] for r in rows]
            print(f"  {split:9s} tied {statistics.fmean(r[4] for r in rows):.1f}  regret "
                  f"{statistics.median(worst):.2f} / {max(worst):.2f}  unstable: "
                  f"{', '.join(r[0] for r in rows if not r[2]) or '-'}")


if __name__ == "__main__":
    main()
