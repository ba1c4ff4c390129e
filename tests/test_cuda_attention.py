"""CUDA's attention-kernel choice in a CPU simulation (bsselect/memory/cuda_attention.py).

The GPU numbers this reproduces are in docs/benchmarks-cuda.md; here, on the CPU: the choice
itself case by case, that the routed call computes what ``scaled_dot_product_attention``
computes, and that a simulated step's memory per sample moves by exactly the attention
weights the two devices' kernels save differently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.memory.cuda_attention import cuda_backend, cuda_attention_policy, routed_attention
from bsselect.memory.simulated import simulate_step_peak
from bsselect.precision import Precision
from bsselect.step import StepSettings

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def qkv(heads: int = 8, kv_heads: int = 8, head_dim: int = 64, dims: int = 4):
    q = torch.empty(2, heads, 16, head_dim, device="meta")
    k = torch.empty(2, kv_heads, 16, head_dim, device="meta")
    if dims == 3:
        q, k = q[0], k[0]
    return q, k, k


@pytest.mark.parametrize("dtype,mask,kv_heads,head_dim,dims,expected", [
    (bf16, False, 8, 64, 4, "flash"),
    (fp16, False, 2, 128, 4, "flash"),        # flash takes grouped-query heads
    (bf16, True, 8, 64, 4, "efficient"),      # flash takes no explicit mask
    (bf16, True, 2, 64, 4, "math"),           # efficient takes no grouped-query heads
    (fp32, False, 8, 64, 4, "efficient"),     # flash is fp16/bf16 only
    (fp32, False, 2, 64, 4, "math"),          # fp32 + GQA: the Qwen2/Llama-3 case
    (fp32, True, 8, 64, 4, "efficient"),
    (bf16, False, 8, 512, 4, "efficient"),    # head dim over flash's 256
    (fp32, False, 8, 6, 4, "math"),           # not aligned for efficient
    (bf16, False, 8, 64, 3, "math"),          # fused kernels need 4-D inputs
    (torch.float64, False, 8, 64, 4, "math"),
])
def test_backend_choice(dtype, mask, kv_heads, head_dim, dims, expected):
    q, k, v = qkv(kv_heads=kv_heads, head_dim=head_dim, dims=dims)
    assert cuda_backend(q, k, v, has_mask=mask, dtype=dtype) == expected


@pytest.mark.parametrize("kv_heads,mask,causal", [(4, False, True), (2, False, True),
                                                   (4, True, False), (2, True, False)])
def test_routed_call_computes_attention(kv_heads, mask, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, 10, 8, generator=g) for _ in range(2))
    m = torch.rand(10, 10, generator=g) > 0.3 if mask else None
    if m is not None:
        m[:, 0] = True  # no fully masked row
    gqa = kv_heads != 4
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                          enable_gqa=gqa)
    got = routed_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(got, want)
    with cuda_attention_policy():  # through the mode, positional arguments too
        again = F.scaled_dot_product_attention(q, k, v, m, 0.0, causal, enable_gqa=gqa)
    torch.testing.assert_close(again, want)


T, D, H = 64, 64, 4


class Attention(nn.Module):
    def __init__(self, kv_heads: int, dropout: float) -> None:
        super().__init__()
        self.kv, self.p = kv_heads, dropout
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.k, self.v = nn.Linear(D, D // H * kv_heads), nn.Linear(D, D // H * kv_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q = self.q(x).view(b, T, H, D // H).transpose(1, 2)
        k = self.k(x).view(b, T, self.kv, D // H).transpose(1, 2)
        v = self.v(x).view(b, T, self.kv, D // H).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p, is_causal=True,
                                           enable_gqa=self.kv != H)
        return self.o(o.transpose(1, 2).reshape(b, T, D))


def per_sample(kv_heads: int, dropout: float, precision: Precision, target: str | None
               ) -> float:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, T, D, generator=g), torch.randn(64, T, D, generator=g))
    task = Task(model=lambda: Attention(kv_heads, dropout), train_data=data, loss_fn=F.mse_loss,
                optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))
    settings = StepSettings(precision=precision, target_device=target)
    peaks = [simulate_step_peak(task, b, kernel_workspace=False, settings=settings).peak_bytes
             for b in (8, 16)]
    return (peaks[1] - peaks[0]) / 8


def test_fp32_grouped_query_attention_saves_the_weights_on_cuda():
    """fp32 with GQA: the CPU's fused kernel saves no (T x T) weights; CUDA's math fallback
    saves the softmax output of every head (float32)."""
    weights = H * T * T * 4
    extra = per_sample(2, 0.0, Precision.fp32, "cuda") - per_sample(2, 0.0, Precision.fp32, None)
    assert weights <= extra <= 2.5 * weights


def test_dropout_keeps_the_fused_kernel_on_cuda():
    """bf16 with attention dropout: the CPU falls back to math (weights, dropout mask and the
    dropped weights saved); CUDA's flash keeps only a seed, so no (T x T) tensor per head."""
    cpu = per_sample(H, 0.1, Precision.bf16, None)
    cuda = per_sample(H, 0.1, Precision.bf16, "cuda")
    assert cpu - cuda >= H * T * T * 2  # at least the bf16 weights
    assert cuda == pytest.approx(per_sample(H, 0.0, Precision.bf16, "cuda"), rel=0.02)


