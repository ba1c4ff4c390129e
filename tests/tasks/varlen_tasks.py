"""Tasks whose items differ in size, for worst-case input tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from bsselect import Task

VOCAB = 50
N_ITEMS = 3000
LONG = 256          # the one outlier's length; every other item has 8..32 tokens
LONG_INDEX = 1234


class TokenMLP(nn.Module):
    """Per-token MLP, mean-pooled: activation memory is proportional to batch x padded length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(self.emb(x)).mean(1))


def pad(batch):
    xs, ys = zip(*batch)
    return pad_sequence(list(xs), batch_first=True), torch.stack(ys)


def items(n: int = N_ITEMS, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (n,), generator=g)
    lengths[LONG_INDEX] = LONG
    return [(torch.randint(VOCAB, (int(length),), generator=g), torch.tensor(int(length) % 2))
            for length in lengths]


def variable_length() -> Task:
    return Task(model=TokenMLP, train_data=items(), loss_fn=F.cross_entropy, collate_fn=pad,
                lr=0.05)
