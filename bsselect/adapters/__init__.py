"""Adapters from other frameworks' training setups to a ``bsselect.Task``."""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from ..errors import UsageError


def norm_or_none(value: Any) -> float | None:
    """A framework's gradient-clipping norm as ``Task.max_grad_norm``: None where the
    framework clips nothing (None, 0 or below — the HF Trainer clips only above 0 — and
    inf), else the number (bools and non-numbers are left to Task's own check)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value <= 0 or value == float("inf")):
        return None
    return value


def model_factory(model: Any, kinds: str) -> Callable[[], nn.Module]:
    """A zero-argument builder of a fresh model: ``model`` itself when it is a factory (or a
    class); a copy per call when it is an instance (each trial needs its own weights; the
    instance's memory is already spent, so a factory is cheaper). ``kinds`` names what else
    the caller accepts, for the error."""
    if isinstance(model, nn.Module):
        from ..task import builds_fresh

        return builds_fresh(lambda: copy.deepcopy(model))
    if callable(model):
        return model
    raise UsageError(f"model must be {kinds}; got {type(model).__name__}")


def batch_len(batch: Any) -> int:
    """Items in a batch: the first dimension of its first tensor, in a tensor, a dict or a
    list/tuple, nested (0 when it has none)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    values = batch.values() if hasattr(batch, "values") else (
        batch if isinstance(batch, (list, tuple)) else ())
    for value in values:
        n = batch_len(value)
        if n:
            return n
    return 0


def loader_sampling(loader: Any) -> str:
    """``GradientNoiseMonitor``'s ``sampling`` for a DataLoader: ``"uniform"`` when its sampler
    draws with replacement (``RandomSampler(replacement=True)``, ``WeightedRandomSampler``
    with replacement), else ``"epochs"`` (a permutation per epoch, or a fixed order)."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None:
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
    return "uniform" if getattr(sampler, "replacement", False) is True else "epochs"
