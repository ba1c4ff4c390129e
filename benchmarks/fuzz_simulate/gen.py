"""Random small architectures for differential fuzzing of bsselect's memory simulator.

gen_case(seed) -> dict(task=Task, settings=StepSettings, bs=int, desc=str). Reproducible:
the architecture is drawn from random.Random(seed) inside the factory, so every call of
task.model builds the same architecture.
"""
import random
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.step import StepSettings
from bsselect.precision import Precision

N_ITEMS = 64


# ---------------------------------------------------------------- generic wrappers
class Residual(nn.Module):
    def __init__(self, inner):
        super().__init__(); self.inner = inner
    def forward(self, x):
        return x + self.inner(x)


class ResidualInplace(nn.Module):
    def __init__(self, inner):
        super().__init__(); self.inner = inner
    def forward(self, x):
        y = self.inner(x)
        y += x
        return y


class Ckpt(nn.Module):
    def __init__(self, inner):
        super().__init__(); self.inner = inner
    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


class CatBranch(nn.Module):
    def __init__(self, inner, dim):
        super().__init__(); self.inner = inner; self.dim = dim
    def forward(self, x):
        return torch.cat([x, self.inner(x)], self.dim)


class Shared(nn.Module):
    """Same module applied twice (parameters shared across layers)."""
    def __init__(self, inner, act):
        super().__init__(); self.inner = inner; self.act = act
    def forward(self, x):
        return self.inner(self.act(self.inner(x)))


class Lambda(nn.Module):
    def __init__(self, fn, name):
        super().__init__(); self.fn = fn; self.name = name
    def forward(self, x):
        return self.fn(x)
    def extra_repr(self):
        return self.name


class IndexSel(nn.Module):
    def __init__(self, dim, idx, mode):
        super().__init__(); self.dim = dim; self.mode = mode
        self.register_buffer("idx", idx)
    def forward(self, x):
        if self.mode == "index_select":
            return x.index_select(self.dim, self.idx)
        shape = list(x.shape); shape[self.dim] = self.idx.numel()
        view = [1] * x.dim(); view[self.dim] = -1
        return x.gather(self.dim, self.idx.view(view).expand(shape))
    def extra_repr(self):
        return f"{self.mode} dim={self.dim} n={self.idx.numel()}"


def act(r):
    k = r.choice(["relu", "gelu", "gelu_tanh", "silu", "tanh", "softplus", "leaky",
                  "relu_", "silu_", "leaky_", "elu", "sigmoid", "hardswish"])
    return {
        "relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
        "silu": nn.SiLU(), "tanh": nn.Tanh(), "softplus": nn.Softplus(),
        "leaky": nn.LeakyReLU(0.1), "relu_": nn.ReLU(inplace=True), "silu_": nn.SiLU(inplace=True),
        "leaky_": nn.LeakyReLU(0.1, inplace=True), "elu": nn.ELU(), "sigmoid": nn.Sigmoid(),
        "hardswish": nn.Hardswish(),
    }[k]


def safe_act(r):
    """An activation that is never in-place (for places where in-place would be illegal)."""
    while True:
        a = act(r)
        if not getattr(a, "inplace", False):
            return a


