"""Task.from_lightning on a real LightningModule (training_step with self.log, a dict loss,
configure_optimizers with a scheduler) and LightningDataModule (custom collate_fn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from conftest import run_cli  # noqa: E402
from tasks import lightning_tasks  # noqa: E402

from bsselect import Task  # noqa: E402
from bsselect.memory.cpu_truth import cpu_step_peak  # noqa: E402
from bsselect.memory.inputs import InputMode, scan_inputs  # noqa: E402
from bsselect.memory.simulated import simulate_step_peak  # noqa: E402
from bsselect.task import validate_task  # noqa: E402

TASKS = str(Path(__file__).parent / "tasks" / "lightning_tasks.py")


def test_the_module_and_datamodule_settings_are_taken_over():
    task = lightning_tasks.blobs()
    assert task.lr == 0.05 and task.base_batch_size == 24
    assert len(task.train_data) == 1000 and len(task.val_data) == 200
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), 0.2)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.9, 1e-4)
    x, y = task.collate_fn([task.train_data[i] for i in range(4)])
    assert set(x) == {"x", "y"} and y is None  # the loader's own batch; the step holds the loss
    validate_task(task)
    validate_task(task, on_meta=True)


def test_the_optimizers_parameter_groups_are_rebuilt_at_each_lr():
    task = lightning_tasks.grouped()
    assert task.lr == 0.01  # the first group's
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), 0.04)
    assert isinstance(optimizer, torch.optim.AdamW)
    net = model.module.net
    groups = optimizer.param_groups
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(net[0].weight), id(net[2].weight)], [id(net[2].bias)]]  # net[0].bias in none
    assert [g["lr"] for g in groups] == [0.04, 0.02]  # the second group's ratio kept
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.95) for g in groups)
    # parameters that are not the module's own, in order: one group of the first's settings
    loose = task.make_optimizer([torch.nn.Parameter(torch.zeros(2))], 0.04)
    assert len(loose.param_groups) == 1 and loose.param_groups[0]["weight_decay"] == 0.1


def test_one_group_over_part_of_the_module_in_its_own_order_is_rebuilt_so():
    """The usual freezing pattern (only some parameters handed to the optimizer) and a group
    that lists its parameters in another order than the module: each rebuilt exactly so, as
    a checkpoint's optimizer state is keyed by that order."""
    task = Task.from_lightning(lightning_tasks.PartClassifier, lightning_tasks.Blobs())
    model = task.model()
    net = model.module.net
    optimizer = task.make_optimizer(model.parameters(), 0.1)
    assert len(optimizer.param_groups) == 1
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(net[2].bias), id(net[2].weight)]  # net[0] left out, as the module's own optimizer
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("module_class, state_name", [
    (lightning_tasks.GroupedClassifier, "exp_avg"), (lightning_tasks.PartClassifier,
                                                     "momentum_buffer")])
def test_a_lightning_checkpoint_gives_its_optimizer_state_to_the_right_parameters(
        tmp_path, module_class, state_name):
    """Two groups (one parameter in none), and one group over part of the module listed in
    its own order: the checkpoint's state fits, and lands on the parameters it belongs to."""
    from bsselect.checkpoint import branch_from, load_checkpoint

    trainer = lightning_tasks.fit_and_save(module_class(), lightning_tasks.Blobs(), 6,
                                           tmp_path / "run.ckpt")
    task = Task.from_lightning(module_class, lightning_tasks.Blobs())
    branch = branch_from(load_checkpoint(tmp_path / "run.ckpt"), task.model,
                         task.make_optimizer, task.lr)
    assert branch.warnings == ()  # it fitted: same groups, same state
    live = trainer.optimizers[0]
    saved = branch.optimizer_state
    assert [len(g["params"]) for g in saved["param_groups"]] == [
        len(g["params"]) for g in live.param_groups]
    order = [p for g in live.param_groups for p in g["params"]]
    for i, p in enumerate(order):
        assert torch.equal(saved["state"][i][state_name], live.state[p][state_name])
    # and the rebuilt optimizer, loaded with it, holds each buffer on its own parameter
    model = task.model()
    model.load_state_dict(branch.model_state)
    rebuilt = task.make_optimizer(model.parameters(), task.lr)
    rebuilt.load_state_dict(saved)
    names = {id(p): n for n, p in model.named_parameters()}
    live_names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
    for p in (q for g in rebuilt.param_groups for q in g["params"]):
        twin = next(q for q in order if live_names[id(q)] == names[id(p)].removeprefix("module."))
        assert torch.equal(rebuilt.state[p][state_name], live.state[twin][state_name])


