"""B_simple at comparable points (issue 18 item 1): measured at the base configuration's state
after k base steps (k = 0, 8, 32, 128; the sweep's own estimator, 8 measurements), against the
B_noise that the oracle's full runs imply and the sweep's pooled B_hat (both computed from
benchmarks/results/sweep-ramp-93f9bcf.json.gz). Results: docs/benchmarks-sweep.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_branch_noise.py \\
        digits-mlp,digits-cnn,logreg,mlp-adam,cnn-bn,lstm-count,gru-lm
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tasks  # noqa: E402
import selection_lib  # noqa: E402

from bsselect.examples import EXAMPLES  # noqa: E402
from bsselect.selection.lr_scaling import LrScaling  # noqa: E402
from bsselect.selection.rank import pooled_b_simple  # noqa: E402
from bsselect.selection.sweep import SweepSettings, default_budget, make_setup  # noqa: E402
from bsselect.selection.trials import _fresh_model, branch_point, measure_trial_noise  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sweep-ramp-93f9bcf.json.gz"
STEPS = (0, 8, 32, 128)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    tasks = {**EXAMPLES, **bench_tasks.HELD_OUT}
    # The B_noise the oracle's steps-to-target imply, and the default sweep's B_hat (pooled
    # over its first sweep's trial ends), from the selection benchmark's results.
    examples = {e["name"]: e for e in json.loads(gzip.open(RESULTS).read())["examples"]}
    implied = {n: selection_lib.implied_b_noise(selection_lib.oracle_times(e))
               for n, e in examples.items()}
    pooled = {n: pooled_b_simple(selection_lib.trials_from_sweep(e["sweeps"][0]["result"]))
              for n, e in examples.items()}
    for name in names:
        task = tasks[name]()
        settings = SweepSettings(budget=default_budget(512, task.base_batch_size),
                                 lr_scaling=LrScaling.linear)
        setup, _ = make_setup(task, settings, torch.device("cpu"))
        row = []
        for k in STEPS:
            at = branch_point(setup, k) if k else setup
            model, _ = _fresh_model(at, task.lr, branch=True)
            est = measure_trial_noise(dataclasses.replace(at, noise_measurements=8), model)
            row.append(f"k={k}: {est.b_simple:8.1f}" if est and est.b_simple else f"k={k}: n/a")
        print(f"{name:11s} implied {implied.get(name) or 0:8.1f}  pooled "
              f"{pooled.get(name) or 0:6.1f} | " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
