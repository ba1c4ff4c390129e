"""The monitor past the first epoch: with batches drawn epoch by epoch (a shuffling DataLoader,
Lightning, the HF Trainer) each batch comes from the items not yet seen this epoch, whose mean
gradient is larger than the dataset's once the model has fitted the others, so the monitor's
B_simple reads low (docs/noise.md, "During training"). It must know when it is there, say it
once, and flag what it logs and returns; with fresh uniform draws it says nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from bsselect.adapters import loader_sampling
from bsselect.errors import UsageError
from bsselect.selection.noise_monitor import GradientNoiseMonitor


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _train(mon, model, loader, steps, accumulation=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(())
    for _ in range(steps):
        for _ in range(accumulation):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            (F.cross_entropy(model(x), y) / accumulation).backward()
        mon.step(micro_batch_size=len(x))
        opt.step()
        opt.zero_grad()


def test_readings_past_the_first_epoch_are_flagged_warned_once_and_noted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    data = _data(96)
    mon = GradientNoiseMonitor(model, accumulation_steps=2, n_data=96)
    loader = DataLoader(data, batch_size=8, shuffle=True, drop_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(mon, model, loader, steps=6)          # 96 items: the first epoch exactly
        assert not mon.past_first_epoch and mon.samples_seen == 96
        assert not [w for w in caught if "epoch" in str(w.message)]
        _train(mon, model, loader, steps=8)          # into the second and third
    said = [str(w.message) for w in caught if "first epoch" in str(w.message)]
    assert len(said) == 1 and "B_simple" in said[0] and "low" in said[0]
    flags = [r.past_first_epoch for r in mon.readings]
    assert flags == [False] * 6 + [True] * 8
    assert mon.readings[-1].to_dict()["past_first_epoch"] is True
    est = mon.estimate()
    assert est.notes and est.notes[0].startswith("8 of the 14 steps are past the first epoch")
    assert mon.estimate(last=6).notes[0].startswith("6 of the 6")
    mon.close()


def test_fresh_draws_or_no_dataset_size_flag_nothing():
    for options in (dict(n_data=96, sampling="uniform"), dict()):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        mon = GradientNoiseMonitor(model, accumulation_steps=2, **options)
        sampler = RandomSampler(_data(96), replacement=True, num_samples=96)
        loader = DataLoader(_data(96), batch_size=8, sampler=sampler)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train(mon, model, loader, steps=20)
        assert mon.samples_seen == 320 and not mon.past_first_epoch
        assert not any(r.past_first_epoch for r in mon.readings)
        assert mon.estimate().notes == ()
        mon.close()
    with pytest.raises(UsageError, match="sampling"):
        GradientNoiseMonitor(nn.Linear(2, 1), accumulation_steps=2, sampling="random")


def test_loader_sampling_reads_the_sampler():
    data = _data(16)
    assert loader_sampling(DataLoader(data, shuffle=True)) == "epochs"
    assert loader_sampling(DataLoader(data)) == "epochs"
    assert loader_sampling(DataLoader(data, sampler=RandomSampler(data, replacement=True))
                           ) == "uniform"
    assert loader_sampling(None) == "epochs"


def test_lightning_callback_logs_the_flag_and_warns_once(tmp_path):
    L = pytest.importorskip("lightning")
    from tasks.lightning_tasks import Blobs, Classifier

    from bsselect.adapters.lightning import NoiseScaleMonitor

    torch.manual_seed(0)
    logged = []

    class Logging(Classifier):
        def log(self, name, value, *args, **kwargs):
            if name.startswith("bsselect/"):
                logged.append((self.current_epoch, name, float(value)))
            return super().log(name, value, *args, **kwargs)

    callback = NoiseScaleMonitor()
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=4, callbacks=[callback],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Logging(), datamodule=Blobs(batch_size=8))
    assert len([w for w in caught if "first epoch" in str(w.message)]) == 1
    mon = callback.monitor
    assert mon.n_data == 1000 and mon.sampling == "epochs"
    flags = {(epoch, value) for epoch, name, value in logged
             if name == "bsselect/b_simple_past_first_epoch"}
    assert flags == {(0, 0.0), (1, 1.0)}
    assert [r.past_first_epoch for r in mon.readings] == [False] * 31 + [True] * 31
    assert trainer.callback_metrics["bsselect/b_simple_past_first_epoch"] == 1.0


def test_hf_callback_logs_the_flag(tmp_path):
    pytest.importorskip("transformers")
    from test_noise_monitor import DictBlobs, HFStyle, _hf_trainer

    from bsselect.adapters.hf import NoiseScaleCallback

    torch.manual_seed(0)
    callback = NoiseScaleCallback()
    trainer = _hf_trainer(tmp_path, HFStyle(), DictBlobs(), callback, learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert len([w for w in caught if "first epoch" in str(w.message)]) == 1
    lines = [(h["epoch"], h["b_simple_past_first_epoch"]) for h in trainer.state.log_history
             if "b_simple_past_first_epoch" in h]
    assert lines and {flag for epoch, flag in lines if epoch <= 1} == {0}
    assert {flag for epoch, flag in lines if epoch > 1.05} == {1}
    assert callback.monitor.sampling == "epochs" and callback.monitor.n_data == 1000
