"""A Hugging Face setup as users have it: a tokenizer (built locally, no download), a dataset of
tokenised dict items of different lengths, DataCollatorForLanguageModeling, a model config."""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from bsselect import Task

WORDS = ("the a cat dog bird sat ran flew on under over mat tree roof big small red blue "
         "quick slow and then").split()


def tokenizer():
    from bsselect.examples.hf_trainer import word_tokenizer

    return word_tokenizer(WORDS)


class Sentences(Dataset):
    """Tokenised sentences of 4..40 words: dict items, as a tokenised HF dataset gives them."""

    def __init__(self, n: int = 600, seed: int = 0) -> None:
        rng = random.Random(seed)
        tok = tokenizer()
        self.items = [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))))
                      for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])


def config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(WORDS) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])


def gpt2_lm() -> Task:
    from transformers import DataCollatorForLanguageModeling

    return Task.from_hf(config(), Sentences(), eval_dataset=Sentences(120, seed=1),
                        data_collator=DataCollatorForLanguageModeling(tokenizer(), mlm=False),
                        lr=1e-3, base_batch_size=8)


def trainer_task() -> Task:
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    args = TrainingArguments(output_dir="hf-out", learning_rate=3e-4, weight_decay=0.01,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             report_to=[], use_cpu=True)
    trainer = Trainer(model_init=lambda: GPT2LMHeadModel(config()), args=args,
                      train_dataset=Sentences(), eval_dataset=Sentences(120, seed=1),
                      data_collator=DataCollatorForLanguageModeling(tokenizer(), mlm=False))
    return Task.from_trainer(trainer)


class _Labelled(Dataset):
    """The sentences with a class label each (their length mod 3), for sequence classification."""

    def __init__(self, n: int = 400) -> None:
        self.items = Sentences(n).items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.items[i])
        item["labels"] = len(item["input_ids"]) % 3
        return item


def bert_classifier() -> Task:
    """BERT for sequence classification from its config, DataCollatorWithPadding."""
    from transformers import BertConfig, DataCollatorWithPadding

    config = BertConfig(vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=3, architectures=["BertForSequenceClassification"])
    return Task.from_hf(config, _Labelled(), data_collator=DataCollatorWithPadding(tokenizer()),
                        lr=1e-3, base_batch_size=8)
