"""Transformer-style random models for the differential fuzz (session 31 review).

gen_case(seed) -> dict(task, settings, bs, desc) like gen.py. Two families:
  "tf": a hand-built decoder/encoder stack (embeddings, learned/rotary positions, pre/post
        LayerNorm/RMSNorm, SDPA or hand attention with causal/padding masks, GQA, MLP
        GELU/SiLU/SwiGLU, dropout, checkpoint), causal-LM loss or mean-pooled classification.
  "hf": tiny Hugging Face models from configs (GPT-2, Llama, BERT, ...), Task.from_hf.
"""
import math
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
PAD = 0


class HandRMS(nn.Module):
    def __init__(self, d):
        super().__init__(); self.w = nn.Parameter(torch.ones(d))
    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.w * y.to(x.dtype)


def make_norm(kind, d):
    if kind == "ln": return nn.LayerNorm(d)
    if kind == "ln_nb": return nn.LayerNorm(d, bias=False)
    if kind == "rms": return nn.RMSNorm(d)
    return HandRMS(d)


def rope_tables(T, hd, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    t = torch.arange(T).float()
    fr = torch.outer(t, inv)
    emb = torch.cat([fr, fr], -1)
    return emb.cos(), emb.sin()


def rot_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


class Attn(nn.Module):
    def __init__(self, r, E, T, causal, cfg):
        super().__init__()
        self.E = E
        self.h = r.choice([h for h in (1, 2, 4) if E % h == 0 and (E // h) % 2 == 0])
        self.hd = E // self.h
        kvs = [k for k in (1, 2, 4) if self.h % k == 0]
        self.kvh = r.choice(kvs) if r.random() < .4 else self.h
        self.gqa = r.choice(["repeat_interleave", "enable_gqa", "expand"]) if self.kvh != self.h else "none"
        self.impl = r.choice(["sdpa", "sdpa", "hand"])
        self.p = r.choice([0.0, 0.0, 0.1])
        self.causal = causal
        self.mask = cfg["mask"]
        self.rope = cfg["rope"]
        self.fused = r.random() < .5
        bias = r.random() < .5
        kvE = self.kvh * self.hd
        if self.fused:
            self.qkv = nn.Linear(E, E + 2 * kvE, bias=bias)
        else:
            self.q = nn.Linear(E, E, bias=bias); self.k = nn.Linear(E, kvE, bias=bias)
            self.v = nn.Linear(E, kvE, bias=bias)
        self.o = nn.Linear(E, E, bias=bias)
        self.out_p = r.choice([0.0, 0.1])
        self.contig = r.random() < .5
        if self.rope:
            c, s = rope_tables(T, self.hd)
            self.register_buffer("cos", c, persistent=False)
            self.register_buffer("sin", s, persistent=False)

    def forward(self, x, pad_mask):
        B, T, E = x.shape
        kvE = self.kvh * self.hd
        if self.fused:
            q, k, v = self.qkv(x).split([E, kvE, kvE], -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2)
        if self.rope:
            cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)
            q = q * cos + rot_half(q) * sin
            k = k * cos + rot_half(k) * sin
        rep = self.h // self.kvh
        enable_gqa = False
        if rep > 1:
            if self.gqa == "repeat_interleave":
                k = k.repeat_interleave(rep, 1); v = v.repeat_interleave(rep, 1)
            elif self.gqa == "expand":
                k = k[:, :, None].expand(B, self.kvh, rep, T, self.hd).reshape(B, self.h, T, self.hd)
                v = v[:, :, None].expand(B, self.kvh, rep, T, self.hd).reshape(B, self.h, T, self.hd)
            elif self.impl == "sdpa":
                enable_gqa = True
            else:
                k = k.repeat_interleave(rep, 1); v = v.repeat_interleave(rep, 1)
        p = self.p if self.training else 0.0
        # mask: "none", "is_causal", "bool" (B,1,T,T) from pads (+causal), "float" additive
        allowed = None
        if self.mask in ("bool", "float") or (self.impl == "hand" and self.causal):
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
            if self.causal:
                allowed = allowed.tril()
            allowed = allowed[None, None]
            if self.mask in ("bool", "float"):
                allowed = allowed & pad_mask[:, None, None, :]
                # keep at least the diagonal so no row is fully masked
                allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)[None, None]
        if self.impl == "sdpa":
            kw = {}
            if allowed is None:
                if self.causal: kw["is_causal"] = True
            elif self.mask == "float":
                kw["attn_mask"] = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
            else:
                kw["attn_mask"] = allowed
            if enable_gqa: kw["enable_gqa"] = True
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            a = torch.softmax(s.float(), -1).to(q.dtype) if r_choice_float(self) else s.softmax(-1)
            a = F.dropout(a, p, self.training)
            y = torch.matmul(a, v)
        y = y.transpose(1, 2)
        y = y.contiguous().view(B, T, E) if self.contig else y.reshape(B, T, E)
        return F.dropout(self.o(y), self.out_p, self.training)

    def extra_repr(self):
        return (f"h={self.h} kvh={self.kvh} gqa={self.gqa} impl={self.impl} p={self.p} "
                f"causal={self.causal} mask={self.mask} rope={self.rope} fused={self.fused}")


def r_choice_float(m):
    return getattr(m, "_softmax_fp32", False)


class MLP(nn.Module):
    def __init__(self, r, E):
        super().__init__()
        self.kind = r.choice(["gelu", "gelu_tanh", "silu", "swiglu", "relu"])
        H = r.choice([2, 4]) * E
        bias = r.random() < .5
        if self.kind == "swiglu":
            self.fused = r.random() < .5
            if self.fused:
                self.gu = nn.Linear(E, 2 * H, bias=bias)
            else:
                self.g = nn.Linear(E, H, bias=bias); self.u = nn.Linear(E, H, bias=bias)
        else:
            self.fc = nn.Linear(E, H, bias=bias)
            self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                        "silu": nn.SiLU(), "relu": nn.ReLU()}[self.kind]
        self.proj = nn.Linear(H, E, bias=bias)
        self.drop = nn.Dropout(r.choice([0.0, 0.1]))
    def forward(self, x):
        if self.kind == "swiglu":
            if self.fused:
                g, u = self.gu(x).chunk(2, -1)
            else:
                g, u = self.g(x), self.u(x)
            h = F.silu(g) * u
        else:
            h = self.act(self.fc(x))
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, r, E, T, causal, cfg):
        super().__init__()
        self.pre = cfg["pre"]
        self.n1 = make_norm(cfg["norm"], E); self.n2 = make_norm(cfg["norm"], E)
        self.attn = Attn(r, E, T, causal, cfg)
        self.attn._softmax_fp32 = r.random() < .3
        self.mlp = MLP(r, E)
        self.drop = nn.Dropout(r.choice([0.0, 0.1]))
        self.parallel = self.pre and r.random() < .2  # GPT-J style
    def forward(self, x, pad_mask):
        if self.parallel:
            h = self.n1(x)
            return x + self.drop(self.attn(h, pad_mask)) + self.mlp(h)
        if self.pre:
            x = x + self.drop(self.attn(self.n1(x), pad_mask))
            return x + self.mlp(self.n2(x))
        x = self.n1(x + self.drop(self.attn(x, pad_mask)))
        return self.n2(x + self.mlp(x))


