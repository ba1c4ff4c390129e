"""The simulation's fake step: the task's model built on ``meta`` and turned into fake ``cpu``
tensors, and its batch collated for real and then faked (integer and boolean tensors stay
real, so a model can read ids, masks and lengths). simulated.py counts the step's storages on
what this module builds; ``fake_step`` lets other checks run the model the same way.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import CannotSimulate, RealTooError, TaskError, meta_device_error, one_line
from ..step import REAL_ITEMS_MAX, make_batch
from ..task import Task
from .values import RealWhereKnown, keep_real, really, values_where_known


@contextmanager
def young_gc_only() -> Iterator[None]:
    """Inside, ``gc.collect()`` scans only objects created inside (a full collection costs
    0.1 s in a process that has imported torch). Cycles made inside are still collected."""
    if gc.get_freeze_count():  # the caller froze objects already; leave that alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def new_fake_mode() -> Any:
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    # A meta kernel that raises is logged by torch at ERROR before the exception reaches us;
    # bsselect reports the exception itself, in one line.
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

    # Real tensors the task captured (class weights in a loss, say) are converted on use;
    # they were allocated before the step, as in a real run, and are not counted.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _fake_twin(t: torch.Tensor, fake_mode: Any) -> torch.Tensor:
    """A fake ``cpu`` tensor like ``t`` (meta or real), a Parameter if ``t`` is one."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor):
        return t
    if t.device.type == "meta":
        converter = fake_mode.fake_tensor_converter
        fake = converter.from_meta_and_device(fake_mode, t.detach(), torch.device("cpu"))
    else:  # created for real (from numpy, say); its memory was already spent
        fake = fake_mode.from_tensor(t.detach())
    if isinstance(t, nn.Parameter):
        param = nn.Parameter(fake, requires_grad=t.requires_grad)
        # Attributes set on the parameter (an optimizer factory's grouping marks, such as
        # hf.NO_DECAY) decide the optimizer's groups, hence the order it steps in.
        param.__dict__.update(vars(t))
        _copy_tensor_hooks(t, param)
        return param
    return fake


def _copy_tensor_hooks(source: torch.Tensor, target: torch.Tensor) -> None:
    """The gradient hooks ``__init__`` registered on ``source`` (``register_hook``,
    ``register_post_accumulate_grad_hook``), registered again on its twin: they live outside
    the tensor's ``__dict__``, and a twin without them simulated a model whose parameter
    hooks keep each gradient twice 24% low (review)."""
    for hook in (getattr(source, "_backward_hooks", None) or {}).values():
        target.register_hook(hook)
    for hook in (getattr(source, "_post_accumulate_grad_hooks", None) or {}).values():
        target.register_post_accumulate_grad_hook(hook)


