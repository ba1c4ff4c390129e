"""One rank of an N-way FSDP2 (``fully_shard``) run, simulated in this process.

The simulated step (``simulated.simulate_step_peak``) runs on fake tensors under a live-storage
counter. For a sharded run the model is wrapped as the user's job wraps it, with PyTorch's own
``fully_shard`` on a *fake process group* of ``world_size`` ranks (``torch.distributed``'s
"fake" backend: collectives return at once, nothing is communicated), this process playing
rank 0 — the approach of torchtitan's memory estimation and ``FSDPMemTracker``. Every buffer
FSDP2 itself allocates is then counted as the real rank allocates it: the sharded parameters,
gradients and optimizer state (each 1/N of the whole, padded to a multiple of N), the
all-gather buffers that hold a unit's unsharded parameters during its forward and backward
(freed after the forward with ``reshard_after_forward``, kept until the backward without it),
the reduce-scatter buffers of its unsharded gradients, and the casts of a
``MixedPrecisionPolicy`` (bf16 parameters for compute, fp32 gradient reduction).

Two things the counter needs beyond the unsharded simulation: FSDP2 allocates and frees the
unsharded parameters by resizing a storage in place (``UntypedStorage.resize_``, which no
dispatch mode sees), so ``following_resizes`` reports those to the counter; and a sharded
parameter is a ``DTensor`` whose wrapper reports the global size, so the counter counts its
local shard (``live.local``).

Activation checkpointing wraps each unit with ``checkpoint_wrapper`` (non-reentrant
``torch.utils.checkpoint``) before sharding, as torchtitan and most FSDP2 recipes do: its
activations are recomputed in the backward, and the simulation runs that recomputation.

Not here: the communication library's own memory (NCCL's buffers on a GPU are outside PyTorch's
allocator; gloo's on a CPU are inside it) — docs/benchmarks-sharded.md says what that is worth.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import UsageError


# Said wherever checkpointing is (``apply_checkpointing`` turns the cache off).
_NO_KV_CACHE = "(a Hugging Face model's KV cache off: use_cache=False)"


@dataclass(frozen=True)
class ShardPlan:
    """How the run shards: FSDP2 over ``world_size`` ranks, ``unit`` the class name of the
    modules each wrapped by ``fully_shard`` (None: every module of the model's largest
    ``nn.ModuleList`` or ``nn.Sequential`` of identical blocks, the transformer layers), ``reshard_after_forward``,
    ``param_dtype`` for compute (``MixedPrecisionPolicy``; None: the parameters' own) with
    gradients reduced in ``reduce_dtype``, and ``checkpointing`` (activation checkpointing per
    unit)."""

    world_size: int = 1
    fsdp: bool = True        # False: only activation checkpointing, no sharding
    unit: Optional[str] = None
    reshard_after_forward: bool = True
    param_dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = torch.float32
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UsageError(f"--world-size must be >= 1, got {self.world_size}")

    def describe(self) -> str:
        if not self.fsdp:
            return f"activation checkpointing per {self.unit or 'block'} {_NO_KV_CACHE}"
        parts = [f"FSDP2 over {self.world_size} ranks",
                 f"per {self.unit or 'block'}",
                 "resharded after forward" if self.reshard_after_forward
                 else "unsharded from forward to backward"]
        if self.param_dtype is not None:
            parts.append(f"{str(self.param_dtype).replace('torch.', '')} parameters, "
                         f"{str(self.reduce_dtype).replace('torch.', '')} reduction")
        if self.checkpointing:
            parts.append(f"activation checkpointing per unit {_NO_KV_CACHE}")
        return ", ".join(parts)


def find_units(model: nn.Module, unit: Optional[str]) -> list[nn.Module]:
    """The modules to wrap: those of class ``unit`` (outermost only), or the blocks of the
    largest ``nn.ModuleList`` or ``nn.Sequential`` whose members are all one class (with
    parameters). UsageError when none."""
    if unit is not None:
        found: list[nn.Module] = []
        inside: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in inside:
                continue
            if type(module).__name__ == unit:
                found.append(module)
                inside.update(id(m) for m in module.modules())
        if found and not _has_forward(found[0]):
            raise UsageError(f"--shard-unit {unit} is a container without a forward of its own, "
                             "which fully_shard cannot wrap: name the class of its blocks")
        if not found:
            names = sorted({type(m).__name__ for m in model.modules()})
            raise UsageError(f"--shard-unit {unit}: no module of that class in the model "
                             f"(its classes: {', '.join(names[:20])})")
        if found[0] is model:  # fully_shard applied twice to the root; nothing to checkpoint
            raise UsageError(f"--shard-unit {unit} is the model's own class: a unit is a "
                             "block inside the model (FSDP2 wraps the root by itself, and "
                             "checkpointing the whole model saves nothing), e.g. its "
                             "transformer layer's class")
        return found
    # The outermost lists of blocks of one class, all of them: a list nested in a block (an
    # MoE layer's experts) is part of that block, and an encoder's and a decoder's lists are
    # units alike, whatever their classes. The longest list anywhere took 8 experts over 4
    # layers, and the encoder's list alone: 12-22% high (review). Lists of leaf modules
    # (Linear heads, norms) are units only where the model has no list of blocks, and a list
    # of containers (ModuleLists of layers) is looked into.
    lists: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) \
                and len({type(m) for m in module}) == 1 \
                and any(True for _ in module[0].parameters()) and _has_forward(module[0]):
            lists.append(module)
            inside.update(id(m) for m in module.modules())
    if not lists:
        raise UsageError("no repeated blocks (an nn.ModuleList or nn.Sequential of one class) to "
                         "shard by; name the class each fully_shard call wraps with "
                         "--shard-unit")
    blocks = [lst for lst in lists if _is_block(lst[0])]
    chosen = blocks or [max(lists, key=len)]
    return [m for lst in chosen for m in lst]


def _is_block(module: nn.Module) -> bool:
    """A module made of modules with parameters (a layer), not a leaf (Linear, LayerNorm)."""
    return any(any(True for _ in child.parameters()) for child in module.children())


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return


def apply_checkpointing(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Each unit wrapped by ``checkpoint_wrapper`` (non-reentrant), in place; the wrappers.

    A Hugging Face model's KV cache is turned off (``config.use_cache = False``), as its own
    ``gradient_checkpointing_enable`` does for training: with the cache on, the recomputation
    in the backward appends every layer's keys and values to the cache a second time — more
    memory than the run has (21% on a 4-layer Llama), and with a padding mask an error."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            config.use_cache = False

    wrapped = []
    for unit in units:
        wrapper = checkpoint_wrapper(unit, preserve_rng_state=False)
        _replace(model, unit, wrapper)
        wrapped.append(wrapper)
    return wrapped


def shard(model: nn.Module, plan: ShardPlan, mesh: Any) -> nn.Module:
    """``fully_shard`` on every unit, then on the root, as the plan says (checkpointing first).
    Returns the model (the same object)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = find_units(model, plan.unit)
    if plan.checkpointing:
        units = apply_checkpointing(model, units)
    if not plan.fsdp:
        return model
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                    mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                mp_policy=mp)
    return model


@contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A one-process fake process group of ``world_size`` ranks (this one is rank 0) and its
    1-D CPU device mesh, built outside any fake mode (a mesh reads real rank values)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UsageError("sharded simulation runs in one process: not under torchrun")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


@contextmanager
def following_resizes(counter: Any) -> Iterator[None]:
    """Report ``UntypedStorage.resize_`` calls (FSDP2's allocation and freeing of unsharded
    parameters) to ``counter`` while inside."""
    original = torch.UntypedStorage.resize_

    def resize_(storage: torch.UntypedStorage, size: int) -> Any:
        out = original(storage, size)
        counter.resized(storage)
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


class _Chunks(Sequence):
    """``torch.chunk(tensor, n, dim)`` padded with empties to ``n`` entries, as FSDP2's
    ``_chunk_with_empty`` returns it, but each chunk made only when indexed: FSDP2 reads the
    local rank's chunk and chunk 0 of every parameter, and making all ``n`` (512 for 512
    ranks) fake tensors per parameter was most of a 70B model's sharding time."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int) -> None:
        self.tensor, self.n, self.dim = tensor, num_chunks, dim
        size = tensor.size(dim)
        self.step = -(-size // num_chunks)
        self.nonempty = -(-size // self.step)
        self.size = size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i < self.nonempty:
            start = i * self.step
            return self.tensor.narrow(self.dim, start, min(self.step, self.size - start))
        return self[0].new_empty(0)


@contextmanager
def lazy_chunks() -> Iterator[None]:
    """While inside, FSDP2 chunks parameters with ``_Chunks`` (the same tensors for the
    indices it reads). Left as it is when this torch has no ``_chunk_with_empty`` to replace,
    or for a dimension of size 0 (``torch.chunk``'s own rules apply there)."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:  # pragma: no cover - another torch layout
        yield
        return
    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:  # pragma: no cover
        yield
        return

    def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> Any:
        if tensor.dim() == 0 or tensor.size(dim) == 0:
            return original(tensor, num_chunks, dim)
        return _Chunks(tensor, num_chunks, dim)

    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def _elementwise_optimizers() -> tuple[type, ...]:
    """torch's optimizers whose step is elementwise per parameter (each state tensor and
    update the parameter's shape, no reduction over a parameter's elements): on a shard they
    do exactly what they do on the whole. Not Adafactor (row and column statistics), LBFGS or
    anyone's own (a distributed Muon orthogonalises the full matrix: ``full_tensor()``)."""
    names = ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
             "RMSprop", "ASGD", "Rprop")
    return tuple(getattr(torch.optim, n) for n in names if hasattr(torch.optim, n))