class TF(nn.Module):
    def __init__(self, r, V, T, task, n_cls):
        super().__init__()
        E = r.choice([16, 32, 48, 64])
        causal = task == "lm" or r.random() < .3
        pos = r.choice(["learned", "learned", "rope", "none"])
        cfg = dict(pre=r.random() < .7, norm=r.choice(["ln", "rms", "rms", "hand_rms", "ln_nb"]),
                   mask=r.choice(["none", "bool", "float", "bool"]), rope=pos == "rope")
        self.cfg = cfg; self.posk = pos; self.task = task
        self.emb = nn.Embedding(V, E, padding_idx=PAD if r.random() < .3 else None)
        self.pos = nn.Embedding(T, E) if pos == "learned" else None
        self.edrop = nn.Dropout(r.choice([0.0, 0.1]))
        self.blocks = nn.ModuleList([Block(r, E, T, causal, cfg) for _ in range(r.randint(1, 3))])
        self.ckpt = r.choice(["none", "none", "all", "some"])
        self.ckpt_mask = [self.ckpt == "all" or (self.ckpt == "some" and i % 2 == 0)
                          for i in range(len(self.blocks))]
        self.nf = make_norm(cfg["norm"], E) if cfg["pre"] else nn.Identity()
        if task == "lm":
            self.head = nn.Linear(E, V, bias=False)
            self.tied = r.random() < .5
            if self.tied: self.head.weight = self.emb.weight
        else:
            self.pool = r.choice(["mean", "masked_mean", "first"])
            self.head = nn.Linear(E, n_cls)
    def forward(self, x):
        B, T = x.shape
        pad_mask = x != PAD
        h = self.emb(x)
        if self.pos is not None:
            h = h + self.pos(torch.arange(T, device=x.device))
        h = self.edrop(h)
        for blk, ck in zip(self.blocks, self.ckpt_mask):
            h = checkpoint(blk, h, pad_mask, use_reentrant=False) if ck else blk(h, pad_mask)
        h = self.nf(h)
        if self.task == "lm":
            return self.head(h)
        if self.pool == "mean": h = h.mean(1)
        elif self.pool == "first": h = h[:, 0]
        else:
            m = pad_mask.unsqueeze(-1).to(h.dtype)
            h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(h)
    def extra_repr(self):
        return f"cfg={self.cfg} pos={self.posk} ckpt={self.ckpt}"


