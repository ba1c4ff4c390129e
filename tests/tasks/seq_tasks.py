"""Sequence models that read their batch's values: Hugging Face decoders fed padded batches
with an attention mask, a packed-sequence LSTM, boolean-mask token selection, and a model
that branches on an activation's value (which no simulation can run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import Dataset, TensorDataset

from bsselect import Task

VOCAB, T_MAX = 96, 48


class Sequences(Dataset):
    """Token sequences of 6..T_MAX tokens (seeded), each its own target."""

    def __init__(self, n: int = 400, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(6, T_MAX + 1, (n,), generator=g).tolist()
        self.items = [torch.randint(1, VOCAB, (k,), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i], self.items[i]


def pad_with_mask(items: list) -> tuple[dict, torch.Tensor]:
    """A padding collator as HF's: input_ids, attention_mask, and labels -100 on padding."""
    longest = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(x)] = x, 1, x
    return {"input_ids": ids, "attention_mask": mask}, labels


class Decoder(nn.Module):
    """A randomly initialised transformers decoder built from its config (no download)."""

    def __init__(self, family: str) -> None:
        super().__init__()
        if family == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            self.lm = LlamaForCausalLM(LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T_MAX,
                bos_token_id=1, eos_token_id=2, pad_token_id=0))
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            self.lm = GPT2LMHeadModel(GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=T_MAX,
                bos_token_id=1, eos_token_id=2))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.lm(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def _decoder_task(family: str) -> Task:
    return Task(model=lambda: Decoder(family), train_data=Sequences(), loss_fn=next_token_loss,
                collate_fn=pad_with_mask, optimizer=torch.optim.AdamW, lr=1e-3,
                base_batch_size=8)


def llama() -> Task:
    return _decoder_task("llama")


def gpt2() -> Task:
    return _decoder_task("gpt2")


def pad_with_lengths(items: list) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    longest = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, :len(x)] = x
    lengths = torch.tensor([len(x) for x, _ in items])
    return (ids, lengths), torch.tensor([int(x.sum()) % 4 for x, _ in items])


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 24)
        self.rnn = nn.LSTM(24, 48, batch_first=True)
        self.out = nn.Linear(48, 4)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, lengths = x
        packed = pack_padded_sequence(self.emb(ids), self.lengths(ids, lengths).cpu(),
                                      batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.out(h[-1])

    def lengths(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return lengths


def packed_lstm() -> Task:
    return Task(model=PackedLSTM, train_data=Sequences(), loss_fn=F.cross_entropy,
                collate_fn=pad_with_lengths, optimizer=torch.optim.Adam, lr=1e-3,
                base_batch_size=8)


class TrimmedPackedLSTM(PackedLSTM):
    """Drops each sequence's last token with an in-place op on a tensor computed from the
    batch (``lengths -= 1``): the simulation once applied such ops twice, packed fewer tokens
    than the real step and read the memory 15% low (review)."""

    def lengths(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(1)
        lengths -= 1
        return lengths


def packed_lstm_trimmed() -> Task:
    return Task(model=TrimmedPackedLSTM, train_data=Sequences(), loss_fn=F.cross_entropy,
                collate_fn=pad_with_lengths, optimizer=torch.optim.Adam, lr=1e-3,
                base_batch_size=8)


def _seq2seq(items: list) -> dict:
    x, _ = pad_with_mask(items)
    labels = torch.stack([t[:6] for t, _ in items])  # every sequence has >= 6 tokens
    return {**x, "labels": labels}


def t5() -> Task:
    """A tiny T5 from its config: transformers' relative-position buckets add in place
    (``relative_buckets += ...``) to a tensor computed from positions alone, which the
    simulation once applied twice and then looked up past the bucket table's end."""
    from transformers import T5Config

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                      architectures=["T5ForConditionalGeneration"])
    return Task.from_hf(config, Sequences(), data_collator=_seq2seq, lr=1e-3,
                        base_batch_size=8)


class BranchOnActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h * 2 if h.sum() > 0 else h


def branchy() -> Task:
    g = torch.Generator().manual_seed(0)
    return Task(model=BranchOnActivation,
                train_data=TensorDataset(torch.randn(64, 4, generator=g),
                                         torch.randint(0, 2, (64,), generator=g)),
                loss_fn=F.cross_entropy, lr=0.1, base_batch_size=8)


class _Family(nn.Module):
    """Other transformers families, from their configs: an encoder (BERT, sequence
    classification) and a decoder with grouped-query attention (Qwen2)."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        if family == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            self.model = BertForSequenceClassification(BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=T_MAX, num_labels=4))
        else:
            from transformers import Qwen2Config, Qwen2ForCausalLM

            self.model = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T_MAX,
                bos_token_id=1, eos_token_id=2))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits


def _classify(items: list) -> tuple[dict, torch.Tensor]:
    x, _ = pad_with_mask(items)
    return x, torch.tensor([int(t.sum()) % 4 for t, _ in items])


def extra_family(family: str) -> Task:
    if family == "bert":
        return Task(model=lambda: _Family("bert"), train_data=Sequences(),
                    loss_fn=F.cross_entropy, collate_fn=_classify, optimizer=torch.optim.AdamW,
                    lr=1e-3, base_batch_size=8)
    return Task(model=lambda: _Family("qwen2"), train_data=Sequences(), loss_fn=next_token_loss,
                collate_fn=pad_with_mask, optimizer=torch.optim.AdamW, lr=1e-3,
                base_batch_size=8)


class WordDropout(nn.Module):
    """Keeps each token with p=0.85, drawn in place into a tensor made in forward
    (``torch.zeros(s).bernoulli_(p)``), then runs the head on the kept tokens only. On the
    fake pass the tensor kept its zeros: no token kept, the peak 0.06x the real one (review)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 4))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, _ = x
        keep = torch.zeros(ids.shape).bernoulli_(0.85).bool()
        h = self.mlp(self.emb(ids)[keep])
        return h.mean(0, keepdim=True).expand(ids.shape[0], -1)


