"""Single CPU kernels measured on a small real batch (``kernel_cost``), so that the simulation
can add the scratch, and correct the outputs, that fake tensors get wrong; ``KERNELS`` names
the kernels and how each is batched. The measurement is the CPU allocator's own account
(``cpu_truth.allocator_log``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from ..errors import one_line
from ..precision import REDUCED_DTYPES
from .cpu_truth import allocator_log, high_water
from .layout import dim_order, stride_order


# --- single kernels -------------------------------------------------------------------------
#
# Fake tensors get an op's outputs from its meta kernel, which knows nothing of the scratch the
# real CPU kernel allocates through PyTorch's allocator: oneDNN convolution copies input, weight
# and output into blocked layouts (channels padded to the SIMD width) and computes into a
# blocked output before copying it out; the CPU flash-attention kernels keep per-thread buffers
# and, in backward, a float accumulator for grad_q. Some meta kernels also get an output's size
# wrong: oneDNN's LSTM layer returns a workspace (every gate at every step, kept for backward)
# that meta says is empty. Which copies happen depends on the ISA, the oneDNN version and the
# shapes, so rather than re-deriving oneDNN's choices we ask the kernel: run it for real on
# inputs shaped like the fake ones but with a small batch, record its allocations and its
# outputs' sizes, and scale each linearly in the batch (they are copies of batch-major tensors,
# or per-thread or per-weight buffers that do not depend on it).


@dataclass(frozen=True)
class KernelCost:
    """What a real CPU kernel allocates, in bytes: its high-water mark above what was live
    before it (outputs and scratch together), and the storage size of each output (in
    ``tree_flatten`` order; 0 where the output is not a tensor)."""

    high_water_bytes: int
    output_bytes: tuple[int, ...]
    # each output's dims from outermost to innermost stride (None: not a tensor, or not
    # dense), which the fake output may not share: layer norm's backward gives a contiguous
    # grad_input for a permuted input, and the ops after it follow that layout
    output_orders: tuple[Optional[tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """How to run a kernel on a small batch: ``batch_dims(args)`` maps argument positions
    (or keyword names) to the dim holding the batch, the kernel's own batch first; arguments
    whose dim does not match (a broadcast mask) are left alone. ``min_items`` is the smallest
    batch that takes the same code path as larger ones (convolution: one item picks another
    backend). ``prepare`` fills in arguments that fake tensors cannot provide. ``applies``
    limits the spec to some arguments (matmuls: reduced precision only), and
    ``output_item_bytes`` adds an output's bytes per batch item to the calibration's cost
    when the output can be much larger than the inputs (a matmul into a vocabulary)."""

    batch_dims: Callable[[Sequence[Any]], dict[Any, int]]
    min_items: int
    prepare: Optional[Callable[[list], None]] = None
    applies: Optional[Callable[[Sequence[Any]], bool]] = None
    output_item_bytes: Optional[Callable[[Sequence[Any]], int]] = None


def _dim0(*keys: Any) -> Callable[[Sequence[Any]], dict[Any, int]]:
    return lambda args: {k: 0 for k in keys}


def _rnn_dims(
    sequences: tuple[int, ...], states: tuple[int, ...]
) -> Callable[[Sequence[Any]], dict[Any, int]]:
    """oneDNN RNN layers get sequences as (T, B, C): ``mkldnn_rnn`` transposes batch-first
    input before the layer (and passes batch_first on regardless); states are (B, H)."""
    return lambda args: {**{i: 1 for i in sequences}, **{i: 0 for i in states}}


def _rnn_forward_for_backward(args: list) -> None:
    """The backward kernel reads the forward's workspace, which fake tensors leave empty:
    run the real forward on the calibration inputs and pass its outputs."""
    a = args
    with torch.enable_grad():  # backward runs with grad off; the forward saves its workspace on
        out = torch.ops.aten.mkldnn_rnn_layer.default(
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[13], a[20], a[14], a[15], a[16], a[17],
            a[19], a[21], a[18])
    a[7], a[8], a[9], a[22] = out


# bfloat16 matmuls on the CPU go through oneDNN, which packs its operands into a scratch buffer
# (a few hundred KB once the dims pass its blocking, a full copy when the first operand is
# transposed, as in a weight gradient); float32 ones go to MKL, which allocates nothing through
# PyTorch. Which dim to scale for calibration: the largest of the product's batch, rows, inner
# and columns (rows of activations in forward, the contraction in a weight gradient).
_MATMUL_MIN_ITEMS = 256  # oneDNN's packing grows with each dim up to about here, then stays


def _matmul_choice(args: Sequence[Any], first: int) -> tuple[dict[Any, int], int]:
    """(batch dims, output bytes per item) for ``a @ b`` at ``args[first:first+2]`` with an
    optional broadcast ``args[0]`` added (addmm, baddbmm) when ``first`` is 1."""
    a, b = args[first], args[first + 1]
    lead = a.dim() - 2  # 1 for bmm
    m, k, n = a.shape[lead], a.shape[lead + 1], b.shape[lead + 1]
    out_numel = m * n * (a.shape[0] if lead else 1)
    options = [(m, {first: lead}, -2), (k, {first: lead + 1, first + 1: lead}, None),
               (n, {first + 1: lead + 1}, -1)]
    if lead:
        options.append((a.shape[0], {first: 0, first + 1: 0}, -3))
    size, dims, out_dim = max(options, key=lambda o: o[0])
    if first and out_dim is not None and isinstance(args[0], torch.Tensor) \
            and args[0].dim() + out_dim >= 0:
        dims = {**dims, 0: args[0].dim() + out_dim}  # the added bias, aligned from the right
    per_item = 0 if out_dim is None else out_numel // max(size, 1) * a.dtype.itemsize
    return dims, per_item


def _matmul_spec(first: int) -> KernelSpec:
    return KernelSpec(
        batch_dims=lambda args: _matmul_choice(args, first)[0],
        min_items=_MATMUL_MIN_ITEMS,
        applies=lambda args: args[first].dtype in REDUCED_DTYPES,
        output_item_bytes=lambda args: _matmul_choice(args, first)[1],
    )


def _batch_size_list(position: int) -> Callable[[list], None]:
    """An upsampling backward names the input's full size, batch first, in ``args[position]``:
    the calibration's smaller batch goes there too."""
    def prepare(args: list) -> None:
        args[position] = [args[0].shape[0], *list(args[position])[1:]]
    return prepare