def test_the_simulated_step_of_training_step_matches_the_cpu_allocator():
    task = lightning_tasks.blobs()
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    for b in (8, 128):
        assert simulate_step_peak(task, b, inputs=inputs).peak_bytes == pytest.approx(
            cpu_step_peak(task, b, inputs=inputs).peak_bytes, rel=0.005)


def test_sweep_trains_the_module_through_its_training_step():
    done = run_cli("sweep", f"{TASKS}:blobs", "--batch-sizes", "8,32,128", "--budget", "512",
                   "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [t["status"] for t in data["trials"]] == ["ok", "ok", "ok"]
    assert all(t["train_loss_end"] < t["train_loss_start"] for t in data["trials"])
    assert data["recommended_batch_size"] in (8, 32, 128)


def test_manual_optimization_is_refused_in_one_line():
    """It failed later, in the simulated step, with "Manual is not attached to a Trainer"."""
    from bsselect.errors import TaskError

    class Manual(lightning_tasks.Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(TaskError, match=r"manual optimization \(automatic_optimization=False"):
        Task.from_lightning(Manual, lightning_tasks.Blobs())


class _NoisyTrainCollate(lightning_tasks.Blobs):
    """A DataModule whose train loader augments (noise on the inputs) and whose val loader
    does not: evaluation must batch the val set with the val loader's collate_fn."""

    def train_dataloader(self):
        def augmenting(items):
            batch = lightning_tasks._as_dict(items)
            return {"x": batch["x"] + 100.0, "y": batch["y"]}

        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size,
                                           collate_fn=augmenting)


def test_validation_batches_come_from_the_val_loaders_collate_fn():
    task = Task.from_lightning(lightning_tasks.Classifier, _NoisyTrainCollate())
    items = [task.val_data[i] for i in range(4)]
    x, _ = task.collate_fn(items)
    raw = torch.stack([task.val_data.data[i][0] for i in range(4)])
    torch.testing.assert_close(x["x"], raw)  # not shifted by the train loader's +100
    train_x, _ = task.collate_fn([task.train_data[i] for i in range(4)])
    torch.testing.assert_close(train_x["x"], torch.stack(
        [task.train_data[i][0] for i in range(4)]) + 100.0)
    # One collate_fn for both (the usual case): the val set is the loader's own dataset.
    same = lightning_tasks.blobs()
    assert isinstance(same.val_data, torch.utils.data.TensorDataset)


def test_the_callback_and_from_lightning_carry_gradient_clipping(tmp_path):
    import lightning as L

    from bsselect.adapters.lightning import BatchSizeFromProbe

    assert Task.from_lightning(lightning_tasks.Classifier, lightning_tasks.Blobs(),
                               max_grad_norm=0.5).max_grad_norm == 0.5
    assert lightning_tasks.blobs().max_grad_norm is None
    seen = []

    class Spy(BatchSizeFromProbe(memory="4MiB").__class__):
        def on_fit_start(self, trainer, pl_module):
            from bsselect.adapters import lightning as adapter

            real = adapter.from_lightning

            def spying(*args, **kwargs):
                task = real(*args, **kwargs)
                seen.append(task.max_grad_norm)
                return task

            adapter.from_lightning = spying
            try:
                super().on_fit_start(trainer, pl_module)
            finally:
                adapter.from_lightning = real

    for clip, algorithm, expected in ((0.25, "norm", 0.25), (0.25, "value", None),
                                      (None, None, None)):
        trainer = L.Trainer(max_steps=1, callbacks=[Spy()], accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
        if algorithm == "value":  # not expressible: said, not dropped in silence (review)
            with pytest.warns(UserWarning, match="clips gradients by value"):
                trainer.fit(lightning_tasks.Classifier(), datamodule=lightning_tasks.Blobs())
        else:
            trainer.fit(lightning_tasks.Classifier(), datamodule=lightning_tasks.Blobs())
        assert seen[-1] == expected


class _IndexedValCollate(lightning_tasks.Blobs):
    """A val loader whose batches carry an index beside x and y, for a validation_step that
    takes them: training_step (which bsselect evaluates with) cannot."""

    def val_dataloader(self):
        def with_index(items):
            x, y = zip(*items)
            return torch.stack(x), torch.stack(y), torch.arange(len(items))

        return torch.utils.data.DataLoader(self.val, batch_size=self.batch_size,
                                           collate_fn=with_index)


def test_a_val_collate_that_training_step_cannot_take_falls_back_to_the_train_one():
    with pytest.warns(UserWarning, match="the val dataloader's collate_fn makes batches that "
                                         "training_step cannot take"):
        task = Task.from_lightning(lightning_tasks.Classifier, _IndexedValCollate())
    assert isinstance(task.val_data, torch.utils.data.TensorDataset)  # not wrapped
    x, _ = task.collate_fn([task.val_data[i] for i in range(4)])
    assert set(x) == {"x", "y"}  # the train loader's batches, which the step takes
    validate_task(task)


def _loader(batch_size=None, batch_sampler=None):
    data = lightning_tasks.Blobs()
    data.setup("fit")
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(data.train, batch_sampler=batch_sampler(data.train),
                                           collate_fn=lightning_tasks._as_dict)
    return torch.utils.data.DataLoader(data.train, batch_size=batch_size,
                                       collate_fn=lightning_tasks._as_dict)


def test_a_batch_samplers_batch_size_is_the_base_and_an_unreadable_one_is_asked_for():
    """DataLoader(batch_sampler=...) has batch_size None: the base batch was 32 where the run
    trained at 128, and every trial's lr scaled from it, without a word (review)."""
    from torch.utils.data import BatchSampler, RandomSampler

    from bsselect.errors import UsageError

    sampled = _loader(batch_sampler=lambda d: BatchSampler(RandomSampler(d), 128, False))
    task = Task.from_lightning(lightning_tasks.Classifier, train_dataloader=sampled)
    assert task.base_batch_size == 128

    class Buckets(torch.utils.data.Sampler):  # a custom batch sampler with no batch_size
        def __init__(self, data):
            self.n = len(data)

        def __iter__(self):
            return iter([list(range(i, min(i + 50, self.n))) for i in range(0, self.n, 50)])

        def __len__(self):
            return (self.n + 49) // 50

    custom = _loader(batch_sampler=Buckets)
    with pytest.raises(UsageError, match="base_batch_size="):
        Task.from_lightning(lightning_tasks.Classifier, train_dataloader=custom)
    task = Task.from_lightning(lightning_tasks.Classifier, train_dataloader=custom,
                               base_batch_size=50)
    assert task.base_batch_size == 50


def test_several_dataloaders_are_the_first_validation_one_or_refused_for_training():
    from bsselect.errors import UsageError

    train, val = _loader(24), _loader(16)
    with pytest.warns(UserWarning, match="2 validation dataloaders"):
        task = Task.from_lightning(lightning_tasks.Classifier, train_dataloader=train,
                                   val_dataloader=[val, _loader(8)])
    assert task.val_data is val.dataset
    for several in ([train, train], {"a": train}):
        with pytest.raises(UsageError, match="one train dataloader"):
            Task.from_lightning(lightning_tasks.Classifier, train_dataloader=several)


class _ReadsAValue(lightning_tasks.Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.scale = float(torch.tensor(64.0).sqrt())  # cannot run on the meta device


class _NeedsWidth(lightning_tasks.Classifier):
    def __init__(self, width: int) -> None:
        super().__init__(width)


def test_a_module_that_cannot_build_on_meta_or_needs_arguments_is_said_in_api_terms():
    """Both were raw tracebacks from the meta-device build of configure_optimizers' module
    (review): a module that reads a tensor's value in __init__ trains in Lightning."""
    from bsselect.errors import UsageError

    task = Task.from_lightning(_ReadsAValue, train_dataloader=_loader(24))
    assert task.lr == 0.05 and task.model().module.scale == 8.0
    with pytest.raises(UsageError, match=r"lambda: _NeedsWidth\(\.\.\.\)"):
        Task.from_lightning(_NeedsWidth, train_dataloader=_loader(24))
    task = Task.from_lightning(lambda: _NeedsWidth(32), train_dataloader=_loader(24))
    assert task.model().module.net[0].out_features == 32


class _BadConfig(lightning_tasks.Classifier):
    builds = 0

    def __init__(self) -> None:
        type(self).builds += 1
        raise ValueError("width must be even")


def test_a_module_whose_init_fails_on_its_own_is_not_built_again_for_real():
    """An __init__ that raises its own error (not the meta device's) was built a second time
    for real, where a large module allocates all its weights before failing the same way."""
    from bsselect.errors import TaskError

    with pytest.raises(TaskError, match="building the LightningModule failed: ValueError: "
                                        "width must be even"):
        Task.from_lightning(_BadConfig, train_dataloader=_loader(24))
    assert _BadConfig.builds == 1