# ---------------------------------------------------------------- vector family (B, D)
def vec_block(r, d, depth=0):
    kinds = ["lin", "lin", "act", "norm", "drop", "res", "cat", "reshape", "slice", "index",
             "shared", "ckpt", "frozen"]
    if depth > 1:
        kinds = ["lin", "act", "norm", "drop"]
    k = r.choice(kinds)
    if k == "lin":
        d2 = r.choice([16, 24, 32, 48, 64])
        return nn.Sequential(nn.Linear(d, d2, bias=r.random() < 0.8), safe_act(r) if r.random() < .3 else act(r)), d2
    if k == "act":
        return safe_act(r), d
    if k == "norm":
        n = r.choice(["ln", "bn", "rms", "gn"])
        if n == "ln":
            return nn.LayerNorm(d, elementwise_affine=r.random() < .8), d
        if n == "bn":
            return nn.BatchNorm1d(d, affine=r.random() < .8), d
        if n == "rms":
            return nn.RMSNorm(d), d
        g = r.choice([g for g in (1, 2, 4, 8) if d % g == 0])
        return nn.GroupNorm(g, d), d
    if k == "drop":
        return nn.Dropout(r.choice([0.0, 0.1, 0.5])), d
    if k == "res":
        inner, d2 = vec_block(r, d, depth + 1)
        inner = nn.Sequential(inner, nn.Linear(d2, d))
        return (ResidualInplace if r.random() < .3 else Residual)(inner), d
    if k == "cat":
        d2 = r.choice([8, 16])
        return CatBranch(nn.Sequential(nn.Linear(d, d2), safe_act(r)), -1), d + d2
    if k == "reshape":
        g = r.choice([g for g in (2, 4, 8) if d % g == 0] or [1])
        mode = r.choice(["t_contig", "permute_reshape", "flatten"])
        if mode == "t_contig":
            f = lambda x, g=g: x.view(x.shape[0], g, -1).transpose(1, 2).contiguous().view(x.shape[0], -1)
        elif mode == "permute_reshape":
            f = lambda x, g=g: x.reshape(x.shape[0], g, -1).permute(0, 2, 1).reshape(x.shape[0], -1)
        else:
            f = lambda x, g=g: torch.flatten(x.unsqueeze(1).expand(-1, 2, -1), 1)
            return Lambda(f, mode), 2 * d
        return Lambda(f, f"{mode} g={g}"), d
    if k == "slice":
        mode = r.choice(["head", "stride", "narrow"])
        if mode == "head":
            k2 = max(4, d // 2); return Lambda(lambda x, k2=k2: x[:, :k2], f"[:, :{k2}]"), k2
        if mode == "stride":
            return Lambda(lambda x: x[:, ::2], "[:, ::2]"), (d + 1) // 2
        return Lambda(lambda x: x.narrow(1, 1, d - 2), "narrow"), d - 2
    if k == "index":
        g = torch.Generator().manual_seed(r.randrange(1 << 30))
        n = r.choice([d, d // 2, d + 8])
        idx = torch.randint(d, (n,), generator=g)
        return IndexSel(1, idx, r.choice(["index_select", "gather"])), n
    if k == "shared":
        return Shared(nn.Linear(d, d), safe_act(r)), d
    if k == "ckpt":
        inner, d2 = vec_block(r, d, depth + 1)
        inner2, d3 = vec_block(r, d2, depth + 1)
        return Ckpt(nn.Sequential(inner, inner2)), d3
    if k == "frozen":
        inner, d2 = vec_block(r, d, depth + 1)
        for p in inner.parameters():
            p.requires_grad_(False)
        return inner, d2


def build_vec(r, out_dim):
    d = r.choice([16, 32, 48])
    layers = [nn.Linear(d, 32)] if r.random() < .5 else []
    cur = 32 if layers else d
    for _ in range(r.randint(2, 6)):
        b, cur = vec_block(r, cur)
        layers.append(b)
    layers.append(nn.Linear(cur, out_dim))
    return nn.Sequential(*layers), (d,), torch.float32


# ---------------------------------------------------------------- 1d conv family (B, C, L)
def conv1d_block(r, c, L, depth=0):
    kinds = ["conv", "conv", "convT", "bn", "gn", "act", "pool", "apool", "up", "res", "cat",
             "ckpt", "drop", "lnperm"]
    if depth:
        kinds = ["conv", "bn", "act", "gn"]
    k = r.choice(kinds)
    if k == "conv":
        c2 = r.choice([4, 8, 12, 16])
        ks = r.choice([1, 3, 5]); dil = r.choice([1, 1, 2]); st = r.choice([1, 1, 2])
        g = r.choice([g for g in (1, 2, 4) if c % g == 0 and c2 % g == 0])
        pad = r.choice(["same_ish", 0])
        pad = (ks // 2) * dil if pad == "same_ish" else 0
        if st > 1 and pad == 0: pad = 1
        L2 = (L + 2 * pad - dil * (ks - 1) - 1) // st + 1
        if L2 < 2:
            return nn.Identity(), c, L
        if depth and (st != 1 or L2 != L): return conv1d_block(r, c, L, depth)
        return nn.Conv1d(c, c2, ks, stride=st, padding=pad, dilation=dil, groups=g, bias=r.random() < .7), c2, L2
    if k == "convT":
        c2 = r.choice([4, 8])
        if r.random() < .5 and L <= 32:
            return nn.ConvTranspose1d(c, c2, 2, stride=2), c2, 2 * L
        return nn.ConvTranspose1d(c, c2, 3, padding=1), c2, L
    if k == "bn": return nn.BatchNorm1d(c), c, L
    if k == "gn":
        g = r.choice([g for g in (1, 2, 4) if c % g == 0]); return nn.GroupNorm(g, c), c, L
    if k == "act": return act(r) if not depth else safe_act(r), c, L
    if k == "drop": return nn.Dropout(0.2), c, L
    if k == "pool":
        if L < 4: return nn.Identity(), c, L
        return (nn.MaxPool1d(2) if r.random() < .5 else nn.AvgPool1d(2)), c, L // 2
    if k == "apool":
        L2 = max(2, L // 3)
        return (nn.AdaptiveMaxPool1d(L2) if r.random() < .5 else nn.AdaptiveAvgPool1d(L2)), c, L2
    if k == "up":
        if L > 32: return nn.Identity(), c, L
        mode = r.choice(["nearest", "linear"])
        if r.random() < .5:
            return nn.Upsample(scale_factor=2, mode=mode), c, 2 * L
        return Lambda(lambda x, m=mode, s=L + 3: F.interpolate(x, size=s, mode=m), f"interp {mode}"), c, L + 3
    if k == "res":
        return Residual(nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c), safe_act(r))), c, L
    if k == "cat":
        return CatBranch(nn.Conv1d(c, 4, 1), 1), c + 4, L
    if k == "ckpt":
        b1, c1, L1 = conv1d_block(r, c, L, 1); b2, c2, L2 = conv1d_block(r, c1, L1, 1)
        return Ckpt(nn.Sequential(b1, b2)), c2, L2
    if k == "lnperm":
        return nn.Sequential(Lambda(lambda x: x.transpose(1, 2), "T"), nn.LayerNorm(c),
                             Lambda(lambda x: x.transpose(1, 2), "T")), c, L


def build_conv1d(r, out_dim):
    c = r.choice([2, 3, 4]); L = r.choice([16, 24, 32])
    layers = []; cur, Lc = c, L
    for _ in range(r.randint(2, 6)):
        b, cur, Lc = conv1d_block(r, cur, Lc); layers.append(b)
    head = r.choice(["pool", "flat"])
    if head == "pool":
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(cur, out_dim)]
    else:
        layers += [nn.Flatten(), nn.Linear(cur * Lc, out_dim)]
    return nn.Sequential(*layers), (c, L), torch.float32


# ---------------------------------------------------------------- 2d conv family (B, C, H, W)
def conv2d_block(r, c, H, depth=0):
    kinds = ["conv", "conv", "convT", "bn", "gn", "act", "pool", "apool", "up", "res", "cat",
             "ckpt", "drop", "lnperm", "frozen"]
    if depth:
        kinds = ["conv", "bn", "act", "gn"]
    k = r.choice(kinds)
    if k == "conv":
        c2 = r.choice([4, 8, 12, 16])
        ks = r.choice([1, 3, 3, 5]); dil = r.choice([1, 1, 2]); st = r.choice([1, 1, 2])
        g = r.choice([g for g in (1, 2, 4) if c % g == 0 and c2 % g == 0])
        if r.random() < .15 and c2 % c == 0: g = c  # depthwise
        pad = (ks // 2) * dil if r.random() < .7 else 0
        if st > 1 and pad == 0: pad = 1
        if depth: st = 1; pad = (ks // 2) * dil
        H2 = (H + 2 * pad - dil * (ks - 1) - 1) // st + 1
        if H2 < 2:
            return nn.Identity(), c, H
        return nn.Conv2d(c, c2, ks, stride=st, padding=pad, dilation=dil, groups=g, bias=r.random() < .7), c2, H2
    if k == "convT":
        c2 = r.choice([4, 8])
        if r.random() < .5 and H <= 12:
            return nn.ConvTranspose2d(c, c2, 2, stride=2), c2, 2 * H
        g = r.choice([g for g in (1, 2) if c % g == 0 and c2 % g == 0])
        return nn.ConvTranspose2d(c, c2, 3, padding=1, groups=g), c2, H
    if k == "bn": return nn.BatchNorm2d(c), c, H
    if k == "gn":
        g = r.choice([g for g in (1, 2, 4) if c % g == 0]); return nn.GroupNorm(g, c), c, H
    if k == "act": return act(r) if not depth else safe_act(r), c, H
    if k == "drop": return (nn.Dropout2d(0.2) if r.random() < .5 else nn.Dropout(0.1)), c, H
    if k == "pool":
        if H < 4: return nn.Identity(), c, H
        p = r.choice(["max", "avg", "max3"])
        if p == "max3": return nn.MaxPool2d(3, stride=2, padding=1), c, (H - 1) // 2 + 1
        return (nn.MaxPool2d(2) if p == "max" else nn.AvgPool2d(2)), c, H // 2
    if k == "apool":
        H2 = max(2, H // 3)
        return (nn.AdaptiveMaxPool2d(H2) if r.random() < .5 else nn.AdaptiveAvgPool2d(H2)), c, H2
    if k == "up":
        if H > 12: return nn.Identity(), c, H
        mode = r.choice(["nearest", "bilinear"])
        if r.random() < .5:
            return nn.Upsample(scale_factor=2, mode=mode), c, 2 * H
        return Lambda(lambda x, m=mode, s=H + 3: F.interpolate(x, size=(s, s), mode=m), f"interp {mode}"), c, H + 3
    if k == "res":
        return Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), safe_act(r))), c, H
    if k == "cat":
        return CatBranch(nn.Sequential(nn.Conv2d(c, 4, 1), safe_act(r)), 1), c + 4, H
    if k == "ckpt":
        b1, c1, H1 = conv2d_block(r, c, H, 1); b2, c2, H2 = conv2d_block(r, c1, H1, 1)
        return Ckpt(nn.Sequential(b1, b2)), c2, H2
    if k == "lnperm":
        return nn.Sequential(Lambda(lambda x: x.permute(0, 2, 3, 1), "P"), nn.LayerNorm(c),
                             Lambda(lambda x: x.permute(0, 3, 1, 2), "P")), c, H
    if k == "frozen":
        b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        for p in b.parameters(): p.requires_grad_(False)
        return b, c, H


def build_conv2d(r, out_dim):
    c = r.choice([1, 3, 4]); H = r.choice([8, 12, 16])
    layers = []; cur, Hc = c, H
    for _ in range(r.randint(2, 6)):
        b, cur, Hc = conv2d_block(r, cur, Hc); layers.append(b)
    if r.random() < .6:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cur, out_dim)]
    else:
        layers += [nn.Flatten(), nn.Linear(cur * Hc * Hc, out_dim)]
    return nn.Sequential(*layers), (c, H, H), torch.float32


