import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task

N = 256
def data(xshape, yshape=None, xdtype=torch.float32, n=N, ylong=None):
    g = torch.Generator().manual_seed(0)
    if xdtype == torch.long:
        x = torch.randint(0, 100, (n, *xshape), generator=g)
    else:
        x = torch.randn(n, *xshape, generator=g)
    if ylong is not None:
        y = torch.randint(0, ylong, (n, *(yshape or ())), generator=g)
    else:
        y = torch.randn(n, *yshape, generator=g)
    return TensorDataset(x, y)

def mse(o, y): return F.mse_loss(o, y)
def task(model, ds, loss=mse, **kw):
    return Task(model=model, train_data=ds, loss_fn=loss, lr=1e-3, base_batch_size=8, **kw)

class Wrap(nn.Module):
    """Linear in, fn, Linear out -- activations need grad."""
    def __init__(self, fn, cin, cout=None, mods=None):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleDict(mods or {})
        self.inp = nn.Linear(cin, cin)
    def forward(self, x):
        return self.fn(self, self.inp(x))

D, T = 64, 128
# ---- gather / scatter ----
def gather():
    idx = torch.randint(0, T, (1, T, D))
    return task(lambda: Wrap(lambda m, h: torch.gather(h, 1, idx.expand(h.shape[0], -1, -1)), D),
                data((T, D), (T, D)))
def gather_argsort():
    def f(m, h):
        i = torch.argsort(h, dim=1)
        return torch.gather(h, 1, i)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def scatter_add():
    idx = torch.randint(0, 32, (1, T, D))
    def f(m, h):
        z = torch.zeros(h.shape[0], 32, D)
        return z.scatter_add(1, idx.expand(h.shape[0], -1, -1), h)
    return task(lambda: Wrap(f, D), data((T, D), (32, D)))
def index_add():
    idx = torch.randint(0, 32, (T,))
    def f(m, h):
        z = torch.zeros(h.shape[0], 32, D)
        return z.index_add(1, idx, h)
    return task(lambda: Wrap(f, D), data((T, D), (32, D)))
def index_select():
    idx = torch.randint(0, T, (T * 2,))
    return task(lambda: Wrap(lambda m, h: h.index_select(1, idx), D), data((T, D), (2 * T, D)))
def adv_index():
    idx = torch.randint(0, T, (T * 2,))
    return task(lambda: Wrap(lambda m, h: h[:, idx], D), data((T, D), (2 * T, D)))
def scatter_reduce():
    idx = torch.randint(0, 32, (1, T, D))
    def f(m, h):
        z = torch.zeros(h.shape[0], 32, D)
        return z.scatter_reduce(1, idx.expand(h.shape[0], -1, -1), h, reduce="amax", include_self=False)
    return task(lambda: Wrap(f, D), data((T, D), (32, D)))
# ---- sort ----
def sort():
    return task(lambda: Wrap(lambda m, h: torch.sort(h, dim=1).values, D), data((T, D), (T, D)))
def topk():
    return task(lambda: Wrap(lambda m, h: torch.topk(h, 16, dim=1).values, D), data((T, D), (16, D)))
def topk_last():
    return task(lambda: Wrap(lambda m, h: torch.topk(h, 8, dim=-1).values, D), data((T, D), (T, 8)))
def sort_last():
    return task(lambda: Wrap(lambda m, h: torch.sort(h, dim=-1).values, D), data((T, D), (T, D)))
def kthvalue():
    return task(lambda: Wrap(lambda m, h: torch.kthvalue(h, 5, dim=1).values, D), data((T, D), (D,)))
def median():
    return task(lambda: Wrap(lambda m, h: torch.median(h, dim=1).values, D), data((T, D), (D,)))
# ---- scans ----
def cumsum():
    return task(lambda: Wrap(lambda m, h: torch.cumsum(h, 1), D), data((T, D), (T, D)))
def cumprod():
    return task(lambda: Wrap(lambda m, h: torch.cumprod(h * 0.01 + 1, 1), D), data((T, D), (T, D)))