def _not_on_batch(dim_position: int, default: int = -1) -> Callable[[Sequence[Any]], bool]:
    """The op's reduced or normalised dim (``args[dim_position]``, or ``default`` where the
    call left it out: ``x.kthvalue(3)`` dispatches two arguments) is not the batch's."""
    def applies(args: Sequence[Any]) -> bool:
        dim = args[dim_position] if len(args) > dim_position else default
        return (dim if isinstance(dim, int) else 0) % max(args[0].dim(), 1) != 0
    return applies


def _batch_size_int(position: int) -> Callable[[list], None]:
    """A backward that names the batch size as an integer in ``args[position]`` (group
    norm's ``N``): the calibration's smaller batch goes there too."""
    def prepare(args: list) -> None:
        args[position] = args[0].shape[0]
    return prepare


def _not_contiguous(*positions: int) -> Callable[[Sequence[Any]], bool]:
    """Some of ``args[positions]`` is not contiguous (transposed, permuted, or the stride-0
    gradient of a sum): the kernel copies it."""
    return lambda args: any(isinstance(args[i], torch.Tensor) and not args[i].is_contiguous()
                            for i in positions)


def _strided_grad(args: Sequence[Any]) -> bool:
    """The incoming gradient is not contiguous (the stride-0 gradient of a sum or mean):
    the backward kernel copies it."""
    return isinstance(args[0], torch.Tensor) and not args[0].is_contiguous()


