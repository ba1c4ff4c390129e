"""``bsselect noise``: the simple gradient noise scale B_simple = tr(Sigma)/|G|^2 of a task.

Measuring: one big batch of ``b_big`` items, split into ``n_sub = b_big / b_small`` disjoint
sub-batches, one forward/backward pass each; |g_small|^2 is averaged over the sub-batches and
|g_big|^2 is the norm of their mean, so the big batch costs no extra pass and no extra data. A
loss that is a mean over units of varying number per item (``Task.loss_weight``: a padded LM's
label tokens) weights the sub-batches by their units (``weighted_pair``).
The math (unbiased estimators, finite population correction, bootstrap) is in noise_math.py;
the measurement over a run (``measure_noise``: at initialisation or a checkpoint, and along
warm-up steps) in noise_run.py; method, sources and measured cost in docs/noise.md.

Gradients are raw: ``torch.autograd.grad`` of the task's mean-reduced loss, so no clipping, no
GradScaler scaling, and the caller's ``.grad`` fields are never touched.

Active dropout (``nn.Dropout`` and its kin in training mode, ``active_dropout``) adds noise that
the finite population correction would wrongly shrink to nothing at ``b = N``; each measurement
then runs its first sub-batch a second time (new masks, same items) to measure that noise, and
the estimate is corrected for it (noise_math.py; +1 pass per measurement).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import distributed
from ..errors import TaskError, UsageError, one_line
from ..precision import Precision, raw_grads
from ..step import collate, forward_loss, sample_indices, to_device
from ..task import Task, loss_units
from .noise_math import (  # noqa: F401  (weighted_pair: re-exported)
    NoiseEstimate, check_batch_sizes, estimate_from_norms, weighted_pair)

__all__ = [
    "NoiseEstimate", "active_dropout", "estimate_from_norms", "training_batchnorm",
    "measure_grad_norms", "estimate_noise", "split_batch", "default_batch_sizes",
    "DEFAULT_N_SUB", "DEFAULT_MEASUREMENTS",
]

# Defaults, justified by measurement in docs/noise.md ("Choosing b_small, b_big, measurements"):
# b_small = the task's base batch size (a pass costs what a training step's forward/backward
# costs and is known to fit), b_big = 8 * b_small, 32 measurements.
DEFAULT_N_SUB = 8
DEFAULT_MEASUREMENTS = 32

Progress = Callable[[int, int], None]  # (passes done, passes total)


# --- one measurement -------------------------------------------------------------------------

def split_batch(batch: Any, n_sub: int) -> list[Any]:
    """``n_sub`` equal, disjoint slices of a nested batch along dim 0 of every tensor leaf."""
    leaves, spec = tree_flatten(batch)
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.ndim}
    if len(sizes) != 1:
        raise TaskError(
            "cannot split the batch into sub-batches: its tensors do not share one size along "
            f"dim 0 (found {sorted(sizes) or 'no tensors'})"
        )
    size = sizes.pop()
    if size % n_sub:
        raise UsageError(f"a batch of {size} does not split into {n_sub} equal sub-batches")
    step = size // n_sub
    # Leaves without a batch dimension (flags, scalars) are shared by every sub-batch.
    parts = [leaf.split(step) if isinstance(leaf, torch.Tensor) and leaf.ndim else [leaf] * n_sub
             for leaf in leaves]
    return [tree_unflatten([p[i] for p in parts], spec) for i in range(n_sub)]


class _Norms(NamedTuple):
    small_sq: float  # mean over sub-batches of |g_small|^2 (Task.loss_weight: weighted_pair's)
    big_sq: float  # |mean of the sub-batch gradients|^2 (likewise)
    loss: float  # mean loss over the sub-batches (weighted by their units)
    mask_sq: float | None = None  # |g - g'|^2 of one sub-batch under two sets of masks
    first_sq: float | None = None  # |g|^2 of that sub-batch (with mask_sq)
    mask_scale: float = 1.0  # Task.loss_weight: mask_sq's factor as an average sub-batch's

    def random(self) -> bool:
        """Whether the repeated sub-batch's two gradients differ: a random forward."""
        if self.mask_sq is None or self.first_sq is None:
            return False
        ratio = self.mask_sq / self.first_sq if self.first_sq > 0 else (
            math.inf if self.mask_sq > 0 else 0.0)
        return math.isfinite(self.mask_sq) and ratio > RANDOM_FORWARD_RTOL ** 2


