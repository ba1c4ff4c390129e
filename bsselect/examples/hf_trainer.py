"""A Hugging Face Trainer script as users write it (needs `bsselect[hf]`), plus the three lines
that give bsselect its task. Everything is built locally: a word-level tokenizer, tokenised
sentences of different lengths, a small GPT-2 from its config.

    bsselect probe bsselect.examples.hf_trainer:make_task --memory 4GiB
    bsselect sweep bsselect.examples.hf_trainer:make_task
"""

from __future__ import annotations

import random

WORDS = ("the a cat dog bird fox sat ran flew hid on under over near mat tree roof log big "
         "small red blue quick slow and then").split()


def word_tokenizer(words: list[str] = WORDS):
    """A word-level fast tokenizer over ``words`` ([PAD] 0, [UNK] 1), built locally."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")


def _sentences(tokenizer, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(tokenizer(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))))
            for _ in range(n)]


def build_trainer():
    from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel,
                              Trainer, TrainingArguments)

    tokenizer = word_tokenizer()
    config = GPT2Config(vocab_size=len(WORDS) + 2, n_embd=64, n_layer=2, n_head=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(output_dir="trainer-out", learning_rate=1e-3, weight_decay=0.01,
                             per_device_train_batch_size=16, report_to=[], use_cpu=True)
    return Trainer(model_init=lambda: GPT2LMHeadModel(config), args=args,
                   train_dataset=_sentences(tokenizer, 4000, 0),
                   eval_dataset=_sentences(tokenizer, 400, 1),
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


# The three lines: import bsselect's Task, and return one made from the Trainer.
from bsselect import Task  # noqa: E402


def make_task() -> Task:
    return Task.from_trainer(build_trainer())