def logcumsumexp():
    return task(lambda: Wrap(lambda m, h: torch.logcumsumexp(h, 1), D), data((T, D), (T, D)))
def cummax():
    return task(lambda: Wrap(lambda m, h: torch.cummax(h, 1).values, D), data((T, D), (T, D)))
# ---- image ops ----
C, H = 8, 32
class Img(nn.Module):
    def __init__(self, fn, cin=C):
        super().__init__(); self.fn = fn; self.conv = nn.Conv2d(cin, C, 1)
    def forward(self, x): return self.fn(self, self.conv(x))
def grid_sample():
    def f(m, h):
        b = h.shape[0]
        th = torch.eye(2, 3).unsqueeze(0).expand(b, 2, 3) + 0.1 * m.theta
        grid = F.affine_grid(th, (b, C, H, H), align_corners=False)
        return F.grid_sample(h, grid, align_corners=False)
    def mk():
        m = Img(f); m.theta = nn.Parameter(torch.zeros(1, 2, 3)); return m
    return task(mk, data((C, H, H), (C, H, H)))
def grid_sample_nearest():
    grid0 = torch.rand(1, H, H, 2) * 2 - 1
    return task(lambda: Img(lambda m, h: F.grid_sample(h, grid0.expand(h.shape[0], -1, -1, -1), mode="nearest", align_corners=False)),
                data((C, H, H), (C, H, H)))
def interp_bilinear():
    return task(lambda: Img(lambda m, h: F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)),
                data((C, H, H), (C, 2 * H, 2 * H)))
def interp_nearest():
    return task(lambda: Img(lambda m, h: F.interpolate(h, scale_factor=2, mode="nearest")),
                data((C, H, H), (C, 2 * H, 2 * H)))
def interp_bicubic():
    return task(lambda: Img(lambda m, h: F.interpolate(h, scale_factor=2, mode="bicubic", align_corners=False)),
                data((C, H, H), (C, 2 * H, 2 * H)))
