"""Small models whose CPU step peaks inside a kernel's own scratch, which fake tensors do not
see (review, session 28): upsampling, nn.Bilinear, kthvalue, F.fold, batch norm's backward,
softmax's backward on a stride-0 gradient, a sum of bools over an activation, a batch of
matrix exponentials and an FFT over time; (session 29) pooling backwards on a stride-0
gradient, conv_tbc, F.affine_grid, a whole-tensor max or median, and forwards that end in
median, logsumexp, cdist, huber or binary cross-entropy with logits; and (session 30, a
differential fuzz) layer norm, GELU and index_select on layouts that make the kernel copy,
group norm's backward, index_select's, and a one-channel image permuted from NHWC; (session
31) batch norm's forward statistics on a 2-d input, checkpointed so that they are the peak."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task

K = 10


def _seeded(model, shape: tuple[int, ...], targets, loss_fn) -> Task:
    """The task of every model here: 128 seeded inputs of ``shape``, then ``targets(g)``."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, *shape, generator=g), targets(g))
    return Task(model=model, train_data=data, loss_fn=loss_fn, lr=1e-3, base_batch_size=8)


def _task(model, shape: tuple[int, ...]) -> Task:
    return _seeded(model, shape, lambda g: torch.randint(0, K, (128,), generator=g),
                   F.cross_entropy)


class Upsample(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.conv(x), scale_factor=2, mode=self.mode)
        return self.head(up.mean((2, 3)))


class BilinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.bilinear = nn.Bilinear(32, 32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        return self.bilinear(h, x)


class KthPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 128)
        self.head = nn.Linear(128, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x).kthvalue(3, 1).values)


class KthLast(KthPool):
    """``kthvalue`` with its dim left out (the last): the op dispatches two arguments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x).transpose(1, 2).kthvalue(3).values.mean(1, keepdim=True)
                         .expand(-1, 128))


class Fold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.mix = nn.Linear(72, 72)
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(self.conv(x), 3, padding=1)
        cols = self.mix(cols.transpose(1, 2)).transpose(1, 2)
        return self.head(F.fold(cols, (16, 16), 3, padding=1).mean((2, 3)))


class BatchNormPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class SoftmaxSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.softmax(self.proj(x), 1).sum(1))


class BoolSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head((h / (h > 0).sum(1, keepdim=True).clamp(min=1)).mean(1))


class MatrixExp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 64)
        self.head = nn.Linear(64, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = 0.1 * self.proj(x).view(-1, 8, 8)
        return self.head(torch.linalg.matrix_exp(a).flatten(1))


class SpectrumOverTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.rfft(self.proj(x), dim=1).abs().mean(1))


class PoolOverTime(nn.Module):
    """max_pool1d, then a mean over time: the pool's backward gets a stride-0 gradient."""

    def __init__(self, pool=F.max_pool1d) -> None:
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.proj(x).transpose(1, 2), 2).mean(2))


