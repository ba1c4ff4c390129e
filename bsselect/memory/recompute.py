"""The simulation's function modes inside activation checkpointing's recomputation.

A ``TorchFunctionMode`` is not active in the backward pass: the autograd engine does not carry
the function-mode stack into it, so when ``torch.utils.checkpoint`` recomputes a block's
forward there, the simulation's modes (CUDA's choice of attention kernel, CUDA's autocast op
lists, the counter's ``F.linear`` marks) are not, and the recomputation runs CPU rules. Where
the CPU and CUDA save different tensors (GPT-2's attention with dropout: math on the CPU, flash
on CUDA) checkpointing's own check then failed the step with "Recomputed values ... have
different metadata" (review), and where they save the same the recomputation was counted by
the CPU's rules. Inside ``recomputed_under(make)``, both kinds of checkpoint enter ``make()``
around their recomputation:

- non-reentrant (``use_reentrant=False``, ``checkpoint_wrapper``'s default, and the
  composable ``torch.distributed._composable.checkpoint``): through the recomputation
  context of ``context_fn``, entered before the caller's own;
- reentrant (``use_reentrant=True``): around ``CheckpointFunction.backward``, which
  recomputes the forward and runs its backward.

Nested calls enter their contexts in the order they were entered, as in the forward.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterator

import torch.utils.checkpoint as _checkpoint

_FACTORIES: list[Callable[[], ContextManager[Any]]] = []
_RECOMPUTED = [0]  # recomputations run under the modes so far (this process)
_GENERATOR = "_checkpoint_without_reentrant_generator"
_COMPOSABLE = "torch.distributed._composable.checkpoint_activation"


def recomputations() -> int:
    """How many checkpoint recomputations have run inside ``recomputed_under`` so far: a
    simulation that saw one recomputes (CUDA's caching allocator fragments more then)."""
    return _RECOMPUTED[0]


@contextmanager
def _all_modes() -> Iterator[None]:
    _RECOMPUTED[0] += 1
    with ExitStack() as stack:
        for make in list(_FACTORIES):
            stack.enter_context(make())
        yield


@contextmanager
def _then(first: ContextManager[Any], second: ContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield


@contextmanager
def recomputed_under(make: Callable[[], ContextManager[Any]]) -> Iterator[None]:
    """Inside, every checkpoint's recomputation runs under ``make()`` (a fresh context each
    time) as well as under what it already enters."""
    first = not _FACTORIES
    if first:
        generator = _checkpoint._checkpoint_without_reentrant_generator
        backward = _checkpoint.CheckpointFunction.backward
        # The composable ``checkpoint(module)`` imported the generator by name (review).
        holders = [m for m in (_checkpoint, sys.modules.get(_COMPOSABLE))
                   if m is not None and getattr(m, _GENERATOR, None) is generator]

        def with_modes(fn: Any, preserve_rng_state: bool = True,
                       context_fn: Any = _checkpoint.noop_context_fn, *args: Any,
                       **kwargs: Any) -> Any:
            def contexts() -> tuple[Any, Any]:
                forward, recompute = context_fn()
                return forward, _then(_all_modes(), recompute)
            return generator(fn, preserve_rng_state, contexts, *args, **kwargs)

        def backward_with_modes(ctx: Any, *grads: Any) -> Any:
            with _all_modes():
                return backward(ctx, *grads)

        for module in holders:
            setattr(module, _GENERATOR, with_modes)
        _checkpoint.CheckpointFunction.backward = staticmethod(backward_with_modes)
    _FACTORIES.append(make)
    try:
        yield
    finally:
        _FACTORIES.pop()
        if first:
            for module in holders:
                setattr(module, _GENERATOR, generator)
            _checkpoint.CheckpointFunction.backward = staticmethod(backward)
