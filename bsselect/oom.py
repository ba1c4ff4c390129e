"""Out-of-memory detection for every backend, in one place.

PyTorch raises ``torch.OutOfMemoryError`` for CUDA/HIP (and XPU in recent releases); other
backends and older releases raise a plain RuntimeError whose message names the failure, and the
CPU allocator raises RuntimeError "DefaultCPUAllocator: can't allocate memory" (or MemoryError
from Python itself). Messages below are the ones PyTorch's allocators emit.
"""

from __future__ import annotations

import gc

import torch

_OOM_MESSAGES = (
    "out of memory",                          # CUDA, HIP ("HIP out of memory"), XPU
    "cuda out of memory",
    "cudnn_status_not_supported",             # cuDNN when it cannot get a workspace
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "mps backend out of memory",              # Apple MPS
    "defaultcpuallocator: can't allocate memory",
    "can't allocate memory",
    "failed to allocate",                     # XLA / misc accelerators
    "resource_exhausted",
)


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` means the device ran out of memory (any backend)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args:
        message = str(exc.args[0]).lower()
        return any(fragment in message for fragment in _OOM_MESSAGES)
    return False


def caused_by_oom(exc: BaseException) -> bool:
    """``is_oom_error`` of ``exc`` or of the error it was raised from (a TaskError that wraps
    the device's out-of-memory error)."""
    return is_oom_error(exc) or (exc.__cause__ is not None and is_oom_error(exc.__cause__))


def drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc`` and of the errors it was raised from (``__cause__``,
    ``__context__``: under torchrun an OOM is re-raised from the rank's own), so that an error
    kept to report an OOM does not keep the failed step's frames and tensors alive."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def release_memory() -> None:
    """Drop Python garbage and return cached blocks to the device after an OOM. Call it after
    the ``except`` block, not inside it: there the exception's traceback still holds the
    failed step's frames, and with them its tensors (PyTorch's FAQ)."""
    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()
