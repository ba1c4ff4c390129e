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


# --- padding per dimension, and text tokenised in the collate_fn ------------------------------

class _Images(torch.utils.data.Dataset):
    """500 images of 32x32 and two of equal element count, 8x128 and 128x8: a batch holding
    both is padded to 128x128 (16x a square image)."""

    def __init__(self) -> None:
        self.shapes = [(32, 32)] * 500 + [(8, 128), (128, 8)]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int):
        h, w = self.shapes[i]
        return torch.randn(3, h, w, generator=torch.Generator().manual_seed(i)), i % 4


def pad_images(items):
    """Pads each dimension to the batch's largest, as DETR-style collators do."""
    h = max(x.shape[1] for x, _ in items)
    w = max(x.shape[2] for x, _ in items)
    out = torch.zeros(len(items), 3, h, w)
    for k, (x, _) in enumerate(items):
        out[k, :, :x.shape[1], :x.shape[2]] = x
    return out, torch.tensor([y for _, y in items])


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)).mean((2, 3)))


def padded_images() -> Task:
    return Task(model=_ConvNet, train_data=_Images(), loss_fn=F.cross_entropy,
                collate_fn=pad_images, lr=0.01)


TEXTS = ["supercalifragilistic " * 12] * 960 + [" ".join("abcdefgh"[i % 8] for i in range(60))] * 40
LONG_TEXT = 960  # the first of the 40 short-character texts of 60 words (60 tokens)


def tokenise(texts):
    """Word-level tokens: the 250-character texts are 12 tokens, the 119-character ones 60."""
    tokens = [[sum(map(ord, w)) % (VOCAB - 1) + 1 for w in t.split()] for t in texts]
    ids = torch.zeros(len(tokens), max(map(len, tokens)), dtype=torch.long)
    for i, s in enumerate(tokens):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) % 2 for s in tokens])


def raw_texts() -> Task:
    return Task(model=TokenMLP, train_data=TEXTS, loss_fn=F.cross_entropy, collate_fn=tokenise,
                lr=0.05)
