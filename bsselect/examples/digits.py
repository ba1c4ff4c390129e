"""UCI handwritten digits (8x8, 1,797 images), the copy scikit-learn bundles, shipped here as
``data/digits.csv.gz`` (64 pixel columns in 0..16, then the label)."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..task import Task

_DATA = Path(__file__).parent / "data" / "digits.csv.gz"
N_VAL = 297  # the last 297 images; the first 1,500 train


@lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 64) scaled to [0, 1] and labels as int64 (N,)."""
    with gzip.open(_DATA, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1] / 16.0)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    return x, y


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return (output.argmax(dim=-1) == target).float().mean().item()


def _splits(image_shape: tuple[int, ...]) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits()
    x = x.reshape(len(x), *image_shape)
    return TensorDataset(x[:-N_VAL], y[:-N_VAL]), TensorDataset(x[-N_VAL:], y[-N_VAL:])


def digits_mlp() -> Task:
    train, val = _splits((64,))

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    return Task(model=model, train_data=train, val_data=val, loss_fn=F.cross_entropy,
                metric=accuracy, lr=0.05, base_batch_size=32)


def digits_cnn() -> Task:
    train, val = _splits((1, 8, 8))

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    return Task(model=model, train_data=train, val_data=val, loss_fn=F.cross_entropy,
                metric=accuracy, lr=0.05, base_batch_size=32)
