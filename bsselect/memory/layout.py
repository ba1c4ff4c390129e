"""Where a kernel's outputs lie in memory (their strides), where the fake kernels and the
real ones differ. A layout decides which path the next kernel takes (a convolution on a
channels-last input takes another oneDNN path, with other scratch and copies), so a wrong
layout is a wrong byte count downstream.

- ``standard_layout``: a one-channel image permuted from NHWC, contiguous and channels-last
  at once, which ATen's pointwise kernels lay out in the standard order;
- ``mixed_layout``: a pointwise kernel over operands of different layouts, laid out as the
  real kernel's TensorIterator does (read from the real kernel, run on a few elements);
- ``with_real_layout``: a calibrated kernel's outputs in the real kernel's dim order.

The counter that applies them is ``simulated.LiveStorageCounter``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

_aten = torch.ops.aten

# Ops whose CPU kernel lays its output out as ``standard_layout`` says, beyond those tagged
# pointwise, judged by their operands of the output's shape (batch norm's weight and running
# statistics are not: its output is standard for a contiguous input); pointwise-tagged ones
# that copy their input's strides instead (``clone``); and ops whose CPU kernel gives the
# input's strides where the fake kernel gives the standard ones (group norm). Measured on a
# one-channel image permuted from NHWC, the only layout where these differ (fuzz; hardtanh
# and its ReLU6, and every other activation's forward and backward in torch.nn.functional,
# checked one by one).
_ITERATOR_OPS = {*(getattr(_aten, f"{name}_backward").default for name in (
                    "softplus", "hardtanh", "elu", "hardsigmoid", "hardswish", "mish",
                    "log_sigmoid", "leaky_relu")),
                 _aten.native_dropout.default,
                 _aten.native_batch_norm.default, _aten._native_batch_norm_legit.default,
                 _aten._native_batch_norm_legit.no_stats}
_KEEPS_STRIDES = {_aten.clone.default, _aten.hardtanh.default}  # hardtanh: ReLU6 too
_INPUT_STRIDES = {_aten.native_group_norm.default}


def standard_layout(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """``out`` with the standard contiguous strides ATen gives it. A pointwise CPU kernel
    (TensorIterator) whose operands all have the output's shape and are all contiguous
    writes a standard contiguous output; fake tensors keep the input's strides. The two
    differ only in the stride of a size-one dim, as in a one-channel image permuted from
    NHWC ((HW, 1, W, 1) against (HW, HW, W, 1)), and that stride decides the memory format a
    following convolution takes: ReLU then Conv2d on such an image was 23-52% low, Softplus
    then ConvTranspose2d 64% (fuzz)."""
    first = out[0] if isinstance(out, tuple) and out else out
    if not isinstance(first, torch.Tensor):
        return out
    if func in _INPUT_STRIDES:
        return _input_strides(args[0], out)
    if func in _KEEPS_STRIDES or not (torch.Tag.pointwise in func.tags or func in _ITERATOR_OPS):
        return out
    if not first.is_contiguous() or first.stride() == dense_strides(first.shape):
        return out
    if _wraps_a_number(func, args):
        return out  # a 0-d operand of another shape: ATen keeps the input's dim order
    operands = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    if func in _ITERATOR_OPS:
        operands = [a for a in operands if a.dim() == first.dim()]
    if not operands or any(a.shape != first.shape or not a.is_contiguous() for a in operands):
        return out
    storages = {id(a.untyped_storage()) for a in operands}
    outputs = tuple(
        _laid_out(t, dense_strides(t.shape))
        if isinstance(t, torch.Tensor) and t.shape == first.shape and t.is_contiguous()
        and id(t.untyped_storage()) not in storages else t
        for t in (out if isinstance(out, tuple) else (out,)))
    return outputs if isinstance(out, tuple) else outputs[0]


# Elementwise kernels outside ``_ITERATOR_OPS`` that are not tagged pointwise and whose fake
# kernel passes the operands to its TensorIterator in another order than the real one: loss
# and activation backwards, found by running each on a channels-last and a contiguous operand
# in both orders against the real kernel (tests/test_memory_simulated.py).
_ELEMENTWISE = {_aten.rrelu_with_noise_backward.default, _aten.mse_loss_backward.default,
                _aten.smooth_l1_loss_backward.default, _aten.huber_loss_backward.default,
                _aten.binary_cross_entropy_backward.default, _aten.copysign.Tensor,
                _aten.softshrink_backward.default, _aten.hardshrink_backward.default}
# Sizes of a tiny copy's dims that are not one: distinct primes, so that each stride of a
# dense tiny output is a product that names the dims inside it. Five dims at most (2,310
# elements).
_TINY_SIZES = (2, 3, 5, 7, 11)
_MIXED_SEEN: dict[tuple, tuple | None] = {}


class _Tiny(NamedTuple):
    """An operand's tiny copy: its shape, strides and dtype."""
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype


