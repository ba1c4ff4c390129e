"""The noise scale during the user's own run (bsselect.selection.noise_monitor and its Lightning and
Hugging Face callbacks) against ``bsselect noise`` at the same checkpoint: the run trains at
lr 0, so every step sees the initial weights that ``noise_scale`` measures, and the monitor's
pooled ``B_simple`` must lie inside ``noise_scale``'s 90% interval. A monitor that got the
micro-batch scaling, the rank averaging or the batch sizes wrong is off by the accumulation
or world factor and fails."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from test_distributed import TASKS, torchrun
from torch import nn
from torch.utils.data import DataLoader

from bsselect import Task, noise_scale
from bsselect.api import resolve_task
from bsselect.errors import UsageError
from bsselect.selection.noise_math import per_measurement
from bsselect.selection.noise_monitor import GROW_FACTOR, GradientNoiseMonitor


def _inside(value, interval):
    lo, hi = interval
    assert lo <= value <= hi, f"{value:.1f} outside ({lo:.1f}, {hi:.1f})"


@pytest.fixture(scope="module")
def digits():
    task, _ = resolve_task("digits-mlp")
    return task


def _digits_reference(task, b_small, b_big):
    return noise_scale(task, b_small=b_small, b_big=b_big, measurements=64).final


# ----------------------------------------------------------------------- pure parts


def test_moving_averages_keep_signal_and_noise_apart():
    model = nn.Linear(2, 1)
    mon = GradientNoiseMonitor(model, accumulation_steps=2, ema=0.5)
    pairs = [(4.0, 2.5), (9.0, 5.5), (2.0, 1.9)]
    for small, big in pairs:
        mon.record(small, big, 8, 16)
    g, t = per_measurement([p[0] for p in pairs], [p[1] for p in pairs], 8, 16)
    w = [0.25, 0.5, 1.0]  # weights of an ema-0.5 average of three, before bias correction
    g_avg, t_avg = (sum(wi * x for wi, x in zip(w, v)) / sum(w) for v in (g, t))
    assert mon.grad_sq_norm == pytest.approx(g_avg)
    assert mon.trace_sigma == pytest.approx(t_avg)
    assert mon.b_simple == pytest.approx(t_avg / g_avg)   # ratio of averages
    assert mon.b_simple != pytest.approx(sum(wi * ti / gi for wi, ti, gi in zip(w, t, g))
                                         / sum(w))        # not an average of ratios
    mon.skip_last()
    assert mon.skipped == 1 and len(mon.readings) == 2
    assert mon.b_simple == pytest.approx((0.5 * t[0] + t[1]) / (0.5 * g[0] + g[1]))


def test_a_part_the_optimizer_holds_at_lr_0_is_left_out():
    """As `bsselect noise`: the monitor given the optimizer reads the same norms as one on
    the model with that part frozen by requires_grad."""
    def readings(frozen_by_lr: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
        if frozen_by_lr:
            opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                                   {"params": model[2].parameters()}], lr=0.05)
        else:
            model[0].requires_grad_(False)
            opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
        mon = GradientNoiseMonitor(model, accumulation_steps=2,
                                   optimizer=opt if frozen_by_lr else None)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for _ in range(2):
                x, y = torch.randn(8, 16, generator=g) * 3, torch.randint(0, 3, (8,), generator=g)
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
            mon.step(micro_batch_size=8)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [v for r in mon.readings for v in (r.small_sq, r.big_sq)]

    assert readings(True) == pytest.approx(readings(False), rel=1e-5)


def test_a_step_with_one_batch_size_is_refused():
    with pytest.raises(UsageError, match="two batch sizes"):
        GradientNoiseMonitor(nn.Linear(2, 1))


def test_a_model_on_the_meta_device_is_refused_at_construction():
    with pytest.raises(UsageError, match="meta device"):
        GradientNoiseMonitor(nn.Linear(2, 1, device="meta"), accumulation_steps=2)


def test_an_unused_parameter_does_not_stop_the_measurement():
    """Backward passes are counted once per pass that reaches any trainable parameter: a model
    whose first parameter gets no gradient (an unused embedding, an HF pooler) is measured."""

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Embedding(4, 4)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    model = Skips()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientNoiseMonitor(model, accumulation_steps=4)
    for _ in range(6):
        for _ in range(4):
            x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
        mon.step(micro_batch_size=8)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert mon.skipped == 0 and len(mon.readings) == 6
    with pytest.raises(UsageError):
        mon.step(micro_batch_size=-8)


def test_advice_only_when_the_interval_clears_twice_the_batch():
    mon = GradientNoiseMonitor(nn.Linear(2, 1), accumulation_steps=2)
    # |g_small|^2 = |G|^2 + tr/8, |g_big|^2 = |G|^2 + tr/16 with |G|^2 = 1, tr = 800: B = 800.
    for k in range(40):
        jitter = 1 + 0.01 * ((k % 5) - 2)
        mon.record((1 + 100) * jitter, (1 + 50) * jitter, 8, 16)
    est = mon.estimate()
    assert est.b_simple == pytest.approx(800, rel=0.05)
    assert mon.advice(est.b_simple_lower / GROW_FACTOR * 0.99) is not None
    assert mon.advice(est.b_simple_lower / GROW_FACTOR * 1.01) is None


def test_every_measures_only_those_steps(digits):
    torch.manual_seed(0)
    model = digits.model()
    mon = GradientNoiseMonitor(model, accumulation_steps=2, every=3)
    loader = DataLoader(digits.train_data, batch_size=8, collate_fn=digits.collate_fn)
    batches = iter(loader)
    for _ in range(7):
        for _ in range(2):
            x, y = next(batches)
            (digits.loss_fn(model(x), y) / 2).backward()
        mon.step(8)
        model.zero_grad()
    assert [r.step for r in mon.readings] == [1, 4, 7]
    mon.close()


def test_estimate_rests_on_the_pair_most_readings_have():
    """An epoch's odd last step (another pair of batch sizes) must not decide which readings
    the interval uses."""
    mon = GradientNoiseMonitor(nn.Linear(2, 1), accumulation_steps=4)
    for k in range(20):
        mon.record(101 + k % 3, 51 + k % 3, 8, 32)
    mon.record(150.0, 60.0, 4, 16)
    est = mon.estimate()
    assert (est.b_small, est.b_big, est.measurements) == (8, 32, 20)


@pytest.mark.parametrize("kwargs", [dict(accumulation_steps="4"), dict(every=1.5),
                                    dict(window=None), dict(n_data=0)])
def test_settings_of_the_wrong_type_are_one_usage_error(kwargs):
    with pytest.raises(UsageError, match="must be"):
        GradientNoiseMonitor(nn.Linear(2, 1), **{"accumulation_steps": 2, **kwargs})


class _CheckpointedMLP(nn.Module):
    """The middle layers under activation checkpointing, the head tied to nothing."""

    def __init__(self, reentrant):
        super().__init__()
        self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 3)
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        if self.reentrant is not None:
            h = checkpoint(self.mid, h, use_reentrant=self.reentrant)
        else:
            h = self.mid(h)
        return self.out(h)


def _pairs(model, steps=3, accum=4, scaler=None, monitor_scaler=True):
    """Each step's (small_sq, big_sq) from the monitor, on fixed batches at lr 0; with a
    GradScaler, step() is called after unscale_ and clipping, as AMP recipes do."""
    g = torch.Generator().manual_seed(0)
    mon = GradientNoiseMonitor(model, accumulation_steps=accum,
                               scaler=scaler if monitor_scaler else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(steps):
        for _ in range(accum):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = F.cross_entropy(model(x), y) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        mon.step(micro_batch_size=8)
        (scaler.step(optimizer) if scaler else optimizer.step())
        if scaler:
            scaler.update()
        optimizer.zero_grad()
    mon.close()
    return mon


def test_reentrant_checkpointing_is_one_backward_per_micro_batch():
    """Its recomputing backward is a backward of its own inside the micro-batch's: counted, it
    made every step 'another number of micro-batches' and nothing was ever measured."""
    runs = {}
    for reentrant in (None, True, False):
        torch.manual_seed(0)
        runs[reentrant] = _pairs(_CheckpointedMLP(reentrant))
    plain = [x for r in runs[None].readings for x in (r.small_sq, r.big_sq)]
    assert len(plain) == 6
    for reentrant in (True, False):
        assert runs[reentrant].skipped == 0
        got = [x for r in runs[reentrant].readings for x in (r.small_sq, r.big_sq)]
        assert got == pytest.approx(plain, rel=1e-5)


def test_a_wrong_accumulation_count_is_said_once_not_skipped_in_silence():
    model = nn.Linear(16, 3)
    mon = GradientNoiseMonitor(model, accumulation_steps=3)
    with pytest.warns(UserWarning, match="2 backward passes, not accumulation_steps=3"):
        for _ in range(5):
            for _ in range(2):
                F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 3, (8,))).backward()
            mon.step(8)
    assert mon.readings == [] and mon.skipped == 5


def test_under_a_grad_scaler_step_after_unscale_and_clipping_reads_the_true_norms():
    """With step() after scaler.unscale_ (and clipping), the hooks had seen gradients times
    the scale S and .grad had not: b_simple was None. Both are read during backward now; with
    scaler= the scale is divided out, without it B_simple (a ratio) is still right."""
    runs = []
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)

    for scaler, given in ((None, True), (scaler(), True), (scaler(), False)):
        torch.manual_seed(0)
        runs.append(_pairs(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)),
                           steps=6, scaler=scaler, monitor_scaler=given))
    plain, scaled, unscaled = runs
    assert len(scaled.readings) == 6
    assert [x for r in scaled.readings for x in (r.small_sq, r.big_sq)] == pytest.approx(
        [x for r in plain.readings for x in (r.small_sq, r.big_sq)], rel=1e-4)
    assert unscaled.b_simple == pytest.approx(plain.b_simple, rel=1e-4)
    assert unscaled.grad_sq_norm == pytest.approx(plain.grad_sq_norm * 2.0 ** 32, rel=1e-4)


# ----------------------------------------------------------------------- the real runs


def test_plain_loop_with_accumulation_agrees_with_bsselect_noise(digits):
    reference = _digits_reference(digits, 8, 32)
    torch.manual_seed(0)  # noise_scale's initial weights
    model = digits.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = GradientNoiseMonitor(model, accumulation_steps=4, n_data=len(digits.train_data),
                               window=1000)
    loader = DataLoader(digits.train_data, batch_size=8, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(1), collate_fn=digits.collate_fn)
    i = 0
    for _ in range(2):
        for x, y in loader:
            (digits.loss_fn(model(x), y) / 4).backward()
            i += 1
            if i % 4 == 0:
                mon.step(len(x))
                optimizer.step()
                optimizer.zero_grad()
    est = mon.estimate()
    assert (est.b_small, est.b_big) == (8, 32) and est.measurements > 80
    _inside(est.b_simple, reference.b_simple_ci)
    _inside(mon.b_simple, (reference.b_simple_ci[0] * 0.7, reference.b_simple_ci[1] * 1.3))


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_on_two_gloo_ranks_agrees_with_bsselect_noise(tmp_path, digits, accum):
    import json

    proc = torchrun(str(TASKS / "noise_monitor_ddp.py"), str(tmp_path), str(accum))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # one all-reduced pair per step: every rank has the same estimate
    assert (r0["world_size"], r0["b_small"], r0["b_big"]) == (2, 16, 32 * accum)
    reference = _digits_reference(digits, 16, 32 * accum)
    _inside(r0["b_simple"], reference.b_simple_ci)


@pytest.mark.parametrize("across", [True, False])
def test_ddp_token_shares_over_all_ranks(tmp_path, across):
    """A loss divided by the step's tokens on all ranks (the HF Trainer's default
    average_tokens_across_devices): with weights_across_ranks each piece's share is its tokens
    over the global total, and every step's pair equals the weighted U-statistic of the
    gathered micro-batch gradients; taking each rank's shares as summing to one (before) does
    not."""
    import json

    proc = torchrun(str(TASKS / "noise_monitor_tokens_ddp.py"), str(tmp_path),
                    "1" if across else "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = json.loads((tmp_path / "readings0.json").read_text())["pairs"]
    assert len(pairs) == 12
    # float32 norms (the monitor's) against float64 sums: 1e-7 apart; per-rank shares: 0.5-30%
    close = [p["small"] == pytest.approx(p["true_small"], rel=1e-5)
             and p["big"] == pytest.approx(p["true_big"], rel=1e-5) for p in pairs]
    assert all(close) if across else not all(close)


def test_ddp_step_one_rank_cannot_measure_every_rank_skips(tmp_path):
    """Rank 1 alone passes a NaN token count on step 5: both ranks skip that step and finish
    (the rank used to return before the all-reduce the other rank was waiting in, which then
    met the next step's gradient all-reduce instead), and the other steps read as ever."""
    import json

    proc = torchrun(str(TASKS / "noise_monitor_tokens_ddp.py"), str(tmp_path), "1", "5",
                    timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"readings{rank}.json").read_text())
        assert out["skipped"] == 1
        assert out["pairs"][5] == {"skipped": 5}
        measured = [p for p in out["pairs"] if "small" in p]
        assert len(measured) == 11
        assert all(p["small"] == pytest.approx(p["true_small"], rel=1e-5) for p in measured)


