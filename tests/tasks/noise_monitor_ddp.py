"""Run under torchrun by tests/test_noise_monitor.py: the noise monitor on a DDP model, 2
ranks on gloo, the digits MLP held at its initial weights (lr 0), each rank writing its
monitor's estimate to OUT_DIR/rank<r>.json.

    python -m torch.distributed.run --nproc-per-node 2 noise_monitor_ddp.py OUT_DIR ACCUM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from bsselect import distributed
from bsselect.api import resolve_task
from bsselect.selection.noise_monitor import GradientNoiseMonitor

MICRO = 16


def main(out: Path, accum: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task, _ = resolve_task("digits-mlp")
    torch.manual_seed(0)  # bsselect noise's initial weights
    model = torch.nn.parallel.DistributedDataParallel(task.model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sampler = DistributedSampler(task.train_data, seed=1, drop_last=True)
    loader = DataLoader(task.train_data, batch_size=MICRO, sampler=sampler, drop_last=True,
                        collate_fn=task.collate_fn)
    monitor = GradientNoiseMonitor(model, accumulation_steps=accum,
                                   n_data=len(task.train_data), window=10_000)
    i = 0
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for x, y in loader:
            i += 1
            last = i % accum == 0
            with (model.no_sync() if not last else torch.enable_grad()):
                (task.loss_fn(model(x), y) / accum).backward()
            if last:
                monitor.step(len(x))
                optimizer.step()
                optimizer.zero_grad()
    est = monitor.estimate()
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        b_simple=est.b_simple, b_small=est.b_small, b_big=est.b_big,
        measurements=est.measurements, world_size=monitor.world_size)))
    distributed.teardown()  # gloo: wait for the peer before closing (a bare destroy can abort it)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
