"""Hugging Face style tasks whose items are dicts (issue 14: any item type with a collate_fn)."""

import torch
import torch.nn.functional as F
from torch import nn
from bsselect import Task


class DictItems(torch.utils.data.Dataset):
    """Hugging Face style: each item a dict."""
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i]}


def collate(items):
    return (torch.stack([it["features"] for it in items]),
            torch.stack([it["label"] for it in items]))


def make_task():
    return Task(model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                train_data=DictItems(), loss_fn=F.cross_entropy, collate_fn=collate, lr=0.1,
                base_batch_size=16)


def no_collate():
    return Task(model=lambda: nn.Linear(8, 2), train_data=DictItems(), loss_fn=F.cross_entropy)


def bad_collate():
    return Task(model=lambda: nn.Linear(8, 2), train_data=DictItems(), loss_fn=F.cross_entropy,
                collate_fn=lambda items: {"a": 1, "b": 2})