# ----------------------------------------------------------------------- Lightning


def test_lightning_callback_agrees_with_bsselect_noise(tmp_path):
    L = pytest.importorskip("lightning")
    from tasks.lightning_tasks import Blobs, Classifier

    from bsselect.adapters.lightning import NoiseScaleMonitor

    class Frozen(Classifier):  # lr 0: every step is at the initial weights
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    module, data = Frozen(), Blobs(batch_size=8)
    data.setup("fit")
    same = Classifier()  # its weights, at an lr a Task accepts (noise at step 0 ignores it)
    same.load_state_dict(module.state_dict())
    reference = noise_scale(Task.from_lightning(same, data), b_small=8, b_big=32,
                            measurements=64).final
    callback = NoiseScaleMonitor()
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=4, callbacks=[callback],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    est = callback.monitor.estimate(last=10_000)
    assert (est.b_small, est.b_big) == (8, 32) and est.measurements >= 60
    _inside(est.b_simple, reference.b_simple_ci)
    assert trainer.callback_metrics["bsselect/b_simple"] == pytest.approx(
        callback.monitor.b_simple)


def test_lightning_callback_skips_an_epochs_uneven_last_step(tmp_path):
    """1000 items in micro-batches of 12: each epoch ends on [12, 12, 12, 4], four backwards
    but no single b_small (it was read as 4, b_big 16, and estimate() after fit rested on
    those steps alone)."""
    L = pytest.importorskip("lightning")
    from tasks.lightning_tasks import Blobs, Classifier

    from bsselect.adapters.lightning import NoiseScaleMonitor

    class Frozen(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    callback = NoiseScaleMonitor()
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=4, callbacks=[callback],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(Frozen(), datamodule=Blobs(batch_size=12))
    readings = callback.monitor.readings
    assert {(r.b_small, r.b_big) for r in readings} == {(12, 48)}
    assert len(readings) == 40 and callback.monitor.skipped == 2
    assert callback.monitor.estimate().measurements == 40


def test_lightning_callback_without_a_second_batch_size_warns_and_stays_off(tmp_path):
    L = pytest.importorskip("lightning")
    from tasks.lightning_tasks import Blobs, Classifier

    from bsselect.adapters.lightning import NoiseScaleMonitor

    callback = NoiseScaleMonitor()
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="two batch sizes"):
        trainer.fit(Classifier(), datamodule=Blobs())
    assert callback.monitor is None


