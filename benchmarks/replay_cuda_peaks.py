"""The stored GPU truths against today's simulation, on the CPU (no GPU needed).

``bench_cuda.py --sections peaks`` stored, per case and batch size, the simulated peak of
its day (``--target cuda``, tensors only) and ``max_memory_allocated`` of a real second step
on the GPU. The truth does not change with the code; the simulation does. This re-runs the
simulated side of every stored row with today's code and prints both against the truth, so
that a change to the simulation shows where it moved a CUDA answer. The percentages are of
the simulated tensors plus the 64 MiB of cuBLAS/cuBLASLt workspace the CUDA terms add
(docs/benchmarks-cuda.md), against the allocated bytes.

    PYTHONPATH=. python3 benchmarks/replay_cuda_peaks.py            # a few minutes on 2 cores
    PYTHONPATH=. python3 benchmarks/replay_cuda_peaks.py --json now.json

A row whose case no longer builds the same way here (another transformers version than the
GPU machine's) says so in its own column rather than being dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_cuda import settings_for  # noqa: E402
from cuda_cases import cases, inputs_of  # noqa: E402

from bsselect.memory.simulated import simulate_step_peak  # noqa: E402

MiB = 2**20
WORKSPACE = 64 * MiB
# (case set, stored file): the latest peaks each set's cases were measured with.
STORED = (("tune", "cuda-h200-tune-rerun.json"), ("heldout", "cuda-h200-heldout-fix.json"),
          ("seq", "cuda-h200-seq-rerun.json"), ("recompute", "cuda-h200-recompute-peaks.json"),
          ("recompute", "cuda-h200-recompute-peaks-heldout.json"))


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _pct(sim: int, truth: int) -> str:
    return f"{100 * ((sim + WORKSPACE) / truth - 1):+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    print("| case set | model | precision | b | allocated (GPU) | sim then | sim now | "
          "then vs allocated | now vs allocated | now − then |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for which, name in STORED:
        stored = [r for r in _load(Path(args.results) / name).get("peaks", [])
                  if "allocated" in r and "simulated" in r]
        if not stored:
            continue
        built = {(c[0], c[3]): c for c in cases(which)}
        for r in stored:
            case = built.get((r["model"], r["precision"]))
            row = dict(set=which, file=name, model=r["model"], precision=r["precision"],
                       batch=r["batch"], allocated=r["allocated"], then=r["simulated"])
            t0 = time.time()
            if case is None:
                row["now"] = None
                row["error"] = "no such case in cuda_cases.py now"
            else:
                _, sim_task, _, prec, _, _ = case
                try:
                    row["now"] = simulate_step_peak(
                        sim_task, r["batch"], kernel_workspace=False,
                        settings=settings_for(prec, True, r["model"]),
                        inputs=inputs_of(sim_task, which)).peak_bytes
                except Exception as exc:  # noqa: BLE001 - one row's failure is a row
                    row["now"], row["error"] = None, repr(exc)[:200]
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            now, then, truth = row["now"], r["simulated"], r["allocated"]
            shown = "error: " + row["error"] if now is None else f"{now:,}"
            moved = "" if now is None else f"{100 * (now / then - 1):+.2f}%"
            print(f"| {which} | {r['model']} | {r['precision']} | {r['batch']} | {truth:,} | "
                  f"{then:,} | {shown} | {_pct(then, truth)} | "
                  f"{'' if now is None else _pct(now, truth)} | {moved} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