def interp_antialias():
    return task(lambda: Img(lambda m, h: F.interpolate(h, scale_factor=0.5, mode="bilinear", antialias=True)),
                data((C, H, H), (C, H // 2, H // 2)))
def interp_down():
    return task(lambda: Img(lambda m, h: F.interpolate(h, size=(20, 20), mode="bilinear")),
                data((C, H, H), (C, 20, 20)))
def unfold():
    return task(lambda: Img(lambda m, h: F.unfold(h, 3, padding=1)), data((C, H, H), (C * 9, H * H)))
def fold():
    return task(lambda: Img(lambda m, h: F.fold(F.unfold(h, 3, padding=1), (H, H), 3, padding=1)),
                data((C, H, H), (C, H, H)))
def maxpool_idx():
    return task(lambda: Img(lambda m, h: F.max_pool2d(h, 2, return_indices=True)[0]), data((C, H, H), (C, H // 2, H // 2)))
def maxpool():
    return task(lambda: Img(lambda m, h: F.max_pool2d(h, 3, stride=2, padding=1)), data((C, H, H), (C, H // 2, H // 2)))
def avgpool():
    return task(lambda: Img(lambda m, h: F.avg_pool2d(h, 2)), data((C, H, H), (C, H // 2, H // 2)))
def adaptive_avg():
    return task(lambda: Img(lambda m, h: F.adaptive_avg_pool2d(h, 7)), data((C, H, H), (C, 7, 7)))
def adaptive_max():
    return task(lambda: Img(lambda m, h: F.adaptive_max_pool2d(h, 7)), data((C, H, H), (C, 7, 7)))
def pixel_shuffle():
    return task(lambda: Img(lambda m, h: F.pixel_shuffle(h, 2)), data((C, H, H), (C // 4, 2 * H, 2 * H)))
def pixel_unshuffle():
    return task(lambda: Img(lambda m, h: F.pixel_unshuffle(h, 2)), data((C, H, H), (C * 4, H // 2, H // 2)))
def group_norm():
    return task(lambda: Img(lambda m, h: m.n(h)) if False else _gn(), data((C, H, H), (C, H, H)))
class _GN(nn.Module):
    def __init__(self, norm):
        super().__init__(); self.conv = nn.Conv2d(C, C, 1); self.n = norm
    def forward(self, x): return self.n(self.conv(x))
def _gn(): return _GN(nn.GroupNorm(2, C))
def instance_norm():
    return task(lambda: _GN(nn.InstanceNorm2d(C, affine=True)), data((C, H, H), (C, H, H)))
def instance_norm_stats():
    return task(lambda: _GN(nn.InstanceNorm2d(C, affine=True, track_running_stats=True)), data((C, H, H), (C, H, H)))
def layer_norm():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D)), data((T, D), (T, D)))
def layer_norm_nobias():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D, bias=False)), data((T, D), (T, D)))
def rms_norm():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.RMSNorm(D)), data((T, D), (T, D)))
def local_response_norm():
    return task(lambda: _GN(nn.LocalResponseNorm(3)), data((C, H, H), (C, H, H)))
def conv_transpose():
    return task(lambda: nn.Sequential(nn.Conv2d(C, C, 1), nn.ConvTranspose2d(C, C, 4, stride=2, padding=1)), data((C, H, H), (C, 2 * H, 2 * H)))
def conv1d():
    return task(lambda: nn.Sequential(nn.Conv1d(D, D, 5, padding=2), nn.GELU()), data((D, T), (D, T)))
def depthwise():
    return task(lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C)), data((C, H, H), (C, H, H)))
def dropout2d():
    return task(lambda: nn.Sequential(nn.Conv2d(C, C, 1), nn.Dropout2d(0.3)), data((C, H, H), (C, H, H)))
def dropout():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.Dropout(0.3)), data((T, D), (T, D)))
# ---- attention ----
class MHA(nn.Module):
    def __init__(self, need_weights=True):
        super().__init__(); self.inp = nn.Linear(D, D); self.mha = nn.MultiheadAttention(D, 4, batch_first=True); self.nw = need_weights
    def forward(self, x):
        h = self.inp(x)
        kpm = torch.zeros(h.shape[0], T, dtype=torch.bool); kpm[:, T // 2:] = True
        return self.mha(h, h, h, key_padding_mask=kpm, need_weights=self.nw)[0]
def mha_kpm():
    return task(lambda: MHA(), data((T, D), (T, D)))
def mha_kpm_noweights():
    return task(lambda: MHA(False), data((T, D), (T, D)))
class MHAc(nn.Module):
    def __init__(self):
        super().__init__(); self.inp = nn.Linear(D, D); self.mha = nn.MultiheadAttention(D, 4, batch_first=True, dropout=0.1)
    def forward(self, x):
        h = self.inp(x)
        am = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        return self.mha(h, h, h, attn_mask=am, need_weights=False)[0]
def mha_causal_dropout():
    return task(lambda: MHAc(), data((T, D), (T, D)))
def transformer_layer():
    return task(lambda: nn.TransformerEncoderLayer(D, 4, 128, batch_first=True), data((T, D), (T, D)))
def transformer_layer_norm_first():
    return task(lambda: nn.TransformerEncoderLayer(D, 4, 128, batch_first=True, norm_first=True, activation="gelu"), data((T, D), (T, D)))
class TEnc(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.TransformerEncoderLayer(D, 4, 128, batch_first=True)
    def forward(self, x):
        kpm = torch.zeros(x.shape[0], T, dtype=torch.bool); kpm[:, T // 2:] = True
        return self.l(x, src_key_padding_mask=kpm)
def transformer_layer_kpm():
    return task(lambda: TEnc(), data((T, D), (T, D)))
def transformer_decoder():
    class Dec(nn.Module):
        def __init__(self):
            super().__init__(); self.l = nn.TransformerDecoderLayer(D, 4, 128, batch_first=True)
        def forward(self, x): return self.l(x, x, tgt_is_causal=False)
    return task(lambda: Dec(), data((T, D), (T, D)))
def sdpa_math_mask():
    def f(m, h):
        b = h.shape[0]
        q = h.view(b, T, 4, 16).transpose(1, 2)
        mask = torch.randn(T, T)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(b, T, D)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def sdpa_bool_mask():
    def f(m, h):
        b = h.shape[0]
        q = h.view(b, T, 4, 16).transpose(1, 2)
        mask = torch.ones(b, 1, T, T, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(b, T, D)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def sdpa_dropout():
    def f(m, h):
        b = h.shape[0]
        q = h.view(b, T, 4, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1).transpose(1, 2).reshape(b, T, D)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
# ---- einsum ----
def einsum_big():
    def f(m, h):
        a = torch.einsum("btd,bsd->bts", h, h)
        return torch.einsum("bts,bsd->btd", a.softmax(-1), h)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def einsum_outer():
    def f(m, h):
        return torch.einsum("bti,btj->bij", h, h)
    return task(lambda: Wrap(f, D), data((T, D), (D, D)))
def einsum_3():
    W = torch.randn(D, 8, D)
    def f(m, h):
        return torch.einsum("bti,ikj,btj->btk", h, m.mods["w"].weight.view(D, 8, D) if False else W, h)
    return task(lambda: Wrap(f, D), data((T, D), (T, 8)))
def bilinear():
    return task(lambda: _Bil(), data((T, D), (T, 16)))
class _Bil(nn.Module):
    def __init__(self):
        super().__init__(); self.b = nn.Bilinear(D, D, 16)
    def forward(self, x): return self.b(x, x)
# ---- embedding ----
V = 1000
class Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__(); self.e = nn.Embedding(V, D, **kw); self.l = nn.Linear(D, D)
    def forward(self, x): return self.l(self.e(x % V))
def emb_padding():
    return task(lambda: Emb(padding_idx=0), data((T,), (T, D), xdtype=torch.long))
def emb_maxnorm():
    return task(lambda: Emb(max_norm=1.0), data((T,), (T, D), xdtype=torch.long))
def emb_scale_grad():
    return task(lambda: Emb(scale_grad_by_freq=True), data((T,), (T, D), xdtype=torch.long))
def emb_plain():
    return task(lambda: Emb(), data((T,), (T, D), xdtype=torch.long))
def one_hot():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.l = nn.Linear(100, D)
        def forward(self, x): return self.l(F.one_hot(x, 100).float())
    return task(lambda: M(), data((T,), (T, D), xdtype=torch.long))
# ---- losses ----
K = 100
class Cls(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(D, K)
    def forward(self, x): return self.l(x)
def _cls(loss, y=None):
    return task(lambda: Cls(), data((T, D), (T,), ylong=K) if y is None else y, loss=loss)
def ce_plain():
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), y.reshape(-1)))
def ce_label_smoothing():
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), y.reshape(-1), label_smoothing=0.1))
def ce_weight():
    w = torch.rand(K)
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), y.reshape(-1), weight=w))
def ce_weight_ls():
    w = torch.rand(K)
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), y.reshape(-1), weight=w, label_smoothing=0.1))
def ce_ignore():
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), torch.where(y.reshape(-1) < 10, -100, y.reshape(-1))))
def ce_3d():
    return _cls(lambda o, y: F.cross_entropy(o.transpose(1, 2), y))
