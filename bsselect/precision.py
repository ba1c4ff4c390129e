"""Mixed precision for the training step: autocast and, for float16, gradient scaling.

``--precision bf16|fp16`` runs the forward and the loss under ``torch.autocast`` with that
dtype; parameters, gradients and optimizer state stay float32 (PyTorch's "automatic mixed
precision"). float16 also scales the loss (``torch.amp.GradScaler``) so that small gradients
do not flush to zero in float16 activations' gradients; bfloat16 has float32's exponent range
and needs no scaling.

Which ops autocast lowers, keeps in float32 or promotes is a per-device list; the CPU's and
CUDA's differ (docs/memory-in-real-runs.md lists the differences and what they cost).
"""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from typing import Any, ContextManager, Sequence

import torch


REDUCED_DTYPES = (torch.bfloat16, torch.float16)  # the half-width floats autocast computes in


class Precision(str, Enum):
    """The dtype the forward pass computes in (parameters stay float32)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]

    @property
    def scales_loss(self) -> bool:
        """float16 needs loss scaling; bfloat16 and float32 do not."""
        return self is Precision.fp16


def device_type_of(model: torch.nn.Module) -> str:
    """``cuda``, ``cpu``, ... of the model's first parameter (fake ``cpu`` tensors say cpu)."""
    for p in model.parameters():
        return p.device.type
    return "cpu"


def autocast(precision: Precision, device_type: str) -> ContextManager[Any]:
    """The forward's autocast region (nothing for fp32)."""
    if precision is Precision.fp32:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=precision.dtype)


class _AlwaysStepScaler(torch.amp.GradScaler):
    """A GradScaler for fake tensors: they have no values, so whether a gradient overflowed is
    unknowable; assume it did not and step (a skipped step allocates less, never more)."""

    def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any,
                        **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)


def make_scaler(precision: Precision, device_type: str,
                simulated: bool = False) -> torch.amp.GradScaler | None:
    """A fresh GradScaler for fp16 (one per training run: it carries the scale across
    steps), None otherwise. ``simulated``: one that always steps, for fake tensors and for
    measuring memory (a step skipped for overflow allocates no optimizer state)."""
    if not precision.scales_loss:
        return None
    cls = _AlwaysStepScaler if simulated else torch.amp.GradScaler
    return cls(device_type)


# Noise measurement takes gradients with torch.autograd.grad, outside any optimizer, so it
# scales the loss itself: start where GradScaler starts and halve until every gradient is
# finite, then divide the scale out (noise.py needs the raw, unscaled gradients).
NOISE_INIT_SCALE = 2.0**16
NOISE_MIN_SCALE = 1.0


def raw_grads(loss: torch.Tensor, params: Sequence[torch.Tensor], precision: Precision
              ) -> tuple[torch.Tensor | None, ...]:
    """d loss / d params, unscaled. For fp16 the backward runs on ``loss * scale`` (halved
    while any gradient overflows) and the result is divided by the scale."""
    if not precision.scales_loss:
        return torch.autograd.grad(loss, params, allow_unused=True)
    scale = NOISE_INIT_SCALE
    while True:
        last = scale <= NOISE_MIN_SCALE
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True, retain_graph=not last)
        if last or all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return tuple(None if g is None else g / scale for g in grads)
        scale = max(NOISE_MIN_SCALE, scale / 2)


def parameter_dtype(model: torch.nn.Module) -> str:
    """The dtype of the model's trainable parameters, which their gradients and the
    optimizer's step use: ``float32``, or several joined by ``+`` (``float32+bfloat16``)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.requires_grad})
    return "+".join(dtypes) or "float32"


def describe(precision: Precision) -> str:
    """One line for the human output."""
    if precision is Precision.fp32:
        return "fp32"
    scaling = ", GradScaler loss scaling" if precision.scales_loss else ""
    return f"{precision.value} autocast (float32 parameters{scaling})"


__all__ = ["Precision", "autocast", "make_scaler", "raw_grads", "device_type_of", "describe",
           "parameter_dtype"]
