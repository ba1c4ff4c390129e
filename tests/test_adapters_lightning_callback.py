"""BatchSizeFromProbe in a real Trainer.fit: the probe runs on fit start and the loaders the
Trainer builds afterwards use its batch size."""

from __future__ import annotations

import pytest

L = pytest.importorskip("lightning")

from bsselect.adapters.lightning import BatchSizeFromProbe  # noqa: E402
from tasks.lightning_tasks import Blobs, Classifier  # noqa: E402


def test_the_trainer_trains_at_the_probed_batch_size(tmp_path):
    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    data = Blobs(batch_size=24)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), datamodule=data)
    result = callback.result
    assert result.method == "simulated" and result.budget_bytes == 4 * 2**20
    assert callback.batch_size == min(result.max_batch_pow2, 1000) != 24
    assert data.batch_size == callback.batch_size
    assert trainer.train_dataloader.batch_size == callback.batch_size