def test_lightning_callback_under_fp16_loss_scaling_warns_and_stays_off(tmp_path):
    """The hooks would see gradients still multiplied by the loss scale (S^2 too large)."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision
    from tasks.lightning_tasks import Blobs, Classifier

    from bsselect.adapters.lightning import NoiseScaleMonitor

    callback = NoiseScaleMonitor()
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=4, callbacks=[callback],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[scaled], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="fp16 loss scaling is not supported"):
        trainer.fit(Classifier(), datamodule=Blobs())
    assert callback.monitor is None


# ----------------------------------------------------------------------- Hugging Face


class DictBlobs(torch.utils.data.Dataset):
    def __init__(self, n: int = 1000) -> None:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 16, generator=g) * 2
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, 16, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _hf_trainer(tmp_path, model, data, callback, **args):
    from transformers import Trainer, TrainingArguments, default_data_collator

    options = dict(output_dir=str(tmp_path), learning_rate=0.0, per_device_train_batch_size=8,
                   gradient_accumulation_steps=4, num_train_epochs=2, logging_steps=5,
                   report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                   lr_scheduler_type="constant", seed=1)
    options.update(args)
    return Trainer(model=model, args=TrainingArguments(**options), train_dataset=data,
                   data_collator=default_data_collator, callbacks=[callback])


def test_hf_callback_agrees_with_bsselect_noise(tmp_path):
    pytest.importorskip("transformers")
    from transformers import default_data_collator

    from bsselect.adapters.hf import NoiseScaleCallback

    torch.manual_seed(0)
    model, data = HFStyle(), DictBlobs()
    reference = noise_scale(Task.from_hf(model, data, data_collator=default_data_collator),
                            b_small=8, b_big=32, measurements=64).final
    callback = NoiseScaleCallback()
    trainer = _hf_trainer(tmp_path, model, data, callback, max_grad_norm=0.0)
    trainer.train()
    est = callback.monitor.estimate(last=10_000)
    assert (est.b_small, est.b_big) == (8, 32) and est.measurements >= 60
    _inside(est.b_simple, reference.b_simple_ci)
    logged = [h["b_simple"] for h in trainer.state.log_history if "b_simple" in h]
    assert logged and logged[-1] == pytest.approx(callback.monitor.b_simple)


def test_hf_callback_reads_the_gradients_before_clipping(tmp_path):
    """The Trainer clips before callbacks run; keeping only the unclipped steps chose steps by
    |g_big| and overstated B_simple several-fold. Clipped or not, the readings are the same."""
    pytest.importorskip("transformers")
    from bsselect.adapters.hf import NoiseScaleCallback

    runs = {}
    for max_norm in (0.0, 1e-3):   # 1e-3 clips every step
        torch.manual_seed(0)
        callback = NoiseScaleCallback()
        trainer = _hf_trainer(tmp_path, HFStyle(), DictBlobs(200), callback,
                              max_grad_norm=max_norm, num_train_epochs=1)
        trainer.train()
        runs[max_norm] = callback.monitor
    clipped, free = runs[1e-3], runs[0.0]
    assert len(clipped.readings) == 6 and clipped.skipped == 1   # the epoch's partial step
    for a, b in zip(clipped.readings, free.readings):
        assert (a.small_sq, a.big_sq) == pytest.approx((b.small_sq, b.big_sq), rel=1e-5)
    assert clipped.b_simple == pytest.approx(free.b_simple, rel=1e-5)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, eos_token_id=0, bos_token_id=0))


def _ragged_lm_batches(items):
    lengths = [4 + (i * 13) % 57 for i in range(items)]     # 4..60 tokens
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 40, (n,), generator=g).tolist()} for n in lengths]

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = labels[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return data, collate


def _recorded_hf_run(tmp_path, model, data, collate, accumulation, steps):
    """A Trainer run at lr 0 with a NoiseScaleCallback on ``model``, recording each training
    micro-batch: (callback, trainer, the batches in order, the micro-batch's own mean-loss
    gradient at the initial weights, from an untouched copy of the model)."""
    import copy

    from transformers import Trainer, TrainingArguments

    from bsselect.adapters.hf import NoiseScaleCallback

    twin = copy.deepcopy(model)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append({n: k[n] for n in ("input_ids", "attention_mask", "labels")})
        if m.training else None, with_kwargs=True)
    callback = NoiseScaleCallback()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, max_steps=steps,
                             learning_rate=0.0, max_grad_norm=0.0, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_drop_last=True, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                      callbacks=[callback])
    trainer.train()
    params = list(twin.parameters())

    def own_grad(batch):   # parameters the loss does not reach (a pooler) have no hook either
        grads = torch.autograd.grad(twin(**batch).loss, params, allow_unused=True)
        return torch.cat([g.reshape(-1) for g in grads if g is not None]).double()

    return callback, trainer, seen, own_grad


def test_hf_callback_takes_each_micro_batch_as_its_own_token_mean(tmp_path):
    """transformers 5 divides a GPT-2's summed token losses by the whole step's token count
    (num_items_in_batch), not each micro-batch's mean by the accumulation: each hook gradient
    is the micro-batch's token share times its own mean gradient, and the step's |G|^2 is the
    weighted U-statistic (|sum h|^2 - sum |h_j|^2) / (1 - sum share^2) and its tr(Sigma) the
    shares' residual spread b_big k/(k-1) sum s_j^2 |g_j - g|^2 (review: dividing each hook by
    its share, a per-micro-batch token mean, read B_simple 1.2-2.6x high; tr read as |g|^2 -
    |G|^2, the shares given to step() alone, 4-7% off)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    data, collate = _ragged_lm_batches(64)
    callback, _, seen, own_grad = _recorded_hf_run(tmp_path, _tiny_gpt2(), data, collate, 2, 6)
    assert len(callback.monitor.readings) == 6
    for r in callback.monitor.readings:
        pair = seen[2 * (r.step - 1): 2 * r.step]
        grads = [own_grad(b) for b in pair]
        tokens = [int(b["labels"][:, 1:].ne(-100).sum()) for b in pair]
        shares = [n / sum(tokens) for n in tokens]
        _assert_weighted_reading(r, grads, shares, ratio_only=True)