def ce_probs():
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), F.one_hot(y.reshape(-1), K).float()))
def ce_probs_ls():
    return _cls(lambda o, y: F.cross_entropy(o.reshape(-1, K), F.one_hot(y.reshape(-1), K).float(), label_smoothing=0.1))
def nll_weight():
    w = torch.rand(K)
    return _cls(lambda o, y: F.nll_loss(F.log_softmax(o, -1).reshape(-1, K), y.reshape(-1), weight=w))
def nll_2d():
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.Conv2d(C, 10, 1)
        def forward(self, x): return F.log_softmax(self.c(x), 1)
    return task(lambda: M(), data((C, H, H), (H, H), ylong=10), loss=lambda o, y: F.nll_loss(o, y, weight=torch.rand(10)))
def kl_div():
    return _cls(lambda o, y: F.kl_div(F.log_softmax(o, -1), F.softmax(torch.randn_like(o), -1), reduction="batchmean"))
def kl_div_logtarget():
    return _cls(lambda o, y: F.kl_div(F.log_softmax(o, -1), F.log_softmax(o.detach() * 0.5, -1), reduction="batchmean", log_target=True))
def l1():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=F.l1_loss)
def huber():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=F.huber_loss)
def bce_logits():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.binary_cross_entropy_with_logits(o, (y > 0).float()))
def bce_logits_posw():
    pw = torch.rand(D)
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.binary_cross_entropy_with_logits(o, (y > 0).float(), pos_weight=pw))
def cosine_emb():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.cosine_embedding_loss(o.reshape(-1, D), y.reshape(-1, D), torch.ones(o.shape[0] * T)))
def cos_sim():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: (1 - F.cosine_similarity(o, y, dim=-1)).mean())
def multi_margin():
    return _cls(lambda o, y: F.multi_margin_loss(o.reshape(-1, K), y.reshape(-1)))
