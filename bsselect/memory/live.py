"""What a training step keeps alive between steps, and the bytes its storages hold.

The parameters, buffers and tensors in module attributes, the gradients, the optimizer's
state (its per-parameter state and the tensors in its own attributes), the batch and the
GradScaler's tensors: the simulated step (simulated.py) counts them live at step start, and
its breakdown (param, optimizer state, batch, gradient bytes) sums their distinct storages.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this process holds: a ``DTensor``'s local shard (its wrapper
    reports the global size), else ``t``."""
    inner = getattr(t, "_local_tensor", None) if type(t).__name__ == "DTensor" else None
    return inner if isinstance(inner, torch.Tensor) else t


def _strided_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The dense tensors that hold a tensor's memory: itself, or a sparse tensor's indices
    and values (an nn.Embedding(sparse=True) gradient: an internal error, review)."""
    if t.layout is torch.strided:
        return [t]
    if t.layout is torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (non-tensors are ignored; a DTensor
    counts its local shard)."""
    seen: dict[int, tuple[torch.UntypedStorage, int]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for part in _strided_parts(local(t)):
                st = part.untyped_storage()
                seen[id(st)] = (st, st.nbytes())  # keep st alive so ids stay unique
    return sum(n for _, n in seen.values())


_NOT_STATE = {"param_groups", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
              "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
              "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"}


def optimizer_state_tensors(optimizer: Any, _seen: Optional[set] = None) -> list[Any]:
    """Every tensor the optimizer keeps between steps: its per-parameter state (momentum,
    exp_avg, step, ...) and tensors in its own attributes, inside lists and dicts (an EMA of
    the weights in ``self.ema``: uncounted, the simulated slope was 87x low, review), and
    those of an optimizer it wraps (Lookahead's base optimizer). Not the parameters."""
    seen = set() if _seen is None else _seen
    if id(optimizer) in seen:
        return []
    seen.add(id(optimizer))
    found = tree_flatten(list(getattr(optimizer, "state", {}).values()))[0]
    for name, value in vars(optimizer).items():
        if name in _NOT_STATE or name == "state":
            continue
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, nn.Parameter):
                continue  # its parameter list (LBFGS's _params): the model's, not state
            if isinstance(leaf, torch.Tensor):
                found.append(leaf)
            elif isinstance(leaf, torch.optim.Optimizer):
                found += optimizer_state_tensors(leaf, seen)
    return found


def module_tensors(model: nn.Module) -> list:
    """Parameters, buffers and tensors kept in plain module attributes (a cached mask, the
    last activation a logging hook kept), including inside lists and dicts."""
    found = []
    for module in model.modules():
        for name, value in vars(module).items():
            if name != "_modules":
                found += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return found


def live_at_step_start(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any,
                       scaler: Any = None) -> list:
    """The tensors a training loop keeps alive between steps (with fp16, the GradScaler's
    scale and growth tracker too)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    batch_tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    scaler_tensors = [t for t in (getattr(scaler, "_scale", None),
                                  getattr(scaler, "_growth_tracker", None)) if t is not None]
    return (module_tensors(model) + grads + optimizer_state_tensors(optimizer) + batch_tensors
            + scaler_tensors)