def active_dropout(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``,
    ``AlphaDropout``, ``FeatureAlphaDropout``) that are in training mode with ``p > 0``, and
    of ``nn.MultiheadAttention`` modules with attention dropout. Dropout called as a function
    (``F.dropout`` in ``forward``) is not seen."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        p = (module.p if isinstance(module, nn.modules.dropout._DropoutNd) else
             module.dropout if isinstance(module, nn.MultiheadAttention) else 0.0)
        if p > 0:
            found.append(name or type(module).__name__)
    return tuple(found)


# The same items' gradient twice, closer than this (relative, in norm), is the same: the
# forward draws no random numbers. A deterministic forward and backward repeat a gradient to
# the last bit on a CPU and to ~1e-7 with a GPU's atomic reductions; dropout moves it by far more.
RANDOM_FORWARD_RTOL = 1e-5


def _sum_dtype(device: torch.device) -> torch.dtype:
    # float64 sums: tr(Sigma) comes from a difference of two such norms. MPS has no float64;
    # float32 (relative error ~1e-7) only matters when B_simple < 1e-5 * b_small.
    return torch.float32 if device.type == "mps" else torch.float64


def _sq_norm(grad: torch.Tensor) -> torch.Tensor:
    return grad.pow(2).sum(dtype=_sum_dtype(grad.device))


def trained_parameters(model: nn.Module, task: Task) -> tuple[list[nn.Parameter], int]:
    """The parameters the task's optimizer moves, and how many trainable ones it does not
    (a part frozen through the optimizer: a group of lr 0, or left out of it; ``moved_by``).
    All of them when it moves none."""
    from .noise_monitor import moved_by

    params = [p for p in model.parameters() if p.requires_grad]
    try:  # as training builds it: every parameter (a factory may group them by position)
        optimizer = task.make_optimizer(model.parameters(), task.lr)
    except Exception:  # noqa: BLE001 - the training step builds it and says what is wrong
        return params, 0
    moved = moved_by(optimizer, params)
    return moved, len(params) - len(moved)


