"""The CPU allocator's own account of memory: the ground truth the simulation is checked against.

With ``profile_memory=True`` the profiler records every allocation and free of PyTorch's CPU
allocator as a ``[memory]`` event carrying a signed byte delta, including buffers that kernels
allocate inside themselves. Replaying the deltas in time order gives the live bytes at every
moment, hence the exact peak. Two conditions make the replay exact, and both are met here:
everything that is freed inside the window was allocated inside it (the profiler drops frees of
blocks it never saw allocated), so profiling starts before the batch and the model exist; and
events are ordered by their nanosecond timestamps, ties in the order they were recorded. The
replay checks itself: the bytes live when step 2 begins equal the parameters, step 1's
gradients, the optimizer state and the batch (tests/test_memory_simulated.py).

Memory that bypasses PyTorch's allocator (MKL's or oneDNN's private scratchpads, Python
objects) is not device memory in the sense docs/method.md uses, and is not counted either here or in
the simulation.

This module also measures single CPU kernels (``kernel_cost``) so the simulation can add the
scratch, and correct the outputs, that fake tensors get wrong.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._pytree import tree_flatten

from ..errors import TaskError, one_line
from ..oom import is_oom_error
from ..precision import make_scaler, parameter_dtype
from ..step import StepSettings, make_batch, train_step
from ..task import Task
from .optim_impl import run_as_on
from .fake import young_gc_only
from .simulated import Phase, StepPeak, step_peak, with_phase_marks

_STEP = "bsselect::step2"
_BACKWARD = "bsselect::backward"
_OPTIMIZER = "bsselect::optimizer"


def _mark(name: str) -> None:
    """A zero-length profiler range: its start time marks a phase boundary."""
    with record_function(name):
        pass


def allocator_deltas(events: Sequence[Any]) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocator event, in time order."""
    cpu = torch._C._autograd.DeviceType.CPU
    deltas = [(e.start_ns(), e.nbytes()) for e in events
              if e.name() == "[memory]" and e.device_type() == cpu]
    return sorted(deltas, key=lambda d: d[0])  # stable: ties keep the recording order


def _kineto_events(prof: profile) -> list[Any]:
    # Kineto's own events keep nanosecond timestamps (FunctionEvents round to microseconds,
    # which reorders an allocation and a free that happen within one).
    return prof.profiler.kineto_results.events()


def _range_ns(events: Sequence[Any], name: str) -> list[tuple[int, int]]:
    return sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == name)


def replay_phases(
    deltas: Sequence[tuple[int, int]], step: tuple[int, int], boundaries: dict[Phase, int]
) -> tuple[int, dict[Phase, int]]:
    """Live bytes when ``step`` begins and the peak live bytes in each phase of it.

    ``boundaries`` maps BACKWARD and OPTIMIZER to the time (ns) they begin; FORWARD begins with
    the step. A phase's peak includes the level it starts at.
    """
    start_ns, end_ns = step
    level = sum(d for t, d in deltas if t < start_ns)
    start_bytes = level
    peaks = {phase: 0 for phase in Phase}
    phase = Phase.FORWARD
    peaks[phase] = level
    for t, delta in deltas:
        if not start_ns <= t <= end_ns:
            continue
        now = _phase_at(t, boundaries)
        if now is not phase:
            phase = now
            peaks[phase] = max(peaks[phase], level)
        level += delta
        peaks[phase] = max(peaks[phase], level)
    return start_bytes, peaks


def _phase_at(t_ns: int, boundaries: dict[Phase, int]) -> Phase:
    if t_ns >= boundaries.get(Phase.OPTIMIZER, 1 << 63):
        return Phase.OPTIMIZER
    if t_ns >= boundaries.get(Phase.BACKWARD, 1 << 63):
        return Phase.BACKWARD
    return Phase.FORWARD


