"""Small models whose CPU step peaks inside a kernel's own scratch, which fake tensors do not
see (review, session 28): upsampling, nn.Bilinear, kthvalue, F.fold, batch norm's backward,
softmax's backward on a stride-0 gradient, a sum of bools over an activation, a batch of
matrix exponentials and an FFT over time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task

K = 10


def _task(model, shape: tuple[int, ...]) -> Task:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, *shape, generator=g),
                         torch.randint(0, K, (128,), generator=g))
    return Task(model=model, train_data=data, loss_fn=F.cross_entropy, lr=1e-3,
                base_batch_size=8)


class Upsample(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.conv(x), scale_factor=2, mode=self.mode)
        return self.head(up.mean((2, 3)))


class BilinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.bilinear = nn.Bilinear(32, 32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        return self.bilinear(h, x)


class KthPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 128)
        self.head = nn.Linear(128, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x).kthvalue(3, 1).values)


class KthLast(KthPool):
    """``kthvalue`` with its dim left out (the last): the op dispatches two arguments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x).transpose(1, 2).kthvalue(3).values.mean(1, keepdim=True)
                         .expand(-1, 128))


class Fold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.mix = nn.Linear(72, 72)
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(self.conv(x), 3, padding=1)
        cols = self.mix(cols.transpose(1, 2)).transpose(1, 2)
        return self.head(F.fold(cols, (16, 16), 3, padding=1).mean((2, 3)))


class BatchNormPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class SoftmaxSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.softmax(self.proj(x), 1).sum(1))


class BoolSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head((h / (h > 0).sum(1, keepdim=True).clamp(min=1)).mean(1))


class MatrixExp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 64)
        self.head = nn.Linear(64, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = 0.1 * self.proj(x).view(-1, 8, 8)
        return self.head(torch.linalg.matrix_exp(a).flatten(1))


class SpectrumOverTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.rfft(self.proj(x), dim=1).abs().mean(1))


TASKS = {
    "matrix_exp": lambda: _task(MatrixExp, (32,)),
    "rfft_over_time": lambda: _task(SpectrumOverTime, (64, 32)),
    "upsample_bilinear": lambda: _task(lambda: Upsample("bilinear"), (3, 16, 16)),
    "upsample_nearest": lambda: _task(lambda: Upsample("nearest"), (3, 16, 16)),
    "bilinear": lambda: _task(BilinearHead, (32,)),
    "kthvalue": lambda: _task(KthPool, (64, 32)),
    "kthvalue_last_dim": lambda: _task(KthLast, (64, 32)),
    "fold": lambda: _task(Fold, (3, 16, 16)),
    "batch_norm": lambda: _task(BatchNormPool, (3, 16, 16)),
    "softmax_sum": lambda: _task(SoftmaxSum, (64, 32)),
    "bool_sum": lambda: _task(BoolSum, (64, 32)),
}