# ---------------------------------------------------------------- token sequence family
class MHABlock(nn.Module):
    def __init__(self, r, E, T):
        super().__init__()
        self.bf = r.random() < .5
        self.mask = r.choice(["none", "causal_bool", "causal_float", "kpm", "is_causal"])
        self.need = r.random() < .3
        self.mha = nn.MultiheadAttention(E, r.choice([1, 2, 4]), dropout=r.choice([0.0, 0.1]),
                                         batch_first=self.bf, bias=r.random() < .8)
        self.register_buffer("causal", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))
        kpm = torch.zeros(T, dtype=torch.bool); kpm[-2:] = True
        self.register_buffer("kpm", kpm)
        self.ln = nn.LayerNorm(E)
    def forward(self, x):
        h = self.ln(x)
        if not self.bf: h = h.transpose(0, 1)
        kw = {}
        if self.mask == "causal_bool": kw["attn_mask"] = self.causal
        elif self.mask == "causal_float":
            kw["attn_mask"] = torch.zeros(self.causal.shape, dtype=h.dtype, device=h.device).masked_fill(self.causal, float("-inf"))
        elif self.mask == "is_causal": kw["attn_mask"] = self.causal; kw["is_causal"] = True
        elif self.mask == "kpm": kw["key_padding_mask"] = self.kpm.expand(x.shape[0], -1)
        out, _ = self.mha(h, h, h, need_weights=self.need, **kw)
        if not self.bf: out = out.transpose(0, 1)
        return x + out
    def extra_repr(self):
        return f"bf={self.bf} mask={self.mask} need_weights={self.need}"