def multilabel_margin():
    return _cls(lambda o, y: F.multilabel_margin_loss(o.reshape(-1, K), torch.where(torch.arange(K) < 3, y.reshape(-1, 1), -1)))
def multilabel_soft():
    return _cls(lambda o, y: F.multilabel_soft_margin_loss(o.reshape(-1, K), F.one_hot(y.reshape(-1), K).float()))
def gaussian_nll():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.gaussian_nll_loss(o, y, torch.ones_like(o)))
def poisson_nll():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.poisson_nll_loss(o, y.abs()))
def triplet():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: F.triplet_margin_loss(o.reshape(-1, D), y.reshape(-1, D), o.roll(1, 0).reshape(-1, D)))
def cdist():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: torch.cdist(o, y).mean())
def pdist_norm():
    return task(lambda: nn.Linear(D, D), data((T, D), (T, D)), loss=lambda o, y: torch.linalg.vector_norm(o[:, :, None] - o[:, None], dim=-1).mean())
# ---- pointwise / misc ----
def where_bcast():
    def f(m, h):
        mask = torch.arange(D) < 32
        return torch.where(mask, h, 0.0)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def where_bcast2():
    def f(m, h):
        mask = (h[..., :1] > 0)
        return torch.where(mask, h, h * 2)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def masked_fill():
    def f(m, h):
        mask = torch.zeros(h.shape[0], T, 1, dtype=torch.bool); mask[:, ::2] = True
        return h.masked_fill(mask, 0.0)
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def nonzero():
    def f(m, h):
        i = torch.nonzero(h > 0, as_tuple=True)
        return h[i].sum() + h
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def repeat_interleave_t():
    reps = torch.randint(1, 4, (T,))
    def f(m, h):
        return torch.repeat_interleave(h, reps, dim=1)[:, :T]
    return task(lambda: Wrap(f, D), data((T, D), (T, D)))
def repeat_interleave_int():
    return task(lambda: Wrap(lambda m, h: torch.repeat_interleave(h, 2, dim=1), D), data((T, D), (2 * T, D)))
def expand_repeat():
    return task(lambda: Wrap(lambda m, h: h.repeat(1, 2, 1), D), data((T, D), (2 * T, D)))
def clamp_minmax():
    return task(lambda: Wrap(lambda m, h: h.clamp(-0.5, 0.5), D), data((T, D), (T, D)))
def pow_abs():
    return task(lambda: Wrap(lambda m, h: h.abs().pow(1.5), D), data((T, D), (T, D)))
def softmax_dims():
    return task(lambda: Wrap(lambda m, h: h.softmax(1) + h.log_softmax(-1), D), data((T, D), (T, D)))
def norm_dim():
    return task(lambda: Wrap(lambda m, h: h / h.norm(dim=-1, keepdim=True), D), data((T, D), (T, D)))
def normalize():
    return task(lambda: Wrap(lambda m, h: F.normalize(h, dim=1), D), data((T, D), (T, D)))
def var_std():
    return task(lambda: Wrap(lambda m, h: (h - h.mean(1, keepdim=True)) / h.std(1, keepdim=True), D), data((T, D), (T, D)))
def max_dim():
    return task(lambda: Wrap(lambda m, h: h.max(1).values + h.amax(1), D), data((T, D), (D,)))