class Scaled(nn.Module):
    """``op(x * p)`` with a one-element parameter ``p``: the op's memory is the step's, and
    with the loss ``sum`` its backward gets a stride-0 gradient."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.p = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x * self.p)


def _op_task(op, shape: tuple[int, ...], model=None) -> Task:
    return _seeded(model or (lambda: Scaled(op)), shape, lambda g: torch.zeros(128),
                   lambda out, y: out.sum())


class ConvTBC(nn.Module):
    """fairseq's convolution over (time, batch, channel), summed by the loss: its backward
    multiplies slices of a stride-0 gradient, which BLAS cannot take as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((3, 32, 32), 0.01))
        self.bias = nn.Parameter(torch.zeros(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.conv_tbc(x.transpose(0, 1).contiguous(), self.weight, self.bias, 1)


class SpatialTransformer(nn.Module):
    """F.affine_grid at a larger output size than its input, then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(256, 6)
        self.head = nn.Linear(2, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 1, 48, 48], align_corners=False)
        return self.head(grid.mean((1, 2)))


class ReduceOverTime(nn.Module):
    """A forward that ends in a kernel with input-sized scratch, over a wide activation."""

    def __init__(self, reduce) -> None:
        super().__init__()
        self.reduce = reduce
        self.proj = nn.Linear(32, 128)
        self.head = nn.Linear(128, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reduce(self.proj(x)))


def _dense_task(loss_fn) -> Task:
    """A dense per-position output (B, 64, 128) and a loss over all of it."""
    return _seeded(lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 128)),
                   (64, 32), lambda g: torch.rand(128, 64, 128, generator=g), loss_fn)


def _sequence_task(model, classes: int) -> Task:
    """Per-position classes, cross-entropy on (B, K, T) logits, as a sequence labeller's."""
    return _seeded(model, (64, 32), lambda g: torch.randint(0, classes, (128, 64), generator=g),
                   lambda out, y: F.cross_entropy(out.transpose(1, 2), y))


class MatrixFeatures(nn.Module):
    """Per-position 16 x 16 matrices, a LAPACK op on each, a linear head."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.proj = nn.Linear(32, 256)
        self.head = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.proj(x).view(x.shape[0], x.shape[1], 16, 16)
        return self.head(self.op(m).mean(1))


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _norm_over_time() -> nn.Module:
    """A conv over time, then LayerNorm over channels: the norm's input is (B, T, C) of a
    (B, C, T) activation transposed, not contiguous (speech encoders' feature projection)."""
    return nn.Sequential(nn.Conv1d(32, 48, 3, padding=1), Lambda(lambda h: h.transpose(1, 2)),
                         nn.LayerNorm(48), Lambda(lambda h: h.mean(1)), nn.Linear(48, K))


def _norm_permuted_image() -> nn.Module:
    """LayerNorm over channels of an image permuted to channels-last and back (ConvNeXt)."""
    return nn.Sequential(Lambda(lambda x: x.permute(0, 2, 3, 1)), nn.LayerNorm(12),
                         Lambda(lambda x: x.permute(0, 3, 1, 2)), nn.Flatten(),
                         nn.Linear(12 * 12 * 12, K))


def _one_channel_nhwc(act: nn.Module, conv: nn.Module) -> nn.Module:
    """A grayscale image stored (B, H, W, 1) and permuted to (B, 1, H, W): strides (HW, 1, W,
    1), contiguous and channels-last at once; ATen's pointwise kernels give a standard layout
    where fake tensors keep those strides, and the conv after takes another path."""
    return nn.Sequential(Lambda(lambda x: x.permute(0, 3, 1, 2)), act, conv,
                         Lambda(lambda h: h.mean((2, 3))), nn.Linear(8, K))


_REVERSED = torch.arange(31, -1, -1)


def _median_over_time(h: torch.Tensor) -> torch.Tensor:
    return h.median(1).values


class CheckpointedBatchNorm(nn.Module):
    """BatchNorm1d inside a checkpoint: its forward runs again in the backward, and the
    step peaks inside the kernel's per-channel statistics (session 31's fuzz: 384 bytes low
    in each phase)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.BatchNorm1d(32), nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.norm, x, use_reentrant=False))


TASKS = {
    "max_pool1d_mean": lambda: _task(PoolOverTime, (64, 32)),
    "adaptive_max_pool1d_mean": lambda: _task(
        lambda: PoolOverTime(lambda h, k: F.adaptive_max_pool1d(h, 16)), (64, 32)),
    "avg_pool3d": lambda: _op_task(lambda h: F.avg_pool3d(h, 2), (4, 16, 16, 16)),
    "conv_tbc": lambda: _op_task(None, (64, 32), model=ConvTBC),
    "affine_grid": lambda: _task(SpatialTransformer, (1, 16, 16)),
    "whole_max": lambda: _op_task(lambda h: h.max().reshape(1), (64, 32)),
    "whole_median": lambda: _op_task(lambda h: h.median().reshape(1), (64, 32)),
    "median_over_time": lambda: _task(lambda: ReduceOverTime(_median_over_time), (64, 32)),
    "logsumexp_over_time": lambda: _task(
        lambda: ReduceOverTime(lambda h: torch.logsumexp(h, 1)), (64, 32)),
    "cdist_pool": lambda: _task(
        lambda: ReduceOverTime(lambda h: torch.cdist(h, h).mean(2)[:, :1].expand(-1, 128)),
        (64, 32)),
    "huber_dense": lambda: _dense_task(F.huber_loss),
    "cross_entropy_bkt": lambda: _sequence_task(
        lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 512)), 512),
    "log_softmax_transposed_sum": lambda: _op_task(
        lambda h: F.log_softmax(h.transpose(1, 2), 1), (64, 128)),
    "svdvals_features": lambda: _task(lambda: MatrixFeatures(torch.linalg.svdvals), (64, 32)),
    "pinv_features": lambda: _task(lambda: MatrixFeatures(
        lambda m: torch.linalg.pinv(m).diagonal(dim1=-2, dim2=-1)), (64, 32)),
    "inverse_features": lambda: _task(lambda: MatrixFeatures(
        lambda m: torch.linalg.inv(m + 8 * torch.eye(16)).diagonal(dim1=-2, dim2=-1)),
        (64, 32)),
    "bce_logits_dense": lambda: _dense_task(F.binary_cross_entropy_with_logits),

    "matrix_exp": lambda: _task(MatrixExp, (32,)),
    "rfft_over_time": lambda: _task(SpectrumOverTime, (64, 32)),
    "upsample_bilinear": lambda: _task(lambda: Upsample("bilinear"), (3, 16, 16)),
    "upsample_nearest": lambda: _task(lambda: Upsample("nearest"), (3, 16, 16)),
    "bilinear": lambda: _task(BilinearHead, (32,)),
    "kthvalue": lambda: _task(KthPool, (64, 32)),
    "kthvalue_last_dim": lambda: _task(KthLast, (64, 32)),
    "fold": lambda: _task(Fold, (3, 16, 16)),
    "batch_norm": lambda: _task(BatchNormPool, (3, 16, 16)),
    "softmax_sum": lambda: _task(SoftmaxSum, (64, 32)),
    "bool_sum": lambda: _task(BoolSum, (64, 32)),
    # session 30 (fuzz): layouts that make the CPU kernel copy, or pick another path
    "layer_norm_over_time": lambda: _task(_norm_over_time, (32, 64)),
    "layer_norm_permuted_image": lambda: _task(_norm_permuted_image, (12, 12, 12)),
    "layer_norm_sum": lambda: _op_task(lambda h: F.layer_norm(h, (32,)), (64, 32)),
    "gelu_sum": lambda: _op_task(F.gelu, (64, 32)),
    "group_norm_linear": lambda: _task(
        lambda: nn.Sequential(nn.Linear(32, 64), nn.GroupNorm(4, 64), nn.Linear(64, K)), (32,)),
    "index_select_slice": lambda: _task(lambda: nn.Sequential(
        nn.Linear(32, 128), Lambda(lambda h: h[:, ::2].index_select(1, torch.arange(62, -1, -2))),
        nn.Linear(32, K)), (32,)),
    "index_select_over_time": lambda: _task(lambda: nn.Sequential(
        nn.Linear(32, 32), Lambda(lambda h: h.index_select(1, _REVERSED).mean(1)),
        nn.Linear(32, K)), (32, 32)),
    "one_channel_nhwc_conv": lambda: _task(
        lambda: _one_channel_nhwc(nn.ReLU(), nn.Conv2d(1, 8, 3, padding=1)), (12, 12, 1)),
    "one_channel_nhwc_batch_norm": lambda: _task(
        lambda: _one_channel_nhwc(nn.BatchNorm2d(1), nn.Conv2d(1, 8, 3, padding=1)),
        (12, 12, 1)),
    "one_channel_nhwc_conv_transpose": lambda: _task(
        lambda: _one_channel_nhwc(nn.Softplus(), nn.ConvTranspose2d(1, 8, 3, padding=1)),
        (12, 12, 1)),
    "checkpointed_batch_norm_1d": lambda: _task(CheckpointedBatchNorm, (32,)),
}
