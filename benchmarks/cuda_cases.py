"""The models ``bench_cuda.py`` measures, in four case sets (one per GPU loan).

* ``tune``: the models the CUDA terms were set on (first loan);
* ``heldout``: models not used to set them (second);
* ``seq``: variable-length models on padded worst-case batches, and a ViT (third);
* ``recompute``: activation checkpointing, sliding windows, eval mode (fourth).

``cases(which)`` builds one set; ``PLANS`` holds the shard plan of each case simulated with
one (filled as ``recompute_cases`` builds its set). Building a set needs no GPU; the tasks
``on_gpu`` returns build their models on one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bsselect.examples import EXAMPLES  # noqa: E402


def hf_dir(**config) -> str:
    """A directory holding ``config.json`` with ``config`` (for ``--hf-config``)."""
    d = Path(tempfile.mkdtemp(prefix=f"{config['model_type']}-"))
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def llama_dir(layers: int, hidden: int, inter: int, heads: int, vocab: int = 32000) -> str:
    """The shipped Llama-7B config with other widths and depth."""
    src = json.loads((ROOT / "bsselect/examples/data/llama-7b/config.json").read_text())
    return hf_dir(**{**src, "num_hidden_layers": layers, "hidden_size": hidden,
                     "intermediate_size": inter, "num_attention_heads": heads,
                     "num_key_value_heads": heads, "head_dim": hidden // heads,
                     "vocab_size": vocab})


def on_gpu(task):
    """The task with its model built on the GPU (a billion-parameter model initialised on the
    CPU and copied would take most of each try)."""
    base = task.model

    def model():
        with torch.device("cuda"):
            return base()

    return replace(task, model=model)


class _ResNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        self.net = ResNetForImageClassification(ResNetConfig(
            embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
            layer_type="basic", num_labels=10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


class _GruLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 256)
        self.gru = torch.nn.GRU(256, 1024, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(1024, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0])


def heldout_cases() -> list[tuple[str, object, object, str, int, tuple[int, int]]]:
    """Models not used to set the CUDA terms (the second run): transformers' ResNet-18 shape
    on 64x64 images, a 2-layer GRU LM (cuDNN's RNN on CUDA), GPT-2 and a Qwen2-style GQA
    decoder from configs."""
    import torch.nn.functional as F
    from bench_real_runs import lm_loss
    from torch.utils.data import TensorDataset

    from bsselect import Task
    from bsselect.adapters.hf import config_task

    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(4096, 3, 64, 64, generator=g),
                           torch.randint(10, (4096,), generator=g))
    resnet = Task(model=_ResNet, train_data=images, loss_fn=F.cross_entropy,
                  optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lr=0.1)
    tokens = torch.randint(256, (8192, 65), generator=g)
    gru = Task(model=_GruLM, train_data=TensorDataset(tokens[:, :-1], tokens[:, 1:]),
               loss_fn=lm_loss, optimizer=lambda p, lr: torch.optim.Adam(p, lr=lr), lr=1e-3)
    gpt2 = config_task(hf_dir(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                              n_layer=4, n_embd=512, n_head=8, n_positions=1024,
                              vocab_size=50257), 1024)
    qwen = config_task(hf_dir(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                              hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                              num_attention_heads=16, num_key_value_heads=4,
                              vocab_size=32000, max_position_embeddings=4096,
                              tie_word_embeddings=False), 1024)
    return [
        ("resnet-18 64px", resnet, resnet, "fp32", 400, (16, 64)),
        ("resnet-18 64px", resnet, resnet, "bf16", 400, (16, 64)),
        ("gru-2x1024 seq64", gru, gru, "fp32", 400, (16, 64)),
        ("gru-2x1024 seq64", gru, gru, "bf16", 400, (16, 64)),
        ("gpt2-4x512 seq1024", gpt2, on_gpu(gpt2), "bf16", 60, (4, 16)),
        ("qwen2-gqa-4x1024 seq1024", qwen, on_gpu(qwen), "fp32", 40, (4, 16)),
        ("qwen2-gqa-4x1024 seq1024", qwen, on_gpu(qwen), "bf16", 40, (4, 16)),
    ]


class _Lengths(torch.utils.data.Dataset):
    """``n`` token sequences of ``lo``..``hi`` tokens (seeded), each its own target."""

    def __init__(self, n: int, lo: int, hi: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        self.items = [torch.randint(3, vocab, (k,), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i], self.items[i]


class _HF(torch.nn.Module):
    """A transformers model built from its config, fed ``input_ids`` and ``attention_mask``."""

    def __init__(self, kind: str, checkpointing: str | None = None, eval_mode: bool = False
                 ) -> None:
        super().__init__()
        import transformers as tf

        v, t = SEQ_VOCAB, SEQ_MAX
        if kind == "mistral":  # sliding window of 128 over lengths up to 512, GQA
            self.m = tf.MistralForCausalLM(tf.MistralConfig(
                vocab_size=v, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=t,
                sliding_window=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        elif kind == "gemma2":  # alternating sliding/global layers, logit soft-capping
            self.m = tf.Gemma2ForCausalLM(tf.Gemma2Config(
                vocab_size=v, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=t, sliding_window=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0))
        elif kind == "llama":  # grouped-query attention (8 heads, 2 KV heads)
            self.m = tf.LlamaForCausalLM(tf.LlamaConfig(
                vocab_size=v, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=t,
                bos_token_id=1, eos_token_id=2, pad_token_id=0))
        elif kind == "gpt2":  # attention dropout 0.1
            self.m = tf.GPT2LMHeadModel(tf.GPT2Config(
                vocab_size=v, n_embd=512, n_layer=4, n_head=8, n_positions=t,
                bos_token_id=1, eos_token_id=2))
        else:
            self.m = tf.BertForSequenceClassification(tf.BertConfig(
                vocab_size=v, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                intermediate_size=2048, max_position_embeddings=t, num_labels=4))
        if checkpointing:  # the model's own, as TrainingArguments(gradient_checkpointing=True)
            self.m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        if eval_mode:  # as a from_pretrained instance comes: the step must train it anyway
            self.eval()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.m(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).logits


class _PackedLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(SEQ_VOCAB, 256)
        self.rnn = torch.nn.LSTM(256, 512, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(512, 4)

    def forward(self, x):
        from torch.nn.utils.rnn import pack_padded_sequence

        ids, lengths = x
        packed = pack_padded_sequence(self.emb(ids), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.out(h[-1])


class _ViT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        self.m = ViTForImageClassification(ViTConfig(
            image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6,
            num_attention_heads=6, intermediate_size=1536, num_labels=10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).logits


SEQ_VOCAB, SEQ_MAX = 8000, 512


def _next_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def seq_cases() -> list[tuple[str, object, object, str, int, tuple[int, int]]]:
    """Models never run on a GPU before and not used to set any CUDA term (the third run):
    variable-length inputs as issue 13 simulates them — padded Hugging Face batches with an
    attention mask (Llama with grouped-query attention, GPT-2 with attention dropout, a BERT
    classifier) and a packed-sequence LSTM (cuDNN's packed RNN) — on worst-case inputs (the
    longest items; ``inputs_of``), and a ViT (no mask: fp32 takes the memory-efficient
    kernel, bf16 flash)."""
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    sys.path.insert(0, str(ROOT / "tests"))
    from tasks.seq_tasks import _classify, pad_with_lengths, pad_with_mask

    from bsselect import Task

    data = _Lengths(2048, 32, SEQ_MAX, SEQ_VOCAB)
    adamw = torch.optim.AdamW

    def hf(kind: str, loss, collate) -> Task:
        return Task(model=lambda: _HF(kind), train_data=data, loss_fn=loss,
                    collate_fn=collate, optimizer=adamw, lr=1e-4, base_batch_size=8)

    llama = hf("llama", _next_token, pad_with_mask)
    gpt2 = hf("gpt2", _next_token, pad_with_mask)
    bert = hf("bert", F.cross_entropy, _classify)
    lstm = Task(model=_PackedLSTM, train_data=data, loss_fn=F.cross_entropy,
                collate_fn=pad_with_lengths, optimizer=torch.optim.Adam, lr=1e-3,
                base_batch_size=8)
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(1024, 3, 224, 224, generator=g),
                           torch.randint(10, (1024,), generator=g))
    vit = Task(model=_ViT, train_data=images, loss_fn=F.cross_entropy, optimizer=adamw,
               lr=1e-4, base_batch_size=8)
    return [
        ("padded llama-gqa 4x512 seq<=512", llama, on_gpu(llama), "fp32", 40, (4, 16)),
        ("padded llama-gqa 4x512 seq<=512", llama, on_gpu(llama), "bf16", 40, (4, 16)),
        ("padded gpt2 4x512 seq<=512", gpt2, on_gpu(gpt2), "fp32", 40, (4, 16)),
        ("padded gpt2 4x512 seq<=512", gpt2, on_gpu(gpt2), "bf16", 40, (4, 16)),
        ("padded bert 4x512 seq<=512", bert, on_gpu(bert), "bf16", 40, (4, 16)),
        ("packed lstm 2x512 seq<=512", lstm, lstm, "fp32", 200, (8, 32)),
        ("vit 6x384 224px", vit, vit, "fp32", 100, (8, 32)),
        ("vit 6x384 224px", vit, vit, "bf16", 100, (8, 32)),
    ]


# Cases simulated with a shard plan (``--activation-checkpointing`` alone): name -> plan. Their
# real task's model is wrapped the same way by hand (``apply_checkpointing``).
PLANS: dict = {}


def recompute_cases() -> list[tuple[str, object, object, str, int, tuple[int, int]]]:
    """Session 21 (fourth loan): what changed in the simulation since the third, on CUDA.

    - activation checkpointing, whose recomputation now runs under the simulation's CUDA
      modes (``memory/recompute.py``): GPT-2 with attention dropout (flash on CUDA, math on
      the CPU: it failed before the fix) through the model's own
      ``gradient_checkpointing_enable``, non-reentrant and reentrant; a GQA Llama the same
      way; and ``--activation-checkpointing`` (``checkpoint_wrapper`` per block, the CLI's
      path) on the same Llama;
    - sliding-window attention (Mistral, Gemma2), never run on a GPU before;
    - a model handed over in eval mode (memory steps now train it, as a Trainer does).
    All on padded worst-case batches, as the third run."""
    from bsselect import Task
    from bsselect.memory.sharded import ShardPlan, apply_checkpointing, find_units

    data = _Lengths(2048, 32, SEQ_MAX, SEQ_VOCAB)
    adamw = torch.optim.AdamW
    sys.path.insert(0, str(ROOT / "tests"))
    from tasks.seq_tasks import pad_with_mask

    def hf(model) -> Task:
        return Task(model=model, train_data=data, loss_fn=_next_token,
                    collate_fn=pad_with_mask, optimizer=adamw, lr=1e-4, base_batch_size=8)

    def wrapped_llama() -> torch.nn.Module:
        model = _HF("llama")
        apply_checkpointing(model, find_units(model, None))
        return model

    gpt2_nr = hf(lambda: _HF("gpt2", "non-reentrant"))
    gpt2_r = hf(lambda: _HF("gpt2", "reentrant"))
    llama_nr = hf(lambda: _HF("llama", "non-reentrant"))
    llama = hf(lambda: _HF("llama"))
    llama_cli = hf(wrapped_llama)
    mistral = hf(lambda: _HF("mistral"))
    gemma2 = hf(lambda: _HF("gemma2"))
    gpt2_eval = hf(lambda: _HF("gpt2", eval_mode=True))
    mistral_nr = hf(lambda: _HF("mistral", "non-reentrant"))
    cli = "llama-gqa --activation-checkpointing"
    PLANS[cli] = ShardPlan(fsdp=False, checkpointing=True)
    return [
        ("gpt2 ckpt non-reentrant", gpt2_nr, on_gpu(gpt2_nr), "fp32", 80, (4, 16)),
        ("gpt2 ckpt non-reentrant", gpt2_nr, on_gpu(gpt2_nr), "bf16", 80, (4, 16)),
        ("gpt2 ckpt reentrant", gpt2_r, on_gpu(gpt2_r), "bf16", 80, (4, 16)),
        ("llama-gqa ckpt non-reentrant", llama_nr, on_gpu(llama_nr), "bf16", 80, (4, 16)),
        (cli, llama, on_gpu(llama_cli), "bf16", 80, (4, 16)),
        ("mistral sliding-window 128", mistral, on_gpu(mistral), "fp32", 40, (4, 16)),
        ("mistral sliding-window 128", mistral, on_gpu(mistral), "bf16", 40, (4, 16)),
        ("gemma2 sliding-window 128", gemma2, on_gpu(gemma2), "bf16", 40, (4, 16)),
        ("gpt2 handed over in eval mode", gpt2_eval, on_gpu(gpt2_eval), "fp32", 40, (4, 16)),
        ("mistral sliding-window 128 ckpt non-reentrant", mistral_nr, on_gpu(mistral_nr),
         "fp32", 80, (4, 16)),
    ]


_SCANS: dict = {}


def inputs_of(task, which: str):
    """Worst-case inputs (the longest items, as ``probe --inputs worst-case`` takes them) for
    the sequence case sets (``which``); None (random items) for the others, whose items are all
    one size."""
    if which not in ("seq", "recompute"):
        return None
    from bsselect.memory.inputs import InputMode, scan_inputs

    key = id(task.train_data)
    if key not in _SCANS:
        _SCANS[key] = scan_inputs(task.train_data, InputMode.worst_case)
    return _SCANS[key]


def cases(which: str) -> list[tuple[str, object, object, str, int, tuple[int, int]]]:
    """The case set ``which`` (tune, heldout, seq, recompute): (name, task to simulate, task
    to train, precision, target batch under the cap, two batch sizes for ``peaks``)."""
    if which == "seq":
        return seq_cases()
    if which == "recompute":
        return recompute_cases()
    if which == "heldout":
        return heldout_cases()
    from bench_real_runs import manual_attention_task

    from bsselect.adapters.hf import config_task

    small_llama = config_task(llama_dir(4, 512, 1376, 8), 512)
    mlp, cnn, lm = (EXAMPLES[k]() for k in ("digits-mlp", "digits-cnn", "tiny-lm"))
    attn = manual_attention_task()
    return [
        ("digits-mlp", mlp, mlp, "fp32", 600, (64, 256)),
        ("digits-cnn", cnn, cnn, "fp32", 600, (64, 256)),
        ("digits-cnn", cnn, cnn, "bf16", 600, (64, 256)),
        ("tiny-lm", lm, lm, "fp32", 600, (32, 128)),
        ("tiny-lm", lm, lm, "bf16", 600, (32, 128)),
        ("manual-attention-lm", attn, attn, "bf16", 100, (8, 32)),
        ("llama-4x512 seq512", small_llama, on_gpu(small_llama), "fp32", 60, (4, 16)),
        ("llama-4x512 seq512", small_llama, on_gpu(small_llama), "bf16", 60, (4, 16)),
    ]
