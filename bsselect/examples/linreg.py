"""Synthetic linear regression whose gradient noise scale is known exactly.

x ~ N(0, I_d), y = x.w* + eps with eps ~ N(0, sigma^2), loss 0.5*(x.w - y)^2 averaged over the
batch, zero-initialised weights without bias. With v = w - w*, the per-example gradient is
g = x x^T v - x eps, so G = v and Sigma = |v|^2 I + v v^T + sigma^2 I (Isserlis), hence

    B_simple = tr(Sigma) / |G|^2 = d + 1 + d * sigma^2 / |w0 - w*|^2.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..task import Task


def make_data(d: int, sigma: float, n: int, seed: int) -> tuple[TensorDataset, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = x @ w_star + sigma * torch.randn(n, generator=gen)
    return TensorDataset(x, y), w_star


def closed_form_b_simple(d: int, sigma: float, w0: torch.Tensor, w_star: torch.Tensor) -> float:
    """``d + 1 + d*sigma^2/|w0 - w*|^2`` — exact for the population (infinite data)."""
    return d + 1 + d * sigma**2 / float((w0 - w_star).pow(2).sum())


class LinearModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def half_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (output - target).pow(2).mean()


def neg_mse(output: torch.Tensor, target: torch.Tensor) -> float:
    return -float((output - target).pow(2).mean())


def make_linreg_task(d: int = 16, sigma: float = 1.0, n: int = 100_000, seed: int = 0) -> Task:
    """Task plus, as attributes on the returned train data, ``w_star``, ``d`` and ``sigma``."""
    train, w_star = make_data(d, sigma, n, seed)
    val, _ = make_data(d, sigma, 4096, seed + 1)
    val = TensorDataset(val.tensors[0], val.tensors[0] @ w_star + sigma * torch.randn(
        4096, generator=torch.Generator().manual_seed(seed + 2)))
    train.w_star, train.d, train.sigma = w_star, d, sigma  # type: ignore[attr-defined]
    return Task(model=lambda: LinearModel(d), train_data=train, val_data=val, loss_fn=half_mse,
                metric=neg_mse, lr=0.01, base_batch_size=32)


def linreg() -> Task:
    return make_linreg_task()