def word_dropout() -> Task:
    return Task(model=WordDropout, train_data=Sequences(), loss_fn=F.cross_entropy,
                collate_fn=pad_with_lengths, optimizer=torch.optim.Adam, lr=1e-3,
                base_batch_size=8)


class PlainLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.rnn = nn.LSTM(32, 64, batch_first=True)
        self.out = nn.Linear(64, 4)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x[0]))
        return self.out(h[:, -1])


def plain_lstm() -> Task:
    """oneDNN has no fp16 LSTM on the CPU: under CPU fp16 autocast its real step fails, where
    CUDA's runs it (the real check said "cannot run at any batch size": review)."""
    return Task(model=PlainLSTM, train_data=Sequences(), loss_fn=F.cross_entropy,
                collate_fn=pad_with_lengths, optimizer=torch.optim.Adam, lr=1e-3,
                base_batch_size=8)


class _MaskedSelect(nn.Module):
    """Keeps the real tokens' features with ``torch.masked_select``: the mask broadcast from
    (B, T, 1), or expanded to the activation's shape and contiguous."""

    def __init__(self, full_mask: bool) -> None:
        super().__init__()
        self.full_mask = full_mask
        self.emb = nn.Embedding(VOCAB, 64)
        self.mix = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, lengths = x
        h = torch.tanh(self.mix(self.emb(ids)))
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None])[..., None]
        if self.full_mask:
            mask = mask.expand_as(h).contiguous()
        kept = torch.masked_select(h, mask).view(-1, 64)
        return self.out(kept.mean(0, keepdim=True).expand(ids.shape[0], -1))


def masked_select(full_mask: bool = False) -> Task:
    return Task(model=lambda: _MaskedSelect(full_mask), train_data=Sequences(),
                loss_fn=F.cross_entropy, collate_fn=pad_with_lengths, lr=0.1,
                base_batch_size=8)


class _SelectedTokens(nn.Module):
    """``h[mask]`` on ``width``-wide token features (a per-token loss is 1 wide): the
    boolean mask's nonzero indices are as large as the selection when it is narrow."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, lengths = x
        h = torch.tanh(self.emb(ids))
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        return self.out(h[mask].mean(0, keepdim=True).expand(ids.shape[0], -1))


def selected_tokens(width: int = 2) -> Task:
    return Task(model=lambda: _SelectedTokens(width), train_data=Sequences(),
                loss_fn=F.cross_entropy, collate_fn=pad_with_lengths, lr=0.1,
                base_batch_size=8)