def _widened_sum(args: Sequence[Any]) -> bool:
    """A sum whose int64 result is wider than its bool or integer input."""
    t = args[0]
    return (isinstance(t, torch.Tensor) and t.dim() > 0 and not t.dtype.is_floating_point
            and not t.dtype.is_complex and t.dtype != torch.int64)


def _fft_off_batch(args: Sequence[Any]) -> bool:
    """An FFT whose transformed dims leave the batch's (0) alone."""
    t, dims = args[0], args[1]
    return isinstance(t, torch.Tensor) and t.dim() > 1 and all(
        d % t.dim() != 0 for d in dims)


# Upsampling on the CPU (NCHW input): the kernel computes through a copy of its input and an
# output-sized buffer beside the output, 2.25x the output at 2x bilinear and nearest; a
# model upsampling then pooling was 47-48% low (review). The backward names the input's
# size, batch first.
_UPSAMPLE = ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
             "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d")

_aten = torch.ops.aten
KERNELS: dict[Any, KernelSpec] = {
    **{getattr(_aten, name).default: KernelSpec(_dim0(0), min_items=1)
       for name in _UPSAMPLE if hasattr(_aten, name)},
    **{getattr(_aten, f"{name}_backward").default: KernelSpec(
        _dim0(0), min_items=1, prepare=_batch_size_list(2))
       for name in _UPSAMPLE if hasattr(_aten, f"{name}_backward")},
    # nn.Bilinear: the CPU kernel of every _trilinear call (one forward, three in the
    # backward) builds (batch, in1, in2)-sized products per output feature: 91-94% low
    # (review). Its batch-bearing operands are the 2-d ones; the weight is 3-d.
    _aten._trilinear.default: KernelSpec(
        lambda args: {i: 0 for i in (0, 1, 2) if args[i].dim() == 2}, min_items=1),
    # kthvalue along a non-batch dim copies its input and makes int64 indices: 3x the input
    # inside the kernel, 45% low (review).
    _aten.kthvalue.default: KernelSpec(_dim0(0), min_items=1, applies=_not_on_batch(2)),
    # F.fold: the CPU output's storage is kernel^2 times the tensor's, and its input is
    # copied when not contiguous: 24-38% low (review).
    _aten.col2im.default: KernelSpec(_dim0(0), min_items=1),
    # A sum (or a count) of bools or of integers narrower than int64 reduces an int64 copy of
    # its whole input, made inside the kernel: ``(h > 0).sum()`` on an activation, 29% low
    # (review). A sum of int64 or of floats in their own dtype copies nothing (measured).
    **{op: KernelSpec(_dim0(0), min_items=1, applies=_widened_sum)
       for op in (_aten.sum.default, _aten.sum.dim_IntList, _aten.count_nonzero.dim_IntList,
                  _aten.count_nonzero.default)},
    # A batch of matrix exponentials: scratch of 10x the input in the forward, and the
    # backward is matrix_exp of a block matrix twice the size: 71-76% low (review).
    _aten.linalg_matrix_exp.default: KernelSpec(
        _dim0(0), min_items=1, applies=lambda args: args[0].dim() > 2),
    # FFTs that leave the batch dim alone: along a dim that is not the last they copy their
    # input transposed (and the backward its gradient), a model's rfft over time 22% low
    # (review); along the last they are calibrated too, and measured exact.
    **{op: KernelSpec(_dim0(0), min_items=1, applies=_fft_off_batch)
       for op in (_aten._fft_r2c.default, _aten._fft_c2r.default, _aten._fft_c2c.default)},
    # softmax's backward copies a stride-0 incoming gradient (a sum right after it): 24% low
    # (review).
    _aten._softmax_backward_data.default: KernelSpec(
        _dim0(0, 1), min_items=1,
        applies=lambda args: _strided_grad(args) and _not_on_batch(2)(args)),
    # Pooling backwards copy a gradient whose layout is not the input's (a sum or mean right
    # after the pool gives stride 0; a pool over a transposed activation, channels-last
    # indices) before they scatter it: a max_pool1d over time then a mean 30% low, 3-d pools'
    # 3-4% (review). Batched: the gradient, the input and the indices (max pools').
    **{getattr(_aten, name).default: KernelSpec(_dim0(*batched), min_items=1)
       for name, batched in (("max_pool2d_with_indices_backward", (0, 1, 7)),
                             ("max_pool3d_with_indices_backward", (0, 1, 7)),
                             ("avg_pool2d_backward", (0, 1)), ("avg_pool3d_backward", (0, 1)),
                             ("adaptive_max_pool2d_backward", (0, 1, 2)),
                             ("adaptive_max_pool3d_backward", (0, 1, 2)),
                             ("_adaptive_avg_pool2d_backward", (0, 1)),
                             ("_adaptive_avg_pool3d_backward", (0, 1)))
       if hasattr(_aten, name)},
    # F.affine_grid builds its base grid, (batch, H, W, 3), beside the output: 40% low in the
    # forward (review). The size argument names the batch first.
    _aten.affine_grid_generator.default: KernelSpec(_dim0(0), min_items=1,
                                                   prepare=_batch_size_list(1)),
    # Input-sized scratch inside the forward kernel, freed before it returns: a copy to
    # partition (median, nanmedian), the shifted exponentials (logsumexp), the elementwise
    # loss before its reduction (huber; bce_with_logits two), the pairwise differences
    # (cdist). 25-40% of the forward phase low (review), the step's peak where the model's
    # largest tensor ends in one of them.
    **{op: KernelSpec(_dim0(0, 1, 2, 3), min_items=1)
       for op in (_aten.median.default, _aten.median.dim, _aten.nanmedian.default,
                  _aten.nanmedian.dim, _aten.logsumexp.default, _aten.huber_loss.default,
                  _aten.binary_cross_entropy_with_logits.default, _aten._cdist_forward.default,
                  _aten._euclidean_dist.default)},
    # abs of a complex tensor (a spectrum's magnitude) computes through a contiguous copy of
    # its input when the input is not contiguous: the forward of an rfft over time 12% low.
    _aten.abs.default: KernelSpec(_dim0(0), min_items=1,
                                  applies=lambda args: args[0].is_complex()),
    # (log_)softmax over a dim of a tensor that is not contiguous (cross-entropy on (B, T, K)
    # logits transposed to (B, K, T)) computes through a contiguous copy: the forward of such
    # a loss 32% low (review).
    **{op: KernelSpec(_dim0(0), min_items=1, applies=lambda args: not args[0].is_contiguous())
       for op in (_aten._log_softmax.default, _aten._softmax.default)},
    # log_softmax's backward copies a gradient or output that is not contiguous (the stride-0
    # gradient of a sum right after it): 25% low (review).
    _aten._log_softmax_backward_data.default: KernelSpec(
        _dim0(0, 1), min_items=1,
        applies=lambda args: not (args[0].is_contiguous() and args[1].is_contiguous())),
    # LAPACK on batches of matrices: copies of the input in LAPACK's column-major layout, pivots
    # and workspace inside the kernel: 16-25% of the forward low (review: inv, svd, lu, eig,
    # pinv, lstsq).
    **{getattr(_aten, name).default: KernelSpec(_dim0(0, 1), min_items=1,
                                                applies=lambda args: args[0].dim() > 2)
       for name in ("_linalg_svd", "linalg_inv_ex", "linalg_lu_factor_ex", "linalg_lu",
                    "_linalg_eigh", "linalg_eig", "_linalg_solve_ex", "linalg_lstsq",
                    "linalg_cholesky_ex", "linalg_qr", "_linalg_det", "_linalg_slogdet")
       if hasattr(_aten, name)},
    # Decompositions the CPU runs op by op that fake tensors run as one (their own derivative
    # formulas): dist's difference (25% of the forward low) and _safe_softmax's (the math
    # attention's masked softmax) mask and exponentials (7.8%).
    _aten.dist.default: KernelSpec(_dim0(0, 1), min_items=1),
    _aten._safe_softmax.default: KernelSpec(_dim0(0), min_items=1),
    # pinv is one op with its own derivative: its SVD and products run inside it, 51% of the
    # forward low (review). atol and rtol may be batched tensors.
    _aten.linalg_pinv.atol_rtol_tensor: KernelSpec(
        _dim0(0, 1, 2), min_items=1, applies=lambda args: args[0].dim() > 2),
    # Layer norm over an input that is not contiguous (a (B, C, T) activation transposed to
    # (B, T, C), a permuted image) computes through a contiguous copy of it, and its backward
    # copies such an input and a gradient that is not contiguous (a sum right after it); so
    # does GELU's (erf) backward. A conv then LayerNorm over time was 24% of the forward low,
    # LayerNorm or GELU then a sum 24% of the backward (fuzz).
    _aten.native_layer_norm.default: KernelSpec(_dim0(0), min_items=1,
                                                applies=_not_contiguous(0)),
    _aten.native_layer_norm_backward.default: KernelSpec(_dim0(0, 1, 3, 4), min_items=1,
                                                         applies=_not_contiguous(0, 1)),
    _aten.gelu_backward.default: KernelSpec(_dim0(0, 1), min_items=1,
                                            applies=_not_contiguous(0, 1)),
    # embedding's CPU backward reads a gradient that is not contiguous (a conv over time
    # transposed back to (B, T, E)) through a contiguous copy: 8.9% of a backward low (fuzz).
    _aten.embedding_dense_backward.default: KernelSpec(_dim0(0, 1), min_items=1,
                                                       applies=_not_contiguous(0)),
    # group norm's CPU backward keeps float32 sums per item and channel (ds, db) beside
    # grad_input: after a Linear (one element a channel) 24% of the backward low (fuzz).
    _aten.native_group_norm_backward.default: KernelSpec(_dim0(0, 1, 2, 3), min_items=1,
                                                         prepare=_batch_size_int(5)),
    # index_select along a dim that is not the batch's, on an input that is not contiguous
    # (a slice), copies the input first: 14% of the forward low (fuzz).
    _aten.index_select.default: KernelSpec(
        _dim0(0), min_items=1, applies=lambda args: _not_contiguous(0)(args)
        and _not_on_batch(1)(args)),
    # batch norm's CPU forward computes its statistics in float32 buffers of a value or a row
    # of values a channel, freed before it returns: two a channel, and one more a thread on the
    # channels-last path (a 2-d input, N x C x 1 x 1, a channels-last image), which a
    # transposed input does not take. 384 bytes for 32 channels at one thread, 512 at two;
    # 0.8-2.7% of a phase of small MLPs with a BatchNorm1d low (fuzz).
    **{op: KernelSpec(_dim0(0), min_items=2)
       for op in (_aten.native_batch_norm.default, _aten._native_batch_norm_legit.default,
                  _aten._native_batch_norm_legit.no_stats)},
    # batch norm's CPU backward allocates an input-sized buffer beside grad_input when the
    # gradient is contiguous NCHW (not when channels-last or stride-0): conv -> BatchNorm ->
    # mean, whose peak is there, was 24% low (review).
    _aten.native_batch_norm_backward.default: KernelSpec(_dim0(0, 1), min_items=2),
    _aten.mm.default: _matmul_spec(0),
    _aten.bmm.default: _matmul_spec(0),
    _aten.addmm.default: _matmul_spec(1),
    _aten.baddbmm.default: _matmul_spec(1),
    _aten.convolution.default: KernelSpec(_dim0(0), min_items=2),
    _aten.convolution_backward.default: KernelSpec(_dim0(0, 1), min_items=2),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: KernelSpec(
        _dim0(0, 1, 2, "attn_mask"), min_items=1),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: KernelSpec(
        _dim0(0, 1, 2, 3, 4, 5, "attn_mask"), min_items=1),
    _aten.mkldnn_rnn_layer.default: KernelSpec(
        _rnn_dims(sequences=(0,), states=(5, 6)), min_items=1),
    # Reduced losses whose 0-d result keeps its elementwise buffer as storage: the counter
    # sizes that output on any device (simulated._KEEPS_ELEMENTWISE_BUFFER); calibrated here
    # for the second, transient buffer the CPU kernels allocate, and soft_margin's backward.
    **{op: KernelSpec(_dim0(0, 1), min_items=1)
       for op in (_aten.mse_loss.default, _aten.smooth_l1_loss.default,
                  _aten.soft_margin_loss.default, _aten.binary_cross_entropy.default)},
    _aten.soft_margin_loss_backward.default: KernelSpec(_dim0(1, 2, 0), min_items=1),
    # A mean of bf16/fp16 on the CPU reduces an fp32 copy of its whole input, made inside the
    # kernel (2x the input's bytes): nn.MultiheadAttention's averaged weights and a pooled
    # output under bf16 autocast were 4.8-7.1% over the simulation at the forward's peak
    # (review). sum, var, amax and norm accumulate without a copy (measured).
    **{op: KernelSpec(_dim0(0), min_items=1,
                      applies=lambda args: args[0].dim() > 0 and args[0].dtype in REDUCED_DTYPES)
       for op in (_aten.mean.dim, _aten.mean.default)},
    _aten.mkldnn_rnn_layer_backward.default: KernelSpec(
        _rnn_dims(sequences=(0, 7, 10), states=(5, 6, 8, 9, 11, 12)), min_items=1,
        prepare=_rnn_forward_for_backward),
}

