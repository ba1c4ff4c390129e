"""Simulated peak memory of one training step: fake tensors plus a live-storage counter.

The step runs on FakeTensors (meta-backed: shapes, dtypes and strides, no data) whose device
is ``cpu``, under a ``TorchDispatchMode`` that adds a storage's ``nbytes`` when an op first
returns it and subtracts them when the storage dies (a weak-reference callback, as in
``torch/distributed/_tools/mem_tracker.py``). Views and in-place results share a storage and
are counted once. Nothing is allocated for real except the batch, which is collated for real
(so padding collate_fns give the true shapes) and then converted.

Why fake ``cpu`` rather than raw ``meta``: dispatch decisions that depend on the device run as
they would on the CPU. ``F.scaled_dot_product_attention`` on ``meta`` takes the math path and
materialises the (T x T) attention matrix (+17% on ``tiny-lm``); on fake ``cpu`` it picks the
CPU flash kernel, like the real step. Do not fake ``cuda`` with a CPU-only torch: autograd
aborts the process (docs/method.md, "Simulated").

What fake tensors cannot see is scratch that CPU kernels allocate inside themselves (oneDNN
convolution reorders, flash-attention buffers), and a few meta kernels get an output's size
wrong (oneDNN's LSTM workspace). ``kernel_workspace=True`` takes both from
``calibration.kernel_cost``, which runs those few kernels for real on small inputs.

The fake model and batch are built in fake.py; this module counts what the step does with
them.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import CannotSimulate, TaskError, UsageError, one_line
from ..precision import Precision, make_scaler, parameter_dtype
from ..step import StepSettings, train_step
from ..task import Task
from .optim_impl import run_as_on
from .scratch import (CPU_NORM_DTYPES, CUDA_NORM_STATS, EVENLY_DISTRIBUTED_NODES,
                      FRAMEWORK_SCRATCH, cpu_evenly_distributed_mark, cpu_masked_select_mark,
                      cpu_layer_norm_backward_buffers, cpu_norm_dtypes, cpu_promotion_casts,
                      cuda_masked_select_indices, cuda_norm_dtypes)
from .layout import mixed_layout, standard_layout, with_real_layout
from .fake import build_fake_model, fake_batch_leaf, new_fake_mode, real_batch, young_gc_only
from .live import (live_at_step_start, local, module_tensors, optimizer_state_tensors,
                   storage_bytes)
from .values import IndexOutOfRange, refusal_behind, values_where_known


class Phase(str, Enum):
    """The part of the step in which memory peaked."""

    FORWARD = "forward"  # zero_grad, forward and loss
    BACKWARD = "backward"  # from the first backward node to the optimizer step
    OPTIMIZER = "optimizer"  # optimizer.step()


@dataclass(frozen=True)
class StepPeak:
    """Peak memory of training step 2 (step 1 has created the optimizer state), in bytes.

    ``peak_bytes`` is the maximum of live tensor-storage bytes during step 2: parameters,
    optimizer state, the batch, gradients, activations and temporaries (and, when modelled,
    kernel scratch). ``start_bytes`` is what is live when step 2 begins (it still holds step 1's
    gradients, which ``zero_grad(set_to_none=True)`` frees). The three ``*_peak_bytes`` are the
    peaks within each phase; ``peak_bytes`` is their maximum.

    ``rounded_peak_bytes`` (simulation only) is the peak of the same tensors with each storage
    rounded up to the CUDA caching allocator's 512-byte block and without CPU kernel scratch:
    what ``torch.cuda.max_memory_allocated`` would count for them (other CUDA terms, such as
    cuBLAS/cuDNN workspaces and fragmentation, are not in it).
    """

    batch_size: int
    peak_bytes: int
    param_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    start_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    peak_phase: Phase
    kernel_workspace_bytes: Optional[int] = None  # modelled CPU kernel scratch in peak_bytes
    rounded_peak_bytes: Optional[int] = None
    precision: str = "fp32"
    accumulate: int = 1           # micro-steps per optimizer step
    optimizer_impl: Optional[str] = None  # for-loop | foreach | fused, as the step ran it
    parameter_dtype: str = "float32"  # of the trainable parameters (and so their gradients)
    grad_bytes: Optional[int] = None  # the gradients live between steps (this rank's shard)
    recomputes: bool = False  # activation checkpointing recomputed a forward in the backward


def with_phase_marks(
    task: Task,
    optimizer: torch.optim.Optimizer,
    on_backward: Callable[[], None],
    on_optimizer: Callable[[], None],
    on_graph: Optional[Callable[[Any], None]] = None,
) -> tuple[Task, list[Any]]:
    """A copy of ``task`` whose loss calls ``on_backward`` when its backward begins, and
    hook handles that call ``on_optimizer`` before ``optimizer.step``. Remove the handles
    when done. Shared by the simulation and the CPU truth so both split phases alike.
    ``on_graph`` (the simulation's) gets the loss's ``grad_fn`` when the loss is computed."""

    def loss_fn(output: Any, target: Any) -> torch.Tensor:
        loss = task.loss_fn(output, target)
        if isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            loss.grad_fn.register_prehook(lambda grad_outputs: on_backward())
            if on_graph is not None:
                on_graph(loss.grad_fn)
        return loss

    handles = []
    if hasattr(optimizer, "register_step_pre_hook"):
        handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: on_optimizer()))
    return dataclasses.replace(task, loss_fn=loss_fn), handles


# One text for both: --shard has no measured method, real steps measure one device (review).
SIMULATION_HINT = (" (if the step runs for real, it is the simulation that cannot run it: "
                   "`bsselect probe --method measured` measures it with real steps, on one "
                   "device, unsharded)")
_METADATA_OPS = (torch.ops.prim.device.default,)  # queries that never allocate
_ACCUMULATE = torch.ops.aten.add.Tensor  # the autograd engine's gradient sum, out of place
# Backward formulas that take a functional branch for tensor subclasses, fake tensors
# included (``isTensorSubclassLike`` in FunctionsManual.cpp), and write in place into a fresh
# buffer otherwise: the gradient of ``h[mask]`` is ``zeros.index_put(...)`` on fake tensors,
# ``zeros.index_put_(...)`` for real (+27-43% on a masked-token model without this), and that
# of ``masked_select`` ``zeros.masked_scatter(...)`` against ``masked_scatter_`` (+8-12%);
# that of ``max(dim)``, ``median(dim)``, ``kthvalue``, ``sort`` and ``topk``
# (``value_selecting_reduction_backward``) ``zeros.scatter(...)`` against ``scatter_``, and
# ``gather``'s ``zeros.scatter_add(...)`` against ``scatter_add_`` (+0.8% to +77%, review);
# ``index_select``'s ``zeros.index_add(...)`` against ``index_add_`` (+30-38%, fuzz).
_COPIED_ON_FAKE = {torch.ops.aten.index_put.default, torch.ops.aten.masked_scatter.default,
                   torch.ops.aten.scatter.src, torch.ops.aten.scatter_add.default,
                   torch.ops.aten.index_add.default}
# F.linear on an input it cannot fold into one addmm (3-D and non-contiguous: the transposed
# output of nn.MultiheadAttention(batch_first=True)) computes matmul, then adds the bias in
# place for real (``output.add_(bias)``) and out of place for a tensor subclass (a fake bias):
# +8-11% on an MHA model at the end of its forward without this (review).
_LINEAR_FUNCS = (torch._C._nn.linear,)
# Reduced losses whose 0-d result keeps the elementwise buffer it was reduced from as its
# storage (the shared structured or composite kernel computes into the output, then resizes
# it to 0-d), alive as long as the loss: 10-28% low on regression steps without this (review).
# Checked against the CPU allocator; the kernels are the same code on CUDA.
_KEEPS_ELEMENTWISE_BUFFER = {torch.ops.aten.mse_loss.default,
                             torch.ops.aten.smooth_l1_loss.default,
                             torch.ops.aten.soft_margin_loss.default,
                             torch.ops.aten.binary_cross_entropy.default}
_BIAS_ADD = torch.ops.aten.add.Tensor
# Ops whose kernels allocate scratch no op returns, not yet calibrated (calibration.KERNELS):
# the step is not simulated rather than answered low (review: nn.EmbeddingBag's backward,
# -26.6% in mode mean, -36.6% with per_sample_weights at b=2,048; "fits" where it did not).
_UNSIZED_SCRATCH = {getattr(torch.ops.aten, name).default for name in (
    "_embedding_bag_backward", "_embedding_bag_dense_backward",
    "_embedding_bag_per_sample_weights_backward") if hasattr(torch.ops.aten, name)}


def _summable_in_place(old: Any) -> bool:
    """Whether the autograd engine sums a second gradient into ``old`` in place
    (``can_accumulate_inplace`` in input_buffer.cpp): not where ``old`` shares its storage
    with another tensor, as a view of its base does (a weight's gradient through ``W.t()``):
    then the sum is a new buffer beside the old, for real too."""
    return isinstance(old, torch.Tensor) and not old._is_view()


class NotSimulated(RuntimeError):
    """The step does something whose memory the simulation cannot size: it becomes
    ``CannotSimulate``, and ``probe --method auto`` measures real steps."""


class SparseNotSimulated(NotSimulated):
    """The simulated step made a sparse tensor."""


class ScratchNotSimulated(NotSimulated):
    """The step runs an op whose kernel scratch is not calibrated (``_UNSIZED_SCRATCH``)."""


CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to this


def cuda_rounded(nbytes: int) -> int:
    """Bytes the CUDA caching allocator books for an ``nbytes`` storage (0 stays 0)."""
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


class LiveStorageCounter(TorchDispatchMode):
    """Counts the bytes of live tensor storages returned by ops, and their peak per phase.

    ``kernel_cost`` (optional) maps an op call to what its real CPU kernel allocates (a
    ``calibration.KernelCost``: high-water mark above what was live before the call, outputs
    and scratch together, and each output's real size); for other ops it returns None and
    they count as their fake outputs.
    """

    def __init__(self, kernel_cost: Optional[Callable[..., Any]] = None,
                 cuda: bool = False) -> None:
        super().__init__()
        self._cuda = cuda  # the step will run on CUDA (``cuda_masked_select_indices``)
        self.live_bytes = 0
        self.phase = Phase.FORWARD
        self.phase_peak_bytes = {phase: 0 for phase in Phase}
        self.workspace_at_peak_bytes: dict[Phase, int] = {phase: 0 for phase in Phase}
        self.live_rounded_bytes = 0  # framework tensors only, each rounded to CUDA's block
        self.rounded_peak_bytes = 0
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes counted, for live storages
        self._fake_nbytes: dict[int, int] = {}  # id(storage) -> its nbytes when last seen
        self._refs: dict[int, weakref.ref] = {}
        self._kernel_cost = kernel_cost
        self._between_nodes = False  # the autograd engine runs between two nodes' apply
        self._end_queued = False  # _backward_ends is queued for the running backward
        self._in_linear = 0  # inside F.linear (``LinearCalls``): its bias add is in place
        self._deferred: Optional[tuple[int, int]] = None  # (level, input storage): _settle
        self._evenly_distributed = False  # an EVENLY_DISTRIBUTED_NODES node is starting

    @property
    def cpu_target(self) -> bool:
        """The step will run on this CPU: its kernels' own terms apply (calibrations on)."""
        return self._kernel_cost is not None and not self._cuda

    def watch_graph(self, root: Any) -> None:
        """Hook every node of the backward graph under ``root``, so that the counter knows
        when the autograd engine works between two nodes: there it sums the gradients that
        reach one tensor from several uses. A real run sums them in place (``old.add_(new)``,
        no new memory); on fake tensors, as under any dispatch mode, autograd takes the
        out-of-place ``old + new`` (``isTensorSubclassLike``), which would count a gradient's
        bytes more at that moment (+19–25% on a packed LSTM). Such a sum is noted as a peak
        only if the old buffer outlives it (``_settle``); when it dies right after, as it
        does when a real run sums in place, the level is the real one again."""
        seen: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            node.register_prehook(self._node_starts)
            node.register_hook(self._node_ends)
            if self._kernel_cost is not None and node.name() in EVENLY_DISTRIBUTED_NODES:
                node.register_prehook(self._evenly_distributed_starts)
            stack.extend(child for child, _ in node.next_functions)

    def _settle(self) -> None:
        """Note the level after an op that a real run does in place (see watch_graph and
        _COPIED_ON_FAKE) only if its input outlived it: then the copy is real too."""
        if self._deferred is not None:
            level, key = self._deferred
            self._deferred = None
            if key in self._bytes:
                self.note(level)

    def __exit__(self, *exc: Any) -> Any:
        self._settle()
        return super().__exit__(*exc)

    def _node_starts(self, grad_outputs: Any) -> None:
        self._between_nodes = False
        if not self._end_queued:  # once per backward: the engine's callback at its end
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _evenly_distributed_starts(self, grad_outputs: Any) -> None:
        """The node's first op will be ``isnan`` of the reduced input: note the CPU kernel's
        level there (``cpu_evenly_distributed_mark``)."""
        self._evenly_distributed = True

    def _node_ends(self, grad_inputs: Any, grad_outputs: Any) -> None:
        self._between_nodes = True

    def _backward_ends(self) -> None:
        """After the last node no gradient is summed between nodes: the flag the last node
        left set made every ``a + b`` after the backward (the optimizer step's, the next
        micro-step's forward) look like one, and their peaks went unnoted (11-25% low,
        review)."""
        self._settle()
        self._between_nodes = False
        self._end_queued = False

    def track(self, t: torch.Tensor, real_nbytes: Optional[int] = None) -> None:
        """Count ``t``'s storage if it is new (as ``real_nbytes`` if the real kernel's output
        is known to differ); follow its size if it was resized in place."""
        if t.layout is not torch.strided:
            # Fake sparse tensors do not hold the real number of nonzero rows: a sparse
            # embedding gradient's bytes grow with the batch, and counting the fake ones gave
            # a flat line, under the real step at large batches.
            raise SparseNotSimulated(
                f"the step makes a sparse tensor ({t.layout}: an nn.Embedding(sparse=True) "
                "gradient, say), whose size the simulation cannot know; `bsselect probe "
                "--method measured` measures it with real steps")
        self._count(local(t).untyped_storage(), real_nbytes)

    def resized(self, st: torch.UntypedStorage) -> None:
        """A storage resized in place outside any op (``UntypedStorage.resize_``: FSDP2
        allocates and frees unsharded parameters that way): follow its size, or start
        counting it."""
        self._count(st)
        self.note(self.live_bytes)

    def _count(self, st: torch.UntypedStorage, real_nbytes: Optional[int] = None) -> None:
        key, nbytes = id(st), st.nbytes()
        if key in self._bytes:
            old = self._fake_nbytes[key]
            self._bytes[key] += nbytes - old
            self._fake_nbytes[key] = nbytes
            self.live_bytes += nbytes - old
            self.live_rounded_bytes += cuda_rounded(nbytes) - cuda_rounded(old)
            return
        # The callback fires when the storage itself dies (storages keep their Python object
        # while any tensor uses them), which is when a real allocator would free it.
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))
        self._bytes[key] = nbytes if real_nbytes is None else real_nbytes
        self._fake_nbytes[key] = nbytes
        self.live_bytes += self._bytes[key]
        self.live_rounded_bytes += cuda_rounded(nbytes)

    def _took_over(self, out: torch.Tensor, old: torch.Tensor) -> None:
        """``out`` is what a real run computes in place into ``old``'s storage: the one
        buffer is counted once, now under ``out`` (which outlives ``old``, a temporary)."""
        key = id(local(old).untyped_storage())
        if key not in self._bytes or id(local(out).untyped_storage()) == key:
            return
        self.live_bytes -= self._bytes[key]
        self.live_rounded_bytes -= cuda_rounded(self._fake_nbytes[key])
        self._bytes[key] = 0
        self._fake_nbytes[key] = 0

    def _free(self, key: int) -> None:
        self.live_bytes -= self._bytes.pop(key)
        self.live_rounded_bytes -= cuda_rounded(self._fake_nbytes.pop(key))
        del self._refs[key]

    def enter_phase(self, phase: Phase) -> None:
        self._settle()
        self.phase = phase
        self.note(self.live_bytes)

    def start_step(self) -> None:
        """Forget earlier peaks; the step begins in the forward phase at the live level."""
        self.phase_peak_bytes = {phase: 0 for phase in Phase}
        self.workspace_at_peak_bytes = {phase: 0 for phase in Phase}
        self.rounded_peak_bytes = 0
        self.enter_phase(Phase.FORWARD)

    def note(self, level_bytes: int, workspace_bytes: int = 0) -> None:
        self.rounded_peak_bytes = max(self.rounded_peak_bytes, self.live_rounded_bytes)
        if level_bytes > self.phase_peak_bytes[self.phase]:
            self.phase_peak_bytes[self.phase] = level_bytes
            self.workspace_at_peak_bytes[self.phase] = workspace_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return func(*args, **kwargs)
        if func in _UNSIZED_SCRATCH:
            raise ScratchNotSimulated(
                f"{func.__name__} (nn.EmbeddingBag's backward) allocates scratch the size of "
                "its indices inside the kernel, which the simulation does not see (26-37% "
                "under the allocator at b=2,048); `bsselect probe --method measured` measures "
                "it with real steps")
        self._settle()
        if self._evenly_distributed and func is torch.ops.aten.isnan.default:
            self._evenly_distributed = False
            self.note(self.live_bytes + cpu_evenly_distributed_mark(args[0]))
        if (self._between_nodes and func is _ACCUMULATE and _summable_in_place(args[0])) or (
                self.phase is Phase.BACKWARD and func in _COPIED_ON_FAKE):
            # What a real run does in place into args[0], when args[0] dies right after
            scratch = FRAMEWORK_SCRATCH.get(func)
            extra = scratch(args) if scratch is not None else 0
            if extra:  # in place for real: the scratch above what was live before it
                self.note(self.live_bytes + extra)
            out = func(*args, **kwargs)
            self.track(out)
            self._deferred = (self.live_bytes, id(args[0].untyped_storage()))
            return out
        if self._in_linear and func is _BIAS_ADD and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            if out.shape == args[0].shape and out.dtype == args[0].dtype:
                self._took_over(out, args[0])
            self.track(out)
            self.note(self.live_bytes)
            return out
        before = self.live_bytes
        cost = self._kernel_cost(func, args, kwargs) if self._kernel_cost else None
        out = func(*args, **kwargs)
        out = with_real_layout(standard_layout(func, args, kwargs,
                                               mixed_layout(func, args, kwargs, out)), cost, args)
        if self.cpu_target and func in CPU_NORM_DTYPES:
            out = cpu_norm_dtypes(func, args, out)
        elif self._cuda and func in CUDA_NORM_STATS:
            out = cuda_norm_dtypes(func, args, out)
        outputs = (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
        real_sizes = cost.output_bytes if cost and len(cost.output_bytes) == len(outputs) else None
        if real_sizes is None and func in _KEEPS_ELEMENTWISE_BUFFER and out.dim() == 0:
            real_sizes = (args[0].numel() * out.dtype.itemsize,)
        for i, t in enumerate(outputs):
            if isinstance(t, torch.Tensor):
                self.track(t, real_sizes[i] if real_sizes else None)
        self.note(self.live_bytes)
        scratch = FRAMEWORK_SCRATCH.get(func) if cost is None else None
        extra = scratch(args) if scratch is not None else 0
        if extra:
            self.note(self.live_bytes + extra)
        if self._kernel_cost is not None and cost is None:
            casts = cpu_promotion_casts(func, args, kwargs)
            if casts:
                self.note(self.live_bytes + casts, casts)
            if func is torch.ops.aten.masked_select.default:
                level = before + cpu_masked_select_mark(args, out)
                self.note(level, max(0, level - self.live_bytes))
            if func is torch.ops.aten.native_layer_norm_backward.default:
                buffers = cpu_layer_norm_backward_buffers(args)
                self.note(self.live_bytes + buffers, buffers)
        if self._cuda and func is torch.ops.aten.masked_select.default:
            indices = cuda_masked_select_indices(args, out)
            self.rounded_peak_bytes = max(self.rounded_peak_bytes,
                                          self.live_rounded_bytes + cuda_rounded(indices))
            self.note(self.live_bytes + indices)
        if cost is not None:
            # Inside the kernel, scratch and outputs coexist above what was live before it.
            level = before + cost.high_water_bytes
            self.note(level, max(0, level - self.live_bytes))
        return out


class LinearCalls(TorchFunctionMode):
    """Tells ``counter`` when the step is inside ``F.linear``, whose bias add a real run does
    in place (``_LINEAR_FUNCS``)."""

    def __init__(self, counter: LiveStorageCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func not in _LINEAR_FUNCS:
            return func(*args, **(kwargs or {}))
        self.counter._in_linear += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._in_linear -= 1


@contextmanager
def cuda_rules_of(settings: StepSettings) -> Iterator[None]:
    """When the step will run on CUDA: CUDA's choice of attention kernel (``cuda_attention``)
    and, under autocast, CUDA's autocast op lists (``cuda_autocast``); nothing otherwise."""
    if settings.target_device != "cuda":
        yield
        return
    from .recompute import recomputed_under

    # and in activation checkpointing's recomputation, where function modes are not active
    with _cuda_modes(settings), recomputed_under(lambda: _cuda_modes(settings)):
        yield


@contextmanager
def _cuda_modes(settings: StepSettings) -> Iterator[None]:
    from .cuda_attention import cuda_attention_policy
    from .cuda_autocast import cuda_autocast_policy

    lists = (cuda_autocast_policy() if settings.precision is not Precision.fp32
             else nullcontext())
    with lists, cuda_attention_policy():
        yield


# Step 1 only has to leave what a real step 1 leaves for step 2: the optimizer's state and
# the gradients (freed by step 2's zero_grad). ``prime_optimizer`` creates both without a
# forward or backward pass, half of a simulation's time (a 70B model's step on fake tensors:
# 12.6 s). What a real step 1 would also do is checked against it in tests/test_memory_simulated.py.
PRIME_OPTIMIZER = True
# Sharded simulations: FSDP2 chunks parameters lazily (``sharded.lazy_chunks``) and the
# optimizer steps on local shards (``sharded.local_optimizer_steps``); the same bytes, checked
# against the plain path in tests/test_memory_simulated.py.
FAST_SHARDED = True


def prime_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    skip: frozenset[str] = frozenset()) -> None:
    """Step 1 without its forward and backward: every trainable parameter not named in
    ``skip`` gets a zero gradient (the size a backward gives it; a sharded parameter's is its
    shard) and the optimizer steps once (with fp16 through the GradScaler, which creates its
    scale), so the optimizer's state is what a real first step creates. ``skip``: the
    parameters a backward leaves without a gradient (``simulate_step_peak`` finds them in step
    2 and simulates again without them)."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in skip]
    for p in params:
        p.grad = torch.zeros_like(p)
    if scaler is not None and params:
        scaler.scale(params[0].new_zeros(()).to_local() if hasattr(params[0], "to_local")
                     else params[0].new_zeros(()))
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@contextmanager
def counted_cpu_rng_states(counter: LiveStorageCounter) -> Iterator[None]:
    """Count the CPU generator's state that ``torch.utils.checkpoint`` keeps per checkpoint
    until its recompute (``preserve_rng_state=True``, the default): ``torch.get_rng_state()``
    is a 5,056-byte tensor that no op returns, so the counter never saw it (review: 0.4-2.4%
    low on checkpointed HF models, 55% on eight checkpointed Linear blocks). On the CPU
    target only: a GPU run keeps it in host memory."""
    if not counter.cpu_target:
        yield
        return
    original = torch.get_rng_state

    def get_rng_state() -> torch.Tensor:
        state = original()
        counter.track(state)
        counter.note(counter.live_bytes)
        return state

    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = original


def _run_steps(task: Task, model: nn.Module, batch: Any, counter: LiveStorageCounter,
               settings: StepSettings = StepSettings(), skip: frozenset[str] = frozenset(),
               prime: bool = True) -> Any:
    """Step 1 (creates optimizer state), then step 2 under the counter."""
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    impl = run_as_on(optimizer, settings.target_device or "cpu")
    precision = settings.autocast_precision()
    scaler = make_scaler(precision, "cpu", simulated=True)
    options = dict(precision=precision, scaler=scaler,
                   accumulate=settings.micro_steps())
    marked, handles = with_phase_marks(
        task, optimizer,
        on_backward=lambda: counter.enter_phase(Phase.BACKWARD),
        on_optimizer=lambda: counter.enter_phase(Phase.OPTIMIZER),
        on_graph=counter.watch_graph,
    )
    from .recompute import recomputed_under
    from .sharded import local_optimizer_steps

    x, y = batch
    plan = settings.shard
    local = (local_optimizer_steps(optimizer) if plan and plan.fsdp and FAST_SHARDED
             else nullcontext())
    with local:
        # Step 1 runs without the counter, which makes the simulation 15% faster; what it
        # leaves alive is found by walking the model, the optimizer and the batch (a tensor
        # step 1 hides anywhere else, in a global cache say, is not counted).
        prime = prime and PRIME_OPTIMIZER
        if prime:
            prime_optimizer(model, optimizer, scaler, skip)
        else:
            train_step(model, optimizer, marked, x, y, **options)
        gc.collect()  # a real loop frees step 1's graph before step 2; cycles included
        for t in live_at_step_start(model, optimizer, batch, scaler):
            counter.track(t)
        start_bytes = counter.live_bytes
        kept = _module_storages(model)
        counter.start_step()
        with LinearCalls(counter), recomputed_under(lambda: LinearCalls(counter)), \
                counted_cpu_rng_states(counter), counter:
            train_step(model, optimizer, marked, x, y, **options)
    for handle in handles:
        handle.remove()
    # A tensor the forward keeps in a module attribute (a cache made on the first call) that
    # did not exist before step 2: a real step 1 would have made it, so it would be live from
    # the start of step 2. Only a real step 1 says exactly when it counts.
    cached = prime and bool(_module_storages(model) - kept)
    return optimizer, start_bytes, impl, cached


def _module_storages(model: nn.Module) -> set[int]:
    """Identities of the storages held by the model's parameters, buffers and attributes."""
    return {id(local(t).untyped_storage()) for t in module_tensors(model)}


def simulate_step_peak(
    task: Task, batch_size: int, *, seed: int = 0, kernel_workspace: bool = True,
    settings: StepSettings = StepSettings(), inputs: Any = None,
) -> StepPeak:
    """Peak bytes of training step 2 at ``batch_size``, simulated without allocating the model.

    ``kernel_workspace=True`` includes the scratch this machine's CPU kernels allocate inside
    themselves, so the result is the CPU allocator's peak (``cpu_truth.cpu_step_peak``);
    ``False`` gives framework tensors only, the base for another device's model.
    ``settings`` (precision, accumulation, optimizer device) and ``inputs`` (which items make
    the batch) describe the step as the real run will take it; ``batch_size`` is the
    micro-batch. Fake ``cpu`` tensors honour CPU autocast (``meta`` ones ignore it).
    """
    from .recompute import recomputations

    before = recomputations()
    peak, unused, cached = _simulate(task, batch_size, seed, kernel_workspace, settings,
                                     inputs)
    if cached:  # the forward keeps a cache in the model: a real step 1 makes it first
        peak, _, _ = _simulate(task, batch_size, seed, kernel_workspace, settings, inputs,
                               prime=False)
    elif unused:  # a real step 1 gives these no gradient and no state
        peak, _, _ = _simulate(task, batch_size, seed, kernel_workspace, settings, inputs,
                               unused)
    return dataclasses.replace(peak, recomputes=recomputations() > before)


def _simulate(task: Task, batch_size: int, seed: int, kernel_workspace: bool,
              settings: StepSettings, inputs: Any, skip: frozenset[str] = frozenset(),
              prime: bool = True) -> tuple[StepPeak, frozenset[str], bool]:
    """One simulation; also the trainable parameters step 2 left without a gradient, and
    whether step 2 left a new tensor in the model (a forward-time cache)."""
    from .calibration import kernel_cost
    from .sharded import fake_process_group, following_resizes, lazy_chunks, shard

    batch = real_batch(task, batch_size, seed, inputs)
    plan = settings.shard
    fake_mode = new_fake_mode()
    counter = LiveStorageCounter(kernel_cost if kernel_workspace else None,
                                 cuda=settings.target_device == "cuda")
    # The counter is entered inside the fake mode, so that it sees every op first, as the
    # CPU dispatcher would. A CUDA target casts by CUDA's autocast lists, not the CPU's.
    # Sharded: rank 0 of a fake process group, the model wrapped by fully_shard.
    with (fake_process_group(plan.world_size) if plan and plan.fsdp else nullcontext()) as mesh:
        model = build_fake_model(task, fake_mode)
        if plan:  # outside RealWhereKnown: FSDP2 splits every parameter N ways (fast on fakes)
            with young_gc_only(), fake_mode, (lazy_chunks() if FAST_SHARDED
                                              else nullcontext()):
                try:
                    shard(model, plan, mesh)
                except UsageError:
                    raise
                except Exception as exc:
                    raise TaskError(f"wrapping the model with fully_shard failed: "
                                    f"{one_line(exc)}") from exc
        with young_gc_only(), cuda_rules_of(settings), fake_mode, \
                values_where_known() as known, \
                (following_resizes(counter) if plan else nullcontext()):
            batch = tree_map(lambda t: fake_batch_leaf(t, fake_mode), batch)
            try:
                optimizer, start_bytes, impl, cached = _run_steps(
                    task, model, batch, counter, settings, skip, prime)
            except UsageError:
                raise
            except Exception as exc:
                refusal = None if isinstance(exc, NotSimulated) else refusal_behind(exc, known)
                kind = CannotSimulate if refusal or isinstance(exc, NotSimulated) else TaskError
                shown = refusal or exc
                # An index past an embedding's rows fails a real step too: no hint.
                hint = "" if kind is CannotSimulate or isinstance(exc, IndexOutOfRange) \
                    else SIMULATION_HINT
                raise kind(f"the simulated training step at batch size {batch_size} failed: "
                           f"{one_line(shown)}{hint}") from exc
            peak = step_peak(batch_size, model, optimizer, batch, start_bytes,
                             counter.phase_peak_bytes, counter.workspace_at_peak_bytes,
                             counter.rounded_peak_bytes)
            unused = frozenset(n for n, p in model.named_parameters()
                               if p.requires_grad and p.grad is None)
    return dataclasses.replace(peak, precision=settings.precision.value,
                               accumulate=settings.accumulate,
                               optimizer_impl=impl.value,
                               parameter_dtype=parameter_dtype(model)), unused, cached


def step_peak(
    batch_size: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    start_bytes: int,
    phase_peak_bytes: dict[Phase, int],
    workspace_at_peak_bytes: Optional[dict[Phase, int]] = None,
    rounded_peak_bytes: Optional[int] = None,
) -> StepPeak:
    """The StepPeak of a finished measurement (shared with ``cpu_truth``)."""
    phase = max(Phase, key=lambda p: phase_peak_bytes[p])
    return StepPeak(
        batch_size=batch_size,
        peak_bytes=phase_peak_bytes[phase],
        param_bytes=storage_bytes(model.parameters()),
        optimizer_state_bytes=storage_bytes(optimizer_state_tensors(optimizer)),
        batch_bytes=storage_bytes(tree_flatten(batch)[0]),
        start_bytes=start_bytes,
        grad_bytes=storage_bytes(p.grad for p in model.parameters()),
        forward_peak_bytes=phase_peak_bytes[Phase.FORWARD],
        backward_peak_bytes=phase_peak_bytes[Phase.BACKWARD],
        optimizer_peak_bytes=phase_peak_bytes[Phase.OPTIMIZER],
        peak_phase=phase,
        kernel_workspace_bytes=workspace_at_peak_bytes[phase] if workspace_at_peak_bytes else None,
        rounded_peak_bytes=rounded_peak_bytes,
    )
