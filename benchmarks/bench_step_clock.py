"""Step times on a busy CPU: wall time against the thread's CPU time, and what the sweep picks.

Two parts, each run quiet and with busy processes (``while True: pass``) started here and
stopped by their PIDs:

1. ``rounds``: one example's batch sizes timed in interleaved rounds in this process, one
   torch thread, every step read on both clocks. Prints each size's step time (25th
   percentile of the round medians) and its loaded / quiet ratio per clock.
2. ``sweeps``: ``bsselect sweep EXAMPLE --json`` in a subprocess, from each source tree in
   ``--code`` (e.g. a ``git worktree`` of the commit before and this checkout), taken in
   turn, quiet and loaded, ``--repeats`` times; the pick, the tied set, the timing clock and
   the wall time of each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_step_clock.py rounds tiny-lm \\
        --sizes 8,16,32,64 --busy 1,2
    .venv/bin/python benchmarks/bench_step_clock.py sweeps digits-mlp --busy 2 --repeats 3 \\
        --code /tmp/old-tree,. --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent.parent


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes, each spinning on one core (pure Python: one core each)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=10)


def q25(values: list[float]) -> float:
    return sorted(values)[len(values) // 4]


def rounds(example: str, sizes: list[int], n_rounds: int, steps: int) -> dict:
    """Per size, the round medians of wall and thread CPU seconds (interleaved rounds,
    rotated order, one untimed step after each switch)."""
    import torch
    from torch.utils.data import DataLoader

    from bsselect.task import load_task

    torch.set_num_threads(1)
    task, _ = load_task(example)
    torch.manual_seed(0)
    model = task.model()
    make = task.optimizer or (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    optimizer = make(model.parameters(), 0.0)

    def stream(b: int):
        while True:
            yield from DataLoader(task.train_data, batch_size=b, shuffle=True, drop_last=True,
                                  collate_fn=task.collate_fn)

    streams = {b: stream(b) for b in sizes}

    def step(b: int) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        x, y = next(streams[b])
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
        return time.perf_counter() - w0, time.thread_time() - c0

    for b in sizes:
        for _ in range(3):
            step(b)
    out: dict[int, dict[str, list[float]]] = {b: {"wall": [], "cpu": []} for b in sizes}
    for r in range(n_rounds):
        shift = r % len(sizes)
        for b in sizes[shift:] + sizes[:shift]:
            step(b)
            times = [step(b) for _ in range(steps)]
            out[b]["wall"].append(median(t[0] for t in times))
            out[b]["cpu"].append(median(t[1] for t in times))
    return out


def run_rounds(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    conditions = ["quiet"] + [f"busy{n}" for n in args.busy]
    data = {}
    for repeat in range(args.repeats):
        for cond in conditions:
            procs = start_busy(int(cond[4:])) if cond != "quiet" else []
            try:
                data[f"{cond}#{repeat}"] = rounds(args.example, sizes, args.rounds, args.steps)
            finally:
                stop_busy(procs)
    print(f"{args.example}: step time (ms, 25th percentile of {args.rounds} round medians of "
          f"{args.steps} steps), and loaded / quiet of the same repeat")
    print(f"{'condition':>12} {'clock':>5} " + " ".join(f"{'b=' + str(b):>16}" for b in sizes))
    for key, per in data.items():
        cond, repeat = key.split("#")
        for clock in ("wall", "cpu"):
            cells = []
            for b in sizes:
                t = q25(per[b][clock])
                ref = q25(data[f"quiet#{repeat}"][b][clock])
                cells.append(f"{1e3 * t:8.2f} ({t / ref:5.3f})")
            print(f"{key:>12} {clock:>5} " + " ".join(f"{c:>16}" for c in cells))
    return {"part": "rounds", "example": args.example, "sizes": sizes, "data": {
        k: {str(b): v for b, v in per.items()} for k, per in data.items()}}


def sweep_once(code: Path, example: str, workdir: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), CI="true")
    env.pop("OMP_NUM_THREADS", None)  # the sweep chooses its own threads
    journal = workdir / "journal.jsonl"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bsselect", "sweep", example, "--json",
                           "--journal", str(journal), "--overwrite", *extra],
                          capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"sweep failed ({code}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    timing = result["timing"]["rounds"]
    return {"pick": result["recommended_batch_size"], "tied": result["tied_with_best"],
            "clock": timing[0].get("clock", "wall") if timing else None,
            "step_times_ms": {t["batch_size"]: round(1e3 * t["step_time_s"], 3) for t in timing},
            "wall_s": round(wall, 2)}


def run_sweeps(args: argparse.Namespace) -> dict:
    codes = [Path(c).resolve() for c in args.code.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conditions = ["quiet"] + [f"busy{n}" for n in args.busy]
    rows = []
    for repeat in range(args.repeats):
        for cond in conditions:
            for code in codes:
                procs = start_busy(int(cond[4:])) if cond != "quiet" else []
                try:
                    row = sweep_once(code, args.example, workdir, args.sweep_args.split())
                finally:
                    stop_busy(procs)
                row.update(code=str(code), condition=cond, repeat=repeat)
                rows.append(row)
                print(f"{cond:>6} #{repeat} {code.name:>12}: pick {row['pick']:>4} tied "
                      f"{row['tied']} clock {row['clock']} steps(ms) {row['step_times_ms']} "
                      f"wall {row['wall_s']} s", flush=True)
    return {"part": "sweeps", "example": args.example, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["rounds", "sweeps"])
    parser.add_argument("example")
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--busy", default="1,2", help="busy process counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per size and round")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--code", default=str(HERE),
                        help="source trees to run sweeps from, comma-separated")
    parser.add_argument("--sweep-args", default="", help="extra arguments for each sweep")
    parser.add_argument("--workdir", default="/tmp/bench-step-clock")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.busy = [int(n) for n in args.busy.split(",") if n]
    import platform

    out = run_rounds(args) if args.part == "rounds" else run_sweeps(args)
    out.update(command=" ".join(sys.argv), machine=platform.platform(),
               cpus=len(os.sched_getaffinity(0)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
