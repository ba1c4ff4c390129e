"""Tiny real tasks for tests/test_sweep.py, loaded as ``tests/tasks/sweep_tasks.py:NAME``.

Each trains in milliseconds on a CPU. Two carry a test seam in the model's forward:
``oom`` raises CUDA's out-of-memory error above a batch cap (a fake allocator), and ``slow``
blocks at one batch size so that a test can interrupt a sweep at a known point.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task

N_ITEMS = 384
OOM_CAP = 32                                # batches larger than this "do not fit"
SLOW_BATCH_ENV = "BSSELECT_TEST_SLOW_BATCH"  # batch size at which `slow` blocks
MARKER_ENV = "BSSELECT_TEST_MARKER"          # file `slow` creates when it starts blocking


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by the sign of the first feature: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_ITEMS, 16, generator=g)
    return x, (x[:, 0] > 0).long()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return (output.argmax(dim=-1) == target).float().mean().item()


def tiny() -> Task:
    """No val_data: the sweep must hold out part of train_data. SGD, lr 0.1 at batch 16."""
    x, y = _blobs()
    return Task(model=_mlp, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                metric=accuracy, lr=0.1, base_batch_size=16)


def diverge() -> Task:
    """Least squares (Hessian ~ 3I) with plain SGD, stable while lr < 2/3. The base lr 0.05 at
    batch 8 scales linearly to 0.2 at batch 32 (stable) and 1.6 at batch 256, where the error
    grows ~4x per step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_ITEMS, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) / 4.0
    return Task(model=lambda: nn.Linear(16, 1), train_data=TensorDataset(x[:320], y[:320]),
                val_data=TensorDataset(x[320:], y[320:]), loss_fn=F.mse_loss,
                optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr), lr=0.05,
                base_batch_size=8)


class CappedMemory(nn.Module):
    """A real MLP behind a fake allocator: a forward over more than ``cap`` items raises the
    error PyTorch's CUDA allocator raises."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.cap:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0] * 2} MiB (GPU 0; "
                f"{self.cap * 2} MiB total capacity)")
        return self.net(x)


def oom() -> Task:
    x, y = _blobs()
    return Task(model=lambda: CappedMemory(OOM_CAP), train_data=TensorDataset(x, y),
                val_data=TensorDataset(*_blobs(seed=2)), loss_fn=F.cross_entropy, lr=0.1,
                base_batch_size=16)


def oom_base() -> Task:
    """The same capped model with a base batch size (64) that does not fit: the noise
    measurement's sub-batches (the base batch size) run out of memory in every trial."""
    x, y = _blobs()
    return Task(model=lambda: CappedMemory(OOM_CAP), train_data=TensorDataset(x, y),
                val_data=TensorDataset(*_blobs(seed=2)), loss_fn=F.cross_entropy, lr=0.1,
                base_batch_size=2 * OOM_CAP)