def test_hf_callback_takes_a_mean_loss_the_trainer_left_undivided_in_mean_units(tmp_path):
    """BERT's heads take **kwargs, so the Trainer passes num_items_in_batch and skips
    dividing by the accumulation steps, but their loss is a plain mean that ignores it: the
    step's gradient is the sum of the micro-batches' means. The callback divides that out
    (loss_scale) and weighs nothing: each step's pair is (mean |g_j|^2, |mean g_j|^2) of the
    micro-batches' own mean gradients. Taking token shares (before) read |G|^2 and tr(Sigma)
    about a^2 = 16x high at 4 micro-batches (review)."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForTokenClassification

    from bsselect.adapters.hf_callback import loss_takes_items

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    assert not loss_takes_items(model)
    data, pad = _ragged_lm_batches(64)

    def collate(batch):
        out = pad(batch)
        out["labels"] = torch.where(out["labels"] == -100, -100, out["labels"] % 3)
        return out

    callback, trainer, seen, own_grad = _recorded_hf_run(tmp_path, model, data, collate, 4, 3)
    assert trainer.model_accepts_loss_kwargs   # the Trainer leaves the loss undivided
    assert len(callback.monitor.readings) == 3
    for r in callback.monitor.readings:
        grads = [own_grad(b) for b in seen[4 * (r.step - 1): 4 * r.step]]
        whole = sum(grads) / 4
        small = sum(float(g @ g) for g in grads) / 4
        assert (r.small_sq, r.big_sq) == pytest.approx((small, float(whole @ whole)), rel=1e-3)


def _assert_weighted_reading(r, grads, shares, ratio_only=False):
    """The reading's |G|^2 and tr(Sigma) against the weighted statistics of the micro-batches'
    own mean gradients ``grads`` with ``shares`` (summing to 1), written out here;
    ``ratio_only``: their ratio (the HF Trainer's token total counts the label each causal
    LM's shift drops: its gradients are ~5% smaller than the micro-batches' token means)."""
    k = len(grads)
    whole = sum(s * g for s, g in zip(shares, grads))
    big = float(whole @ whole)
    pieces = sum(s * s * float(g @ g) for s, g in zip(shares, grads))
    g2 = (big - pieces) / (1 - sum(s * s for s in shares))
    spread = k / (k - 1) * sum(s * s * float((g - whole) @ (g - whole))
                               for s, g in zip(shares, grads))
    # the equal-piece pair with that |G|^2 and tr(Sigma) / b_big (free of n_data's correction)
    if ratio_only:
        assert spread / g2 == pytest.approx((r.small_sq - r.big_sq) / (
            k * r.big_sq - r.small_sq), rel=1e-3)
        return g2, spread
    assert (r.small_sq, r.big_sq) == pytest.approx((g2 + k * spread, g2 + spread), rel=1e-4)
    return g2, spread


def test_weights_given_before_each_backward_read_the_weighted_spread_exactly():
    """Micro-batches of 1-3 and 16-24 tokens, each loss its summed token losses over the
    step's total, every weight given with weigh_next before its backward (a 0-d tensor for
    some): each step's |G|^2 and tr(Sigma) are the weighted statistics of the micro-batches'
    own token-mean gradients, to float32 rounding. The same weights handed to step() alone
    read tr(Sigma) as |g|^2 - |G|^2, off by the shares' covariance with the gradient (review:
    -4% to +7%), and warn once."""
    from tasks.token_tasks import _sequences

    lengths, xs, ys, w_start = _sequences()
    model = nn.Linear(w_start.numel(), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_start[None])
    micro, accum = 2, 4
    weighed = GradientNoiseMonitor(model, accumulation_steps=accum, sampling="uniform")
    g = torch.Generator().manual_seed(3)
    batches = []
    for step in range(6):
        idx = torch.randperm(len(xs), generator=g)[:micro * accum].view(accum, micro)
        pairs = [(torch.cat([xs[i] for i in j]), torch.cat([ys[i] for i in j])) for j in idx]
        tokens = [len(y) for _, y in pairs]
        for k, (x, y) in enumerate(pairs):
            weighed.weigh_next(torch.tensor(tokens[k]) if k % 2 else tokens[k])
            (((model(x)[:, 0] - y) ** 2).sum() / sum(tokens)).backward()
        assert weighed.step(micro) is not None
        model.zero_grad()
        batches.append((pairs, tokens))
    weighed.close()
    w0 = model.weight
    spreads = []
    for r, (pairs, tokens) in zip(weighed.readings, batches):
        grads = [torch.autograd.grad(((model(x)[:, 0] - y) ** 2).mean(), [w0])[0].reshape(-1)
                 for x, y in pairs]
        g2, spread = _assert_weighted_reading(r, grads, [n / sum(tokens) for n in tokens])
        assert (r.grad_sq_norm, r.trace_sigma) == pytest.approx((g2, r.b_big * spread),
                                                                rel=1e-4)
        spreads.append(r.trace_sigma)

    late = GradientNoiseMonitor(model, accumulation_steps=accum, sampling="uniform")
    with pytest.warns(UserWarning, match="weigh_next"):
        for pairs, tokens in batches:
            for x, y in pairs:
                (((model(x)[:, 0] - y) ** 2).sum() / sum(tokens)).backward()
            late.step(micro, micro_weights=tokens)
            model.zero_grad()
    off = [abs(r.trace_sigma / t - 1) for r, t in zip(late.readings, spreads)]
    assert max(off) > 0.01
    assert [r.grad_sq_norm for r in late.readings] == pytest.approx(
        [r.grad_sq_norm for r in weighed.readings], rel=1e-5)


def test_weights_given_both_ways_must_agree():
    model = nn.Linear(3, 1)
    monitor = GradientNoiseMonitor(model, accumulation_steps=2)
    for w in (1.0, 3.0):
        monitor.weigh_next(w)
        model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(UsageError, match="weigh_next"):
        monitor.step(2, micro_weights=[1.0, 2.0])
    with pytest.raises(UsageError, match="a number"):
        monitor.weigh_next("3")


def test_token_weighted_steps_are_unbiased_against_exact_per_sequence_gradients():
    """A token-weighted loss (a step's summed token losses over its token count, as the HF
    Trainer trains a GPT-2) over sequences of very different lengths, at fixed weights: the
    monitor's per-step |G|^2 and tr(Sigma), averaged over many steps, against the exact values
    from per-sequence gradients (G = sum s_i / sum n_i, tr = mean |s_i - n_i G|^2 / mean(n)^2).
    Dividing each micro-batch by its token share (the code before) read B_simple 2.2x the
    truth here."""
    from tasks.token_tasks import _sequences

    lengths, xs, ys, w_start = _sequences()   # lengths 1-3 and 16-24
    n_seq, d = len(xs), w_start.numel()
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_start[None])
    w0 = model.weight.detach()[0]
    # exact: per-sequence gradient of its summed token losses
    s = torch.stack([2 * ((x @ w0 - y)[:, None] * x).sum(0) for x, y in zip(xs, ys)])
    n = lengths.double()
    G = s.sum(0) / n.sum()
    g2_true = float(G @ G)
    tr_true = float(((s - n[:, None] * G) ** 2).sum(1).mean() / n.mean() ** 2)

    micro, accum = 2, 8
    monitor = GradientNoiseMonitor(model, accumulation_steps=accum, n_data=n_seq,
                                   sampling="uniform", window=4)
    for _ in range(1500):
        idx = torch.randperm(n_seq, generator=g)[:micro * accum].view(accum, micro)
        tokens = [int(lengths[j].sum()) for j in idx]
        total = sum(tokens)
        for j, n in zip(idx, tokens):
            x = torch.cat([xs[i] for i in j])
            y = torch.cat([ys[i] for i in j])
            monitor.weigh_next(n)
            (((model(x)[:, 0] - y) ** 2).sum() / total).backward()
        assert monitor.step(micro, micro_weights=tokens) is not None
        model.zero_grad()
    g2 = sum(r.grad_sq_norm for r in monitor.readings) / len(monitor.readings)
    tr = sum(r.trace_sigma for r in monitor.readings) / len(monitor.readings)
    assert g2 == pytest.approx(g2_true, rel=0.1)
    assert tr / g2 == pytest.approx(tr_true / g2_true, rel=0.15)


def test_advice_waits_for_enough_readings():
    """Asked at every step until it first says yes, two readings (an interval that covers
    about half the time) advised a larger batch in 18 of 100 runs below the bar (review)."""
    from bsselect.selection.noise_monitor import ADVICE_MIN_READINGS

    mon = GradientNoiseMonitor(nn.Linear(2, 1), accumulation_steps=2)
    for k in range(ADVICE_MIN_READINGS):
        jitter = 1 + 0.01 * ((k % 5) - 2)
        mon.record((1 + 100) * jitter, (1 + 50) * jitter, 8, 16)
        assert (mon.advice(4) is None) == (k + 1 < ADVICE_MIN_READINGS)


def test_at_a_minimum_the_window_is_unresolved_and_away_from_it_resolved():
    """Least squares at its exact minimum over the data (|G|^2 = 0, every step's estimate is
    noise around zero) against the same model moved off it: ``resolved`` (what the callbacks
    log behind) is False at the minimum, where the moving-average ratio is still a finite
    number (review: logged as B_simple in half the runs), and True off it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=g, dtype=torch.float64) + torch.randn(
        512, 1, generator=g, dtype=torch.float64)
    w_min = torch.linalg.lstsq(x, y).solution

    def run(w):
        model = nn.Linear(8, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(w.T)
        monitor = GradientNoiseMonitor(model, accumulation_steps=4, n_data=512, window=32,
                                       sampling="uniform")
        for step in range(32):
            idx = torch.randperm(512, generator=g)[:32].view(4, 8)
            for j in idx:
                (((model(x[j]) - y[j]) ** 2).mean() / 4).backward()
            monitor.step(8)
            model.zero_grad()
        return monitor

    at_min = run(w_min)
    assert len(at_min.readings) == 32 and not at_min.resolved
    assert at_min.estimate().resolved is False
    off = run(w_min + 0.5)
    assert off.resolved and off.estimate().resolved and off.b_simple is not None
    assert not GradientNoiseMonitor(nn.Linear(2, 1), accumulation_steps=2).resolved