# Real memory a calibration may use. Below it the kernel runs at the exact batch; above it,
# at the two largest powers of two that fit, and the allocations are extrapolated.
CALIBRATION_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor argument without its values or its batch size (``shape`` has 1 there).

    Kernels choose code paths by layout (oneDNN convolution follows channels-last strides,
    size-one dims included), so strides and offset are kept exactly when the batch is the
    outermost dim, which makes them independent of the batch size; otherwise ``layout`` is
    the dim order only and the tensor is rebuilt densely in that order.
    """

    shape: tuple[int, ...]
    layout: tuple[Any, ...]  # ("strides", strides, offset) or ("order", dims outer to inner)
    dtype: torch.dtype
    batch_dim: Optional[int]

    def item_bytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize if self.batch_dim is not None else 0

    def real(self, items: int) -> torch.Tensor:
        shape = list(self.shape)
        if self.batch_dim is not None:
            shape[self.batch_dim] = items
        if self.layout[0] == "strides":
            _, stride, offset = self.layout
            extent = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride))
            return torch.zeros(max(extent, 1), dtype=self.dtype).as_strided(shape, stride, offset)
        order = self.layout[1]
        inverse = sorted(range(len(order)), key=lambda i: order[i])
        return torch.zeros([shape[d] for d in order], dtype=self.dtype).permute(inverse)


def _spec(value: Any, batch_dim: Optional[int], items: int) -> Any:
    if isinstance(value, torch.Tensor):
        if batch_dim is not None and (value.dim() <= batch_dim or value.shape[batch_dim] != items):
            batch_dim = None  # broadcast along the batch, or not batched at all
        return _TensorSpec(_shape_without_batch(value, batch_dim), _layout(value, batch_dim),
                           value.dtype, batch_dim)
    if isinstance(value, list):
        return tuple(value)
    return value


def _shape_without_batch(t: torch.Tensor, batch_dim: Optional[int]) -> tuple[int, ...]:
    return tuple(1 if d == batch_dim else n for d, n in enumerate(t.shape))


def _layout(t: torch.Tensor, batch_dim: Optional[int]) -> tuple[Any, ...]:
    stride = t.stride()
    others = 1 + sum((n - 1) * st for d, (n, st) in enumerate(zip(t.shape, stride))
                     if d != batch_dim)  # elements one batch item spans
    # Exact when the batch is outermost, or broadcast (stride 0, e.g. the expanded gradient
    # of a sum): kernels copy such tensors, and that copy is part of their cost.
    if batch_dim is None or t.shape[batch_dim] == 1 or stride[batch_dim] == 0 \
            or stride[batch_dim] >= others:
        return ("strides", tuple(stride), t.storage_offset())
    return ("order", stride_order(t))


def _build(spec: Any, items: int) -> Any:
    if isinstance(spec, _TensorSpec):
        return spec.real(items)
    if isinstance(spec, tuple):
        return list(spec)
    return spec


@lru_cache(maxsize=512)
def _kernel_run(
    func: Any, args: tuple, kwargs: tuple, items: int, threads: int, grad_enabled: bool
) -> tuple:
    """(allocator deltas, output storage bytes) of one run of ``func`` on real zeros with
    ``items`` in the batch. The last two arguments only key the cache: per-thread buffers
    scale with ``threads``, and oneDNN's LSTM keeps its workspace only with grad enabled."""
    real_args = [_build(a, items) for a in args]
    real_kwargs = {k: _build(v, items) for k, v in kwargs}
    prepare = KERNELS[func].prepare
    if prepare is not None:
        prepare(real_args)
    with allocator_log() as deltas:
        out = func(*real_args, **real_kwargs)
        flat = tree_flatten(out)[0]
        outputs = tuple(t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else 0
                        for t in flat)
        orders = tuple(dim_order(t) for t in flat)
        del out, flat  # freed inside the window, as in the step; the replay only needs the max
    return tuple(deltas), outputs, orders


