"""Memory that kernels hold beside their outputs, which fake tensors do not show: formulas
read from the kernels' source and checked against the CPU allocator
(tests/test_memory_simulated.py).

- framework scratch on every device (``FRAMEWORK_SCRATCH``): the int64 indices of boolean-mask
  indexing, CTC's beta table, the contiguous copies a matmul makes of operands BLAS cannot take;
- CPU-only terms: pointwise ops' dtype-promotion casts (``cpu_promotion_casts``),
  ``masked_select``'s mask copies (``cpu_masked_select_mark``);
- CUDA-only terms: ``masked_select``'s ``nonzero`` indices (``cuda_masked_select_indices``).

Kernels whose scratch no formula captures are run for real on a small batch instead
(``calibration.KERNELS``). The counter that adds these terms is ``simulated.LiveStorageCounter``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
from torch.utils._python_dispatch import _disable_current_modes

from ..precision import REDUCED_DTYPES
from .values import is_fake


def _ctc_backward_scratch(args: tuple) -> int:
    """CTC's backward (CPU and CUDA kernels alike) computes its beta table in a tensor shaped
    like the forward's alpha table, (batch, input length, 2 * target length + 1), allocated
    and freed inside the kernel beside the gradient it returns: 22-42% of a small CTC head's
    step (review)."""
    log_alpha = args[6]
    return log_alpha.numel() * log_alpha.element_size()


def _gemm_ready(t: torch.Tensor) -> bool:
    """Whether BLAS takes the matrix ``t`` as it is: one unit stride and a leading dimension
    at least the other's size (``addmm_impl_cpu_``; cuBLAS's ``prepare_matrix_for_cublas``
    alike). Otherwise the kernel first copies it contiguous."""
    if t.dim() != 2:
        return True
    (rows, cols), (s_row, s_col) = t.shape, t.stride()
    return (s_col == 1 and s_row >= max(1, cols)) or (s_row == 1 and s_col >= max(1, rows))


def _gemm_copies(first: int) -> Callable[[tuple], int]:
    """The contiguous copies a matmul kernel makes of operands ``args[first:first + 2]`` that
    BLAS cannot take as they are: a Linear on ``x[:, ::2]`` copies its input in the forward
    and in the weight gradient, 9.9% of the step at b=1,024 (review)."""
    def copies(args: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in args[first:first + 2]
                   if isinstance(t, torch.Tensor) and not _gemm_ready(t))
    return copies


def bool_index_bytes(args: tuple) -> int:
    """The indices an indexing op makes of its boolean masks (``h[mask]``,
    ``loss[mask]``, and the ``index_put_`` of their gradient): ``expandTensors`` replaces each
    mask by ``nonzero()``, an int64 per mask dimension per true element, alive while the
    kernel runs, on every device (measured on the CPU's ``index`` and ``index_put_``). Per
    token of a (B, T) mask that is 16 bytes: 4x a selected per-token float loss, and a model
    selecting 2-wide features was 15-23% low without it (review). Masks are real in the
    simulation (their values decide the shapes); a fake one counts nothing."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    total = 0
    for t in indices:
        if (isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                and not is_fake(t)):
            with _disable_current_modes():
                total += 8 * max(t.dim(), 1) * int(torch.count_nonzero(t))
    return total


_BOOL_INDEXED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                 torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default}

# Tensors a kernel allocates through the framework's allocator on every device and frees
# before it returns (so no op returns them): bytes above the op's outputs while it runs.
FRAMEWORK_SCRATCH: dict[Any, Callable[[tuple], int]] = {
    **{op: bool_index_bytes for op in _BOOL_INDEXED},
    **{op: _ctc_backward_scratch for op in (torch.ops.aten._ctc_loss_backward.default,
                                            torch.ops.aten._ctc_loss_backward.Tensor)},
    torch.ops.aten.mm.default: _gemm_copies(0), torch.ops.aten.addmm.default: _gemm_copies(1),
    # in place: conv_tbc's backward adds a stride-0 gradient's slices into its results
    torch.ops.aten.addmm_.default: _gemm_copies(1)}


_NOT_PROMOTED = {"condition", "mask"}  # where's and masked_fill's: read as bool, never cast
# A number passed as ``other`` (``x * 0.5`` is ``mul.Scalar``) is wrapped in a 0-d tensor
# like a number in a Tensor argument; an ``exponent`` or a clamp bound is not wrapped but takes
# part in the type promotion (an int tensor to a float power is cast first). Measured against
# the CPU allocator on 18 ops over float32, bfloat16, int64 and bool tensors (test).
_NUMBER_OPERANDS = {"other"}
_PROMOTING_NUMBERS = {"exponent", "min", "max"}
_TRUE_DIVISION = {"aten::div", "aten::div_", "aten::true_divide", "aten::true_divide_"}


