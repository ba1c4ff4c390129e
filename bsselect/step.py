"""One training step, shared by every subcommand so that they all measure the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

from .precision import Precision, autocast, device_type_of
from .task import Task, loss_units


@dataclass(frozen=True)
class StepSettings:
    """How a measured step trains, as the real run will: autocast ``precision``,
    ``accumulate`` micro-steps per optimizer step (the batch size is then the micro-batch),
    and ``target_device``, the device type whose defaults a simulation reproduces where they
    differ from the CPU's (the optimizer's foreach/for-loop choice); None: this machine's."""

    precision: Precision = Precision.fp32
    accumulate: int = 1
    target_device: Optional[str] = None
    # One rank of a sharded (FSDP2) run: a memory.sharded.ShardPlan; simulated only.
    shard: Optional[Any] = None

    def autocast_precision(self) -> Precision:
        """The precision the step autocasts to: none when FSDP2's MixedPrecisionPolicy casts
        the parameters instead (``--shard fsdp --precision bf16``)."""
        if self.shard is not None and getattr(self.shard, "param_dtype", None) is not None:
            return Precision.fp32
        return self.precision

    def micro_steps(self) -> int:
        """Micro-steps worth simulating: from the second on they are all alike (the earlier
        gradients alive, the same batch shapes), so two give the peak of any N >= 2."""
        return min(self.accumulate, 2)


def collate(task: Task, items: Sequence[Any]) -> tuple[Any, Any]:
    """(inputs, targets) for ``items`` with the task's collate_fn (or PyTorch's default)."""
    batch = (task.collate_fn or default_collate)(list(items))
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"Task.collate_fn must return (inputs, targets), got "
                        f"{type(batch).__name__}: the step calls model(inputs) and "
                        "loss_fn(output, targets)")
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


def make_batch(task: Task, batch_size: int, seed: int = 0, inputs: Any = None
               ) -> tuple[Any, Any]:
    """A reproducible training batch of ``batch_size`` items, on the CPU: random, or chosen
    by ``inputs`` (an ``inputs.InputScan``: the largest items for worst-case inputs)."""
    if inputs is not None:
        idx = inputs.indices(batch_size, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        idx = sample_indices(len(task.train_data), batch_size, gen)  # type: ignore[arg-type]
    return collate(task, [task.train_data[i] for i in idx])


def forward_loss(model: nn.Module, task: Task, x: Any, y: Any,
                 precision: Precision = Precision.fp32) -> torch.Tensor:
    """The task's loss on ``(x, y)``; forward and loss run under the precision's autocast
    (the loss inside it too, as PyTorch's AMP recipe has it: autocast keeps losses float32)."""
    with autocast(precision, device_type_of(model)):
        return task.loss_fn(model(x), y)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, x: Any, y: Any, *,
    precision: Precision = Precision.fp32,
    scaler: Optional[torch.amp.GradScaler] = None,
    accumulate: int = 1,
    next_micro_batch: Optional[Callable[[], tuple[Any, Any]]] = None,
) -> torch.Tensor:
    """Forward, loss, backward, optimizer step; returns the detached loss.

    Gradients are set to None first (PyTorch's default), so a step's peak memory is
    parameters + optimizer state + activations + gradients, as in a real training loop.

    ``accumulate=N`` runs N forward/backward passes (micro-steps) on micro-batches before the
    one optimizer step, each loss divided by N; micro-batches after the first come from
    ``next_micro_batch()``, or are ``(x, y)`` again (what a memory measurement wants: the same
    shapes). With ``Task.loss_weight`` and ``next_micro_batch``, the step's micro-batches are
    fetched first and each loss weighted by its share of their units (``_unit_shares``). From
    the second micro-step on the gradients of the earlier ones are alive, which is why
    accumulation costs memory. ``scaler`` (fp16: ``precision.make_scaler``) scales the
    loss and unscales before the step, skipping it when a gradient overflowed.
    """
    optimizer.zero_grad(set_to_none=True)
    shares = _unit_shares(task, accumulate, (x, y), next_micro_batch)
    total: Optional[torch.Tensor] = None
    for i in range(accumulate):
        if shares is not None:
            (x, y), share = shares[i]
            if share == 0:  # no unit of the loss in it: its mean is 0/0, its share 0
                continue
        elif i and next_micro_batch is not None:
            x, y = next_micro_batch()
        loss = forward_loss(model, task, x, y, precision)
        if shares is not None:
            part = loss * share
            counted = part.detach()
        else:
            part = loss / accumulate if accumulate > 1 else loss
            counted = loss.detach()
        (scaler.scale(part) if scaler is not None else part).backward()
        total = counted if total is None else total + counted
    clip_gradients(model, optimizer, task, scaler)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    assert total is not None
    return total / accumulate if accumulate > 1 and shares is None else total


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task,
                   scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """``Task.max_grad_norm``: the model's gradients clipped to that global L2 norm, after
    the scaler (fp16) has unscaled them, as the HF Trainer and Lightning do; nothing when
    None."""
    norm = getattr(task, "max_grad_norm", None)
    if norm is None:
        return
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), norm)


def _unit_shares(task: Task, accumulate: int, first: tuple[Any, Any],
                 next_micro_batch: Optional[Callable[[], tuple[Any, Any]]]
                 ) -> Optional[list[tuple[tuple[Any, Any], float]]]:
    """With ``Task.loss_weight`` (a mean over tokens, say) and micro-steps: every micro-batch
    of the step, fetched first, with its share of the step's units, so that the step trains on
    the whole batch's mean as one batch would (as the HF Trainer's ``num_items_in_batch``
    does), not on the equal-weight mean of the micro-batches' means. None otherwise."""
    if accumulate <= 1 or task.loss_weight is None or next_micro_batch is None:
        return None  # the same batch again (a memory measurement): equal shares anyway
    batches = [first] + [next_micro_batch() for _ in range(accumulate - 1)]
    units = [loss_units(task, y) for _, y in batches]
    whole = sum(units)
    if not whole > 0:  # nothing to weight by (the loss is 0/0): equal shares, as without
        return [(b, 1.0 / accumulate) for b in batches]
    return [(b, u / whole) for b, u in zip(batches, units)]


# Above this many items a simulated batch is this many real items, stretched (memory.fake)
REAL_ITEMS_MAX = 1024


def tokens_per_sample(task: Task, inputs: Any = None, batch_size: int = 1) -> Optional[int]:
    """The sequence length of a token batch (a 2-D integer tensor, or ``input_ids`` in a
    dict): tokens per sample, so that probe and check answer in tokens too. None otherwise.
    Worst-case inputs: the largest item's, which every batch of the largest items is padded
    to. Random inputs: that of the batch of ``batch_size`` the step was measured on (one
    random item's said 5 tokens where the measured batch was padded to 48: review)."""
    largest_first = inputs is not None and (inputs.picks_largest or inputs.uniform)
    batch_size = 1 if largest_first else min(batch_size, REAL_ITEMS_MAX)
    try:
        x, _ = make_batch(task, batch_size, 0, inputs)
    except Exception:  # noqa: BLE001 - a label only; the step's own errors are reported
        return None
    ids = x.get("input_ids") if hasattr(x, "get") else x
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return int(ids.shape[1])
    return None