def _phase_boundaries(events: Sequence[Any], step: tuple[int, int]) -> dict[Phase, int]:
    """When (ns) backward and the optimizer step began inside ``step``, from the marks."""
    boundaries = {}
    for phase, name in ((Phase.BACKWARD, _BACKWARD), (Phase.OPTIMIZER, _OPTIMIZER)):
        starts = [s for s, _ in _range_ns(events, name) if step[0] <= s <= step[1]]
        if starts:
            boundaries[phase] = min(starts)
    return boundaries


MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, before it adapts upwards


@lru_cache(maxsize=1)
def return_freed_memory_to_the_os() -> bool:
    """Keep glibc from holding on to freed blocks (issue 13: a packed LSTM's measured probe
    grew to 14.6 GB resident for a step whose peak is 49 MB). glibc raises its mmap
    threshold each time a large block is freed, after which blocks of that size come from
    the heap and stay in the process when freed; the profiler's memory events keep the
    allocation pattern fragmented enough that they are never trimmed. Fixing the threshold
    (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_=131072`` would) returns
    every large block to the OS when it is freed. True where it was set (glibc only)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside: the profiler's C++ side prints a
    ``USDT: ... profiler_start`` / ``profiler_stop`` line to it at each start and stop, which
    would litter the tool's output (a measured probe starts it a dozen times)."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding app): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def memory_profile() -> Iterator[profile]:
    """``torch.profiler.profile`` over the CPU with memory events, started and stopped
    without the profiler's own lines on stderr (errors from inside still raise)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)


def cpu_step_peak(task: Task, batch_size: int, *, seed: int = 0,
                  settings: StepSettings = StepSettings(), inputs: Any = None) -> StepPeak:
    """Peak bytes of training step 2 at ``batch_size``, measured on the real CPU allocator.

    The same step as ``simulate_step_peak``: build the model and optimizer, run step 1 (which
    creates optimizer state), then replay the allocator's events over step 2. All
    ``settings.accumulate`` micro-steps run here (the simulation runs two). Running out of
    memory raises the allocator's own error (``oom.is_oom_error``); any other failure of the
    step, a TaskError.
    """
    return_freed_memory_to_the_os()
    with young_gc_only(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with memory_profile() as prof:
            model, optimizer, batch, impl = _real_steps(task, batch_size, seed, settings, inputs)
    events = _kineto_events(prof)
    step = _range_ns(events, _STEP)[0]
    boundaries = _phase_boundaries(events, step)
    start_bytes, peaks = replay_phases(allocator_deltas(events), step, boundaries)
    # kernel_workspace_bytes stays None: the allocator cannot tell scratch from tensors.
    peak = step_peak(batch_size, model, optimizer, batch, start_bytes, peaks)
    return dataclasses.replace(peak, precision=settings.precision.value,
                               accumulate=settings.accumulate, optimizer_impl=impl.value,
                               parameter_dtype=parameter_dtype(model))


def _real_steps(task: Task, batch_size: int, seed: int, settings: StepSettings,
                inputs: Any) -> tuple[Any, Any, Any, Any]:
    try:
        batch = make_batch(task, batch_size, seed, inputs)
        model = task.model().train()  # a training step, as the simulation's (fake.py)
        if settings.shard is not None:  # one rank of a real FSDP2 run (under torchrun)
            from torch.distributed.device_mesh import init_device_mesh

            from .sharded import shard

            plan = settings.shard
            shard(model, plan, init_device_mesh("cpu", (plan.world_size,)) if plan.fsdp
                  else None)
        optimizer = task.make_optimizer(model.parameters(), task.lr)
        impl = run_as_on(optimizer, settings.target_device or "cpu")
        precision = settings.autocast_precision()
        options = dict(precision=precision, accumulate=settings.accumulate,
                       scaler=make_scaler(precision, "cpu"))
        marked, handles = with_phase_marks(
            task, optimizer, lambda: _mark(_BACKWARD), lambda: _mark(_OPTIMIZER)
        )
        x, y = batch
        train_step(model, optimizer, marked, x, y, **options)
        gc.collect()
        with record_function(_STEP):
            train_step(model, optimizer, marked, x, y, **options)
    except Exception as exc:
        if is_oom_error(exc):  # the caller's to handle: an OOM ends a measured series
            raise
        raise TaskError(
            f"the CPU training step at batch size {batch_size} failed: {one_line(exc)}"
        ) from exc
    for handle in handles:
        handle.remove()
    return model, optimizer, batch, impl


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
_REDUCED = (torch.bfloat16, torch.float16)
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
        applies=lambda args: args[first].dtype in _REDUCED,
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
                      applies=lambda args: args[0].dim() > 0 and args[0].dtype in _REDUCED)
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
    return ("order", tuple(sorted(range(t.dim()), key=lambda d: (-stride[d], d))))


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
        outputs = tuple(t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else 0
                        for t in tree_flatten(out)[0])
        del out  # freed inside the window, as in the step; the replay only needs the maximum
    return tuple(deltas), outputs