@pytest.mark.parametrize("shape", [(1, 4, 10, 10), (2, 1, 10, 10), (10, 10)])
def test_routed_call_differentiates_a_learned_bias(shape):
    """T5's relative-position bias is an additive mask that needs a gradient; the CPU's fused
    op refuses to differentiate its mask (every T5 step on a CUDA target failed: review)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g, requires_grad=True) for _ in range(3))
    m = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(2, 4, 10, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    got = routed_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v, m)),
                    torch.autograd.grad((want * w).sum(), (q, k, v, m))):
        torch.testing.assert_close(a, b)


class LearnedBias(nn.Module):
    def __init__(self, learned: bool = True) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.bias = nn.Parameter(torch.zeros(1, H, T, T), requires_grad=learned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.o(o.transpose(1, 2).reshape(b, T, D))


def test_a_learned_bias_keeps_the_fused_kernel_on_cuda():
    """fp32 with a learned bias: the CPU runs math (the weights of every head saved); CUDA's
    memory-efficient kernel saves none, and its backward writes the bias's gradient for every
    sample and head: exactly that much per sample more than the same step with the bias
    frozen (where the CPU's fused kernel runs too)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, T, D, generator=g), torch.randn(64, T, D, generator=g))

    def per_sample_of(learned: bool, target: str | None) -> float:
        task = Task(model=lambda: LearnedBias(learned), train_data=data, loss_fn=F.mse_loss,
                    optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))
        settings = StepSettings(precision=Precision.fp32, target_device=target)
        peaks = [simulate_step_peak(task, b, kernel_workspace=False,
                                    settings=settings).peak_bytes for b in (8, 16)]
        return (peaks[1] - peaks[0]) / 8

    cuda = per_sample_of(True, "cuda")
    assert cuda - per_sample_of(False, "cuda") == H * T * T * 4
    assert per_sample_of(True, None) > cuda