def _grad_norms(model: nn.Module, task: Task, x: Any, y: Any, n_sub: int,
                precision: Precision = Precision.fp32, repeat: bool = False,
                params: list[nn.Parameter] | None = None) -> _Norms:
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TaskError("the model has no parameters that require grad")
    # fp32 accumulator even for half-precision parameters, so the sum of n_sub grads is exact
    # enough; this is the only parameter-sized memory the measurement adds (two with
    # Task.loss_weight, below).
    promoted = [torch.promote_types(p.dtype, torch.float32) for p in params]
    acc = [torch.zeros_like(p, dtype=d) for p, d in zip(params, promoted)]
    device = params[0].device
    zero = torch.zeros((), dtype=_sum_dtype(device), device=device)
    small_sq, loss_sum, mask_sq, first_sq, mask_w = (zero.clone() for _ in range(5))
    # Under torchrun (x, y) is this rank's share: n_sub / world_size of the sub-batches.
    parts = split_batch((x, y), n_sub // distributed.world_size())
    # A loss averaged over units of varying number per item (Task.loss_weight: a padded LM's
    # label tokens): sub-batch i weighs w_i, the big batch's gradient is sum w_i g_i / sum w_i.
    # Read before any pass (one host sync each, none between the passes); a sub-batch with no
    # unit of the loss (all labels ignored) has share 0 and is not run (its mean is 0/0).
    weighted = task.loss_weight is not None
    weights = [loss_units(task, yi) for _, yi in parts] if weighted else [1.0] * len(parts)
    acc_sq = [torch.zeros_like(p, dtype=d) for p, d in zip(params, promoted)] if weighted else []
    first = next((i for i, w in enumerate(weights) if w > 0), None)  # the one run twice
    with distributed.agreement():
        for i, ((xi, yi), w) in enumerate(zip(parts, weights)):
            if w == 0:
                continue
            if repeat and i == first:  # the second pass starts from the same buffers
                before = _buffers(model)
            loss = forward_loss(model, task, xi, yi, precision)
            # autograd.grad returns the gradients instead of accumulating into .grad; with
            # fp16 the loss is scaled for the backward and the gradients unscaled (raw).
            grads = _dense(raw_grads(loss, params, precision))
            sq = zero.clone()
            for k, (a, g) in enumerate(zip(acc, grads)):
                if g is not None:
                    sq += _sq_norm(g)
                    a.add_(g, alpha=w)
                    if weighted:
                        acc_sq[k].add_(g, alpha=w * w)
            small_sq += sq * (w * w)
            loss_sum += loss.detach().to(loss_sum.dtype) * w
            if repeat and i == first:
                # The same items again under new dropout masks. Buffers as the first pass
                # found them (spectral norm's power iteration, any running state): only the
                # random draws differ between the two passes.
                first_sq += sq
                _restore_buffers(model, before)
                again = _dense(raw_grads(forward_loss(model, task, xi, yi, precision), params,
                                         precision))
                for a, g0, g in zip(acc, grads, again):
                    g0, g = (torch.zeros_like(a) if v is None else v.to(a.dtype)
                             for v in (g0, g))
                    diff = _sq_norm(g - g0)
                    mask_sq += diff
                    mask_w += diff * w  # the mask noise of a mean over w units
    w_sum = zero + sum(weights)
    w_sq = zero + sum(w * w for w in weights)
    # The data-parallel trick (McCandlish et al. 2018, App. A.1): each rank's sub-batch norms
    # are the small batches, the all-reduced gradient is the big batch. No-op in one process.
    distributed.sum_([*acc, small_sq, loss_sum, mask_sq, first_sq,
                      *([*acc_sq, mask_w, w_sum, w_sq] if weighted else [])])
    # One host sync per measurement, not one per sub-batch.
    ranks = distributed.world_size()
    if not weighted:
        mask = (float(mask_sq) / ranks, float(first_sq) / ranks) if repeat else (None, None)
        big_sq = sum(_sq_norm(a / n_sub) for a in acc)
        return _Norms(float(small_sq) / n_sub, float(big_sq), float(loss_sum) / n_sub, *mask)
    total = float(w_sum)
    if not total > 0:
        raise TaskError(f"Task.loss_weight gave the {n_sub} sub-batches of a measurement a "
                        f"total weight of {total:g}: no unit of the loss to average over")
    # Dropout's noise in the repeated sub-batch's mean falls as 1/w (its units), not as
    # 1/b_small: rescaled to an average sub-batch's units, as the estimator reads it.
    raw = float(mask_sq)
    mask = ((raw / ranks, float(first_sq) / ranks) if repeat else (None, None))
    scale = float(mask_w) / raw * n_sub / total if repeat and raw > 0 else 1.0
    big_sq = float(sum(_sq_norm(a / total) for a in acc))
    cross = float(sum((a * s).sum(dtype=_sum_dtype(device)) for a, s in zip(acc, acc_sq))
                  ) / total ** 3
    small, big = weighted_pair(big_sq, float(small_sq) / total ** 2, cross,
                               float(w_sq) / total ** 2, n_sub)
    return _Norms(small, big, float(loss_sum) / total, *mask, mask_scale=scale)


def _dense(grads: Any) -> list[torch.Tensor | None]:
    """``raw_grads``' gradients with sparse ones (an ``nn.Embedding(sparse=True)``) made dense."""
    return [None if g is None else g.to_dense() if g.is_sparse else g for g in grads]


def measure_grad_norms(model: nn.Module, task: Task, x: Any, y: Any, n_sub: int,
                       precision: Precision = Precision.fp32) -> tuple[float, float]:
    """(mean over sub-batches of |g_small|^2, |g_big|^2) for one big batch ``(x, y)``.

    The batch (nested tuples/dicts of tensors allowed) is split along dim 0 into ``n_sub``
    disjoint sub-batches of ``b_small = b_big / n_sub``: one forward/backward pass each;
    ``g_big`` is the mean of the sub-batch gradients, i.e. the gradient of the mean loss over
    the big batch (with ``Task.loss_weight``: the equal-weight pair ``weighted_pair`` gives).
    The model's mode, ``.grad`` fields and buffers (e.g. BatchNorm running
    statistics) are left as they were; an optimizer is not involved. ``precision``: the
    forward under autocast, as training runs it; the norms are of unscaled fp32 gradients.
    """
    return _grad_norms_restoring(model, task, x, y, n_sub, precision)[:2]


def _grad_norms_restoring(model: nn.Module, task: Task, x: Any, y: Any, n_sub: int,
                          precision: Precision = Precision.fp32, repeat: bool = False,
                          params: list[nn.Parameter] | None = None) -> _Norms:
    saved = _buffers(model)
    try:
        return _grad_norms(model, task, x, y, n_sub, precision, repeat, params)
    finally:
        _restore_buffers(model, saved)


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    """A copy of the model's buffers (BatchNorm statistics, spectral norm's vectors...)."""
    return [b.detach().clone() for b in model.buffers()]


def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, old in zip(model.buffers(), saved):
            buf.copy_(old)


# --- many measurements at one point ------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def estimate_noise(
    model: nn.Module, task: Task, *, b_small: int, b_big: int, measurements: int,
    generator: torch.Generator | None = None, seed: int = 0,
    on_pass: Callable[[int], None] | None = None, precision: Precision = Precision.fp32,
    random: bool | None = None,
) -> tuple[NoiseEstimate, float]:
    """(B_simple estimate, mean training loss) for ``model`` as it is now.

    ``measurements`` big batches of ``b_big`` items, each drawn without replacement from
    ``task.train_data`` by ``generator`` (or a fresh one seeded with ``seed``), hence the
    finite population correction with N = len(train_data). Costs
    ``measurements * b_big / b_small`` forward/backward passes, and more where the forward is
    random: each measurement runs its first sub-batch twice (same items, same buffers, new
    random draws) and the estimate is corrected for that noise. With an active dropout module
    (``active_dropout``) or ``random=True`` every measurement does; otherwise (``random``
    None) the first measurement does, as the test — gradients that differ say the forward is
    random here (``F.dropout``, attention dropout, stochastic depth, sampling) and the others
    follow — one pass more in all for a deterministic forward; ``random=False``: never.
    ``on_pass(n)`` is called after each measurement with the passes it used. For use
    mid-training (e.g. by ``sweep``): the model, its ``.grad``, buffers and the global RNG
    are left as they were.
    """
    n_data = len(task.train_data)  # type: ignore[arg-type]
    n_sub = check_settings(b_small, b_big, measurements, n_data)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    device = _model_device(model)
    dropout = active_dropout(model)
    repeat = bool(dropout) or bool(random)  # every measurement runs a sub-batch twice
    test = random is None and not repeat    # the first one does, to find out
    small, big, losses, masks = [], [], [], []
    params, still = trained_parameters(model, task)
    # Dropout etc. draw from the global RNG; fork it so measuring does not change training.
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else [device],
                               device_type=None if on_cpu else device.type):
        distributed.seed_rank(seed)  # independent dropout masks on each rank's sub-batches
        for k in range(measurements):
            idx = distributed.shard(sample_indices(n_data, b_big, gen))  # this rank's share
            x, y = to_device(collate(task, [task.train_data[i] for i in idx]), device)
            twice = repeat or (test and k == 0)
            norms = _run_task(lambda: _grad_norms_restoring(model, task, x, y, n_sub, precision,
                                                            twice, params))
            if test and k == 0:
                repeat = norms.random()  # the same on every rank: the norms are all-reduced
            small.append(norms.small_sq)
            big.append(norms.big_sq)
            losses.append(norms.loss)
            if repeat:
                # E = D, per example
                masks.append(b_small * norms.mask_sq * norms.mask_scale / 2)
            if on_pass is not None:
                on_pass(n_sub + twice)
    est = estimate_from_norms(small, big, b_small, b_big, n_data, seed=seed,
                              mask_trace=masks if repeat else None, dropout=dropout,
                              notes=_dropout_notes(dropout, repeat) + _batchnorm_notes(model)
                              + ((f"{still} trainable parameter tensor(s) the optimizer does "
                                  "not move (a group of lr 0, or not in it) left out",)
                                 if still else ()))
    return est, sum(losses) / len(losses)


