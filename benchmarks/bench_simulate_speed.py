"""How long `simulate_step_peak` takes for a GPT-2-small-sized model (124M parameters).

    /work/venv/bin/python benchmarks/bench_simulate_speed.py [--repeats 5] [--threads 2]
    /work/venv/bin/python benchmarks/bench_simulate_speed.py --agreement

For each batch size: one cold run (first call in the process at that size: includes the
real-kernel calibration of new shapes), then the median of ``--repeats`` warm runs, as wall
time and as this process's CPU time (the simulation is single-threaded Python, so CPU time is
what wall time would be on an idle machine; other processes on a shared 2-core box inflate wall
time). Nothing about the model is allocated for real; the peak RSS is printed at the end.
Results are recorded in docs/benchmarks-simulate.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.examples.lm import Block
from bsselect.examples import EXAMPLES
from bsselect.memory import cpu_step_peak, simulate_step_peak

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


def timed(task: Task, batch_size: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak bytes) of one simulation."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    peak = simulate_step_peak(task, batch_size)
    return time.perf_counter() - wall0, time.process_time() - cpu0, peak.peak_bytes


def agreement(batch_sizes: list[int]) -> None:
    """Simulated vs CPU-allocator peak for the built-in examples, with and without the CPU
    kernels' own scratch (``kernel_workspace``)."""
    print(f"{'task':>10} {'batch':>6} {'cpu_bytes':>12} {'sim_bytes':>12} {'error_%':>8} "
          f"{'no_workspace_error_%':>21}")
    for name in ("digits-mlp", "digits-cnn", "tiny-lm"):
        task = EXAMPLES[name]()
        for b in batch_sizes:
            real = cpu_step_peak(task, b).peak_bytes
            sim = simulate_step_peak(task, b).peak_bytes
            bare = simulate_step_peak(task, b, kernel_workspace=False).peak_bytes
            print(f"{name:>10} {b:>6} {real:>12} {sim:>12} {100 * (sim - real) / real:>8.3f} "
                  f"{100 * (bare - real) / real:>21.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 8 64 256 (speed), 8 32 128 256 (--agreement)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--agreement", action="store_true",
                        help="compare with the CPU allocator on the built-in examples instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.agreement:
        agreement(args.batch_sizes or [8, 32, 128, 256])
        return
    task = gpt_task()
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT().parameters())
    print(f"torch {torch.__version__}, {args.threads} threads, GPT {n_params / 1e6:.0f}M "
          f"parameters, T={BLOCK}, AdamW; load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>6} {'cold_wall_s':>12} {'warm_wall_s':>12} {'warm_cpu_s':>11} "
          f"{'peak_GiB':>9}")
    for b in args.batch_sizes or [8, 64, 256]:
        cold_wall, _, peak_bytes = timed(task, b)
        warm = [timed(task, b) for _ in range(args.repeats)]
        wall = statistics.median(w for w, _, _ in warm)
        cpu = statistics.median(c for _, c, _ in warm)
        print(f"{b:>6} {cold_wall:>12.2f} {wall:>12.2f} {cpu:>11.2f} {peak_bytes / 2**30:>9.2f}")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
