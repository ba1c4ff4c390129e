"""A loss that is a mean over tokens of sequences of very different lengths, with
``Task.loss_weight`` (tests/test_noise_weighted.py; ``bsselect noise
tests/tasks/token_tasks.py:linear_tokens`` under torchrun in tests/test_distributed.py): least
squares on per-token features, half the sequences 1-3 tokens long, half 16-24."""

from __future__ import annotations

import torch
from torch import nn

from bsselect import Task

N_SEQ, D = 256, 6


def _sequences(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # half very short, half long: where equal-weight sub-batch means go most wrong
    lengths = torch.where(torch.rand(N_SEQ, generator=g) < 0.5,
                          torch.randint(1, 4, (N_SEQ,), generator=g),
                          torch.randint(16, 25, (N_SEQ,), generator=g))
    xs = [torch.randn(int(n), D, generator=g, dtype=torch.float64) for n in lengths]
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    ys = [x @ w_true + 0.5 * torch.randn(len(x), generator=g, dtype=torch.float64) for x in xs]
    w0 = w_true + 0.4 * torch.randn(D, generator=g, dtype=torch.float64)
    return lengths, xs, ys, w0


class _Linear(nn.Module):
    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def _collate(items):
    """Pad to the longest sequence: x [b, L, D], targets (y [b, L], mask [b, L])."""
    longest = max(len(x) for x, _ in items)
    x = torch.zeros(len(items), longest, D, dtype=torch.float64)
    y = torch.zeros(len(items), longest, dtype=torch.float64)
    mask = torch.zeros(len(items), longest, dtype=torch.float64)
    for i, (xi, yi) in enumerate(items):
        x[i, :len(xi)], y[i, :len(yi)], mask[i, :len(yi)] = xi, yi, 1.0
    return x, (y, mask)


def _token_mean(out, target):
    y, mask = target
    return ((out - y) ** 2 * mask).sum() / mask.sum()


def _task(weighted: bool = True, **overrides) -> tuple[Task, float, float]:
    """The task and the exact (|G|^2, tr(Sigma)) at its weights: G = sum s_j / sum n_j over
    the per-sequence gradients s_j of their summed token losses, tr(Sigma) = mean |s_j - n_j
    G|^2 / mean(n)^2 (the covariance of a big batch's token-mean gradient, times its size)."""
    lengths, xs, ys, w0 = _sequences()
    s = torch.stack([2 * ((x @ w0 - y)[:, None] * x).sum(0) for x, y in zip(xs, ys)])
    n = lengths.double()
    G = s.sum(0) / n.sum()
    trace = float(((s - n[:, None] * G) ** 2).sum(1).mean() / n.mean() ** 2)
    options = dict(model=lambda: _Linear(w0), train_data=list(zip(xs, ys)),
                   loss_fn=_token_mean, collate_fn=_collate, base_batch_size=2,
                   loss_weight=(lambda target: target[1].sum()) if weighted else None)
    options.update(overrides)
    return Task(**options), float(G @ G), trace


def linear_tokens() -> Task:
    return _task()[0]