class SlowAt(nn.Module):
    """Blocks (for up to a minute) in a training forward at the batch size named by
    $BSSELECT_TEST_SLOW_BATCH, after creating the file $BSSELECT_TEST_MARKER."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == int(os.environ.get(SLOW_BATCH_ENV, "0")):
            Path(os.environ[MARKER_ENV]).touch()
            time.sleep(60)
        return self.net(x)


def slow() -> Task:
    x, y = _blobs()
    return Task(model=SlowAt, train_data=TensorDataset(x, y),
                val_data=TensorDataset(*_blobs(seed=2)), loss_fn=F.cross_entropy, lr=0.1,
                base_batch_size=16)


def bad_metric() -> Task:
    """`tiny` with a metric that reads a key the output does not have."""
    def metric(output: torch.Tensor, target: torch.Tensor) -> float:
        return {"acc": 1.0}["accuracy"]

    return dataclasses.replace(tiny(), metric=metric)


def ascent() -> Task:
    """SGD that maximises the loss (``maximize=True``) at a small lr: the loss rises slowly,
    never past 10x its start within a short trial — the "loss rose" kind of divergence."""
    x, y = _blobs()
    return Task(model=_mlp, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, maximize=True),
                lr=0.02, base_batch_size=16)


class _Detached(nn.Module):
    """Trainable weights whose output never reaches the loss (a common bug: an output built
    from ``.detach()`` or ``torch.no_grad()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach() + 0.0 * self.bias


def frozen() -> Task:
    """No gradient reaches the weights the loss depends on: no trial can train."""
    x, y = _blobs()
    return Task(model=_Detached, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                lr=0.1, base_batch_size=16)


class BatchGram(nn.Module):
    """Memory grows with b**2 (a b x b Gram matrix): a line through small batches promises
    far more than fits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + 1e-3 * ((x @ x.T) @ x))


def gram() -> Task:
    x, y = _blobs()
    x, y = x.repeat(64, 1), y.repeat(64)  # 24,576 items: the data does not cap the batch
    return Task(model=BatchGram, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                lr=0.1, base_batch_size=16)


class _NanAtEnd(nn.Module):
    """A "temperature" ``t`` that enters the forward as ``0 * sqrt(t)`` and the loss as +t:
    SGD lowers it by the lr each step, so ``t`` crosses 0 (sqrt -> NaN weights' outputs) on a
    trial's last step, after that step's own, finite, loss was read."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 1)
        self.t = nn.Parameter(torch.tensor(0.99))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x).squeeze(-1) + 0.0 * torch.sqrt(self.t), self.t


def _nan_at_end_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    prediction, t = out
    return F.mse_loss(prediction, y) + t


def nan_at_end() -> Task:
    """With linear lr scaling every trial of a 1,600-sample budget lowers ``t`` by 1.0 in
    total (budget x lr / base batch): past 0.99 on its last step, whatever the batch size."""
    x, _ = _blobs()
    x = x.repeat(6, 1)
    y = x @ torch.randn(16, generator=torch.Generator().manual_seed(3))
    return Task(model=_NanAtEnd, train_data=TensorDataset(x[:1800], y[:1800]),
                val_data=TensorDataset(x[1800:], y[1800:]), loss_fn=_nan_at_end_loss,
                optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr), lr=0.01,
                base_batch_size=16)


def fixed_lr() -> Task:
    """An optimizer factory that ignores the lr it is given (a hard-coded lr)."""
    x, y = _blobs()
    return Task(model=_mlp, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                optimizer=lambda params, lr: torch.optim.Adam(params, lr=1e-3), lr=4e-3,
                base_batch_size=16)


GROUP_RATIO_ENV = "BSSELECT_TEST_GROUP_RATIO"  # the first layer's lr over the factory's


def group_ratio() -> Task:
    """The first layer at its own fraction of the lr (from the environment), the rest at it."""
    ratio = float(os.environ.get(GROUP_RATIO_ENV, "0.1"))

    def optimizer(params, lr: float) -> torch.optim.Optimizer:
        params = list(params)
        return torch.optim.SGD([{"params": params[:2], "lr": lr * ratio},
                                {"params": params[2:]}], lr=lr, momentum=0.9)

    x, y = _blobs()
    return Task(model=_mlp, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                optimizer=optimizer, lr=0.1, base_batch_size=16)


class _SharedOffset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(batch["x"] + batch["offset"])


def _with_offset(items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = torch.stack([i[0] for i in items])
    return {"x": x, "offset": torch.zeros(16)}, torch.stack([i[1] for i in items])


def shared_offset() -> Task:
    """A batch holding a tensor shared by its rows (an offset of shape (16,)): it trains,
    but cannot be split into the noise measurement's sub-batches."""
    x, y = _blobs()
    return Task(model=_SharedOffset, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                collate_fn=_with_offset, lr=0.1, base_batch_size=16)


def no_group_lr() -> Task:
    """transformers' Adafactor with its own relative step: its groups' lr is None."""
    from transformers.optimization import Adafactor

    x, y = _blobs()
    return Task(model=_mlp, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                optimizer=lambda params, lr: Adafactor(params, lr=None, relative_step=True,
                                                       warmup_init=True),
                lr=0.01, base_batch_size=16)
