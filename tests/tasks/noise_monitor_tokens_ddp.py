"""Run under torchrun by tests/test_noise_monitor.py: the noise monitor on a DDP model whose
loss is a token mean over the whole step's tokens on all ranks (the HF Trainer's
``num_items_in_batch`` with ``average_tokens_across_devices``), tests/tasks/token_tasks.py's
sequences of very uneven lengths. Each step's reading is compared with the weighted
U-statistic and residual spread of every micro-batch's own token-mean gradient, gathered from
both ranks; rank 0 writes the pairs to OUT_DIR/readings.json.

    python -m torch.distributed.run --nproc-per-node 2 noise_monitor_tokens_ddp.py OUT_DIR ACROSS [BAD]

With BAD (a step number), rank 1 alone passes a non-finite token count at that step: every
rank must skip that step alike and go on (a rank that left before the all-reduce hung the
others); the readings of the other steps are unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from token_tasks import _task  # noqa: E402

from bsselect import distributed  # noqa: E402
from bsselect.selection.noise_monitor import GradientNoiseMonitor  # noqa: E402

MICRO, ACCUM, STEPS = 2, 2, 12


def main(out: Path, across: bool, bad: int | None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    task, _, _ = _task()
    plain = task.model()
    twin = copy.deepcopy(plain)  # the truth's gradients: the monitor's hooks are on plain's
    model = torch.nn.parallel.DistributedDataParallel(plain)
    monitor = GradientNoiseMonitor(model, accumulation_steps=ACCUM, n_data=len(task.train_data),
                                   sampling="uniform", window=10_000)
    gen = torch.Generator().manual_seed(0)  # the same draws on both ranks; each takes its share
    pairs = []
    for step in range(STEPS):
        idx = torch.randperm(len(task.train_data), generator=gen)[:MICRO * ACCUM * world]
        mine = idx.view(world, ACCUM, MICRO)[rank]
        batches = [task.collate_fn([task.train_data[int(i)] for i in m]) for m in mine]
        tokens = [float(y[1].sum()) for _, y in batches]
        total = torch.tensor(sum(tokens), dtype=torch.float64)
        dist.all_reduce(total)
        weights = [math.nan, *tokens[1:]] if step == bad and rank == 1 else tokens
        for k, (x, y) in enumerate(batches):
            monitor.weigh_next(weights[k])
            summed = ((model(x) - y[0]) ** 2 * y[1]).sum()
            loss = summed / total * world   # DDP's mean over ranks undoes the * world
            if k < ACCUM - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        reading = monitor.step(MICRO, micro_weights=weights, weights_across_ranks=across)
        model.zero_grad()
        # the truth from each micro-batch's own token-mean gradient, gathered
        own = []
        for x, y in batches:
            g, = torch.autograd.grad(task.loss_fn(twin(x), y), [twin.w])
            own.append(g)
        grads = [torch.zeros(ACCUM, twin.w.numel(), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(grads, torch.stack(own))
        counts = [torch.zeros(ACCUM, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor(tokens, dtype=torch.float64))
        g, s = torch.cat(grads), torch.cat(counts) / float(total)
        whole = (s[:, None] * g).sum(0)
        big = float(whole @ whole)
        pieces = float((s ** 2 * g.pow(2).sum(1)).sum())
        g2 = (big - pieces) / (1 - float(s.pow(2).sum()))
        p = ACCUM * world
        spread = p / (p - 1) * float((s ** 2 * (g - whole).pow(2).sum(1)).sum())  # tr / b_big
        if reading is None:
            pairs.append(dict(skipped=step))
            continue
        # the equal-piece pair with this |G|^2 and tr(Sigma) (noise_math.weighted_pair)
        pairs.append(dict(small=reading.small_sq, big=reading.big_sq,
                          true_small=g2 + p * spread, true_big=g2 + spread))
    (out / f"readings{rank}.json").write_text(json.dumps(dict(pairs=pairs,
                                                              skipped=monitor.skipped)))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]) if len(sys.argv) > 3 else None)
