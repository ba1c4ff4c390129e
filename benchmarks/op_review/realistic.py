"""Realistic models where an op's backward receives an expanded (stride-0) gradient from a
mean/sum pooling right after it, and forward-scratch ops at the forward's peak."""
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task
T, D, K = 128, 64, 10
def ds(xshape, ylong=K):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(256, *xshape, generator=g), torch.randint(0, ylong, (256,), generator=g))
def ce(o, y): return F.cross_entropy(o, y)
def task(model, xshape, loss=ce):
    return Task(model=model, train_data=ds(xshape), loss_fn=loss, lr=1e-3, base_batch_size=8)
class LNMeanPool(nn.Module):
    """Encoder-ish: Linear, GELU, final LayerNorm, mean over tokens, classifier head."""
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.ln = nn.LayerNorm(D); self.head = nn.Linear(D, K)
    def forward(self, x): return self.head(self.ln(F.gelu(self.l(x))).mean(1))
def ln_meanpool(): return task(LNMeanPool, (T, D))
class GeluMeanPool(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.head = nn.Linear(D, K)
    def forward(self, x): return self.head(F.gelu(self.l(x)).mean(1))
def gelu_meanpool(): return task(GeluMeanPool, (T, D))
class CNNGap(nn.Module):
    """conv-relu-maxpool-conv-relu, global average pool by .mean((2,3)), head."""
    def __init__(self, pool_last=False):
        super().__init__(); self.c1 = nn.Conv2d(3, 16, 3, padding=1); self.c2 = nn.Conv2d(16, 32, 3, padding=1); self.head = nn.Linear(32, K); self.pl = pool_last
    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.relu(self.c2(h))
        if self.pl: h = F.max_pool2d(h, 2)
        return self.head(h.mean((2, 3)))
def cnn_gap(): return task(CNNGap, (3, 32, 32))
def cnn_pool_gap(): return task(lambda: CNNGap(True), (3, 32, 32))
class BNGap(nn.Module):
    def __init__(self):
        super().__init__(); self.c1 = nn.Conv2d(3, 32, 3, padding=1); self.bn = nn.BatchNorm2d(32); self.head = nn.Linear(32, K)
    def forward(self, x): return self.head(self.bn(self.c1(x)).mean((2, 3)))
def bn_gap(): return task(BNGap, (3, 32, 32))
class GNGap(nn.Module):
    def __init__(self):
        super().__init__(); self.c1 = nn.Conv2d(3, 32, 3, padding=1); self.gn = nn.GroupNorm(4, 32); self.head = nn.Linear(32, K)
    def forward(self, x): return self.head(self.gn(self.c1(x)).mean((2, 3)))
def gn_gap(): return task(GNGap, (3, 32, 32))
class AttnPoolSoftmaxSum(nn.Module):
    """softmax over tokens, then sum (expanded grad into softmax backward? no: mul first)."""
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.head = nn.Linear(D, K)
    def forward(self, x):
        h = self.l(x)
        return self.head(F.softmax(h, 1).sum(1))
def softmax_sum(): return task(AttnPoolSoftmaxSum, (T, D))
class UpsampleMean(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 8, 1); self.head = nn.Linear(8, K)
    def forward(self, x): return self.head(F.interpolate(self.c(x), scale_factor=2, mode="bilinear").mean((2, 3)))
def upsample_mean(): return task(UpsampleMean, (3, 32, 32))
class GenSumLoss(nn.Module):
    """GAN-generator-like: output image via upsampling + tanh; loss = -out.mean()."""
    def __init__(self):
        super().__init__(); self.l = nn.Linear(64, 8 * 16 * 16); self.c = nn.Conv2d(8, 3, 3, padding=1)
    def forward(self, x):
        h = self.l(x).view(-1, 8, 16, 16)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return torch.tanh(self.c(h))
def gen_mean_loss():
    return task(GenSumLoss, (64,), loss=lambda o, y: -o.mean())
class LNOut(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.ln = nn.LayerNorm(D)
    def forward(self, x): return self.ln(self.l(x))
def ln_out_mean_loss(): return task(LNOut, (T, D), loss=lambda o, y: o.mean())
# forward-scratch at the forward peak: loss with transient buffers on a wide output
class Wide(nn.Module):
    def __init__(self, n=2048):
        super().__init__(); self.l = nn.Linear(D, n)
    def forward(self, x): return self.l(x)
def wide_bce_logits():
    return Task(model=Wide, train_data=TensorDataset(torch.randn(256, T, D), (torch.rand(256, T, 2048) > 0.5).float()),
                loss_fn=F.binary_cross_entropy_with_logits, lr=1e-3, base_batch_size=8)
def wide_huber():
    return Task(model=Wide, train_data=TensorDataset(torch.randn(256, T, D), torch.randn(256, T, 2048)),
                loss_fn=F.huber_loss, lr=1e-3, base_batch_size=8)
def wide_l1():
    return Task(model=Wide, train_data=TensorDataset(torch.randn(256, T, D), torch.randn(256, T, 2048)),
                loss_fn=F.l1_loss, lr=1e-3, base_batch_size=8)
def wide_ce_3d():
    return Task(model=Wide, train_data=TensorDataset(torch.randn(256, T, D), torch.randint(0, 2048, (256, T))),
                loss_fn=lambda o, y: F.cross_entropy(o.transpose(1, 2), y), lr=1e-3, base_batch_size=8)
def wide_logsumexp():
    return Task(model=Wide, train_data=TensorDataset(torch.randn(256, T, D), torch.zeros(256)),
                loss_fn=lambda o, y: o.logsumexp(-1).mean(), lr=1e-3, base_batch_size=8)
class MedianPool(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, 256); self.head = nn.Linear(256, K)
    def forward(self, x): return self.head(self.l(x).median(1).values)
def median_pool(): return task(MedianPool, (T, D))
class KthPool(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, 256); self.head = nn.Linear(256, K)
    def forward(self, x): return self.head(self.l(x).kthvalue(3, 1).values)
def kth_pool(): return task(KthPool, (T, D))
class QuantilePool(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, 256); self.head = nn.Linear(256, K)
    def forward(self, x): return self.head(torch.quantile(self.l(x), 0.9, dim=1))
def quantile_pool(): return task(QuantilePool, (T, D))
class MaxAll(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.head = nn.Linear(D, K)
    def forward(self, x):
        h = self.l(x)
        return self.head((h / h.abs().max()).mean(1))
def max_all_norm(): return task(MaxAll, (T, D))
class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.b = nn.Bilinear(D, D, K)
    def forward(self, x):
        h = self.l(x)
        return self.b(h, h).mean(1)
def bilinear_head(): return task(BilinearHead, (T, D))
class SpecNet(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.head = nn.Linear(D // 2 + 1, K)
    def forward(self, x):
        return self.head(torch.fft.rfft(self.l(x), dim=-1).abs().mean(1))
def rfft_net(): return task(SpecNet, (T, D))
class SpecNetT(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.head = nn.Linear(D, K)
    def forward(self, x):
        return self.head(torch.fft.rfft(self.l(x), dim=1).abs().mean(1))
def rfft_time_net(): return task(SpecNetT, (T, D))
class FNO(nn.Module):
    """Fourier-layer-ish: rfft over time, complex weight multiply on modes, irfft."""
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.w = nn.Parameter(torch.randn(16, D, dtype=torch.cfloat) * 0.1); self.head = nn.Linear(D, K)
    def forward(self, x):
        h = self.l(x)
        f = torch.fft.rfft(h, dim=1)[:, :16] * self.w
        h = torch.fft.irfft(f, n=T, dim=1)
        return self.head(F.gelu(h).mean(1))
def fno(): return task(FNO, (T, D))
class MatExp(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(16, 16); self.head = nn.Linear(256, K)
    def forward(self, x):
        return self.head(torch.linalg.matrix_exp(0.1 * self.l(x)).flatten(1))
def matrix_exp_net(): return task(MatExp, (16, 16))
class FoldNet(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 8, 1); self.l = nn.Linear(72, 72); self.head = nn.Linear(8, K)
    def forward(self, x):
        h = F.unfold(self.c(x), 3, padding=1)          # (B, 72, L)
        h = self.l(h.transpose(1, 2)).transpose(1, 2)  # mix within each patch
        h = F.fold(h, (32, 32), 3, padding=1)
        return self.head(h.mean((2, 3)))
def fold_net(): return task(FoldNet, (3, 32, 32))
class Proto(nn.Module):
    """Prototype classifier: distances of token features to 256 prototypes, min over tokens."""
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, D); self.p = nn.Parameter(torch.randn(256, D)); self.head = nn.Linear(256, K)
    def forward(self, x):
        d = torch.cdist(self.l(x), self.p.expand(x.shape[0], -1, -1))  # (B, T, 256)
        return self.head(d.amin(1))
def cdist_proto(): return task(Proto, (T, D))
class SvdFeat(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(16, 16); self.head = nn.Linear(64 * 16, K)
    def forward(self, x): return self.head(torch.linalg.svdvals(self.l(x)).flatten(1))
def svdvals_feat(): return task(SvdFeat, (64, 16, 16))
class Fft2Feat(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv2d(3, 8, 1); self.head = nn.Linear(8, K)
    def forward(self, x): return self.head(torch.fft.fft2(self.c(x)).abs().mean((2, 3)))
def fft2_feat(): return task(Fft2Feat, (3, 32, 32))
class InvFeat(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(16, 16); self.head = nn.Linear(64 * 16 * 16, K)
    def forward(self, x): return self.head(torch.linalg.inv(self.l(x) + 4 * torch.eye(16)).flatten(1))
def inv_feat(): return task(InvFeat, (64, 16, 16))
class AffineSTN(nn.Module):
    """Spatial transformer: predict theta, affine_grid, grid_sample, GAP by mean."""
    def __init__(self):
        super().__init__(); self.loc = nn.Linear(3 * 32 * 32, 6); self.c = nn.Conv2d(3, 8, 1); self.head = nn.Linear(8, K)
    def forward(self, x):
        th = self.loc(x.flatten(1)).view(-1, 2, 3)
        g = F.affine_grid(th, (x.shape[0], 3, 64, 64), align_corners=False)
        return self.head(self.c(F.grid_sample(x, g, align_corners=False)).mean((2, 3)))
def affine_stn(): return task(AffineSTN, (3, 32, 32))
class TextCNNMaxMean(nn.Module):
    def __init__(self):
        super().__init__(); self.c = nn.Conv1d(D, D, 3, padding=1); self.head = nn.Linear(D, K)
    def forward(self, x): return self.head(F.max_pool1d(self.c(x.transpose(1, 2)), 2).mean(-1))
def textcnn_pool_mean(): return task(TextCNNMaxMean, (T, D))
class SegHead(nn.Module):
    """DeepLab-style: conv features at 1/4 resolution, 1x1 classifier, logits upsampled
    bilinearly to the input size, per-pixel cross-entropy."""
    def __init__(self, mode="bilinear"):
        super().__init__(); self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1); self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1); self.cls = nn.Conv2d(32, 21, 1); self.mode = mode
    def forward(self, x):
        h = self.cls(F.relu(self.c2(F.relu(self.c1(x)))))
        return F.interpolate(h, size=x.shape[-2:], mode=self.mode, **({} if self.mode == "nearest" else {"align_corners": False}))
def _seg(mode):
    g = torch.Generator().manual_seed(0)
    return Task(model=lambda: SegHead(mode), train_data=TensorDataset(torch.randn(128, 3, 64, 64, generator=g), torch.randint(0, 21, (128, 64, 64), generator=g)),
                loss_fn=F.cross_entropy, lr=1e-3, base_batch_size=8)
def seg_bilinear(): return _seg("bilinear")
def seg_nearest(): return _seg("nearest")
