"""One training step, shared by every subcommand so that they all measure the same thing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

from .task import Task


def collate(task: Task, items: Sequence[Any]) -> tuple[Any, Any]:
    """(inputs, targets) for ``items`` with the task's collate_fn (or PyTorch's default)."""
    batch = (task.collate_fn or default_collate)(list(items))
    x, y = batch
    return x, y


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in a nested batch to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def sample_indices(n_items: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """``batch_size`` indices drawn without replacement (with replacement if the data is
    smaller than the batch, so that memory probes can exceed the dataset size)."""
    if batch_size <= n_items:
        return torch.randperm(n_items, generator=generator)[:batch_size].tolist()
    return torch.randint(n_items, (batch_size,), generator=generator).tolist()


def make_batch(task: Task, batch_size: int, seed: int = 0) -> tuple[Any, Any]:
    """A reproducible random training batch of ``batch_size`` items, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    idx = sample_indices(len(task.train_data), batch_size, gen)  # type: ignore[arg-type]
    return collate(task, [task.train_data[i] for i in idx])


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, x: Any, y: Any
) -> torch.Tensor:
    """Forward, loss, backward, optimizer step; returns the detached loss.

    Gradients are set to None first (PyTorch's default), so a step's peak memory is
    parameters + optimizer state + activations + gradients, as in a real training loop.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()