def logsumexp():
    return task(lambda: Wrap(lambda m, h: torch.logsumexp(h, 1), D), data((T, D), (D,)))
def prod_dim():
    return task(lambda: Wrap(lambda m, h: torch.prod(h * 0.01 + 1, 1), D), data((T, D), (D,)))
def cat_stack():
    return task(lambda: Wrap(lambda m, h: torch.cat([h, h * 2], 1), D), data((T, D), (2 * T, D)))
def roll_flip():
    return task(lambda: Wrap(lambda m, h: h.roll(3, 1) + h.flip(1), D), data((T, D), (T, D)))
def diff():
    return task(lambda: Wrap(lambda m, h: torch.diff(h, dim=1), D), data((T, D), (T - 1, D)))
def tril_mask():
    return task(lambda: Wrap(lambda m, h: (h @ h.transpose(1, 2)).tril(), D), data((T, D), (T, T)))
def matmul_bcast():
    W = torch.randn(D, D)
    return task(lambda: Wrap(lambda m, h: h.transpose(1, 2) @ W, D), data((T, D), (D, D)))
def pad_reflect():
    return task(lambda: Img(lambda m, h: F.pad(h, (2, 2, 2, 2), mode="reflect")), data((C, H, H), (C, H + 4, H + 4)))
def pad_replicate():
    return task(lambda: Img(lambda m, h: F.pad(h, (2, 2, 2, 2), mode="replicate")), data((C, H, H), (C, H + 4, H + 4)))
def pad_circular():
    return task(lambda: Img(lambda m, h: F.pad(h, (2, 2, 2, 2), mode="circular")), data((C, H, H), (C, H + 4, H + 4)))
def activations():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D), nn.Mish(), nn.Linear(D, D), nn.Hardswish(), nn.Linear(D, D), nn.ELU(), nn.Linear(D, D), nn.PReLU(), nn.Linear(D, D), nn.Softplus(), nn.Linear(D, D), nn.GLU()), data((T, D), (T, D // 2)))
def glu():
    return task(lambda: nn.Sequential(nn.Linear(D, 2 * D), nn.GLU()), data((T, D), (T, D)))
def prelu():
    return task(lambda: nn.Sequential(nn.Conv2d(C, C, 1), nn.PReLU(C)), data((C, H, H), (C, H, H)))
def rrelu():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.RReLU()), data((T, D), (T, D)))
def gelu_tanh():
    return task(lambda: nn.Sequential(nn.Linear(D, D), nn.GELU("tanh")), data((T, D), (T, D)))
# ---- fft / complex ----
class Spec(nn.Module):
    def __init__(self, fn):
        super().__init__(); self.fn = fn; self.l = nn.Linear(256, 256)
    def forward(self, x): return self.fn(self.l(x))
def rfft():
    return task(lambda: Spec(lambda h: torch.fft.rfft(h, dim=-1).abs()), data((32, 256), (32, 129)))
def fft_c():
    return task(lambda: Spec(lambda h: torch.view_as_real(torch.fft.fft(h, dim=-1)).sum(-1)), data((32, 256), (32, 256)))
def irfft():
    return task(lambda: Spec(lambda h: torch.fft.irfft(torch.fft.rfft(h, dim=-1) * 2, n=256, dim=-1)), data((32, 256), (32, 256)))
def fft2():
    return task(lambda: Img(lambda m, h: torch.fft.fft2(h).abs()), data((C, H, H), (C, H, H)))
def rfft2():
    return task(lambda: Img(lambda m, h: torch.fft.irfft2(torch.fft.rfft2(h) * 0.5, s=(H, H))), data((C, H, H), (C, H, H)))
def stft():
    w = torch.hann_window(64)
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.l = nn.Linear(4096, 4096, bias=False)
        def forward(self, x):
            s = torch.stft(self.l(x), 64, hop_length=16, window=w, return_complex=True)
            return s.abs()
    return task(lambda: M(), data((4096,), (33, 257)))