def mixed_layout(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """``out`` laid out as the real kernel lays it out, for a pointwise kernel whose operands
    of the output's shape are laid out differently from each other (a gradient permuted from
    channels-last beside a contiguous saved input: a layer norm on an image permuted to NHWC,
    then an activation). ATen's TensorIterator orders the output's dims by its operands' strides,
    in the kernel's own operand order; some fake kernels are decompositions that pass the
    operands in another order (ELU's, hardtanh's and softplus's backwards follow the saved
    input where the real kernel follows the gradient), and the convolution's backward after
    them then took another path: 5.6% of a backward low (fuzz). The real kernel runs once on
    a copy of a few elements with the operands' dim orders (cached), and the fake outputs take
    its output's layout."""
    if "out" in kwargs or func in _KEEPS_STRIDES or not (
            torch.Tag.pointwise in func.tags or func in _ITERATOR_OPS or func in _ELEMENTWISE):
        return out
    outs = list(out) if isinstance(out, tuple) else [out]
    first = outs[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 2 or first.layout != torch.strided:
        return out
    # (a first look without flattening: a pointwise op's tensors are its arguments)
    if len({a.stride() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
            and a.layout == torch.strided and a.shape == first.shape}) < 2:
        return out
    flat, spec = tree_flatten((args, kwargs))
    laid = _real_tiny_strides(func, flat, spec, first.shape)
    if laid is None or len(laid) != len(outs):
        return out
    return _relaid(out, [stride if isinstance(t, torch.Tensor) and t.shape == first.shape
                         else None for t, stride in zip(outs, laid)], flat)


def _real_tiny_strides(func: Any, flat: list, spec: Any, shape: torch.Size
                       ) -> tuple | None:
    """Each output's strides at ``shape`` as the real kernel lays them out, read from a run on
    tiny copies of the operands (``flat``, the flattened args and kwargs); None for an output
    of another shape or layout, and None altogether where an operand is not dense or the
    real kernel fails."""
    big = [i for i, n in enumerate(shape) if n != 1]
    if len(big) > len(_TINY_SIZES):
        return None
    sizes = [1] * len(shape)
    for i, d in enumerate(big):
        sizes[d] = _TINY_SIZES[i]
    plans = []
    for a in flat:
        if isinstance(a, torch.Tensor):
            plan = _tiny_plan(a, shape, sizes) if a.layout == torch.strided else None
            if plan is None:
                return None
            plans.append(_Tiny(*plan, a.dtype))
        else:
            plans.append(a)
    try:
        key: tuple | None = (func, tuple(plans), tuple(sizes))
        hash(key)
    except TypeError:  # an argument that cannot be a key: run it, uncached
        key = None
    if key is not None and key in _MIXED_SEEN:
        tiny = _MIXED_SEEN[key]
    else:
        tiny_out = _run_tiny(func, plans, spec, sizes)
        tiny = tiny_out and tuple(_tiny_strides(t, sizes) for t in tiny_out)
        if key is not None:
            _MIXED_SEEN[key] = tiny
    return tiny and tuple(_scaled(t, sizes, shape) for t in tiny)


def _tiny_plan(a: torch.Tensor, shape: Sequence[int], sizes: Sequence[int]
               ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shape and strides of ``a``'s tiny copy: each dim of the output's size takes the
    tiny size, a broadcast dim stays one, and each stride is the product of the tiny sizes
    of the dims inside it, as ``a``'s is of theirs. None unless ``a`` broadcasts to
    ``shape`` and is dense (expanded dims aside)."""
    lead = len(shape) - a.dim()
    if lead < 0:
        return None
    tiny_shape = []
    for i, n in enumerate(a.shape):
        if n == shape[lead + i]:
            tiny_shape.append(sizes[lead + i])
        elif n == 1:
            tiny_shape.append(1)
        else:
            return None
    strides = []
    for d, s in enumerate(a.stride()):
        if s == 0:
            strides.append(0)
            continue
        inner = [e for e in range(a.dim()) if a.shape[e] != 1 and 0 < a.stride(e) < s]
        if s != math.prod(a.shape[e] for e in inner):
            return None
        strides.append(math.prod(tiny_shape[e] for e in inner))
    return tuple(tiny_shape), tuple(strides)


def _run_tiny(func: Any, plans: list, spec: Any, sizes: Sequence[int]) -> list | None:
    """The real kernel's outputs on tiny operands made from ``plans`` (values in (0, 1):
    every loss and activation takes them), or None where it fails."""
    with unset_fake_temporarily(), _disable_current_modes():
        try:
            flat = []
            for plan in plans:
                if not isinstance(plan, _Tiny):
                    flat.append(plan)
                    continue
                n = 1 + sum((k - 1) * s for k, s in zip(plan.shape, plan.strides))
                base = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
                base = base > 0.5 if plan.dtype == torch.bool else base.to(plan.dtype)
                flat.append(base.as_strided(plan.shape, plan.strides))
            args, kwargs = tree_unflatten(flat, spec)
            out = func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a dtype or values the kernel refuses: no answer
            return None
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _tiny_strides(t: Any, sizes: Sequence[int]) -> tuple[int, ...] | None:
    """A tiny output's strides if it is dense and of the tiny ``sizes``, else None."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sizes) \
            or not is_non_overlapping_and_dense_or_false(t):
        return None
    return tuple(t.stride())


def _scaled(stride: tuple[int, ...] | None, sizes: Sequence[int], shape: Sequence[int]
            ) -> tuple[int, ...] | None:
    """The strides at ``shape`` of a dense tiny output of ``sizes`` and ``stride``: each
    dim's is the product of the full sizes of the dims whose tiny strides lie inside its
    own."""
    if stride is None:
        return None
    inner = [[e for e in range(len(sizes)) if sizes[e] != 1 and stride[e] < stride[d]]
             for d in range(len(sizes))]
    if any(stride[d] != math.prod(sizes[e] for e in dims) for d, dims in enumerate(inner)):
        return None
    return tuple(math.prod(shape[e] for e in dims) for dims in inner)


_OPERAND_NAMES = ("self", "other")  # what a number passed there becomes: a 0-d
# tensor operand (``x + 1``), not a parameter of the kernel (``threshold_backward``'s)


def _wraps_a_number(func: Any, args: tuple) -> bool:
    """Whether a number passed to ``func`` is one of its operands, which ATen wraps in a 0-d
    tensor (then its operands are not all of one shape)."""
    for arg, value in zip(func._schema.arguments, args):
        if isinstance(value, (bool, int, float, complex)) and (
                arg.name in _OPERAND_NAMES or str(arg.type) == "Tensor"):
            return True
    return False


def _input_strides(x: Any, out: Any) -> Any:
    """``out`` with its first output laid out as the input ``x`` is, where both are dense
    and of one shape."""
    first = out[0] if isinstance(out, tuple) else out
    if not (isinstance(x, torch.Tensor) and x.shape == first.shape
            and x.stride() != first.stride() and is_non_overlapping_and_dense_or_false(x)):
        return out
    laid = _laid_out(first, x.stride())
    return (laid, *out[1:]) if isinstance(out, tuple) else laid


def stride_order(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's dims from the outermost stride to the innermost (ties, as a size-one dim's,
    by position)."""
    stride = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda d: (-stride[d], d)))


def dense_strides(shape: Sequence[int], order: Sequence[int] | None = None
                  ) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` whose dims are laid out in ``order`` (outer
    to inner; the standard order when None)."""
    stride, step = [0] * len(shape), 1
    for d in reversed(range(len(shape)) if order is None else tuple(order)):
        stride[d] = step
        step *= max(shape[d], 1)
    return tuple(stride)


def _laid_out(t: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """A fresh tensor like ``t`` (fake where ``t`` is) with ``stride``."""
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)


def dim_order(t: Any) -> tuple[int, ...] | None:
    """A dense tensor's dims from the outermost stride to the innermost (ties, as a size-one
    dim's, by position); None for anything else."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.layout != torch.strided \
            or not is_non_overlapping_and_dense_or_false(t):
        return None
    return stride_order(t)


def with_real_layout(out: Any, cost: Any, args: Sequence[Any]) -> Any:
    """``out`` (the fake kernel's) with each fresh dense output laid out in the dim order the
    real kernel's had (``calibration.KernelCost.output_orders``); views and in-place outputs
    are kept."""
    if cost is None or not cost.output_orders:
        return out
    flat = tree_flatten(out)[0]
    if len(flat) != len(cost.output_orders):
        return out
    return _relaid(out, [
        dense_strides(t.shape, order) if order is not None
        and len(order) == getattr(t, "ndim", -1) and dim_order(t) not in (None, order) else None
        for t, order in zip(flat, cost.output_orders)], tree_flatten(list(args))[0])


def _relaid(out: Any, strides: Sequence[tuple[int, ...] | None], inputs: Sequence[Any]) -> Any:
    """``out`` with each of its (flattened) outputs laid out with ``strides`` where that is
    given and not already its layout; views and in-place outputs (the storage of one of
    ``inputs``) are kept."""
    flat, spec = tree_flatten(out)
    storages = {id(a.untyped_storage()) for a in inputs if isinstance(a, torch.Tensor)}
    changed = False
    for i, (t, stride) in enumerate(zip(flat, strides)):
        if stride is None or tuple(t.stride()) == tuple(stride) \
                or id(t.untyped_storage()) in storages:
            continue
        flat[i] = _laid_out(t, stride)
        changed = True
    return tree_unflatten(flat, spec) if changed else out
