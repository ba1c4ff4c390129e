"""One rank of a real FSDP2 run on gloo, under torchrun: the CPU allocator's peak of training
step 2 (``cpu_truth.cpu_step_peak`` with the model wrapped by ``fully_shard`` exactly as the
simulation wraps it), written as one JSON line per rank to stdout.

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        benchmarks/sharded_driver.py TASK BATCH [--checkpointing] [--no-reshard] [--bf16]

TASK: a bsselect task spec, or ``llama:PATH`` for a local transformers config (--seq-len).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from bsselect import distributed
from bsselect.api import hf_config_task, resolve_task
from bsselect.memory.cpu_truth import cpu_step_peak
from bsselect.memory.sharded import ShardPlan
from bsselect.step import StepSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task")
    parser.add_argument("batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--no-reshard", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", help="write each rank's line to OUT/rank<r>.json instead")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    if args.task.startswith("hf:"):
        task, _ = hf_config_task(None, args.task[3:], args.seq_len)
    else:
        task, _ = resolve_task(args.task)
    plan = ShardPlan(dist.get_world_size(), checkpointing=args.checkpointing,
                     reshard_after_forward=not args.no_reshard,
                     param_dtype=torch.bfloat16 if args.bf16 else None)
    peak = cpu_step_peak(task, args.batch, settings=StepSettings(shard=plan))
    line = json.dumps(dict(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           peak_bytes=peak.peak_bytes, start_bytes=peak.start_bytes,
                           phase=peak.peak_phase.value))
    if args.out:  # ranks printing at once can interleave on one stdout line
        Path(args.out, f"rank{dist.get_rank()}.json").write_text(line)
    else:
        print(line, flush=True)
    distributed.teardown()  # gloo: wait for the peers before closing (a bare destroy can abort one)


if __name__ == "__main__":
    main()