class SDPABlock(nn.Module):
    def __init__(self, r, E, T):
        super().__init__()
        self.h = r.choice([1, 2, 4])
        self.mask = r.choice(["none", "is_causal", "bool", "float", "bool_b"])
        self.p = r.choice([0.0, 0.0, 0.1])
        self.fused = r.random() < .5
        if self.fused:
            self.qkv = nn.Linear(E, 3 * E)
        else:
            self.q = nn.Linear(E, E); self.k = nn.Linear(E, E); self.v = nn.Linear(E, E)
        self.o = nn.Linear(E, E)
        self.register_buffer("bmask", torch.tril(torch.ones(T, T, dtype=torch.bool)))
    def forward(self, x):
        B, T, E = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(E, -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        sh = lambda t: t.view(B, T, self.h, E // self.h).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        kw = {}
        if self.mask == "is_causal": kw["is_causal"] = True
        elif self.mask == "bool": kw["attn_mask"] = self.bmask
        elif self.mask == "bool_b": kw["attn_mask"] = self.bmask.expand(B, 1, T, T)
        elif self.mask == "float":
            kw["attn_mask"] = torch.zeros(T, T, dtype=q.dtype).masked_fill(~self.bmask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, **kw)
        y = y.transpose(1, 2).reshape(B, T, E)
        return x + self.o(y)
    def extra_repr(self):
        return f"h={self.h} mask={self.mask} p={self.p} fused={self.fused}"


class RNNBlock(nn.Module):
    def __init__(self, r, E):
        super().__init__()
        self.kind = r.choice(["gru", "lstm"])
        self.bf = r.random() < .5
        self.bi = r.random() < .5
        H = r.choice([8, 16])
        cls = nn.GRU if self.kind == "gru" else nn.LSTM
        self.rnn = cls(E, H, num_layers=r.choice([1, 1, 2]), batch_first=self.bf,
                       bidirectional=self.bi, dropout=0.0)
        self.proj = nn.Linear(H * (2 if self.bi else 1), E)
    def forward(self, x):
        h = x if self.bf else x.transpose(0, 1)
        out = self.rnn(h)[0]
        if not self.bf: out = out.transpose(0, 1)
        return x + self.proj(out)
    def extra_repr(self):
        return f"{self.kind} bf={self.bf} bi={self.bi}"


class ConvT(nn.Module):
    def __init__(self, r, E):
        super().__init__()
        self.conv = nn.Conv1d(E, E, 3, padding=1, groups=r.choice([1, E]))
    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def seq_block(r, E, T):
    k = r.choice(["mha", "sdpa", "sdpa", "rnn", "mlp", "norm", "convt", "index", "ckpt", "drop", "frozen"])
    if k == "mha": return MHABlock(r, E, T)
    if k == "sdpa": return SDPABlock(r, E, T)
    if k == "rnn": return RNNBlock(r, E)
    if k == "mlp": return Residual(nn.Sequential(nn.Linear(E, 2 * E), act(r), nn.Linear(2 * E, E)))
    if k == "norm": return nn.LayerNorm(E) if r.random() < .5 else nn.RMSNorm(E)
    if k == "convt": return ConvT(r, E)
    if k == "drop": return nn.Dropout(0.1)
    if k == "index":
        g = torch.Generator().manual_seed(r.randrange(1 << 30))
        return IndexSel(1, torch.randperm(T, generator=g), r.choice(["index_select", "gather"])) \
            if r.random() < .5 else IndexSel(2, torch.randperm(E, generator=g), "index_select")
    if k == "ckpt": return Ckpt(seq_block(r, E, T))
    if k == "frozen":
        b = seq_block(r, E, T)
        for p in b.parameters(): p.requires_grad_(False)
        return b


class SeqModel(nn.Module):
    def __init__(self, r, V, T, out):
        super().__init__()
        E = r.choice([16, 32])
        self.emb = nn.Embedding(V, E, padding_idx=0 if r.random() < .3 else None)
        self.pos = nn.Parameter(torch.zeros(T, E)) if r.random() < .5 else None
        self.blocks = nn.Sequential(*[seq_block(r, E, T) for _ in range(r.randint(1, 4))])
        self.out_kind = out
        if out == "token":
            self.head = nn.Linear(E, V, bias=False)
            if r.random() < .5:
                self.head.weight = self.emb.weight  # tie
                self.tied = True
        else:
            self.head = nn.Linear(E, out)
    def forward(self, x):
        h = self.emb(x)
        if self.pos is not None: h = h + self.pos
        h = self.blocks(h)
        if self.out_kind != "token": h = h.mean(1)
        return self.head(h)


# ---------------------------------------------------------------- losses / optimizers
def pick_loss(r, family, out_dim, T):
    """(loss_fn, target maker(n) -> tensor, output transform name)."""
    if family == "seq_token":
        ls = r.choice([0.0, 0.0, 0.1]); ign = r.random() < .5
        def loss(o, y, ls=ls):
            return F.cross_entropy(o.flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=ls)
        def tgt(n, g, ign=ign):
            y = torch.randint(out_dim, (n, T), generator=g)
            if ign: y[:, :2] = -100
            return y
        return loss, tgt, f"token_ce ls={ls} ign={ign}"
    k = r.choice(["ce", "ce_ls", "ce_ign", "nll", "mse", "l1", "smooth_l1", "bce", "kl", "multi"])
    if k in ("ce", "ce_ls", "ce_ign", "nll"):
        def tgt(n, g, k=k):
            y = torch.randint(out_dim, (n,), generator=g)
            if k == "ce_ign": y[::3] = -100
            return y
        if k == "ce": return F.cross_entropy, tgt, k
        if k == "ce_ls": return (lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1)), tgt, k
        if k == "ce_ign": return (lambda o, y: F.cross_entropy(o, y, ignore_index=-100)), tgt, k
        return (lambda o, y: F.nll_loss(F.log_softmax(o, -1), y)), tgt, k
    if k in ("mse", "l1", "smooth_l1", "bce"):
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss,
              "bce": F.binary_cross_entropy_with_logits}[k]
        return fn, (lambda n, g: torch.rand(n, out_dim, generator=g)), k
    if k == "kl":
        def loss(o, y):
            return F.kl_div(F.log_softmax(o, -1), y, reduction="batchmean")
        return loss, (lambda n, g: torch.softmax(torch.randn(n, out_dim, generator=g), -1)), k
    # multi-output: logits split in two heads: CE on first part, mse on rest
    def loss(o, y):
        a, b = o[:, :out_dim - 4], o[:, out_dim - 4:]
        return F.cross_entropy(a, y) + 0.5 * F.mse_loss(b, torch.zeros_like(b))
    return loss, (lambda n, g: torch.randint(out_dim - 4, (n,), generator=g)), "multi(ce+mse)"


