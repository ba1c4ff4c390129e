"""Adapter setups that are wrong in the ways users get them wrong."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from bsselect import Task


def no_loss() -> Task:
    """An HF model fed batches without labels and no loss_fn."""
    from transformers import default_data_collator

    from tasks.hf_tasks import Sentences, config

    items = [{k: v for k, v in item.items() if k != "labels"} for item in Sentences(32)]
    return Task.from_hf(config(), items, data_collator=lambda rows: default_data_collator(
        [{**r, "input_ids": r["input_ids"][:4], "attention_mask": r["attention_mask"][:4]}
         for r in rows]), lr=1e-3)


def datamodule_setup_fails() -> Task:
    import lightning as L

    from tasks.lightning_tasks import Classifier

    class Broken(L.LightningDataModule):
        def setup(self, stage: str) -> None:
            raise FileNotFoundError("data/train.parquet")

    return Task.from_lightning(Classifier, Broken())


class _Stream(IterableDataset):
    def __iter__(self):
        while True:
            yield {"input_ids": torch.arange(1, 9), "labels": torch.arange(1, 9)}


def streaming_trainer() -> Task:
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from tasks.hf_tasks import config

    args = TrainingArguments(output_dir="out", max_steps=10, report_to=[], use_cpu=True)
    return Task.from_trainer(Trainer(model=GPT2LMHeadModel(config()), args=args,
                                     train_dataset=_Stream()))
