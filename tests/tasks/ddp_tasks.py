"""Tiny tasks for tests/test_distributed.py whose fake allocator runs out of memory on ONE rank.

Loaded as ``tests/tasks/ddp_tasks.py:NAME`` by bsselect under torchrun. On rank 1 only, a
per-device batch above ``CAP`` raises the error PyTorch's CUDA allocator raises: in the forward
(``oom_forward``) or in the backward (``oom_backward``, where DDP's all-reduces would be in
flight). Rank 0 never runs out, so every other rank must learn of the OOM through a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task

CAP = 16          # per-device batches above this do not "fit" on rank 1
N_ITEMS = 512


def _oom(batch: int, where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"CUDA out of memory in {where}. Tried to allocate {batch * 2} MiB (GPU 1; "
        f"{CAP * 2} MiB total capacity)")


def _short_on_memory(batch: int) -> bool:
    return dist.is_initialized() and dist.get_rank() == 1 and batch > CAP


class _FailBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.batch = x.shape[0]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        if _short_on_memory(ctx.batch):
            raise _oom(ctx.batch, "backward")
        return grad


class RankCapped(nn.Module):
    """A real MLP behind a fake allocator that is short on memory on rank 1."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.where == "forward" and _short_on_memory(x.shape[0]):
            raise _oom(x.shape[0], "forward")
        h = self.net[0](x)
        if self.training and self.where == "backward":
            h = _FailBackward.apply(h)
        return self.net[2](self.net[1](h))


def _task(where: str) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ITEMS, 16, generator=g)
    y = (x[:, 0] > 0).long()
    return Task(model=lambda: RankCapped(where), train_data=TensorDataset(x[:384], y[:384]),
                val_data=TensorDataset(x[384:], y[384:]), loss_fn=F.cross_entropy, lr=0.1,
                base_batch_size=16)


def oom_forward() -> Task:
    return _task("forward")


def oom_backward() -> Task:
    return _task("backward")
