"""Op-dominated tasks: out = op(x * p) with a 1-element parameter, so the op's memory dominates."""
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task
T, D = 128, 64
def _sq(o, y): return o.float().square().sum()
class P(nn.Module):
    def __init__(self, fn):
        super().__init__(); self.fn = fn; self.p = nn.Parameter(torch.ones(1))
    def forward(self, x): return self.fn(x * self.p)
def mk(fn, xshape=(T, D), loss=None, ylong=None, yshape=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *xshape, generator=g)
    y = torch.randint(0, ylong, (64, *yshape), generator=g) if ylong else torch.zeros(64)
    return Task(model=lambda: P(fn), train_data=TensorDataset(x, y),
                loss_fn=loss or (_sq if __import__('os').environ.get('LOSS') == 'sq' else (lambda o, y: o.float().sum())), lr=1e-3, base_batch_size=8)
def op_kthvalue(): return mk(lambda h: torch.kthvalue(h, 5, 1).values)
def op_median(): return mk(lambda h: torch.median(h, 1).values)
def op_median_all(): return mk(lambda h: torch.median(h).reshape(1))
def op_nanmedian(): return mk(lambda h: torch.nanmedian(h, 1).values)
def op_quantile(): return mk(lambda h: torch.quantile(h, 0.3, dim=1))
def op_mode(): return mk(lambda h: torch.mode(h, 1).values)
def op_logsumexp(): return mk(lambda h: torch.logsumexp(h, 1))
def op_sort(): return mk(lambda h: torch.sort(h, 1).values)
def op_topk(): return mk(lambda h: torch.topk(h, 16, 1).values)
def op_msort(): return mk(lambda h: torch.msort(h))
def op_argsort_stable(): return mk(lambda h: h.gather(1, torch.argsort(h, 1, stable=True)))
def op_cumprod(): return mk(lambda h: torch.cumprod(h, 1))
def op_prod(): return mk(lambda h: torch.prod(h, 1))
def op_huber(): return mk(lambda h: F.huber_loss(h, torch.zeros_like(h)).reshape(1))
def op_bce_logits(): return mk(lambda h: F.binary_cross_entropy_with_logits(h, torch.ones_like(h)).reshape(1))
def op_l1(): return mk(lambda h: F.l1_loss(h, torch.zeros_like(h)).reshape(1))
def op_ce_3d(): return mk(lambda h: h, loss=lambda o, y: F.cross_entropy(o, y), ylong=T, yshape=(D,))
def op_ce_3d_T(): return mk(lambda h: h, loss=lambda o, y: F.cross_entropy(o.transpose(1, 2), y), ylong=D, yshape=(T,))
def op_ce_2d(): return mk(lambda h: h.reshape(-1, D), loss=lambda o, y: F.cross_entropy(o, y.reshape(-1)), ylong=D, yshape=(T,))
def op_nll_3d(): return mk(lambda h: F.log_softmax(h, 1), loss=lambda o, y: F.nll_loss(o, y), ylong=T, yshape=(D,))
def op_log_softmax_T(): return mk(lambda h: F.log_softmax(h.transpose(1, 2), 1))
def op_softmax_dim1(): return mk(lambda h: F.softmax(h, 1))
def op_cdist(): return mk(lambda h: torch.cdist(h, h))
def op_cdist_mm(): return mk(lambda h: torch.cdist(h, h, compute_mode="use_mm_for_euclid_dist"))
def op_cdist_p1(): return mk(lambda h: torch.cdist(h, h, p=1))
def op_fft2(): return mk(lambda h: torch.fft.fft2(h).abs())
def op_rfft2(): return mk(lambda h: torch.fft.rfft2(h).abs())
def op_rfft(): return mk(lambda h: torch.fft.rfft(h, dim=1).abs())
def op_fft_dim1(): return mk(lambda h: torch.fft.fft(h, dim=1).real)
def op_fftn(): return mk(lambda h: torch.fft.fftn(h, dim=(1, 2)).real)
def op_irfft2(): return mk(lambda h: torch.fft.irfft2(torch.fft.rfft2(h)))
def op_svdvals(): return mk(lambda h: torch.linalg.svdvals(h.reshape(-1, 16, 16)), xshape=(64, 16, 16))
def op_svd(): return mk(lambda h: torch.linalg.svd(h, full_matrices=False).S, xshape=(64, 16, 16))
def op_inv(): return mk(lambda h: torch.linalg.inv(h + 4 * torch.eye(16)), xshape=(64, 16, 16))
def op_pinv(): return mk(lambda h: torch.linalg.pinv(h), xshape=(64, 16, 16))
def op_slogdet(): return mk(lambda h: torch.linalg.slogdet(h + 4 * torch.eye(16)).logabsdet, xshape=(64, 16, 16))
def op_det(): return mk(lambda h: torch.linalg.det(h + 4 * torch.eye(16)), xshape=(64, 16, 16))
def op_matrix_norm2(): return mk(lambda h: torch.linalg.matrix_norm(h, ord=2), xshape=(64, 16, 16))
def op_matrix_norm_nuc(): return mk(lambda h: torch.linalg.matrix_norm(h, ord="nuc"), xshape=(64, 16, 16))
def op_matrix_exp(): return mk(lambda h: torch.linalg.matrix_exp(h * 0.1), xshape=(64, 16, 16))
def op_eig(): return mk(lambda h: torch.linalg.eigvals(h).abs(), xshape=(64, 16, 16))
def op_eigh(): return mk(lambda h: torch.linalg.eigvalsh(h + h.transpose(-1, -2)), xshape=(64, 16, 16))
def op_qr(): return mk(lambda h: torch.linalg.qr(h).R, xshape=(64, 16, 16))
def op_cholesky(): return mk(lambda h: torch.linalg.cholesky(h @ h.transpose(-1, -2) + torch.eye(16)), xshape=(64, 16, 16))
def op_solve(): return mk(lambda h: torch.linalg.solve(h + 4 * torch.eye(16), h), xshape=(64, 16, 16))
def op_lu(): return mk(lambda h: torch.linalg.lu(h).U, xshape=(64, 16, 16))
def op_lstsq(): return mk(lambda h: torch.linalg.lstsq(h + 4 * torch.eye(16), h).solution, xshape=(64, 16, 16))
def op_matrix_power(): return mk(lambda h: torch.linalg.matrix_power(h * 0.3, 5), xshape=(64, 16, 16))
def op_fold(): return mk(lambda h: F.fold(h, (16, 16), 3, padding=1), xshape=(8 * 9, 256))
def op_unfold(): return mk(lambda h: F.unfold(h, 3, padding=1), xshape=(8, 16, 16))
def op_bilinear():
    W = torch.randn(16, D, D)
    return mk(lambda h: F.bilinear(h, h, W))
