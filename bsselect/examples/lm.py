"""A character-level GPT (nanoGPT-style, 2 layers) on Python's own help text.

The corpus is ``pydoc_data.topics`` — about 465 kB of English documentation that ships with
CPython, so nothing is downloaded. Bytes are the vocabulary (256 symbols).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..task import Task

BLOCK = 64
VOCAB = 256


@lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """The help text as a uint8 tensor."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class Blocks(Dataset):
    """Non-overlapping windows: input = bytes[i : i+T], target = bytes[i+1 : i+T+1]."""

    def __init__(self, data: torch.Tensor, block: int = BLOCK) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.data[i * self.block : (i + 1) * self.block + 1].long()
        return chunk[:-1], chunk[1:]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, block: int = BLOCK) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def next_char_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return (logits.argmax(-1) == target).float().mean().item()


def tiny_lm(dim: int = 64, layers: int = 2, heads: int = 4) -> Task:
    data = corpus()
    split = int(len(data) * 0.9)
    return Task(
        model=lambda: TinyGPT(dim, layers, heads),
        train_data=Blocks(data[:split]),
        val_data=Blocks(data[split:]),
        loss_fn=lm_loss,
        metric=next_char_accuracy,
        optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        lr=3e-3,
        base_batch_size=32,
    )