def cpu_promotion_casts(func: Any, args: tuple, kwargs: dict) -> int:
    """Bytes the CPU's TensorIterator allocates inside a pointwise op whose operands differ in
    dtype: CPU loops compute in one dtype, so each operand of another dtype is first copied to
    the common one (``TensorIteratorBase::compute_types``: ``op.tensor().to(common_dtype)``),
    a Python number in a Tensor argument is wrapped (8 bytes) and cast too, and an in-place or
    out= result of another dtype is computed into a temporary of the common dtype and copied
    back. All are freed when the op returns; meta kernels (fake tensors) do none of it.
    Under autocast this is every residual add of a float32 stream and a bf16 branch."""
    if torch.Tag.pointwise not in func.tags:
        return 0
    schema = func._schema
    operands, numbers, wrapped = [], [], []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.name in _NOT_PROMOTED or arg.kwarg_only or value is None \
                or not isinstance(value, (torch.Tensor, bool, int, float)):
            continue
        if isinstance(value, torch.Tensor):
            operands.append(value)
        elif isinstance(arg.type, torch.TensorType) or (
                isinstance(arg.type, torch.NumberType) and arg.name in _NUMBER_OPERANDS):
            numbers.append(value)  # wrapped in a 0-d tensor, which takes part in the promotion
            wrapped.append(value)
        elif isinstance(arg.type, torch.NumberType) and arg.name in _PROMOTING_NUMBERS:
            numbers.append(value)
    if not operands or (len(operands) == 1 and not numbers):
        return 0
    try:
        _, common = elementwise_dtypes(*operands, *numbers, type_promotion_kind=(
            ELEMENTWISE_TYPE_PROMOTION_KIND.INT_TO_FLOAT  # true division of integers
            if func._schema.name in _TRUE_DIVISION and kwargs.get("rounding_mode") is None
            else ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT))
    except Exception:  # noqa: BLE001 - a combination the helper rejects: count nothing
        return 0
    scratch = sum(t.numel() * common.itemsize for t in operands if t.dtype != common)
    for n in wrapped:  # wrapped as a 0-d double / long / bool tensor, then cast
        dtype = (torch.bool if isinstance(n, bool) else
                 torch.int64 if isinstance(n, int) else torch.float64)
        scratch += dtype.itemsize + (common.itemsize if dtype != common else 0)
    if torch.Tag.inplace in func.tags and operands[0].dtype != common:
        scratch += operands[0].numel() * common.itemsize  # the result, then copied back
    return scratch


_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: CPU kernels below it run on one thread


def cpu_layer_norm_backward_buffers(args: tuple) -> int:
    """Bytes layer norm's CPU backward holds beside its outputs: the weight's and the bias's
    gradients are summed in two rows of the normalised size a thread, in the input's dtype,
    when either is asked for. 128 bytes for 16 features at one thread in float32, 12 KB for
    768 at two (measured); a small bf16 model's backward was 1.3% low (fuzz)."""
    x, shape, mask = args[1], args[2], args[7]
    if not (mask[1] or mask[2]):
        return 0
    return 2 * math.prod(shape) * torch.get_num_threads() * x.dtype.itemsize


def cpu_masked_select_mark(args: tuple, out: torch.Tensor) -> int:
    """Bytes above what was live before it that ``masked_select``'s CPU kernel reaches
    (``masked_select_out_impl_cpu``). It counts the mask's true elements with ``sum``, which
    reduces a long copy of the mask at the broadcast shape (8 bytes an element, the 8-byte
    count, and on several threads a partial sum per thread). Then, unless it runs serially
    (one thread or ``self`` under GRAIN_SIZE elements, and both operands contiguous at the
    broadcast shape), it keeps the mask as longs and their prefix sum (16 bytes an element)
    beside the output while it gathers: a (B, T, 1) mask on a (B, T, D) float32 activation
    takes 4x the activation. Unmodelled, a
    token-selecting model's step was 13-30% over the simulation and ``check`` answered 30
    where 24 fits (review). CUDA's kernel is ``nonzero`` and ``index``: not this."""
    source, mask = args[0], args[1]
    shape = torch.broadcast_shapes(source.shape, mask.shape)
    n = math.prod(shape)
    threads = torch.get_num_threads()
    counted = 8 * n + 8 + (8 * threads if threads > 1 and n >= _GRAIN_SIZE else 0)
    out_bytes = out.numel() * out.element_size()
    if out_bytes == 0:
        return counted
    serial = ((source.numel() < _GRAIN_SIZE or threads == 1)
              and all(t.shape == shape and t.is_contiguous() for t in (source, mask)))
    return max(counted, out_bytes + (0 if serial else 16 * n))


def cuda_masked_select_indices(args: tuple, out: torch.Tensor) -> int:
    """Bytes ``masked_select`` holds beside its output on CUDA, at least: its CUDA kernel is
    ``index(self, [mask])`` at the broadcast shape, and indexing by a boolean mask first turns
    the mask into ``nonzero()``'s indices, an int64 per dimension for every selected element
    (device-generic ``expandTensors``; the CPU's ``index`` allocates exactly this: 6x a
    float32 output under a 3-d mask). cub's own temporary storage in CUDA's ``nonzero`` is
    not counted (not measured here: no GPU)."""
    ndim = len(torch.broadcast_shapes(args[0].shape, args[1].shape))
    return 8 * max(ndim, 1) * out.numel()