def lm_loss(o, y):
    return F.cross_entropy(o[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)


def lm_loss_ls(o, y):
    return F.cross_entropy(o[:, :-1].reshape(-1, o.shape[-1]).float(), y[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=0.1)


def pick_opt(r):
    k = r.choice(["adamw", "adamw", "adam", "sgd", "sgd_m"])
    return {
        "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
        "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
        "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
        "sgd_m": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    }[k], k


def pick_settings(r):
    s = r.choice(["fp32", "fp32", "bf16", "acc2"])
    return {"fp32": StepSettings(), "bf16": StepSettings(precision=Precision.bf16),
            "acc2": StepSettings(accumulate=2)}[s], s


def make_tokens(g, n, T, V, padded):
    x = torch.randint(1, V, (n, T), generator=g)
    if padded:
        lens = torch.randint(max(2, T // 3), T + 1, (n,), generator=g)
        for i in range(n):
            x[i, lens[i]:] = PAD
    return x


# ---------------------------------------------------------------- HF family
def hf_model_fn(r, V, T, kind, attn):
    import transformers as tr
    E = r.choice([16, 32, 64]); L = r.choice([1, 2]); heads = r.choice([2, 4])
    common = dict(vocab_size=V)
    if kind == "gpt2":
        cfg = tr.GPT2Config(n_layer=L, n_embd=E, n_head=heads, n_positions=64, vocab_size=V,
                            resid_pdrop=r.choice([0.0, 0.1]), attn_pdrop=r.choice([0.0, 0.1]),
                            embd_pdrop=0.1, tie_word_embeddings=r.random() < .7)
        cls = tr.GPT2LMHeadModel
    elif kind == "llama":
        kv = r.choice([k for k in (1, 2) if heads % k == 0])
        cfg = tr.LlamaConfig(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
                             num_attention_heads=heads, num_key_value_heads=kv,
                             max_position_embeddings=64, vocab_size=V,
                             tie_word_embeddings=r.random() < .5,
                             attention_dropout=r.choice([0.0, 0.1]))
        cls = tr.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = tr.Qwen2Config(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
                             num_attention_heads=heads, num_key_value_heads=1,
                             max_position_embeddings=64, vocab_size=V,
                             tie_word_embeddings=r.random() < .5)
        cls = tr.Qwen2ForCausalLM
    elif kind == "gpt_neox":
        cfg = tr.GPTNeoXConfig(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
                               num_attention_heads=heads, max_position_embeddings=64,
                               vocab_size=V, rotary_pct=r.choice([0.25, 1.0]),
                               use_parallel_residual=r.random() < .5)
        cls = tr.GPTNeoXForCausalLM
    elif kind == "bert":
        cfg = tr.BertConfig(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
                            num_attention_heads=heads, max_position_embeddings=64,
                            vocab_size=V, num_labels=3, pad_token_id=PAD,
                            hidden_dropout_prob=r.choice([0.0, 0.1]),
                            attention_probs_dropout_prob=r.choice([0.0, 0.1]))
        cls = tr.BertForSequenceClassification
    else:  # distilbert / roberta-ish
        cfg = tr.RobertaConfig(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
                               num_attention_heads=heads, max_position_embeddings=T + 4,
                               vocab_size=V, num_labels=3, pad_token_id=1)
        cls = tr.RobertaForSequenceClassification
    cfg._attn_implementation = attn
    ck = r.random() < .25

    def build():
        torch.manual_seed(0)
        m = cls(cfg)
        if ck:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m
    return build, cfg, ck


def hf_collate_fn(pad_id, lm):
    def collate(items):
        T = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        am = torch.zeros(len(items), T, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"]); ids[i, :n] = torch.tensor(it["input_ids"]); am[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": am}
        if lm:
            lab = ids.clone(); lab[am == 0] = -100
            out["labels"] = lab
        else:
            out["labels"] = torch.tensor([it["label"] for it in items])
        return out
    return collate


def gen_hf(seed, r, g):
    kind = r.choice(["gpt2", "gpt2", "llama", "llama", "qwen2", "gpt_neox", "bert", "roberta"])
    attn = r.choice(["sdpa", "eager"])
    V = r.choice([64, 100]); T = r.choice([8, 16, 24, 32])
    build, cfg, ck = hf_model_fn(random.Random(r.randrange(1 << 30)), V, T, kind, attn)
    lm = kind not in ("bert", "roberta")
    pad_id = 1 if kind == "roberta" else 0
    var = r.random() < .5
    data = []
    for i in range(N_ITEMS):
        n = int(torch.randint(max(2, T // 2), T + 1, (1,), generator=g)) if var else T
        ids = torch.randint(2, V, (n,), generator=g).tolist()
        it = {"input_ids": ids}
        if not lm: it["label"] = int(torch.randint(3, (1,), generator=g))
        data.append(it)
    s_obj, s = pick_settings(r)
    bs = r.choice([2, 8])
    opt_k = r.choice(["default", "default", "adam", "sgd"])
    opt = {"default": None, "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
           "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}[opt_k]
    task = Task.from_hf(build, data, data_collator=hf_collate_fn(pad_id, lm), lr=1e-3,
                        base_batch_size=8, optimizer=opt)
    desc = dict(seed=seed, family="hf", kind=kind, attn=attn, ckpt=ck, var=var, T=T, V=V,
                opt=opt_k, settings=s, bs=bs, loss="model")
    return dict(task=task, settings=s_obj, bs=bs, desc=desc)


def gen_case(seed, family=None):
    r = random.Random(seed)
    family = family or r.choice(["tf", "tf", "tf", "hf"])
    g = torch.Generator().manual_seed(seed)
    if family == "hf":
        return gen_hf(seed, r, g)
    arch_seed = r.randrange(1 << 30)
    T = r.choice([8, 12, 16, 24, 32]); V = r.choice([50, 100])
    task_k = r.choice(["lm", "lm", "cls"])
    padded = r.random() < .6
    x = make_tokens(g, N_ITEMS, T, V, padded)
    n_cls = 5
    if task_k == "lm":
        y = x.clone(); y[x == PAD] = -100
        lname = r.choice(["lm", "lm", "lm_ls"])
        loss = lm_loss if lname == "lm" else lm_loss_ls
    else:
        y = torch.randint(n_cls, (N_ITEMS,), generator=g)
        loss = F.cross_entropy; lname = "ce"
    model_fn = lambda: TF(random.Random(arch_seed), V, T, task_k, n_cls)
    opt_fn, opt_name = pick_opt(r)
    settings, s = pick_settings(r)
    bs = r.choice([2, 8])
    task = Task(model=model_fn, train_data=TensorDataset(x, y), loss_fn=loss, lr=1e-3,
                base_batch_size=8, optimizer=opt_fn)
    desc = dict(seed=seed, family="tf", task=task_k, loss=lname, opt=opt_name, settings=s,
                bs=bs, T=T, V=V, padded=padded)
    return dict(task=task, settings=settings, bs=bs, desc=desc)


# ====================================================================== wave 2: more op variety
class Attn2(nn.Module):
    """Attention written the other ways transformer code writes it."""
    def __init__(self, r, E, T, causal):
        super().__init__()
        self.h = r.choice([h for h in (1, 2, 4) if E % h == 0])
        self.hd = E // self.h; self.E = E; self.causal = causal
        self.style = r.choice(["unbind", "einsum", "baddbmm_alibi", "where_min", "sdpa_alibi",
                               "sdpa_kpm", "sdpa_scale", "softmax_f32", "mha_module"])
        self.qkv = nn.Linear(E, 3 * E)
        self.o = nn.Linear(E, E)
        self.p = r.choice([0.0, 0.1])
        slopes = torch.tensor([2 ** (-8 * (i + 1) / self.h) for i in range(self.h)])
        self.register_buffer("slopes", slopes, persistent=False)
        if self.style == "mha_module":
            self.mha = nn.MultiheadAttention(E, self.h, dropout=self.p, batch_first=True)
    def extra_repr(self):
        return f"style={self.style} h={self.h} causal={self.causal} p={self.p}"
    def forward(self, x, pad_mask):
        B, T, E = x.shape
        dev = x.device
        if self.style == "mha_module":
            kw = dict(key_padding_mask=~pad_mask)
            if self.causal:
                kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)
            kw["key_padding_mask"][:, 0] = False
            return self.mha(x, x, x, need_weights=False, **kw)[0]
        qkv = self.qkv(x).reshape(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.p if self.training else 0.0
        keep = torch.ones(T, T, dtype=torch.bool, device=dev)
        if self.causal: keep = keep.tril()
        keep = keep[None, None] & pad_mask[:, None, None, :]
        keep = keep | torch.eye(T, dtype=torch.bool, device=dev)
        if self.style == "unbind":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        elif self.style == "sdpa_kpm":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask[:, None, None, :] |
                                               torch.zeros(1, 1, T, 1, dtype=torch.bool, device=dev).index_fill(2, torch.tensor([0], device=dev), True)
                                               if False else pad_mask[:, None, None, :], dropout_p=p)
        elif self.style == "sdpa_scale":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal,
                                               scale=0.3)
        elif self.style == "sdpa_alibi":
            pos = torch.arange(T, device=dev)
            bias = -(pos[None, :] - pos[:, None]).abs().to(q.dtype) * self.slopes.to(q.dtype)[:, None, None]
            bias = bias[None].masked_fill(~keep, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        elif self.style == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.hd ** -0.5
            s = s.masked_fill(~keep, float("-inf"))
            a = F.dropout(s.softmax(-1), p, self.training)
            y = torch.einsum("bhqk,bhkd->bhqd", a, v)
        elif self.style == "baddbmm_alibi":
            pos = torch.arange(T, device=dev).to(q.dtype)
            alibi = (self.slopes.to(q.dtype)[:, None] * pos[None, :])  # (h, T) bloom-style
            alibi = alibi[None].expand(B, -1, -1).reshape(B * self.h, 1, T)
            s = torch.baddbmm(alibi, q.reshape(B * self.h, T, self.hd),
                              k.reshape(B * self.h, T, self.hd).transpose(1, 2),
                              beta=1.0, alpha=self.hd ** -0.5).view(B, self.h, T, T)
            s = torch.masked_fill(s, ~keep, torch.finfo(s.dtype).min)
            a = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            a = F.dropout(a, p, self.training)
            y = torch.bmm(a.reshape(B * self.h, T, T), v.reshape(B * self.h, T, self.hd)).view(B, self.h, T, self.hd)
        elif self.style == "where_min":
            s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
            s = torch.where(keep, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=dev))
            a = nn.functional.softmax(s, dim=-1)
            y = F.dropout(a, p, self.training) @ v
        else:  # softmax_f32, in-place masked_fill_
            s = torch.matmul(q, k.transpose(2, 3)) * (self.hd ** -0.5)
            s.masked_fill_(~keep, -1e4)
            a = s.float().softmax(-1).type_as(s)
            y = torch.matmul(F.dropout(a, p, self.training), v)
        y = y.permute(0, 2, 1, 3).flatten(2)
        return self.o(y)


class MoE(nn.Module):
    def __init__(self, r, E):
        super().__init__()
        self.n = r.choice([2, 4]); self.k = r.choice([1, 2]); H = 2 * E
        self.router = nn.Linear(E, self.n, bias=False)
        self.w1 = nn.ModuleList([nn.Linear(E, H, bias=False) for _ in range(self.n)])
        self.w2 = nn.ModuleList([nn.Linear(H, E, bias=False) for _ in range(self.n)])
        self.style = r.choice(["dense_mask", "index_add"])
    def extra_repr(self):
        return f"n={self.n} k={self.k} style={self.style}"
    def forward(self, x):
        B, T, E = x.shape
        h = x.reshape(-1, E)
        logits = self.router(h)
        w = logits.softmax(-1, dtype=torch.float)
        topw, topi = w.topk(self.k, -1)
        topw = (topw / topw.sum(-1, keepdim=True)).to(h.dtype)
        if self.style == "dense_mask":
            out = torch.zeros_like(h)
            for e in range(self.n):
                gate = (topw * (topi == e)).sum(-1, keepdim=True)
                out = out + gate * self.w2[e](F.silu(self.w1[e](h)))
        else:
            out = torch.zeros_like(h)
            onehot = F.one_hot(topi, self.n).permute(2, 1, 0)  # (n, k, N)
            for e in range(self.n):
                idx, tok = torch.where(onehot[e])
                if tok.numel() == 0:
                    continue
                y = self.w2[e](F.silu(self.w1[e](h[tok]))) * topw[tok, idx, None]
                out = out.index_add(0, tok, y.to(out.dtype))
        return out.view(B, T, E)


class Block2(nn.Module):
    def __init__(self, r, E, T, causal, norm):
        super().__init__()
        self.n1 = make_norm(norm, E); self.n2 = make_norm(norm, E)
        self.attn = Attn2(r, E, T, causal)
        self.ffn = MoE(r, E) if r.random() < .35 else MLP(r, E)
    def forward(self, x, pad_mask):
        x = x + self.attn(self.n1(x), pad_mask)
        return x + self.ffn(self.n2(x))


class TF2(nn.Module):
    def __init__(self, r, V, T, task, n_cls):
        super().__init__()
        E = r.choice([16, 32, 64]); self.E = E
        causal = task == "lm" or r.random() < .3
        norm = r.choice(["ln", "rms", "hand_rms"])
        self.emb = nn.Embedding(V, E, max_norm=1.0 if r.random() < .1 else None,
                                scale_grad_by_freq=r.random() < .15)
        self.scale_emb = r.random() < .3
        self.pos_kind = r.choice(["cumsum", "learned", "none", "sinus"])
        self.pos = nn.Embedding(T + 2, E)
        self.kind = r.choice(["mine", "mine", "torch_enc"])
        if self.kind == "torch_enc":
            layer = nn.TransformerEncoderLayer(E, r.choice([1, 2, 4]), 2 * E, dropout=r.choice([0.0, 0.1]),
                                               activation=r.choice(["relu", "gelu"]),
                                               batch_first=True, norm_first=r.random() < .5)
            self.enc = nn.TransformerEncoder(layer, r.randint(1, 2), enable_nested_tensor=False)
            self.causal = causal
        else:
            self.blocks = nn.ModuleList([Block2(r, E, T, causal, norm) for _ in range(r.randint(1, 2))])
            self.ck = r.random() < .3
        self.nf = make_norm(norm, E)
        self.task = task
        self.head = nn.Linear(E, V if task == "lm" else n_cls, bias=False)
        if task == "lm" and r.random() < .5 and self.emb.max_norm is None:
            self.head.weight = self.emb.weight
    def forward(self, x):
        B, T = x.shape
        pad_mask = x != PAD
        h = self.emb(x)
        if self.scale_emb: h = h * (self.E ** 0.5)
        if self.pos_kind == "cumsum":
            pid = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
            h = h + self.pos(pid)
        elif self.pos_kind == "learned":
            h = h + self.pos.weight[:T]
        elif self.pos_kind == "sinus":
            t = torch.arange(T, device=x.device, dtype=h.dtype)[:, None]
            f = torch.exp(torch.arange(0, self.E, 2, device=x.device, dtype=h.dtype) * (-math.log(1e4) / self.E))
            h = h + torch.stack([torch.sin(t * f), torch.cos(t * f)], -1).flatten(-2)
        if self.kind == "torch_enc":
            kpm = ~pad_mask
            kpm[:, 0] = False
            msk = nn.Transformer.generate_square_subsequent_mask(T, device=x.device) if self.causal else None
            h = self.enc(h, mask=msk, src_key_padding_mask=kpm, is_causal=self.causal)
        else:
            for b in self.blocks:
                h = checkpoint(b, h, pad_mask, use_reentrant=False) if self.ck else b(h, pad_mask)
        h = self.nf(h)
        if self.task == "lm":
            return self.head(h)
        m = pad_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def gen_case2(seed, big=False):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    arch_seed = r.randrange(1 << 30)
    T = r.choice([8, 12, 16, 24, 32] + ([64, 128] if big else [])); V = r.choice([50, 100] + ([1000] if big else []))
    task_k = r.choice(["lm", "lm", "cls"])
    padded = r.random() < .6
    x = make_tokens(g, N_ITEMS, T, V, padded)
    if task_k == "lm":
        y = x.clone(); y[x == PAD] = -100
        lname = r.choice(["lm", "lm", "lm_ls"])
        loss = lm_loss if lname == "lm" else lm_loss_ls
    else:
        y = torch.randint(5, (N_ITEMS,), generator=g); loss = F.cross_entropy; lname = "ce"
    model_fn = lambda: TF2(random.Random(arch_seed), V, T, task_k, 5)
    opt_fn, opt_name = pick_opt(r)
    settings, s = pick_settings(r)
    bs = r.choice([2, 8] + ([16, 32] if big else []))
    task = Task(model=model_fn, train_data=TensorDataset(x, y), loss_fn=loss, lr=1e-3,
                base_batch_size=8, optimizer=opt_fn)
    desc = dict(seed=seed, family="tf2", task=task_k, loss=lname, opt=opt_name, settings=s,
                bs=bs, T=T, V=V, padded=padded)
    return dict(task=task, settings=settings, bs=bs, desc=desc)


def hf2_model_fn(r, V, kind, attn):
    import transformers as tr
    E = r.choice([32, 64]); L = r.choice([1, 2]); heads = r.choice([2, 4])
    dec = dict(hidden_size=E, intermediate_size=2 * E, num_hidden_layers=L,
               num_attention_heads=heads, max_position_embeddings=128, vocab_size=V)
    lm = True
    if kind == "mistral":
        cfg = tr.MistralConfig(**dec, num_key_value_heads=1, sliding_window=r.choice([4, None]),
                               tie_word_embeddings=r.random() < .5); cls = tr.MistralForCausalLM
    elif kind == "mixtral":
        cfg = tr.MixtralConfig(**dec, num_key_value_heads=1, num_local_experts=4,
                               num_experts_per_tok=2, router_aux_loss_coef=0.01,
                               output_router_logits=r.random() < .5); cls = tr.MixtralForCausalLM
    elif kind == "gemma":
        cfg = tr.GemmaConfig(**dec, num_key_value_heads=1, head_dim=E // heads); cls = tr.GemmaForCausalLM
    elif kind == "phi":
        cfg = tr.PhiConfig(**dec, partial_rotary_factor=0.5); cls = tr.PhiForCausalLM
    elif kind == "opt":
        cfg = tr.OPTConfig(hidden_size=E, ffn_dim=2 * E, num_hidden_layers=L, num_attention_heads=heads,
                           max_position_embeddings=128, vocab_size=V, word_embed_proj_dim=E,
                           dropout=0.1, pad_token_id=0); cls = tr.OPTForCausalLM
    elif kind == "bloom":
        cfg = tr.BloomConfig(hidden_size=E, n_layer=L, n_head=heads, vocab_size=V,
                             hidden_dropout=0.1, attention_dropout=r.choice([0.0, 0.1])); cls = tr.BloomForCausalLM
    elif kind == "falcon":
        cfg = tr.FalconConfig(hidden_size=E, num_hidden_layers=L, num_attention_heads=heads, vocab_size=V,
                              new_decoder_architecture=r.random() < .5, num_kv_heads=1,
                              alibi=r.random() < .3); cls = tr.FalconForCausalLM
    elif kind == "gptj":
        cfg = tr.GPTJConfig(n_embd=E, n_layer=L, n_head=heads, vocab_size=V, n_positions=128,
                            rotary_dim=E // heads // 2); cls = tr.GPTJForCausalLM
    elif kind == "t5":
        cfg = tr.T5Config(d_model=E, d_kv=E // heads, d_ff=2 * E, num_layers=L, num_heads=heads,
                          vocab_size=V, decoder_start_token_id=0, pad_token_id=0,
                          feed_forward_proj=r.choice(["relu", "gated-gelu"])); cls = tr.T5ForConditionalGeneration
    elif kind == "bart":
        cfg = tr.BartConfig(d_model=E, encoder_layers=L, decoder_layers=L, encoder_attention_heads=heads,
                            decoder_attention_heads=heads, encoder_ffn_dim=2 * E, decoder_ffn_dim=2 * E,
                            vocab_size=V, max_position_embeddings=128, pad_token_id=1,
                            decoder_start_token_id=2); cls = tr.BartForConditionalGeneration
    elif kind == "distilbert":
        cfg = tr.DistilBertConfig(dim=E, hidden_dim=2 * E, n_layers=L, n_heads=heads, vocab_size=V,
                                  num_labels=3, max_position_embeddings=128); cls = tr.DistilBertForSequenceClassification
        lm = False
    cfg._attn_implementation = attn
    ck = r.random() < .25

    def build():
        torch.manual_seed(0)
        m = cls(cfg)
        if ck:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m
    return build, lm, ck


HF2_KINDS = ["mistral", "mixtral", "gemma", "phi", "opt", "bloom", "falcon", "gptj", "t5", "bart",
             "distilbert"]


def gen_hf2(seed, kind=None):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    kind = kind or r.choice(HF2_KINDS)
    attn = r.choice(["sdpa", "eager"])
    V = r.choice([64, 100]); T = r.choice([8, 16, 24, 32])
    build, lm, ck = hf2_model_fn(random.Random(r.randrange(1 << 30)), V, kind, attn)
    pad_id = 1 if kind == "bart" else 0
    var = r.random() < .5
    data = []
    for i in range(N_ITEMS):
        n = int(torch.randint(max(2, T // 2), T + 1, (1,), generator=g)) if var else T
        it = {"input_ids": torch.randint(3, V, (n,), generator=g).tolist()}
        if not lm: it["label"] = int(torch.randint(3, (1,), generator=g))
        data.append(it)
    s_obj, s = pick_settings(r)
    bs = r.choice([2, 8])
    opt_k = r.choice(["default", "default", "adam", "sgd"])
    opt = {"default": None, "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
           "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}[opt_k]
    task = Task.from_hf(build, data, data_collator=hf_collate_fn(pad_id, lm), lr=1e-3,
                        base_batch_size=8, optimizer=opt)
    desc = dict(seed=seed, family="hf2", kind=kind, attn=attn, ckpt=ck, var=var, T=T, V=V,
                opt=opt_k, settings=s, bs=bs, loss="model")
    return dict(task=task, settings=s_obj, bs=bs, desc=desc)


def gen_case_w2(seed):
    """wave 2: tf2 (2/3) and hf2 (1/3)."""
    return gen_hf2(seed) if seed % 3 == 2 else gen_case2(seed)