@contextmanager
def allocator_log() -> Iterator[list[int]]:
    """The CPU allocator's signed byte deltas while inside, in the order they happened.

    This uses the legacy (non-kineto) profiler: it starts in microseconds, where the first
    kineto session in a process takes seconds, and each thread's events come in recording
    order. It gives the same deltas as kineto for every kernel in ``KERNELS`` (checked against
    ``cpu_step_peak`` by the tests)."""
    from torch.autograd import _disable_profiler_legacy, _enable_profiler_legacy
    from torch.autograd.profiler_legacy import profile as legacy_profile

    deltas: list[int] = []
    _enable_profiler_legacy(legacy_profile(profile_memory=True).config())
    try:
        yield deltas
    finally:
        records = _disable_profiler_legacy()
        events = [(e.start_us(), thread, i, e.cpu_memory_usage())
                  for thread, events in enumerate(records) for i, e in enumerate(events)
                  if e.kind() == "memory_alloc"]
        deltas += [d for *_, d in sorted(events)]


def high_water(deltas: Sequence[int]) -> int:
    """The maximum of the running sum of ``deltas`` (and 0)."""
    level = peak = 0
    for d in deltas:
        level += d
        peak = max(peak, level)
    return peak


def _affine(lo: Sequence[int], hi: Sequence[int], n_lo: int, n_hi: int, items: int) -> list[int]:
    return [a + round((b - a) * (items - n_lo) / (n_hi - n_lo)) for a, b in zip(lo, hi)]


def extrapolate(lo: tuple, hi: tuple, n_lo: int, n_hi: int, items: int) -> KernelCost:
    """The cost at ``items`` from runs at ``n_lo`` < ``n_hi``, each allocation and output
    affine in the batch. If the runs allocate differently (the kernel changed algorithm),
    the high-water mark itself is extrapolated instead."""
    (deltas_lo, outputs_lo), (deltas_hi, outputs_hi) = lo, hi
    outputs = tuple(_affine(outputs_lo, outputs_hi, n_lo, n_hi, items))
    if len(deltas_lo) == len(deltas_hi):
        return KernelCost(high_water(_affine(deltas_lo, deltas_hi, n_lo, n_hi, items)), outputs)
    marks = _affine([high_water(deltas_lo)], [high_water(deltas_hi)], n_lo, n_hi, items)
    return KernelCost(marks[0], outputs)


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
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))  # outer to inner
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
                                          length)))


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
        deltas, outputs = runs[0]
        return KernelCost(high_water(deltas), outputs)
    return extrapolate(runs[0], runs[1], sizes[0], sizes[1], items)


def _run_outside_modes(func: Any, args: tuple, kwargs: tuple, items: int) -> tuple:
    from torch.utils._python_dispatch import _disable_current_modes

    # Called from inside the simulation's dispatch: the fake mode must not see these tensors.
    # Grad mode stays as the step has it: oneDNN's LSTM keeps its workspace only when it is on.
    with _disable_current_modes():
        return _kernel_run(func, args, kwargs, items, torch.get_num_threads(),
                           torch.is_grad_enabled())