# Autograd nodes of a reduction of a whole tensor to one of its elements (``h.max()``,
# ``h.min()``, ``h.median()``, ``h.nanmedian()``): their backward is
# ``evenly_distribute_backward``, which takes another branch on fake tensors
# (``isTensorSubclassLike``, as ``_COPIED_ON_FAKE``'s formulas do).
EVENLY_DISTRIBUTED_NODES = frozenset(
    {"MaxBackward1", "MinBackward1", "MedianBackward0", "NanmedianBackward0"})


def cpu_evenly_distributed_mark(source: torch.Tensor) -> int:
    """Bytes above what was live before it that ``evenly_distribute_backward`` reaches on the
    CPU for an input like ``source``: ``grad.new_zeros(input)`` (the result), the mask
    ``input == value`` and, inside ``mask.sum()``, an int64 copy of the mask (8 bytes an
    element) beside its 8-byte result and 16 bytes of the kernel's. The branch fake tensors
    take (``isnan``, ``logical_and``, ``eq``, then ``mask * (grad / mask.sum())``) holds 2
    bytes an element less at that point for float32: ``x / x.max()`` was 9.5% low in its
    backward (review). Equal to the allocator's mark on the CPU (tests)."""
    n = source.numel()
    return n * source.element_size() + n + 8 + 8 * n + 16


_aten = torch.ops.aten
# Norms whose CPU kernel, on a reduced-precision input with float32 affine parameters (bf16
# autocast: LayerNorm, BatchNorm and GroupNorm run on bf16 activations with fp32 weights),
# returns its saved statistics in float32 where the fake kernels return the input's dtype:
# op -> (the input's position, the parameters' positions, the statistics' output positions).
# Half-sized statistics were 0.2-0.9% low on bf16 ConvNext, Swin, Segformer and MobileNetV2,
# and batch norm's backward could not be calibrated (its kernel refuses bf16 statistics
# beside fp32 weights) (review).
CPU_NORM_DTYPES: dict[Any, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    _aten.native_layer_norm.default: (0, (2, 3), (1, 2)),
    _aten.native_batch_norm.default: (0, (1, 2), (1, 2)),
    _aten._native_batch_norm_legit.default: (0, (1, 2), (1, 2)),
    _aten._native_batch_norm_legit.no_stats: (0, (1, 2), (1, 2)),
    _aten.native_group_norm.default: (0, (1, 2), (1, 2)),
    # the fake backward returns grad_input in float32; the CPU's is the input's dtype
    _aten.native_group_norm_backward.default: (1, (4,), ()),
}


# Norms whose CUDA kernel keeps its saved statistics in float32 for a reduced-precision input
# whatever the parameters' dtype (``layer_norm_cuda`` allocates mean and rstd in the
# accumulate type), where the fake kernel of this CPU's fake tensors gives the input's dtype:
# torch's reference ``native_layer_norm`` converts them to the input's dtype on the CPU only
# (tested). A bf16 model's LayerNorm was 4 bytes a row low under ``--target cuda``.
# op -> (the input's position, the statistics' output positions).
CUDA_NORM_STATS: dict[Any, tuple[int, tuple[int, ...]]] = {
    _aten.native_layer_norm.default: (0, (1, 2)),
}


def cuda_norm_dtypes(func: Any, args: tuple, out: Any) -> Any:
    """``out`` with the float32 statistics CUDA's kernel keeps (``CUDA_NORM_STATS``)."""
    source, stats = CUDA_NORM_STATS[func]
    x = args[source]
    if not (isinstance(x, torch.Tensor) and x.dtype in REDUCED_DTYPES
            and isinstance(out, tuple)):
        return out
    return tuple(t.to(torch.float32) if i in stats and isinstance(t, torch.Tensor) else t
                 for i, t in enumerate(out))


def cpu_norm_dtypes(func: Any, args: tuple, out: Any) -> Any:
    """``out`` with the dtypes the CPU kernel gives (``CPU_NORM_DTYPES``): float32
    statistics for a mixed-precision norm, and group norm's grad_input in the input's
    dtype. Unchanged where the input is float32 or no parameter is."""
    source, params, stats = CPU_NORM_DTYPES[func]
    x = args[source]
    mixed = (isinstance(x, torch.Tensor) and x.dtype in REDUCED_DTYPES and any(
        i < len(args) and isinstance(args[i], torch.Tensor) and args[i].dtype == torch.float32
        for i in params))
    if not mixed or not isinstance(out, tuple):
        return out
    if stats:
        return tuple(t.to(torch.float32) if i in stats and isinstance(t, torch.Tensor) else t
                     for i, t in enumerate(out))
    first = out[0]
    if isinstance(first, torch.Tensor) and first.dtype != x.dtype:
        return (first.to(x.dtype), *out[1:])
    return out