def pick_opt(r):
    k = r.choice(["sgd", "sgd_m", "sgd_nest", "sgd_wd", "adam", "adamw", "rmsprop", "adagrad",
                  "adamax", "nadam", "radam", "default", "adam_amsgrad", "rmsprop_m"])
    fns = {
        "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
        "sgd_m": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        "sgd_nest": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
        "sgd_wd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
        "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
        "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr),
        "adam_amsgrad": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True, weight_decay=1e-4),
        "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
        "rmsprop_m": lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.9, centered=True),
        "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
        "adamax": lambda p, lr: torch.optim.Adamax(p, lr=lr),
        "nadam": lambda p, lr: torch.optim.NAdam(p, lr=lr),
        "radam": lambda p, lr: torch.optim.RAdam(p, lr=lr),
        "default": None,
    }
    return fns[k], k


def gen_case(seed, family=None, settings=None, bs=None, opt=None):
    r = random.Random(seed)
    family = family or r.choice(["vec", "vec", "conv1d", "conv2d", "conv2d", "seq_token", "seq_cls"])
    arch_seed = r.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    T = r.choice([8, 12, 16]); V = r.choice([20, 50])
    out_dim = r.choice([6, 10]) if family != "seq_token" else V
    loss, tgt, loss_name = pick_loss(r, family, out_dim, T)

    if family in ("vec", "conv1d", "conv2d"):
        builder = {"vec": build_vec, "conv1d": build_conv1d, "conv2d": build_conv2d}[family]
        _, in_shape, _ = builder(random.Random(arch_seed), out_dim)
        x = torch.randn(N_ITEMS, *in_shape, generator=g)
        model_fn = lambda: builder(random.Random(arch_seed), out_dim)[0]
    else:
        out = "token" if family == "seq_token" else out_dim
        x = torch.randint(1, V, (N_ITEMS, T), generator=g)
        model_fn = lambda: SeqModel(random.Random(arch_seed), V, T, out)
    y = tgt(N_ITEMS, g)
    opt_fn, opt_name = pick_opt(r)
    if opt is not None:
        opt_fn, opt_name = opt
    s = r.choice(["fp32", "fp32", "fp32", "bf16", "acc2"])
    if settings is None:
        settings = {"fp32": StepSettings(), "bf16": StepSettings(precision=Precision.bf16),
                    "acc2": StepSettings(accumulate=2)}[s]
    else:
        s = "given"
    bs = bs or r.choice([2, 8, 32])
    task = Task(model=model_fn, train_data=TensorDataset(x, y), loss_fn=loss, lr=1e-3,
                base_batch_size=8, optimizer=opt_fn)
    desc = dict(seed=seed, family=family, loss=loss_name, opt=opt_name, settings=s, bs=bs)
    return dict(task=task, settings=settings, bs=bs, desc=desc)