def to_fake_cpu(model: nn.Module, fake_mode: Any) -> None:
    """Replace the model's parameters, buffers and plain tensor attributes by fake ``cpu``
    twins, in place, keeping tied tensors tied."""
    twins: dict[int, torch.Tensor] = {}

    def twin(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in twins:
            twins[id(t)] = _fake_twin(t, fake_mode)
        return twins[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                table[name] = twin(t)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):  # a cached mask kept as a plain attribute
                setattr(module, name, twin(value))


def build_fake_model(task: Task, fake_mode: Any) -> nn.Module:
    """``task.model()`` built on the ``meta`` device (nothing is allocated, and ``.to()``
    inside ``__init__`` works, which FakeTensor parameters do not support), then turned into
    fake ``cpu`` tensors. TaskError in one line if the model cannot be built that way."""
    try:
        with torch.device("meta"):
            model = task.model()
    except Exception as exc:
        if not meta_device_error(exc):  # review: the factory's own error, blamed on the simulation
            raise RealTooError(f"building the model failed: {one_line(exc)}") from exc
        raise TaskError(
            "building the model on the meta device failed (meta tensors have shapes but no "
            f"values, so .item(), .tolist() and data-dependent shapes fail): {one_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"Task.model() returned {type(model).__name__}, not an nn.Module")
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:  # review: an internal error, where real steps train it
        which = (f"{lazy[0]} is uninitialised" if len(lazy) == 1 else
                 f"{lazy[0]} and {len(lazy) - 1} more tensor(s) are uninitialised")
        raise CannotSimulate(
            f"the model has lazy modules ({which}: nn.LazyLinear and the like), whose shapes "
            "come from the first forward, and the simulation builds the model without one: "
            "run one dummy batch through it in Task.model before returning it, or measure "
            "with real steps (`bsselect probe --method measured`)")
    to_fake_cpu(model, fake_mode)
    # The step is a training step whatever mode the factory returns: a copy of an instance
    # from from_pretrained (eval mode) ran without dropout, 35% low on GPT-2 (review);
    # Trainer and Lightning call .train() before they train, and so does this.
    model.train()
    return model




def real_batch(task: Task, batch_size: int, seed: int, inputs: Any = None) -> tuple[Any, Any]:
    """``make_batch`` for real, outside any fake mode: datasets may compute on real values,
    and a padding collate_fn must see the true items to give the true shapes. ``inputs``
    (an ``inputs.InputScan``) chooses the items: the largest ones for worst-case inputs.

    Collating millions of items would cost minutes (the line's answer for a small model can
    be that large), so above REAL_ITEMS_MAX a batch of that many real items is collated and,
    when every tensor in it leads with the batch dimension, stretched to ``batch_size``
    (``_stretched``)."""
    try:
        if batch_size > REAL_ITEMS_MAX:
            small = make_batch(task, REAL_ITEMS_MAX, seed, inputs)
            leaves = [t for t in tree_flatten(small)[0] if isinstance(t, torch.Tensor)]
            if leaves and all(t.dim() >= 1 and t.shape[0] == REAL_ITEMS_MAX for t in leaves):
                return tree_map(lambda t: _stretched(t, batch_size)
                                if isinstance(t, torch.Tensor) else t, small)
        return make_batch(task, batch_size, seed, inputs)
    except Exception as exc:
        raise TaskError(f"collating a batch of {batch_size} failed: {one_line(exc)}") from exc


def _stretched(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``t`` (REAL_ITEMS_MAX collated items) as a batch of ``batch_size``. A tensor the
    simulation keeps real (ids, masks, lengths: the model may read their values) repeats the
    collated items in turn, so the stretched batch holds them in their proportions; repeating
    one item made every item that one (a model that keeps a mask's real tokens measured one
    item's tokens times the batch: 3780 answered where a typical 3780 needs 1.5x the budget).
    A fake one's values are never read: a zero-stride view of its first item, which
    ``fake_batch_leaf`` turns into a full-size fake tensor."""
    view = t[:1].expand(batch_size, *t.shape[1:])
    if keep_real(view):  # within the bytes the simulation keeps real
        reps = -(-batch_size // t.shape[0])
        with really():
            return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size]
    return view


def fake_batch_leaf(t: Any, fake_mode: Any) -> Any:
    """The simulation's twin of a batch tensor: integer and boolean tensors (ids, masks,
    lengths) stay real, so that a model can read their values (``values.keep_real``); others
    become fake. A stretched one (zero stride on the batch dimension) becomes a contiguous
    tensor of its full size, as a real collate would give."""
    if not isinstance(t, torch.Tensor):
        return t
    stretched = t.dim() >= 1 and t.shape[0] > 1 and t.stride(0) == 0
    if keep_real(t):
        if stretched:
            with really():
                return t.contiguous()
        return t
    if stretched:
        return torch.empty(t.shape, dtype=t.dtype)  # inside fake_mode: fake, full storage
    return fake_mode.from_tensor(t)


@contextmanager
def fake_step(task: Task, batch: Any) -> Iterator[tuple[nn.Module, Any, RealWhereKnown]]:
    """The task's model and ``batch`` as the simulation sees them (fake tensors; the
    batch's integer and boolean tensors real, and ops on them alone run for real), with the
    simulation's modes active inside, and the mode that knows which values it has. For
    checks that must not allocate the model."""
    fake_mode = new_fake_mode()
    model = build_fake_model(task, fake_mode)
    with young_gc_only(), fake_mode, values_where_known() as known:
        yield model, tree_map(lambda t: fake_batch_leaf(t, fake_mode), batch), known
