"""Model configs for the Hugging Face adapter: reading a local (or shipped) ``config.json``,
checking that transformers can build it, building it with random weights, and the
``--hf-config`` task (a causal LM on random tokens) for ``probe`` and ``check``. Never
downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "data"


def shipped_configs() -> list[str]:
    """Names of the model configs that ship with bsselect (``--hf-config llama-7b``)."""
    return sorted(p.parent.name for p in SHIPPED_CONFIGS.glob("*/config.json"))


def load_config(path: str | Path, option: str = "model") -> Any:
    """The transformers config in a local JSON file (any name) or a directory's
    ``config.json``; never downloads. UsageError naming ``option`` when it is missing or not
    a config."""
    from transformers import AutoConfig

    where = Path(path)
    shipped = SHIPPED_CONFIGS / str(path)
    if not where.exists() and (shipped / "config.json").is_file():
        where = shipped  # a config that ships with bsselect, by name: llama-7b
    if not where.exists():
        raise UsageError(f"{option} {path}: no such file or directory (a local config.json or "
                         "its directory, or a shipped one: "
                         f"{', '.join(shipped_configs())}; bsselect never downloads)")
    try:  # the file named, whatever its name (not the config.json beside it)
        return AutoConfig.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: not a transformers config ({exc})") from exc


def is_config(value: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(value, PretrainedConfig)


def check_buildable(config: Any) -> None:
    """UsageError, before anything is built, when ``from_config`` has no class for
    ``config``: neither a class its ``architectures`` names that transformers has, nor a
    causal-LM class for its config (a T5 or ViT config without ``architectures``). Classes
    registered with ``AutoModelForCausalLM.register`` count, as ``from_config`` builds them
    (and an ``architectures`` name transformers lacks, such as a remote-code model's, falls
    back to them as before)."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if names and hasattr(transformers, names[0]):
        return
    try:
        if type(config) in transformers.AutoModelForCausalLM._model_mapping:
            return
    except Exception:  # noqa: BLE001 - a mapping that cannot say: let from_config decide
        return
    kind = getattr(config, "model_type", "") or type(config).__name__
    named = (f"names {names[0]}, which this transformers ({transformers.__version__}) does "
             f"not have, " if names else "names no architectures ")
    raise UsageError(f"the {kind} config {named}and {kind} has no causal-LM class: name the "
                     f"class to build in the config, e.g. "
                     f'"architectures": ["{_example_class(kind)}"]')


def _example_class(kind: str) -> str:
    from transformers.models.auto import modeling_auto

    for table in ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                  "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        found = getattr(modeling_auto, table, {}).get(kind)
        if isinstance(found, str):
            return found
    return "SomeModelClass"


def from_config(config: Any) -> nn.Module:
    """Random weights from ``config``: the class its ``architectures`` names, else the
    causal-LM auto class."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is not None:
        return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


class RandomTokens(torch.utils.data.Dataset):
    """``items`` sequences of ``seq_len`` random token ids (seeded per item, made on demand),
    each its own causal-LM labels: the data of ``--hf-config`` tasks, where only shapes matter
    for memory. Every item has one shape (``uniform_items``), and no ordering of their random
    values makes a heavier batch (``memory_follows_values``), so no scan reads them."""

    uniform_items = True
    memory_follows_values = False

    def __init__(self, vocab_size: int, seq_len: int, items: int = 1 << 20,
                 seq_len_given: bool = True) -> None:
        self.vocab_size, self.seq_len, self.items = vocab_size, seq_len, items
        self.seq_len_given = seq_len_given  # False: the config's max_position_embeddings

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(self.vocab_size, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids}

    def real_check_data(self) -> "RandomTokens":
        """The items the real check's step (``memory.real_check``) runs on: at most
        ``REAL_CHECK_TOKENS`` tokens. It looks for dtype and index errors, which the length
        does not change, and at the full length its attention costs the length squared (a
        tiny model at 100,000 tokens did not finish in 5 minutes: review); lengths past the
        model's positions are refused before it runs."""
        if self.seq_len <= REAL_CHECK_TOKENS:
            return self
        return RandomTokens(self.vocab_size, REAL_CHECK_TOKENS, items=2)


REAL_CHECK_TOKENS = 1024


def config_task(path: str | Path, seq_len: int | None = None, lr: float = 1e-4,
                base_batch_size: int = 8) -> Any:
    """A causal-LM Task from a local ``config.json`` (or its directory): random weights of the
    architecture it names, sequences of ``seq_len`` tokens (default: the config's
    ``max_position_embeddings``), the model's own loss, AdamW. For ``probe``/``check
    --hf-config``: what fits for a real architecture, without its weights."""
    config = load_config(path, "--hf-config")
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        kind = getattr(config, "model_type", "") or "this"
        raise UsageError(f"--hf-config {path}: the {kind} config has no vocab_size; "
                         "--hf-config trains a language model on random tokens, so for this "
                         "model write a task (docs/contract.md) or use Task.from_hf with your "
                         "own data")
    length = seq_len or getattr(config, "max_position_embeddings", None)
    if not length or length < 2:
        raise UsageError("--seq-len is needed: the config has no max_position_embeddings")
    from .hf import from_hf

    return from_hf(config, RandomTokens(vocab, int(length), seq_len_given=bool(seq_len)),
                   lr=lr, base_batch_size=base_batch_size)