def _affine(lo: Sequence[int], hi: Sequence[int], n_lo: int, n_hi: int, items: int) -> list[int]:
    return [a + round((b - a) * (items - n_lo) / (n_hi - n_lo)) for a, b in zip(lo, hi)]


def extrapolate(lo: tuple, hi: tuple, n_lo: int, n_hi: int, items: int) -> KernelCost:
    """The cost at ``items`` from runs at ``n_lo`` < ``n_hi``, each allocation and output
    affine in the batch. If the runs allocate differently (the kernel changed algorithm),
    the high-water mark itself is extrapolated instead."""
    (deltas_lo, outputs_lo, _), (deltas_hi, outputs_hi, orders) = lo, hi
    outputs = tuple(_affine(outputs_lo, outputs_hi, n_lo, n_hi, items))
    if len(deltas_lo) == len(deltas_hi):
        return KernelCost(high_water(_affine(deltas_lo, deltas_hi, n_lo, n_hi, items)), outputs,
                          orders)
    marks = _affine([high_water(deltas_lo)], [high_water(deltas_hi)], n_lo, n_hi, items)
    return KernelCost(marks[0], outputs, orders)


def calibration_items(items: int, item_bytes: int, min_items: int) -> tuple[int, ...]:
    """Batch sizes to run a kernel at: ``items`` itself if affordable, else the two largest
    powers of two that are (never below ``min_items``)."""
    # Inputs, outputs, gradients and scratch are each about the size of the batched inputs.
    affordable = CALIBRATION_BUDGET_BYTES // max(1, 4 * item_bytes)
    if items <= max(affordable, 2 * min_items):
        return (items,)
    hi = 2 * min_items
    while hi * 2 <= affordable:
        hi *= 2
    return (hi // 2, hi)


_ATTENTION = (_aten._scaled_dot_product_flash_attention_for_cpu.default,
              _aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
# Sequences longer than this calibrate CPU flash attention at two shorter lengths. From 768
# tokens on its blocks are a fixed size (256 queries x 512 keys), and what it allocates is
# affine in the length: checked from 1,024 to 8,192 tokens, fp32 and bf16, forward and
# backward, the runs at 2,048 and 4,096 give those at 8,192 to the byte
# (tests/test_memory_simulated.py). A real run at the full length costs its length squared: a
# check at 100,000 tokens did not finish in 5 minutes (review).
ATTENTION_CALIBRATION_TOKENS = (2048, 4096)


def _resized(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """A meta tensor like ``t`` (dtype, dim order) with ``n`` along ``dim``."""
    order = stride_order(t)  # outer to inner
    shape = [n if d == dim else t.shape[d] for d in order]
    return torch.empty(shape, dtype=t.dtype, device="meta").permute(
        [order.index(d) for d in range(t.dim())])


def _attention_by_length(func: Any, args: Sequence[Any], kwargs: dict
                         ) -> Optional[KernelCost]:
    """CPU flash attention on a long sequence (self-attention, no mask), from its cost at
    ``ATTENTION_CALIBRATION_TOKENS`` extrapolated affinely in the length; None where that
    does not apply (short, masked or cross-attention: the exact calibration runs)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if (kwargs.get("attn_mask") is not None or len(tensors) < 3
            or any(t.dim() < 3 for t in tensors)):
        return None
    length = tensors[0].shape[2]
    if length <= ATTENTION_CALIBRATION_TOKENS[1] or any(t.shape[2] != length
                                                         for t in tensors):
        return None
    runs = []
    for n in ATTENTION_CALIBRATION_TOKENS:
        short = [_resized(a, 2, n) if isinstance(a, torch.Tensor) else a for a in args]
        cost = kernel_cost(func, short, kwargs)
        if cost is None:
            return None
        runs.append(cost)
    (lo, hi), (n_lo, n_hi) = runs, ATTENTION_CALIBRATION_TOKENS
    mark = _affine([lo.high_water_bytes], [hi.high_water_bytes], n_lo, n_hi, length)[0]
    return KernelCost(mark, tuple(_affine(lo.output_bytes, hi.output_bytes, n_lo, n_hi,
                                          length)), hi.output_orders)


def kernel_cost(func: Any, args: Sequence[Any], kwargs: dict) -> Optional[KernelCost]:
    """What the real CPU kernel for ``func`` allocates for arguments shaped like ``args``
    (fake tensors are fine); None for kernels the simulation can trust to meta, or if the
    kernel cannot be run."""
    spec = KERNELS.get(func)
    if spec is None or (spec.applies is not None and not spec.applies(args)):
        return None
    if func in _ATTENTION:
        by_length = _attention_by_length(func, args, kwargs)
        if by_length is not None:
            return by_length
    dims = spec.batch_dims(args)
    key, dim = next(iter(dims.items()))
    items = (args[key] if isinstance(key, int) else kwargs[key]).shape[dim]
    arg_specs = tuple(_spec(a, dims.get(i), items) for i, a in enumerate(args))
    kw_specs = tuple((k, _spec(v, dims.get(k), items)) for k, v in sorted(kwargs.items()))
    item_bytes = sum(s.item_bytes() for s in tree_flatten([arg_specs, kw_specs])[0]
                     if isinstance(s, _TensorSpec))
    if spec.output_item_bytes is not None:
        item_bytes += spec.output_item_bytes(args)
    sizes = calibration_items(items, item_bytes, spec.min_items)
    try:
        runs = [_run_outside_modes(func, arg_specs, kw_specs, n) for n in sizes]
    except Exception as exc:  # the kernel then counts as its meta outputs only
        warnings.warn(f"bsselect: could not run {func} for real to measure its scratch, so it "
                      f"is not counted: {one_line(exc)}", RuntimeWarning, stacklevel=2)
        return None
    if len(sizes) == 1:
        deltas, outputs, orders = runs[0]
        return KernelCost(high_water(deltas), outputs, orders)
    return extrapolate(runs[0], runs[1], sizes[0], sizes[1], items)


def _run_outside_modes(func: Any, args: tuple, kwargs: tuple, items: int) -> tuple:
    from torch.utils._python_dispatch import _disable_current_modes

    # Called from inside the simulation's dispatch: the fake mode must not see these tensors.
    # Grad mode stays as the step has it: oneDNN's LSTM keeps its workspace only when it is on.
    with _disable_current_modes():
        return _kernel_run(func, args, kwargs, items, torch.get_num_threads(),
                           torch.is_grad_enabled())