def op_bilinear_param():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.b = nn.Bilinear(D, D, 16)
        def forward(self, x): return self.b(x, x)
    t = mk(lambda h: h); t.model = M; return t
def op_trilinear_einsum():
    W = torch.randn(16, D, D)
    return mk(lambda h: torch.einsum("bti,kij,btj->btk", h, W, h))
def op_gather(): 
    idx = torch.randint(0, T, (1, T, D))
    return mk(lambda h: torch.gather(h, 1, idx.expand(h.shape[0], -1, -1)))
def op_take_along(): 
    idx = torch.randint(0, T, (1, T, D))
    return mk(lambda h: torch.take_along_dim(h, idx, 1))
def op_index_put():
    idx = torch.randint(0, T, (T // 2,))
    return mk(lambda h: torch.zeros_like(h).index_put((slice(None), idx) if False else (torch.arange(h.shape[0])[:, None], idx[None]), h[:, :T // 2]))
def op_scatter():
    idx = torch.randint(0, T, (1, T, D))
    return mk(lambda h: torch.zeros_like(h).scatter(1, idx.expand(h.shape[0], -1, -1), h))
def op_embedding_renorm():
    pass
def op_std_mean(): return mk(lambda h: torch.std_mean(h, 1)[0])
def op_var_unbiased(): return mk(lambda h: torch.var(h, 1, correction=0))
def op_norm_p3(): return mk(lambda h: torch.linalg.vector_norm(h, 3, dim=1))
def op_norm_inf(): return mk(lambda h: torch.linalg.vector_norm(h, float("inf"), dim=1))
def op_amax(): return mk(lambda h: torch.amax(h, 1))
def op_max_all(): return mk(lambda h: h.max().reshape(1))
def op_renorm(): return mk(lambda h: torch.renorm(h, 2, 0, 1.0))
def op_histc(): return mk(lambda h: h + torch.histc(h.detach(), 10).sum())
def op_searchsorted(): 
    b = torch.linspace(-2, 2, 50)
    return mk(lambda h: h * torch.bucketize(h.detach(), b))
def op_trace(): return mk(lambda h: torch.diagonal(h, dim1=-2, dim2=-1).sum(-1), xshape=(64, 16, 16))
def op_kron(): return mk(lambda h: torch.kron(h[:, :4, :4], h[:, :8, :8]))
def op_cross(): return mk(lambda h: torch.linalg.cross(h[..., :3], h[..., 3:6]))
def op_polar(): return mk(lambda h: torch.view_as_real(torch.polar(h.abs(), h)).sum(-1))
def op_complex_abs(): return mk(lambda h: torch.complex(h, h).abs())
def op_angle(): return mk(lambda h: torch.complex(h, h * 2).angle())
def op_atan2(): return mk(lambda h: torch.atan2(h, h + 1))
def op_lerp(): return mk(lambda h: torch.lerp(h, h * 2, 0.3))
def op_addcmul(): return mk(lambda h: torch.addcmul(h, h, h, value=0.5))
def op_erfinv(): return mk(lambda h: torch.erfinv(torch.tanh(h) * 0.9))
def op_lgamma(): return mk(lambda h: torch.lgamma(h.abs() + 1))
def op_digamma(): return mk(lambda h: torch.digamma(h.abs() + 1))
def op_polygamma(): return mk(lambda h: torch.polygamma(1, h.abs() + 1))
def op_xlogy(): return mk(lambda h: torch.xlogy(h, h.abs() + 1))
def op_logaddexp(): return mk(lambda h: torch.logaddexp(h, h * 2))
def op_hypot(): return mk(lambda h: torch.hypot(h, h * 2))
def op_sinc(): return mk(lambda h: torch.sinc(h))
def op_nan_to_num(): return mk(lambda h: torch.nan_to_num(h))
def op_clamp_tensor(): return mk(lambda h: torch.clamp(h, min=torch.zeros(D), max=torch.ones(D)))
def op_fmod(): return mk(lambda h: torch.fmod(h, 0.7))
def op_div_floor(): return mk(lambda h: h - torch.div(h, 0.7, rounding_mode="floor"))
def op_float64(): return mk(lambda h: h.double().sin().float())
def op_half(): return mk(lambda h: h.half().float())
def op_bf16_sum(): return mk(lambda h: h.bfloat16().sum(1))
def op_bf16_softmax(): return mk(lambda h: h.bfloat16().softmax(1))
def op_bf16_logsumexp(): return mk(lambda h: h.bfloat16().logsumexp(1))
def op_bf16_norm(): return mk(lambda h: h.bfloat16().norm(dim=1))
def op_bf16_var(): return mk(lambda h: h.bfloat16().var(1))
def op_bf16_cumsum(): return mk(lambda h: h.bfloat16().cumsum(1))
def op_bf16_layernorm(): return mk(lambda h: F.layer_norm(h.bfloat16(), (D,)))
def op_bf16_groupnorm(): return mk(lambda h: F.group_norm(h.bfloat16().transpose(1, 2), 4))
def op_bf16_ce(): return mk(lambda h: h.bfloat16(), loss=lambda o, y: F.cross_entropy(o.reshape(-1, D), y.reshape(-1)), ylong=D, yshape=(T,))
def op_f16_sum(): return mk(lambda h: h.half().sum(1))
def op_grid_sample_3d(): 
    grid = torch.rand(1, 8, 8, 8, 3) * 2 - 1
    return mk(lambda h: F.grid_sample(h, grid.expand(h.shape[0], -1, -1, -1, -1), align_corners=False), xshape=(4, 16, 16, 16))
def op_interp_trilinear(): return mk(lambda h: F.interpolate(h, scale_factor=2, mode="trilinear"), xshape=(4, 8, 8, 8))
def op_interp_linear(): return mk(lambda h: F.interpolate(h, scale_factor=2, mode="linear"))
def op_upsample_nearest_exact(): return mk(lambda h: F.interpolate(h[:, None], scale_factor=2, mode="nearest-exact"))
def op_avg_pool3d(): return mk(lambda h: F.avg_pool3d(h, 2), xshape=(4, 16, 16, 16))
def op_max_pool3d(): return mk(lambda h: F.max_pool3d(h, 2), xshape=(4, 16, 16, 16))
def op_max_pool1d(): return mk(lambda h: F.max_pool1d(h, 2))
def op_adaptive_max1d(): return mk(lambda h: F.adaptive_max_pool1d(h, 7))
def op_adaptive_avg3d(): return mk(lambda h: F.adaptive_avg_pool3d(h, 3), xshape=(4, 16, 16, 16))
def op_adaptive_max3d(): return mk(lambda h: F.adaptive_max_pool3d(h, 3), xshape=(4, 16, 16, 16))
def op_frac_maxpool(): return mk(lambda h: F.fractional_max_pool2d(h, 2, output_ratio=0.5), xshape=(4, 32, 32))
def op_lp_pool(): return mk(lambda h: F.lp_pool2d(h, 2, 2), xshape=(4, 32, 32))
def op_max_unpool(): return mk(lambda h: F.max_unpool2d(*F.max_pool2d(h, 2, return_indices=True), 2), xshape=(4, 32, 32))
def op_pdist(): return mk(lambda h: F.pdist(h[0]))
def op_channel_shuffle(): return mk(lambda h: F.channel_shuffle(h, 2), xshape=(4, 32, 32))
def op_conv_tbc(): 
    w = torch.randn(3, D, D)
    return mk(lambda h: torch.conv_tbc(h, w, torch.zeros(D), 1))
def op_embedding_bag_max():
    pass
def op_ctc_alt(): pass
def op_affine_grid(): 
    return mk(lambda h: F.affine_grid(h[:, :2, :3].contiguous(), (h.shape[0], 4, 64, 64), align_corners=False), xshape=(4, 4))
def op_rnn_tanh():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.r = nn.RNN(D, D, batch_first=True)
        def forward(self, x): return self.r(x)[0]
    t = mk(lambda h: h); t.model = M; return t
def op_rnn_cell_loop():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.GRUCell(D, D)
        def forward(self, x):
            h = torch.zeros(x.shape[0], D); outs = []
            for t in range(x.shape[1]):
                h = self.c(x[:, t], h); outs.append(h)
            return torch.stack(outs, 1)
    t = mk(lambda h: h); t.model = M; return t
def op_lstm_cell_loop():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.LSTMCell(D, D)
        def forward(self, x):
            h = c = torch.zeros(x.shape[0], D); outs = []
            for t in range(x.shape[1]):
                h, c = self.c(x[:, t], (h, c)); outs.append(h)
            return torch.stack(outs, 1)
    t = mk(lambda h: h); t.model = M; return t
def op_lstm_proj():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.r = nn.LSTM(D, D, batch_first=True, proj_size=16)
        def forward(self, x): return self.r(x)[0]
    t = mk(lambda h: h); t.model = M; return t
def op_lstm_bidir_dropout():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.r = nn.LSTM(D, D, 2, batch_first=True, bidirectional=True, dropout=0.2)
        def forward(self, x): return self.r(x)[0]
    t = mk(lambda h: h); t.model = M; return t
def op_embedding_renorm_():
    pass
def op_boolsum_norm(): return mk(lambda h: h / (h > 0).sum())
def op_boolsum_dim(): return mk(lambda h: h / (h > 0).sum(1, keepdim=True).clamp(min=1))
def op_min_all(): return mk(lambda h: h.min().reshape(1))
def op_median_norm(): return mk(lambda h: h / h.median())
def op_max_norm(): return mk(lambda h: h / h.max())
def op_nanmedian_all(): return mk(lambda h: torch.nanmedian(h).reshape(1))
def op_amax_all(): return mk(lambda h: h.amax().reshape(1))
def op_cummax(): return mk(lambda h: torch.cummax(h, 1).values)
def op_logcumsumexp(): return mk(lambda h: torch.logcumsumexp(h, 1))
def op_dist(): return mk(lambda h: torch.dist(h, torch.zeros_like(h)).reshape(1))
def op_stack(): return mk(lambda h: torch.stack([h, h * 2], 1))
def op_repeat(): return mk(lambda h: h.repeat(1, 2, 1))
def op_pad(): return mk(lambda h: F.pad(h, (1, 1, 2, 2), value=0.5))
def op_celu(): return mk(lambda h: F.celu(h))
def op_rot90(): return mk(lambda h: torch.rot90(h, 1, (1, 2)))
def op_mv(): return mk(lambda h: torch.mv(h.reshape(-1, D), torch.ones(D)))
def op_safe_softmax(): return mk(lambda h: torch.ops.aten._safe_softmax(h, -1))
def op_mode_vals(): return mk(lambda h: torch.mode(h, 1).values)
