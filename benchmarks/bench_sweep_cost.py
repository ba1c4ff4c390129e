"""The sweep's cost against one full run at the best batch size, measured back to back.

    PYTHONPATH=. python3 benchmarks/bench_sweep_cost.py \
        --oracle benchmarks/results/sweep-ramp-93f9bcf.json.gz --examples tiny-lm,gru-lm \
        [--repeats 2] [--json out.json]

Issue 12's cost bar: the default sweep (as ``bench_selection.py`` runs it) must cost less than
one full run at the best size wherever that run lasts over 10 s. ``bench_selection.py`` scores
it against the oracle's ``T(best)``: steps to the target times the interleaved min-of-medians
step time, measured when the oracle was made — an idealised run on another day's machine (this
2-vCPU machine's step times move up to 2x within 20 minutes). Here the full run is what a user
would run: the task at the oracle's best batch size and its scaled lr (with the sweep's lr
ramp), for the oracle's median steps to the target, in a plain training loop (data loading,
``train_step``, the loss read each step; no validation, which would only make it longer), with
the sweep's thread count; and the sweep runs just before it, in the same process. Each pair is
repeated; the ratio is the sweep's wall time over the run's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib  # noqa: E402
from bench_selection import CONFIG, TASKS, read_json  # noqa: E402

from bsselect.selection.lr_scaling import scale_lr, trial_lr  # noqa: E402
from bsselect.selection.sweep import (RAMP_BASE_STEPS, SweepSettings, data_cap,  # noqa: E402
                                      default_budget, make_setup, powers_of_two,
                                      resolve_lr_scaling, run_sweep)
from bsselect.selection.timing import cpu_threads, default_threads  # noqa: E402
from bsselect.selection.trials import cycle_batches  # noqa: E402
from bsselect.step import to_device, train_step  # noqa: E402

CPU = torch.device("cpu")


def measure(example: dict, repeats: int) -> dict:
    name = example["name"]
    task = TASKS[name]()
    sizes = powers_of_two(8, CONFIG[name]["cap"] or data_cap(len(task.train_data)))
    scaling = resolve_lr_scaling(task, None)
    settings = SweepSettings(budget=default_budget(max(sizes), task.base_batch_size),
                             lr_scaling=scaling, seed=0,
                             lr_ramp_samples=RAMP_BASE_STEPS * task.base_batch_size)
    ot = lib.oracle_times(example)
    best = lib.best_batch(ot)
    steps = math.ceil(ot[best]["steps"])
    threads = default_threads()
    out = dict(name=name, best=best, steps=steps, oracle_time_s=ot[best]["time_s"],
               oracle_raw_wall_s=ot[best]["raw_wall_s"], threads=threads, pairs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = run_sweep(task, task_name=name, batch_sizes=sizes, settings=settings,
                               device=CPU, journal_path=Path(tmp) / "j.jsonl", resume=False,
                               overwrite=True, max_batch=max(sizes),
                               max_batch_source="--batch-sizes", threads=threads)
            sweep_s = time.perf_counter() - t0
            run_s = full_run(task, settings, best, scaling, steps, threads)
            out["pairs"].append(dict(sweep_s=sweep_s, run_s=run_s, ratio=sweep_s / run_s,
                                     pick=result.recommended_batch_size))
            print(f"{name}: sweep {sweep_s:.2f} s (picks {result.recommended_batch_size}), "
                  f"full run at {best} for {steps} steps {run_s:.2f} s: "
                  f"{sweep_s / run_s:.2f}x", flush=True)
    return out


def full_run(task, settings: SweepSettings, b: int, scaling, steps: int, threads: int) -> float:
    setup, _ = make_setup(task, settings, CPU)
    lr = scale_lr(task.lr, task.base_batch_size, b, scaling)
    with cpu_threads(threads):
        torch.manual_seed(0)
        model = task.model()
        model.load_state_dict(setup.initial_state)
        model.train()
        opt = task.make_optimizer(model.parameters(), lr)
        batches = cycle_batches(setup, b)
        t0 = time.perf_counter()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = trial_lr(step, lr, b, task.lr, 0, setup.lr_ramp_samples)
            x, y = to_device(next(batches), CPU)
            train_step(model, opt, task, x, y).item()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oracle", type=Path, required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    by_name = {e["name"]: e for e in read_json(args.oracle)["examples"]}
    results = [measure(by_name[n], args.repeats) for n in args.examples.split(",")]
    doc = dict(command=" ".join(sys.argv), results=results,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            torch=torch.__version__, loadavg=os.getloadavg()[0]))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