class Checkpointed(nn.Module):
    """The attention block under activation checkpointing, as a user's model or
    ``--activation-checkpointing`` runs it: recomputed in the backward."""

    def __init__(self, dropout: float, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = Attention(H, dropout), kind
        self.pre = nn.Linear(D, D)  # a reentrant checkpoint needs an input that needs grad
        if kind == "composable":
            from torch.distributed._composable import checkpoint

            checkpoint(self.inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        if self.kind == "composable":
            return self.inner(self.pre(x))
        return checkpoint(self.inner, self.pre(x), use_reentrant=self.kind == "reentrant")


@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant", "composable"])
def test_the_recomputation_runs_cuda_attention_too(kind):
    """Function modes are not active in the backward, where checkpointing recomputes: the
    recomputation ran the CPU's math attention where the forward had run CUDA's flash, and
    non-reentrant checkpointing failed the step on the mismatch (review: GPT-2 with
    --activation-checkpointing --target cuda, exit 1). With flash in both, attention dropout
    adds no (T x T) tensor per head, as without checkpointing."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, T, D, generator=g), torch.randn(64, T, D, generator=g))

    def per_sample_checkpointed(dropout: float) -> float:
        task = Task(model=lambda: Checkpointed(dropout, kind), train_data=data,
                    loss_fn=F.mse_loss, optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))
        settings = StepSettings(precision=Precision.bf16, target_device="cuda")
        peaks = [simulate_step_peak(task, b, kernel_workspace=False,
                                    settings=settings).peak_bytes for b in (8, 16)]
        return (peaks[1] - peaks[0]) / 8

    assert per_sample_checkpointed(0.1) == pytest.approx(per_sample_checkpointed(0.0), rel=0.02)


def test_modes_are_entered_around_both_kinds_of_recomputation_and_then_removed():
    from torch.overrides import TorchFunctionMode
    from torch.utils import checkpoint as ck

    from bsselect.memory.recompute import recomputed_under

    seen: list[str] = []

    class Spy(TorchFunctionMode):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(self.name)
            return func(*args, **(kwargs or {}))

    def block(q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)

    before = (ck._checkpoint_without_reentrant_generator, ck.CheckpointFunction.backward)
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    for reentrant in (False, True):
        seen.clear()
        with Spy("outer"), recomputed_under(lambda: Spy("outer")), \
                Spy("inner"), recomputed_under(lambda: Spy("inner")):
            ck.checkpoint(block, q, use_reentrant=reentrant).sum().backward()
        # forward: the innermost mode first; the recomputation: the same order
        assert seen == ["inner", "outer", "inner", "outer"], (reentrant, seen)
    assert (ck._checkpoint_without_reentrant_generator, ck.CheckpointFunction.backward) == before
    seen.clear()
    ck.checkpoint(block, q, use_reentrant=False).sum().backward()
    assert seen == []


def test_cuda_autocast_policy_registers_once_when_re_entered(monkeypatch):
    """Checkpointing's recomputation enters the simulation's modes again inside the step. A
    second Python kernel on the AutocastCPU key is an error in torch 2.11 ("already a kernel
    registered from python"; every bf16 checkpointed model failed to simulate on the CUDA
    machine), so a nested entry registers nothing, and the outer policy holds after it."""
    from bsselect.memory import cuda_autocast

    made: list[object] = []
    real = torch.library.Library

    def counting(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.library, "Library", counting)
    x = torch.randn(4, 8)

    def softmax_dtype() -> torch.dtype:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.softmax(x.bfloat16(), -1).dtype

    assert softmax_dtype() == torch.bfloat16  # the CPU's list
    with cuda_autocast.cuda_autocast_policy():
        assert softmax_dtype() == torch.float32  # CUDA's: softmax in fp32
        with cuda_autocast.cuda_autocast_policy():
            assert softmax_dtype() == torch.float32
        assert softmax_dtype() == torch.float32
    assert softmax_dtype() == torch.bfloat16
    assert len(made) == 1


@pytest.mark.parametrize("kind", ["none", "non-reentrant", "reentrant", "composable"])
def test_a_step_that_recomputes_says_so(kind):
    """``StepPeak.recomputes``: the CUDA terms give such a step a larger fragmentation
    allowance (measured on an H200: reserved up to 1.27x the tensors at the largest batch
    that trained, against 1.15x without checkpointing)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, T, D, generator=g), torch.randn(16, T, D, generator=g))
    model = (lambda: nn.Sequential(nn.Linear(D, D), Attention(H, 0.0))) if kind == "none" \
        else (lambda: Checkpointed(0.0, kind))
    task = Task(model=model, train_data=data, loss_fn=F.mse_loss,
                optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))
    for target in (None, "cuda"):
        step = simulate_step_peak(task, 4, settings=StepSettings(target_device=target))
        assert step.recomputes is (kind != "none")


def test_cuda_terms_give_a_recomputing_step_more_fragmentation_headroom():
    from bsselect.memory.targets import (FRAGMENTATION_FRACTION,
                                         FRAGMENTATION_FRACTION_RECOMPUTE, cuda_terms)

    def headroom(recomputes: bool):
        terms = cuda_terms(10**9, None, False, recomputes=recomputes)
        return next(t for t in terms if t.name == "fragmentation headroom")

    assert headroom(False).bytes == int(FRAGMENTATION_FRACTION * 10**9)
    assert headroom(True).bytes == int(FRAGMENTATION_FRACTION_RECOMPUTE * 10**9)
    assert FRAGMENTATION_FRACTION_RECOMPUTE > FRAGMENTATION_FRACTION
    assert "checkpointing" in headroom(True).note and "checkpointing" not in headroom(False).note
