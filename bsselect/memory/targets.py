"""Memory a CUDA device needs beyond the tensors a CPU/meta simulation sees.

Each term is named, valued and explained so that ``probe``/``check`` can show it as its own
line (docs/method.md, "CUDA terms"). Workspaces are PyTorch's defaults; the context and the
fragmentation allowance are set from measurements on an NVIDIA H200 (torch 2.11, CUDA 13,
``benchmarks/bench_cuda.py``; docs/benchmarks-cuda.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MiB = 2**20

# CUBLAS_WORKSPACE_CONFIG default ":4096:2:16:8" = 2*4 MiB + 8*16 KiB per (handle, stream),
# allocated through the caching allocator on the first matmul (seen as 8,519,680 B).
CUBLAS_WORKSPACE_BYTES = 2 * 4096 * 1024 + 8 * 16 * 1024
# Hopper (sm90+) default ":4096:8" = 32 MiB, and cuBLASLt's workspace grows to 32 MiB there.
CUBLAS_WORKSPACE_HOPPER_BYTES = 8 * 4096 * 1024
# cuBLASLt's workspace before Hopper: 4 MiB for every preset here (PyTorch's default,
# CUBLASLT_WORKSPACE_SIZE=4096 KiB); some builds use 1 MiB on small GPUs, which this overstates.
CUBLASLT_WORKSPACE_BYTES = 4 * MiB
CUBLASLT_WORKSPACE_HOPPER_BYTES = 32 * MiB
# cuDNN workspace: the convolution algorithms PyTorch picks commonly ask for tens to hundreds
# of MiB; 256 MiB is a conservative allowance, only for models with convolutions or RNNs
# (measured on an H200: ResNet-18 shapes 61 MB above the simulation at batch 64, a 2-layer GRU
# 92-114 MB for cuDNN's RNN buffers).
CUDNN_WORKSPACE_BYTES = 256 * MiB
# CUDA context + kernels loaded lazily (CUDA_MODULE_LOADING=LAZY, the default since 11.7),
# outside the allocator; only when the budget is the device's total. Measured on an H200
# (torch 2.11+cu130): 619 MiB right after init, 789 MiB after training eight models.
CUDA_CONTEXT_BYTES = 800 * MiB
# The caching allocator's reserved-but-unusable headroom: max_memory_reserved over
# max_memory_allocated in a training step measured 7-15% on an H200 for the five model and
# precision pairs whose peak was over 100 MB (up to 27% on smaller ones, a few MiB). 15%: the
# largest of them. Set from the tuning half of benchmarks/bench_cuda.py; the held-out half is
# reported separately (docs/benchmarks-cuda.md).
FRAGMENTATION_FRACTION = 0.15
# Activation checkpointing's recomputation (a block's forward run again inside the backward,
# between the gradients' allocations) fragments the cache more, and by how much depends on the
# allocator's history. On an H200, the cap under which the largest batch still trained was
# 1.25x and 1.27x the simulated tensors (less the workspaces) for the two checkpointed steps
# this was set from (GPT-2, a GQA Llama), and 1.09x, 1.12x and 1.27x for three held out
# (max_memory_reserved over max_memory_allocated: 16-36% at small batches). 30%: above all of
# them (docs/benchmarks-cuda.md, section 8).
FRAGMENTATION_FRACTION_RECOMPUTE = 0.30
ALLOC_ROUND_BYTES = 512        # the caching allocator rounds every request up to 512 B


class Target(str, Enum):
    """Where the training will run, when it is not where bsselect runs."""

    same = "same"   # the probing device itself: no extra terms
    cuda = "cuda"


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str


def round_up(n: int, multiple: int = ALLOC_ROUND_BYTES) -> int:
    return -(-n // multiple) * multiple


def cuda_terms(
    peak_bytes: int,
    rounded_peak_bytes: int | None,
    uses_cudnn: bool,
    hopper: bool | None = None,
    budget_is_total: bool = True,
    recomputes: bool = False,
) -> list[Term]:
    """The CUDA-only terms for a step whose simulated peak is ``peak_bytes``.

    ``rounded_peak_bytes`` is the same peak with every live storage rounded up to 512 B (from
    the simulation); when unknown the rounding term is 0 and says so. ``hopper``: whether the
    GPU is sm90 or newer (larger cuBLAS workspaces); None (unknown GPU): assume it is, the
    larger of the two (51 MiB more than older GPUs use). ``recomputes``: the step recomputes
    checkpointed activations in its backward (a larger fragmentation allowance).
    """
    terms: list[Term] = []
    if rounded_peak_bytes is not None:
        terms.append(Term("allocator rounding", max(0, rounded_peak_bytes - peak_bytes),
                          "each allocation rounded up to 512 B (CUDA caching allocator)"))
    else:
        terms.append(Term("allocator rounding", 0, "not modelled for this peak"))
    large = hopper is None or hopper
    cublas = CUBLAS_WORKSPACE_HOPPER_BYTES if large else CUBLAS_WORKSPACE_BYTES
    lt = CUBLASLT_WORKSPACE_HOPPER_BYTES if large else CUBLASLT_WORKSPACE_BYTES
    which = ("sm90+ sizes; GPU not named" if hopper is None
             else "sm90+ sizes" if hopper else "pre-sm90 sizes")
    terms.append(Term("cuBLAS + cuBLASLt workspace", cublas + lt,
                      f"default CUBLAS_WORKSPACE_CONFIG and CUBLASLT_WORKSPACE_SIZE, one "
                      f"stream ({which})"))
    if uses_cudnn:
        terms.append(Term("cuDNN workspace", CUDNN_WORKSPACE_BYTES,
                          "allowance for convolution / RNN algorithm workspaces"))
    if budget_is_total:
        terms.append(Term("CUDA context", CUDA_CONTEXT_BYTES,
                          "driver context and lazily loaded kernels, outside the allocator"))
    fraction = FRAGMENTATION_FRACTION_RECOMPUTE if recomputes else FRAGMENTATION_FRACTION
    terms.append(Term("fragmentation headroom", int(fraction * peak_bytes),
                      f"{fraction:.0%} of the peak: reserved but unusable blocks" +
                      (" (activation checkpointing's recomputation)" if recomputes else "")))
    return terms
