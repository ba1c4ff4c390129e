"""Numbers for docs/memory-in-real-runs.md: memory that holds for the whole real run.

    /work/venv/bin/python benchmarks/bench_real_runs.py agreement   # bf16/fp16 sim vs CPU
    /work/venv/bin/python benchmarks/bench_real_runs.py cuda        # CPU vs CUDA defaults
    /work/venv/bin/python benchmarks/bench_real_runs.py accumulate
    /work/venv/bin/python benchmarks/bench_real_runs.py worst-case

Every table is printed as Markdown. ``agreement`` runs real steps (fp16 matmuls are slow on a
CPU without fp16 units: about 90 s for the 256-wide model at batch 128), the rest only
simulates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.examples import EXAMPLES
from bsselect.examples.lm import tiny_lm
from bsselect.memory import cpu_step_peak, simulate_step_peak
from bsselect.precision import Precision
from bsselect.step import StepSettings

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate_speed import gpt_task, lm_loss  # noqa: E402


class Attn(nn.Module):
    """nanoGPT's non-flash attention: an explicit (T x T) softmax."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2)
                   for z in self.qkv(x).split(c, 2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (c // self.h) ** 0.5)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, c))


class AttnBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), Attn(d, h)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ManualAttentionLM(nn.Module):
    """256 wide, 4 layers, 8 heads, T = 256, byte vocabulary."""

    def __init__(self, d: int = 256, layers: int = 4, h: int = 8, t: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(t, d)
        self.blocks = nn.Sequential(*(AttnBlock(d, h) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def manual_attention_task() -> Task:
    tokens = torch.randint(256, (64, 257), generator=torch.Generator().manual_seed(0))
    return Task(model=ManualAttentionLM, train_data=TensorDataset(tokens[:, :-1], tokens[:, 1:]),
                loss_fn=lm_loss, optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr))


TASKS = {
    "tiny-lm": lambda: EXAMPLES["tiny-lm"](),                  # 64 wide, 2 layers, 0.5M params
    "lm-256x4": lambda: tiny_lm(dim=256, layers=4, heads=8),   # 3.3M params
    "digits-cnn": lambda: EXAMPLES["digits-cnn"](),
    "digits-mlp": lambda: EXAMPLES["digits-mlp"](),
    "gpt2-small": gpt_task,
    "manual-attn": manual_attention_task,
}


def pct(a: int, b: int) -> str:
    return f"{100 * (a - b) / b:+.3f}"


def agreement(args: argparse.Namespace) -> None:
    print("| task | precision | batch | cpu_bytes | sim_bytes | error_% | sim_s | cpu_s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for name in args.tasks:
        task = TASKS[name]()
        for precision in args.precisions:
            settings = StepSettings(Precision(precision))
            for b in args.batch_sizes:
                t0 = time.perf_counter()
                sim = simulate_step_peak(task, b, settings=settings)
                t1 = time.perf_counter()
                real = cpu_step_peak(task, b, settings=settings)
                t2 = time.perf_counter()
                print(f"| {name} | {precision} | {b} | {real.peak_bytes:,} | {sim.peak_bytes:,} | "
                      f"{pct(sim.peak_bytes, real.peak_bytes)} | {t1 - t0:.1f} | {t2 - t1:.1f} |",
                      flush=True)


def cuda_defaults(args: argparse.Namespace) -> None:
    """The same simulated step (framework tensors only, no CPU kernel scratch) with the CPU's
    defaults and with CUDA's: autocast lists and the optimizer's foreach implementation."""
    print("| task | precision | batch | CPU lists + for-loop | CUDA lists | CUDA lists + foreach |"
          " lists_% | total_% | peak phase (CUDA) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|---|")
    for name in args.tasks:
        task = TASKS[name]()
        for precision in args.precisions:
            p = Precision(precision)
            for b in args.batch_sizes:
                cpu = simulate_step_peak(task, b, kernel_workspace=False, settings=StepSettings(p))
                cuda = simulate_step_peak(task, b, kernel_workspace=False,
                                          settings=StepSettings(p, target_device="cuda"))
                lists_only = _lists_only(task, b, p)
                print(f"| {name} | {precision} | {b} | {cpu.peak_bytes:,} | "
                      f"{lists_only:,} | {cuda.peak_bytes:,} | {pct(lists_only, cpu.peak_bytes)} | "
                      f"{pct(cuda.peak_bytes, cpu.peak_bytes)} | {cuda.peak_phase.value} |",
                      flush=True)


def _lists_only(task, b: int, p: Precision) -> int:
    """CUDA's autocast lists with the CPU's for-loop optimizer."""
    from bsselect.memory.cuda_autocast import cuda_autocast_policy

    if p is Precision.fp32:
        return simulate_step_peak(task, b, kernel_workspace=False).peak_bytes
    with cuda_autocast_policy():
        return simulate_step_peak(task, b, kernel_workspace=False,
                                  settings=StepSettings(p)).peak_bytes


def optimizers(args: argparse.Namespace) -> None:
    """Optimizer-phase peak of AdamW's three implementations (simulated)."""
    print("| task | batch | impl | optimizer-phase peak | step peak | peak phase |")
    print("|---|--:|---|--:|--:|---|")
    for name in args.tasks:
        for kw, impl in (({"foreach": False}, "for-loop"), ({"foreach": True}, "foreach"),
                         ({"fused": True}, "fused")):
            task = TASKS[name]()
            base = task.optimizer
            task.optimizer = lambda p, lr, kw=kw: _with(base(p, lr), kw)
            for b in args.batch_sizes:
                s = simulate_step_peak(task, b, kernel_workspace=False)
                assert s.optimizer_impl == impl, (s.optimizer_impl, impl)
                print(f"| {name} | {b} | {impl} | {s.optimizer_peak_bytes:,} | {s.peak_bytes:,} "
                      f"| {s.peak_phase.value} |", flush=True)


def _with(optimizer, kw):
    for group in optimizer.param_groups:
        group.update(kw)
    return optimizer


def accumulate(args: argparse.Namespace) -> None:
    print("| task | precision | micro-batch | accumulate 1 | accumulate 4 | increase | params |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for name in args.tasks:
        task = TASKS[name]()
        for precision in args.precisions:
            p = Precision(precision)
            for b in args.batch_sizes:
                one = simulate_step_peak(task, b, settings=StepSettings(p))
                four = simulate_step_peak(task, b, settings=StepSettings(p, 4))
                print(f"| {name} | {precision} | {b} | {one.peak_bytes:,} | {four.peak_bytes:,} | "
                      f"{four.peak_bytes - one.peak_bytes:,} | {one.param_bytes:,} |", flush=True)


def worst_case(args: argparse.Namespace) -> None:
    """The test task of tests/test_worst_case.py: 2,999 items of 8-32 tokens and one of 256."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tasks.varlen_tasks import variable_length

    from bsselect.device import Budget
    from bsselect.memory.capped import CappedCpuAllocator
    from bsselect.memory.inputs import scan_inputs, typical_inputs
    from bsselect.memory.measured import run_two_steps
    from bsselect.memory.probe import Method, run_probe

    task = variable_length()
    t0 = time.perf_counter()
    worst = scan_inputs(task.train_data)
    scan_s = time.perf_counter() - t0
    typical = typical_inputs(task.train_data)
    common = dict(task_name="varlen", device=torch.device("cpu"), method=Method.simulated,
                  margin=0.0, batch_sizes=[8, 16, 32, 64])
    free = run_probe(task, budget=Budget(2**40, "x"), inputs=typical, **common)
    cap = free.fixed_bytes + 300 * free.per_sample_bytes
    t_ans = run_probe(task, budget=Budget(cap, "cap"), inputs=typical, **common).max_batch
    w_ans = run_probe(task, budget=Budget(cap, "cap"), inputs=worst, **common).max_batch

    def real(b: int, inputs) -> str:
        try:
            return f"{run_two_steps(task, b, CappedCpuAllocator(cap), 0, inputs=inputs):,} B"
        except torch.OutOfMemoryError:
            return "out of memory"

    print(f"scan: {worst.items_scanned:,} items in {scan_s:.3f} s; largest "
          f"{worst.largest_item_elements} elements, median {worst.median_item_elements:.0f}")
    print(f"cap {cap:,} B; typical answer {t_ans}, worst-case answer {w_ans}\n")
    print("| batch | items | real step under the cap |")
    print("|--:|---|---|")
    for b, inputs, label in ((t_ans, typical, "random"), (t_ans, worst, "largest"),
                             (w_ans, worst, "largest"), (w_ans + 1, worst, "largest")):
        print(f"| {b} | {label} | {real(b, inputs)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["agreement", "cuda", "optimizers", "accumulate",
                                         "worst-case"])
    parser.add_argument("--tasks", nargs="+", default=["tiny-lm"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    {"agreement": agreement, "cuda": cuda_defaults, "optimizers": optimizers,
     "accumulate": accumulate, "worst-case": worst_case}[args.what](args)


if __name__ == "__main__":
    main()