def steps_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` is one of ``_elementwise_optimizers``' own (a subclass that
    keeps it counts; one that overrides it, or a step patched on the instance, does not)."""
    if "step" in optimizer.__dict__:
        return False
    own = inspect.unwrap(type(optimizer).step)
    return any(isinstance(optimizer, cls) and own is inspect.unwrap(cls.step)
               for cls in _elementwise_optimizers())


@contextmanager
def local_optimizer_steps(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """While inside, ``optimizer.step`` runs on the local shards of its DTensor parameters
    (their gradients' local shards, its state kept as plain local tensors), not on the
    DTensors: the same storages and the same elementwise ops — a DTensor's op is its local
    tensor's op when every operand is sharded alike — without DTensor's sharding
    propagation, which took most of a sharded simulation's optimizer step (a 70B model: 7 s
    a step on fake tensors). ``zero_grad`` and everything else still see the DTensors.
    Only for ``steps_elementwise`` optimizers: another (an FSDP2-aware Muon that gathers the
    full matrix) takes its plain-tensor branch on shards, and the simulation missed its
    optimizer-phase peak, "fits" at 2.5x under a real rank (review); it steps on the
    DTensors, as a real run does."""
    from torch.distributed.tensor import DTensor

    if not steps_elementwise(optimizer):
        yield
        return

    original = optimizer.step
    own = optimizer.__dict__.get("step")  # an instance attribute already there, if any

    def step(*args: Any, **kwargs: Any) -> Any:
        swapped: list[tuple[dict, list]] = []
        moved: list[tuple[Any, Any]] = []
        for group in optimizer.param_groups:
            params = group["params"]
            if not any(isinstance(p, DTensor) for p in params):
                continue
            local = []
            for p in params:
                if not isinstance(p, DTensor):
                    local.append(p)
                    continue
                loc = p._local_tensor
                if p.grad is not None and not isinstance(p.grad, DTensor):
                    raise TypeError("a sharded parameter with an unsharded gradient")
                loc.grad = None if p.grad is None else p.grad._local_tensor
                if p in optimizer.state:
                    optimizer.state[loc] = optimizer.state.pop(p)
                moved.append((p, loc))
                local.append(loc)
            swapped.append((group, params))
            group["params"] = local
        try:
            return original(*args, **kwargs)
        finally:
            for group, params in swapped:
                group["params"] = params
            for p, loc in moved:
                loc.grad = None
                if loc in optimizer.state:
                    optimizer.state[p] = optimizer.state.pop(loc)

    optimizer.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del optimizer.step  # the class's step again
        else:
            optimizer.step = own  # type: ignore[method-assign]
