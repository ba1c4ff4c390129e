"""CUDA's choice of attention kernel, in a simulation that runs on fake ``cpu`` tensors.

``F.scaled_dot_product_attention`` picks a kernel per device, and what a training step saves
for backward depends on the pick: the fused kernels (flash, memory-efficient) save the output
and a float32 log-sum-exp per query row; the math fallback materialises the (T x T) attention
weights of every head, and with dropout its mask too. The CPU and CUDA pick differently:

- the CPU's fused kernel refuses dropout (GPT-2 trains with attention dropout 0.1), so the CPU
  falls back to math where CUDA runs flash: a CPU simulation overstated a GPT-2 step by 41-48%
  on an H200;
- CUDA's flash kernel takes only fp16/bf16 and no explicit mask, its memory-efficient kernel
  takes fp32 and masks but not grouped-query attention (``enable_gqa``), so an fp32 GQA
  decoder (Qwen2, Llama 3) runs math on CUDA where the CPU's fused kernel accepts it: the
  simulation understated an fp32 Qwen2-style step by 23-27% (docs/benchmarks-cuda.md).

Inside ``cuda_attention_policy()`` (a ``TorchFunctionMode``, so calls through any alias of
the function are seen), each call is routed as CUDA would route it: to the CPU's fused op for
flash and memory-efficient (the same saved tensors: output and log-sum-exp; dropout keeps only
a seed on CUDA, so the fused op runs without it), or to the math implementation. Inputs are
cast first as CUDA's autocast casts them (``scaled_dot_product_attention`` is on its
lower-precision list). A mask that needs a gradient (T5's learned position bias), which the
CPU's fused op refuses to differentiate, runs a fused forward and backward by hand
(``_LearnedBias``). Not modelled: cuDNN attention (after math in PyTorch's default order),
sm86/sm89's head-dimension limits, and nested tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..precision import REDUCED_DTYPES
from .values import is_fake

FLASH_MAX_HEAD_DIM = 256


def cuda_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, has_mask: bool,
                 dtype: torch.dtype) -> str:
    """The kernel CUDA's ``scaled_dot_product_attention`` picks on sm80/sm90 (flash, then
    memory-efficient, then math; ``sdp_utils.cpp``) for inputs of these shapes computed in
    ``dtype``: 'flash', 'efficient' or 'math'. Fewer key/value heads than query heads is
    grouped-query attention (sdpa accepts it only with ``enable_gqa``)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "math"
    head_dim = q.shape[-1]
    same_dims = k.shape[-1] == head_dim and v.shape[-1] == head_dim
    if dtype in REDUCED_DTYPES and not has_mask and head_dim <= FLASH_MAX_HEAD_DIM and same_dims:
        return "flash"
    if k.shape[-3] != q.shape[-3]:
        return "math"  # memory-efficient attention has no grouped-query support
    if dtype not in REDUCED_DTYPES + (torch.float32,):
        return "math"
    align = 8 if dtype in REDUCED_DTYPES else 4
    if head_dim % align or v.shape[-1] % align:
        return "math"
    return "efficient"


def _arguments(args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("dropout_p", 0.0)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    bound.setdefault("enable_gqa", False)
    return bound


def routed_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` as CUDA would run it, on CPU (fake) tensors."""
    a = _arguments(args, kwargs)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
             and q.dtype.is_floating_point else q.dtype)
    backend = cuda_backend(q, k, v, has_mask=mask is not None, dtype=dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if mask is not None and mask.dtype.is_floating_point:
        mask = mask.to(dtype)
    with torch.autocast("cpu", enabled=False):  # CUDA's autocast wrapper: no nested casts
        if mask is not None and mask.dtype == torch.bool:
            # sdpa turns a boolean mask into an additive one before any kernel, on CUDA too.
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask.logical_not(), float("-inf"))
        if backend == "math":
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, mask, a["dropout_p"], a["is_causal"], None, scale=a["scale"],
                enable_gqa=bool(a["enable_gqa"]))[0]
        if mask is not None and mask.requires_grad and torch.is_grad_enabled():
            return _LearnedBias.apply(q, k, v, mask, a["is_causal"], a["scale"])
        # The CPU's fused op takes grouped-query heads as CUDA's flash does (not repeated).
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, a["is_causal"], attn_mask=mask, scale=a["scale"])[0]


class _LearnedBias(torch.autograd.Function):
    """CUDA's memory-efficient kernel with an additive mask that needs a gradient (T5's
    learned relative-position bias): the CPU's fused op refuses to differentiate its mask, so
    its forward and backward run here by hand. Saved for backward as on CUDA: the inputs, the
    output and the log-sum-exp, no (T x T) weights; the backward writes the bias's gradient
    at the full (batch, heads, queries, keys) shape, then sums it to the mask's own."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor, is_causal: bool, scale: float | None) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        q, k, v, mask, out, lse = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=mask,
            scale=ctx.scale)
        full = (*q.shape[:-1], k.shape[-2])
        if is_fake(q):  # the simulation: CUDA's kernel writes only this, block by block
            d_bias = q.new_empty(full, dtype=mask.dtype)
        else:  # real tensors (tests): the value, dS = P * (dP - rowsum(dO * O))
            d_bias = _bias_grad(q, k, v, mask, out, grad, ctx.scale)
        return gq, gk, gv, d_bias.sum_to_size(mask.shape), None, None


def _bias_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               out: torch.Tensor, grad: torch.Tensor, scale: float | None) -> torch.Tensor:
    # (sdpa takes no explicit mask with is_causal)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    p = torch.softmax(scores + mask, dim=-1)
    return (p * (grad @ v.transpose(-2, -1) - (grad * out).sum(-1, keepdim=True))).to(mask.dtype)


class _Route(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            return routed_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_attention_policy() -> Iterator[None]:
    """Inside, ``F.scaled_dot_product_attention`` saves for backward what it would on CUDA."""
    with _Route():
        yield
