"""CUDA's autocast op lists, applied to a simulation that runs on fake ``cpu`` tensors.

Autocast casts an op's inputs according to a per-device list (``aten/src/ATen/
autocast_mode.h``/``.cpp``), and the lists differ: CUDA runs ``layer_norm``, ``softmax``,
``log_softmax``, ``sum``, ``exp``, ``pow`` and friends in float32 where the CPU keeps the input's
dtype; CUDA runs ``einsum``, ``mv`` and RNN cells in reduced precision where the CPU does not;
the CPU casts a few ops CUDA leaves alone (``cross_entropy_loss`` as a whole, where CUDA's
casts happen inside it, in ``log_softmax`` and ``nll_loss``). Since the dtype of every saved
activation follows from these casts, a CPU simulation of a step that will run on CUDA must use
CUDA's lists.

Fake ``cuda`` tensors would pick them up by themselves, but autograd aborts on them in a
CPU-only build (docs/method.md, "Simulated"). So, inside ``cuda_autocast_policy()``, Python kernels registered on
the ``AutocastCPU`` dispatch key make CPU autocast follow CUDA's lists: ops only CUDA lists get
CUDA's policy (lower precision, float32, float32 via the dtype argument, or promote), ops only
the CPU lists pass through as on CUDA, and ops both list keep the CPU's kernel (their policies
agree). ``tests/test_precision.py`` checks the result op by op against CUDA's own autocast
kernels run on fake ``cuda`` tensors without autograd. Not reproduced: the cast cache for the
few lower-precision ops only CUDA lists (a weight used twice in one forward is cast twice), and
device-specific branches inside composite ops.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_map

# torch 2.13, aten/src/ATen/autocast_mode.h: the CUDA lists for ops the CPU lists lack.
LOWER_PRECISION = (
    "_convolution", "convolution", "_scaled_dot_product_flash_attention", "addmv", "addr",
    "einsum", "mv", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
)
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "dist", "pdist", "renorm",
    "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    "norm.Scalar", "norm.ScalarOpt_dim",
)
FP32_SET_OPT_DTYPE = (
    "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "index_put",
    "tensordot", "scatter_add",
)

_CPU_KEY = torch._C.DispatchKey.AutocastCPU


def _overload(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _no_cpu_autocast() -> Any:
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_CPU_KEY))


def _eligible(t: Any) -> bool:
    """What autocast casts: floating tensors other than float64."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64


def _cast_all(dtype: torch.dtype, args: Any, kwargs: Any) -> tuple[Any, Any]:
    cast = lambda t: t.to(dtype) if _eligible(t) and t.dtype is not dtype else t  # noqa: E731
    return tree_map(cast, args), tree_map(cast, kwargs)


def _lower(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _cast_all(torch.get_autocast_dtype("cpu"), args, kwargs)
        with _no_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _fp32(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _cast_all(torch.float32, args, kwargs)
        with _no_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


# On CUDA, softmax and log_softmax of float16 with dtype float32 compute straight into a
# float32 output ("half_to_float"); elsewhere they first cast the input (one more copy).
_HALF_TO_FLOAT = {"aten::softmax.int": torch.ops.aten._softmax.default,
                  "aten::log_softmax.int": torch.ops.aten._log_softmax.default}


def _fp32_set_opt_dtype(op: Any) -> Callable[..., Any]:
    """float32 output through the op's own ``dtype`` argument (no cast copy of the input),
    unless the caller set it — CUDA's cross_entropy passes the input's dtype to log_softmax."""
    names = [a.name for a in op._schema.arguments]
    position = names.index("dtype")
    half_to_float = _HALF_TO_FLOAT.get(op.name())

    def kernel(*args: Any, **kwargs: Any) -> Any:
        given = args[position] if len(args) > position else kwargs.get("dtype")
        with _no_cpu_autocast():
            if given is None and half_to_float is not None and args[0].dtype is torch.float16:
                return half_to_float(args[0], args[1], True)
            if given is None and args and _eligible(args[0]):
                if len(args) > position:
                    args = (*args[:position], torch.float32, *args[position + 1:])
                else:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)
    return kernel


def _promote(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        widest = torch.get_autocast_dtype("cpu")
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if _eligible(t):
                widest = torch.promote_types(widest, t.dtype)
        args, kwargs = _cast_all(widest, args, kwargs)
        with _no_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _passthrough(op: Any) -> Callable[..., Any]:
    """What CUDA does with an op its lists lack: nothing. A composite op decomposes with
    autocast still on, so the ops inside it get their own (CUDA) policies."""
    composite = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(),
                                                               "CompositeImplicitAutograd")

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if composite:
            return op.decompose(*args, **kwargs)
        with _no_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def cpu_only_ops() -> list[str]:
    """Ops with a CPU autocast kernel and no CUDA one (``cross_entropy_loss``, ``stack``...)."""
    cpu = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU"))
    cuda = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
    return sorted(name.split("::", 1)[1] for name in cpu - cuda)


def cuda_policies() -> dict[str, Callable[[Any], Callable[..., Any]]]:
    """Op name -> kernel factory for every op whose CUDA policy the CPU does not already have."""
    policies: dict[str, Callable[[Any], Callable[..., Any]]] = {}
    for names, policy in ((LOWER_PRECISION, _lower), (FP32, _fp32),
                          (FP32_SET_OPT_DTYPE, _fp32_set_opt_dtype), (PROMOTE, _promote)):
        for name in names:
            policies[name] = policy
    for name in cpu_only_ops():
        policies.setdefault(name, _passthrough)
    return policies


_DEPTH = [0]  # entries of cuda_autocast_policy now open


@contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Inside, ``torch.autocast("cpu", ...)`` casts as ``torch.autocast("cuda", ...)`` does.
    Process-wide while inside (the dispatcher has no per-thread kernels); the CPU's own
    kernels are back on exit. Re-entered (activation checkpointing's recomputation enters the
    simulation's modes again inside the step) it registers nothing more: a second Python
    kernel on a key that has one is an error in torch 2.11 (seen on CUDA machines), and its
    exit would take the outer one's kernels away."""
    _DEPTH[0] += 1
    try:
        if _DEPTH[0] > 1:
            yield
            return
        with _registered():
            yield
    finally:
        _DEPTH[0] -= 1


@contextmanager
def _registered() -> Iterator[None]:
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name, policy in cuda_policies().items():
                try:
                    op = _overload(name)
                except AttributeError:  # not in this build of torch
                    continue
                lib.impl(op.name().split("::", 1)[1], policy(op), "AutocastCPU")
        yield
    finally:
        lib._destroy()