def training_batchnorm(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's BatchNorm modules (``nn.BatchNorm1d/2d/3d``, their lazy and
    sync kin) in training mode: they normalise with the batch's own statistics."""
    return tuple(name or type(module).__name__ for name, module in model.named_modules()
                 if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm))


def _batchnorm_notes(model: nn.Module) -> tuple[str, ...]:
    found = training_batchnorm(model)
    if not found:
        return ()
    names = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"BatchNorm normalises with batch statistics ({names}): a sub-batch's gradient "
            "depends on which items share it, so this is the noise at b_small's batch "
            "statistics, not of single items; another --b-small can give another value",)


def _dropout_notes(dropout: tuple[str, ...], random: bool = False) -> tuple[str, ...]:
    if not dropout and random:
        return ("the forward is random without an active dropout module (functional dropout, "
                "attention dropout, stochastic depth, noise or sampling in forward): that "
                "noise is part of tr(Sigma), measured by running one sub-batch per "
                "measurement twice, and taken out of the finite population correction",)
    if not dropout:
        return ()
    names = ", ".join(dropout[:3]) + (f" and {len(dropout) - 3} more" if len(dropout) > 3 else "")
    which = f"module{'s' if len(dropout) > 1 else ''} {names}"
    return (f"dropout is active ({which}): its mask noise is part of tr(Sigma), measured by "
            "running one sub-batch per measurement twice, and taken out of the finite "
            "population correction, which would otherwise overstate |G|^2 by about "
            "tr_dropout/N and understate B_simple",)


