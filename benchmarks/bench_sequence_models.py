"""Simulated probe against the CPU allocator on sequence models that read their batch's values
(issue 13): Hugging Face decoders and an encoder fed padded batches with an attention mask, and
a packed-sequence LSTM. Every number is from a fresh process per (model, batch size, method),
so one run's allocator state cannot leak into another's.

    .venv/bin/python benchmarks/bench_sequence_models.py            # table for docs
    .venv/bin/python benchmarks/bench_sequence_models.py --json out.json

Peaks: ``simulate_step_peak`` vs ``cpu_step_peak`` (the profiler's allocator events) at
b = 8, 32, 128 on worst-case inputs (the longest items, as probe and check use them).
max_batch: the simulated probe at margin 0 under a budget, against the true maximum found by
bisection on the CPU allocator's peaks (real steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ["llama", "gpt2", "bert", "qwen2", "packed_lstm"]
BATCHES = [8, 32, 128]
BUDGET = 64 * 2**20  # for the max_batch comparison


def task_of(name: str):
    from tasks import seq_tasks

    if name in ("bert", "qwen2"):
        return seq_tasks.extra_family(name)
    return getattr(seq_tasks, name)()


def one(name: str, b: int, kind: str) -> int:
    from bsselect.memory.cpu_truth import cpu_step_peak
    from bsselect.memory.inputs import InputMode, scan_inputs
    from bsselect.memory.simulated import simulate_step_peak

    task = task_of(name)
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    fn = simulate_step_peak if kind == "sim" else cpu_step_peak
    return fn(task, b, inputs=inputs).peak_bytes


def sim_max_batch(name: str) -> int:
    import torch

    from bsselect.device import Budget
    from bsselect.memory.inputs import InputMode, scan_inputs
    from bsselect.memory.probe import Method, run_probe

    task = task_of(name)
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    result = run_probe(task, task_name=name, device=torch.device("cpu"),
                       budget=Budget(BUDGET, "bench"), method=Method.simulated, margin=0.0,
                       inputs=inputs)
    return result.max_batch


def _child(*args: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def true_max_batch(name: str, guess: int) -> tuple[int, int]:
    """The largest b whose real peak fits BUDGET (bisection on real steps), and the steps."""
    lo, hi, steps = 0, None, 0
    b = guess
    while True:
        steps += 1
        fits = _child("one", name, str(b), "cpu") <= BUDGET
        if fits:
            lo = b
        else:
            hi = b
        if hi is None:
            b = lo * 2
        elif hi - lo <= 1:
            return lo, steps
        else:
            b = (lo + hi) // 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "one":
            print(one(args.child[1], int(args.child[2]), args.child[3]))
        else:
            print(sim_max_batch(args.child[1]))
        return
    rows, caps = [], []
    start = time.time()
    for name in MODELS:
        for b in BATCHES:
            sim, cpu = _child("one", name, str(b), "sim"), _child("one", name, str(b), "cpu")
            rows.append(dict(model=name, batch=b, cpu_bytes=cpu, sim_bytes=sim,
                             error_pct=100 * (sim / cpu - 1)))
            print(f"{name:12} b={b:4} cpu {cpu:>12,} sim {sim:>12,} {rows[-1]['error_pct']:+.3f}%",
                  flush=True)
        sim_max = _child("max", name)
        true, steps = true_max_batch(name, sim_max)
        caps.append(dict(model=name, budget=BUDGET, sim_max_batch=sim_max, true_max_batch=true,
                         ratio=sim_max / true, real_steps=steps))
        print(f"{name:12} max_batch sim {sim_max} true {true} ratio {sim_max / true:.4f}",
              flush=True)
    print(f"\n{time.time() - start:.0f} s")
    print("\n| model | batch | CPU allocator bytes | simulated bytes | error |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['cpu_bytes']:,} | {r['sim_bytes']:,} | "
              f"{r['error_pct']:+.3f}% |")
    print(f"\n| model | simulated max_batch (margin 0, {BUDGET // 2**20} MiB) | true max | ratio |")
    print("|---|---:|---:|---:|")
    for c in caps:
        print(f"| {c['model']} | {c['sim_max_batch']} | {c['true_max_batch']} | {c['ratio']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(peaks=rows, max_batch=caps), indent=1))


if __name__ == "__main__":
    main()
