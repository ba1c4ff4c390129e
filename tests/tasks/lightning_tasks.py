"""A Lightning setup as users have it: a LightningModule with training_step, self.log and
configure_optimizers, and a LightningDataModule with a custom collate_fn."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bsselect import Task


class Classifier(L.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 10)}


class GroupedClassifier(Classifier):
    """AdamW over two groups as Lightning users write them: weights with decay, biases without
    and at half the lr; the first layer's bias in no group (frozen by leaving it out)."""

    def configure_optimizers(self):
        first, second = self.net[0], self.net[2]
        return torch.optim.AdamW([
            {"params": [first.weight, second.weight], "weight_decay": 0.1},
            {"params": [second.bias], "weight_decay": 0.0, "lr": 0.005},
        ], lr=0.01, betas=(0.8, 0.95))


class PartClassifier(Classifier):
    """Only the last layer trains (the first is left out of the optimizer), its bias listed
    before its weight."""

    def configure_optimizers(self):
        last = self.net[2]
        return torch.optim.SGD([last.bias, last.weight], lr=0.05, momentum=0.9)


def _as_dict(items):
    x, y = zip(*items)
    return {"x": torch.stack(x), "y": torch.stack(y)}


class Blobs(L.LightningDataModule):
    def __init__(self, batch_size: int = 24) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 16, generator=g) * 2
        y = torch.randint(0, 3, (1200,), generator=g)
        x = centers[y] + torch.randn(1200, 16, generator=g)
        self.train, self.val = TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          collate_fn=_as_dict)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=_as_dict)


def blobs() -> Task:
    return Task.from_lightning(Classifier, Blobs())


def grouped() -> Task:
    return Task.from_lightning(GroupedClassifier, Blobs())


def fit_and_save(module: L.LightningModule, data: L.LightningDataModule, steps: int,
                 path) -> L.Trainer:
    """A user's short run: a quiet CPU Trainer fits ``steps`` steps and saves ``path`` (.ckpt)."""
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=path.parent)
    trainer.fit(module, data)
    trainer.save_checkpoint(path)
    return trainer


class ScheduledClassifier(Classifier):
    """A scheduler sized by the Trainer, as Lightning's docs suggest: configure_optimizers
    reads ``self.trainer``, which a module outside ``fit`` does not have."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2,
                                                             total_steps=steps),
            "interval": "step"}}
