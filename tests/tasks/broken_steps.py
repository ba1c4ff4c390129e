"""Tasks whose first real training step fails where a step on fake tensors runs: fake
tensors check neither dtypes nor a loss's class indices (review: `check` said "fits")."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task


def _x(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(0))


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def label_out_of_range() -> Task:
    """Labels 0..2 for a model with two outputs (the first items hold a 2)."""
    return Task(model=_net, train_data=TensorDataset(_x(), (torch.arange(64) + 2) % 3),
                loss_fn=nn.functional.cross_entropy)


def float64_inputs() -> Task:
    x = _x().double()
    return Task(model=_net, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy)


def bf16_weights() -> Task:
    """bf16 parameters fed float32 inputs: runs under bf16 autocast, fails without it."""
    x = _x()
    return Task(model=lambda: _net().to(torch.bfloat16),
                train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy)


def float_targets() -> Task:
    """Class indices stored as floats for cross-entropy: on fake tensors it fails as a
    gather's dtype, which read as a simulation's limit."""
    x = _x()
    return Task(model=_net, train_data=TensorDataset(x, (x[:, 0] > 0).float()),
                loss_fn=nn.functional.cross_entropy)


def lbfgs() -> Task:
    x = _x()
    return Task(model=_net, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy, optimizer=torch.optim.LBFGS)


@torch.library.custom_op("bsselect_tests::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:  # no fake kernel: a simulation cannot run it
    return x * 2


_double.register_autograd(lambda ctx, g: g * 2)


class _Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_double(self.a(x)))


def bf16_custom_op() -> Task:
    """bf16 weights (trains under bf16 autocast) and an op without a fake kernel: the
    simulation cannot run it, a real step under the run's precision can."""
    x = _x()
    return Task(model=lambda: _Doubled().to(torch.bfloat16),
                train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=lambda out, y: nn.functional.cross_entropy(out.float(), y))


class _ScaledMatmul(torch.autograd.Function):
    """``x @ w`` whose backward multiplies the incoming gradient (bf16 under autocast) by the
    fp32 weight itself: autocast is not active in a backward, so it fails on every device."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.t(), x.t() @ g


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16) * 0.1)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(_ScaledMatmul.apply(x, self.w)))


def bf16_dtype_mismatch() -> Task:
    """Runs in fp32; under bf16 autocast its backward mixes bf16 and fp32 (review: check
    said "fits" because the step ran in fp32, taken for a kernel the CPU lacks)."""
    x = _x()
    return Task(model=_Custom, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy, lr=0.01)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.out = nn.EmbeddingBag(5000, 16, mode="mean"), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.bag(x))


def embedding_bag() -> Task:
    """nn.EmbeddingBag: its CPU backward allocates index-sized scratch no op returns (the
    simulation was 26-37% under the allocator at b=2,048, review)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5000, (256, 64), generator=g)
    return Task(model=_Bag, train_data=TensorDataset(x, torch.randint(0, 2, (256,), generator=g)),
                loss_fn=nn.functional.cross_entropy, lr=0.1)
