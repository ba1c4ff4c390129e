"""Run under torchrun by tests/test_distributed.py: bsselect's core functions on every rank,
each rank writing what it got to OUT_DIR/rank<r>.json, so the test can compare the ranks.

    python -m torch.distributed.run --nproc-per-node 2 ddp_driver.py OUT_DIR

- probe on a CPU allocator capped on rank 1 only (the measured path's seam), with a model
  whose memory grows with b**2 so that the confirming step must back off on rank 1;
- sweep of ``oom_backward``: rank 1 runs out of memory inside the backward;
- sweep then resume, of the tiny sweep task (rank 0 reads the journal, the others get it);
- the noise scale of linreg, estimated data-parallel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from test_probe import quadratic_task  # noqa: E402  (the b**2 model of the single-process test)

from bsselect import distributed  # noqa: E402
from bsselect.device import Budget  # noqa: E402
from bsselect.memory.capped import CappedCpuAllocator  # noqa: E402
from bsselect.memory.probe import run_probe  # noqa: E402
from bsselect.selection.lr_scaling import LrScaling  # noqa: E402
from bsselect.selection.noise_run import measure_noise  # noqa: E402
from bsselect.selection.sweep import SweepSettings, parse_budget, run_sweep  # noqa: E402
from bsselect.task import load_task  # noqa: E402

RANK1_CAP_BATCH = 400  # rank 1's cap: what the line fitted on b <= 64 promises for b = 400


def probe_capped_on_rank_1() -> dict:
    task = quadratic_task()
    cpu = torch.device("cpu")
    sizes = [8, 16, 32, 64]
    free = run_probe(task, task_name="quad", device=cpu, budget=Budget(2**40, "x"), margin=0.0,
                     batch_sizes=sizes, backend=CappedCpuAllocator(2**40), confirm=False)
    cap = free.fixed_bytes + RANK1_CAP_BATCH * free.per_sample_bytes
    if distributed.rank() != 1:
        cap = 2**40
    backend = CappedCpuAllocator(cap)
    result = run_probe(task, task_name="quad", device=cpu, budget=Budget(cap, "cap"),
                       margin=0.0, batch_sizes=sizes, backend=backend)
    return {**result.to_json(), "cap_bytes": cap, "ooms_here": backend.ooms}


def sweep(task_spec: str, sizes: list[int], journal: Path, resume: bool = False) -> dict:
    task, name = load_task(task_spec)
    settings = SweepSettings(budget=parse_budget("256"), lr_scaling=LrScaling.linear,
                             noise_measurements=2)
    result = run_sweep(task, task_name=name, batch_sizes=sizes, settings=settings,
                       device=torch.device("cpu"), journal_path=journal, resume=resume,
                       max_batch=max(sizes), max_batch_source="test")
    return result.to_json()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    tasks = HERE / "ddp_tasks.py"
    tiny = HERE / "sweep_tasks.py"
    out = {
        "rank": distributed.rank(), "world_size": distributed.world_size(),
        "probe": probe_capped_on_rank_1(),
        "backward_oom": sweep(f"{tasks}:oom_backward", [16, 32, 64], out_dir / "oom.jsonl"),
        "first": sweep(f"{tiny}:tiny", [16, 32], out_dir / "tiny.jsonl"),
        "resumed": sweep(f"{tiny}:tiny", [16, 32, 64], out_dir / "tiny.jsonl", resume=True),
        "noise": measure_noise(load_task("linreg")[0], b_small=16, b_big=128,
                               measurements=16).to_json(),
    }
    out["noise"].pop("wall_s")
    (out_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