def default_batch_sizes(task: Task, b_small: int | None = None, b_big: int | None = None
                        ) -> tuple[int, int]:
    """(b_small, b_big) with the defaults filled in: ``b_small`` = the task's base batch size,
    ``b_big = 8 * b_small``, both shrunk to fit the dataset (``b_big <= N``). Given values are
    kept as they are, for ``check_settings`` to judge."""
    for name, value in (("--b-small", b_small), ("--b-big", b_big)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    n_data = len(task.train_data)  # type: ignore[arg-type]
    world = distributed.world_size()
    n_sub = -(-DEFAULT_N_SUB // world) * world  # under torchrun: the same number on every rank
    given_small = b_small is not None
    if b_small is None:
        b_small = max(1, min(task.base_batch_size, n_data // n_sub))
    if b_big is None:
        b_big = min(n_sub * b_small, (n_data // (b_small * world)) * b_small * world)
        if b_big <= b_small:
            raise UsageError(
                (f"--b-small {b_small} leaves no room for the larger batch" if given_small else
                 f"the {n_data:,} training items are too few for two batch sizes")
                + f": b_big must be a multiple of b_small above it and at most {n_data:,}"
                + ("; choose a smaller --b-small" if given_small else ""))
    return b_small, b_big


def check_settings(b_small: int, b_big: int, measurements: int, n_data: int) -> int:
    """Validate sizes for a measurement on ``n_data`` items; returns ``n_sub = b_big/b_small``."""
    check_batch_sizes(b_small, b_big, n_data)
    if b_big % b_small:
        raise UsageError(
            f"b_big ({b_big}) must be a multiple of b_small ({b_small}), e.g. {8 * b_small}"
        )
    if measurements < 2:
        raise UsageError(f"measurements must be at least 2 (32 is a good start), got {measurements}")
    world = distributed.world_size()
    if (b_big // b_small) % world:
        raise UsageError(f"b_big ({b_big}) must be a multiple of b_small x world size "
                         f"({b_small} x {world}): each rank takes the same number of sub-batches")
    return b_big // b_small


def _run_task(fn: Callable[[], Any], what: str = "a forward/backward pass") -> Any:
    """Call ``fn``; errors from the user's code become one-line TaskErrors naming ``what``."""
    try:
        return fn()
    except (TaskError, UsageError):
        raise
    except Exception as exc:
        raise TaskError(f"{what} failed: {one_line(exc)}") from exc
