"""How long `simulate_step_peak` takes for a GPT-2-small-sized model (124M parameters).

    /work/venv/bin/python benchmarks/bench_simulate_speed.py [--repeats 5] [--threads 2]

For each batch size: one cold run (first call in the process at that size: includes the
real-kernel calibration of new shapes), then the median of ``--repeats`` warm runs. Nothing
about the model is allocated for real; the peak RSS of the process is printed at the end.
Results are recorded in docs/benchmarks-simulate.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.examples.lm import Block
from bsselect.memory import simulate_step_peak

VOCAB, BLOCK, DIM, LAYERS, HEADS = 50304, 1024, 768, 12, 12  # GPT-2 small (nanoGPT)


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(BLOCK, DIM)
        self.blocks = nn.Sequential(*(Block(DIM, HEADS) for _ in range(LAYERS)))
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def gpt_task() -> Task:
    tokens = torch.randint(VOCAB, (64, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    return Task(
        model=GPT,
        train_data=TensorDataset(tokens[:, :-1], tokens[:, 1:]),
        loss_fn=lm_loss,
        optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.1),
        lr=6e-4,
    )


def timed(task: Task, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    peak = simulate_step_peak(task, batch_size)
    return time.perf_counter() - t0, peak.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = gpt_task()
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT().parameters())
    print(f"torch {torch.__version__}, {args.threads} threads, GPT {n_params / 1e6:.0f}M "
          f"parameters, T={BLOCK}, AdamW")
    print(f"{'batch':>6} {'cold_s':>8} {'warm_median_s':>14} {'peak_GiB':>9}")
    for b in args.batch_sizes:
        cold_s, peak_bytes = timed(task, b)
        warm = [timed(task, b)[0] for _ in range(args.repeats)]
        print(f"{b:>6} {cold_s:>8.2f} {statistics.median(warm):>14.2f} {peak_bytes / 2**30:>9.2f}")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