def istft():
    w = torch.hann_window(64)
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.l = nn.Linear(2048, 2048, bias=False)
        def forward(self, x):
            s = torch.stft(self.l(x), 64, hop_length=16, window=w, return_complex=True)
            return torch.istft(s * 2, 64, hop_length=16, window=w, length=2048)
    return task(lambda: M(), data((2048,), (2048,)))
def complex_mul():
    def f(h):
        z = torch.view_as_complex(h.reshape(*h.shape[:-1], 128, 2).contiguous())
        r = z * torch.polar(torch.ones(128), torch.linspace(0, 3, 128))
        return torch.view_as_real(r).flatten(-2)
    return task(lambda: Spec(f), data((32, 256), (32, 256)))
def complex_rope():
    def f(h):
        z = torch.view_as_complex(h.float().reshape(*h.shape[:-1], 128, 2))
        r = z * torch.polar(torch.ones(32, 128), torch.rand(32, 128))
        return torch.view_as_real(r).flatten(-2)
    return task(lambda: Spec(f), data((32, 256), (32, 256)))
# ---- param reparam ----
def weight_norm():
    return task(lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(D, D))), data((T, D), (T, D)))
def weight_norm_old():
    import warnings; warnings.filterwarnings("ignore")
    return task(lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(D, D))), data((T, D), (T, D)))
def spectral_norm():
    return task(lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(D, D))), data((T, D), (T, D)))
def spectral_norm_old():
    return task(lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(D, D))), data((T, D), (T, D)))
def orthogonal():
    return task(lambda: nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(D, D))), data((T, D), (T, D)))
# ---- linalg ----
class Lin(nn.Module):
    def __init__(self, fn, n=16):
        super().__init__(); self.fn = fn; self.l = nn.Linear(n, n)
    def forward(self, x): return self.fn(self.l(x))
M_ = 16
def _lin(fn, yshape):
    return task(lambda: Lin(fn), data((64, M_, M_), yshape))
def qr():
    return _lin(lambda h: torch.linalg.qr(h).R, (64, M_, M_))
def qr_q():
    return _lin(lambda h: torch.linalg.qr(h).Q, (64, M_, M_))
def svd():
    return _lin(lambda h: torch.linalg.svdvals(h), (64, M_))
def svd_full():
    return _lin(lambda h: (lambda r: r.U * r.S[..., None, :] @ r.Vh)(torch.linalg.svd(h, full_matrices=False)), (64, M_, M_))
def eigh():
    return _lin(lambda h: torch.linalg.eigh(h + h.transpose(-1, -2)).eigenvalues, (64, M_))
def cholesky():
    return _lin(lambda h: torch.linalg.cholesky(h @ h.transpose(-1, -2) + torch.eye(M_)), (64, M_, M_))
def solve():
    return _lin(lambda h: torch.linalg.solve(h + 4 * torch.eye(M_), h), (64, M_, M_))
def inv():
    return _lin(lambda h: torch.linalg.inv(h + 4 * torch.eye(M_)), (64, M_, M_))
def det():
    return _lin(lambda h: torch.linalg.slogdet(h + 4 * torch.eye(M_)).logabsdet, (64,))
def lstsq():
    return _lin(lambda h: torch.linalg.lstsq(h + 4 * torch.eye(M_), h).solution, (64, M_, M_))
def triangular_solve():
    return _lin(lambda h: torch.linalg.solve_triangular(h.triu() + 4 * torch.eye(M_), h, upper=True), (64, M_, M_))
def matrix_exp():
    return _lin(lambda h: torch.linalg.matrix_exp(h * 0.1), (64, M_, M_))
def cholesky_solve():
    return _lin(lambda h: torch.cholesky_solve(h, torch.linalg.cholesky(h @ h.transpose(-1, -2) + torch.eye(M_))), (64, M_, M_))
def pinv():
    return _lin(lambda h: torch.linalg.pinv(h), (64, M_, M_))
def matrix_norm():
    return _lin(lambda h: torch.linalg.matrix_norm(h, ord=2), (64,))
def lu_factor():
    return _lin(lambda h: torch.linalg.lu_factor(h + 4 * torch.eye(M_)).LU, (64, M_, M_))
