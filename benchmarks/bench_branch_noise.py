"""B_simple at comparable points (issue 18 item 1): measured at the base configuration's state
after k base steps (k = 0, 8, 32, 128; the sweep's own estimator, 8 measurements), against the
B_noise that the oracle's full runs imply and the sweep's pooled B_hat (both read off
benchmarks/results/sweep-ramp-93f9bcf.json.gz). Results: docs/benchmarks-sweep.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_branch_noise.py \\
        digits-mlp,digits-cnn,logreg,mlp-adam,cnn-bn,lstm-count,gru-lm
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tasks  # noqa: E402
from bsselect.examples import EXAMPLES  # noqa: E402
from bsselect.lr_scaling import LrScaling  # noqa: E402
from bsselect.sweep import SweepSettings, default_budget, make_setup  # noqa: E402
from bsselect.trials import _fresh_model, branch_point, measure_trial_noise  # noqa: E402

# From sweep-ramp-93f9bcf.json.gz: the B_noise the oracle's steps-to-target imply, and the
# default sweep's B_hat (pooled over its trials' ends).
IMPLIED = {"digits-mlp": 42.8, "digits-cnn": 52.5, "logreg": 11600, "mlp-adam": 538,
           "cnn-bn": 34.3, "gru-lm": 19.5, "lstm-count": 120}
POOLED = {"digits-mlp": 67.2, "digits-cnn": 12.5, "logreg": 70.1, "mlp-adam": 145,
          "cnn-bn": 9.74, "gru-lm": 18.4, "lstm-count": 10.6}
STEPS = (0, 8, 32, 128)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    tasks = {**EXAMPLES, **bench_tasks.HELD_OUT}
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
        print(f"{name:11s} implied {IMPLIED.get(name)}  pooled {POOLED.get(name)} | "
              + "  ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
