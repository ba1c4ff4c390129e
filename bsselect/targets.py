"""Memory a CUDA device needs beyond the tensors a CPU/meta simulation sees.

Each term is named, valued and explained so that ``probe``/``check`` can show it as its own
line (docs/method.md, "CUDA terms"). Values are PyTorch's defaults; sources in the notes.
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
# cuDNN convolution workspace: the algorithms PyTorch picks commonly ask for tens to
# hundreds of MiB; 256 MiB is a conservative allowance, only for models with convolutions.
CUDNN_WORKSPACE_BYTES = 256 * MiB
# CUDA context + kernels loaded lazily (CUDA_MODULE_LOADING=LAZY, the default since 11.7):
# typically 300-600 MiB outside the allocator; only when the budget is the device's total.
CUDA_CONTEXT_BYTES = 512 * MiB
FRAGMENTATION_FRACTION = 0.05  # caching-allocator reserved-but-unusable headroom
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
    has_conv: bool,
    hopper: bool = False,
    budget_is_total: bool = True,
) -> list[Term]:
    """The CUDA-only terms for a step whose simulated peak is ``peak_bytes``.

    ``rounded_peak_bytes`` is the same peak with every live storage rounded up to 512 B (from
    the simulation); when unknown the rounding term is 0 and says so.
    """
    terms: list[Term] = []
    if rounded_peak_bytes is not None:
        terms.append(Term("allocator rounding", max(0, rounded_peak_bytes - peak_bytes),
                          "each allocation rounded up to 512 B (CUDA caching allocator)"))
    else:
        terms.append(Term("allocator rounding", 0, "not modelled for this peak"))
    cublas = CUBLAS_WORKSPACE_HOPPER_BYTES if hopper else CUBLAS_WORKSPACE_BYTES
    lt = CUBLASLT_WORKSPACE_HOPPER_BYTES if hopper else CUBLASLT_WORKSPACE_BYTES
    terms.append(Term("cuBLAS + cuBLASLt workspace", cublas + lt,
                      "default CUBLAS_WORKSPACE_CONFIG and CUBLASLT_WORKSPACE_SIZE, one stream"))
    if has_conv:
        terms.append(Term("cuDNN workspace", CUDNN_WORKSPACE_BYTES,
                          "allowance for convolution algorithm workspaces"))
    if budget_is_total:
        terms.append(Term("CUDA context", CUDA_CONTEXT_BYTES,
                          "driver context and lazily loaded kernels, outside the allocator"))
    terms.append(Term("fragmentation headroom", int(FRAGMENTATION_FRACTION * peak_bytes),
                      f"{FRAGMENTATION_FRACTION:.0%} of the peak: reserved but unusable blocks"))
    return terms
