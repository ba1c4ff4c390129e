"""BatchSizeFromProbe in a real Trainer.fit: the probe runs on fit start and the loaders the
Trainer builds afterwards use its batch size."""

from __future__ import annotations

import pytest

L = pytest.importorskip("lightning")

from bsselect.adapters.lightning import BatchSizeFromProbe  # noqa: E402
from tasks.lightning_tasks import Blobs, Classifier, _as_dict  # noqa: E402
import torch  # noqa: E402


def test_the_trainer_trains_at_the_probed_batch_size(tmp_path):
    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    data = Blobs(batch_size=24)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), datamodule=data)
    result = callback.result
    assert result.method == "simulated" and result.budget_bytes == 4 * 2**20
    assert callback.batch_size == 512 <= result.max_batch  # the power of two under 1,000
    assert data.batch_size == callback.batch_size
    assert trainer.train_dataloader.batch_size == callback.batch_size


def test_the_probe_takes_the_trainers_precision_and_accumulation(tmp_path):
    """Gradient accumulation keeps gradients alive through the micro-steps and bf16 autocast
    changes the activations: the callback probes the step the Trainer will run."""
    from bsselect import Task, probe

    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    data = Blobs(batch_size=24)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        precision="bf16-mixed", accumulate_grad_batches=4)
    module = Classifier()
    trainer.fit(module, datamodule=data)
    result = callback.result.to_json()
    assert (result["precision"], result["accumulate"]) == ("bf16", 4)
    same = probe(Task.from_lightning(Classifier(), Blobs(batch_size=24)), memory="4MiB",
                 precision="bf16", accumulate=4)
    assert callback.result.max_batch == same.max_batch


class _SplitBlobs(Blobs):
    """Its validation items drawn by a seeded random_split in setup, as users write it."""

    calls = 0

    def setup(self, stage: str) -> None:
        import torch

        type(self).calls += 1
        super().setup(stage)
        whole = self.train
        self.train, self.val = torch.utils.data.random_split(whole, [800, 200])


def test_the_probe_does_not_set_the_datamodule_up_a_second_time(tmp_path):
    """Lightning has run setup("fit") before on_fit_start: running it again drew another
    random_split (the user's validation set changed when the callback was added)."""
    def fit(callbacks):
        L.seed_everything(0)
        _SplitBlobs.calls = 0
        data = _SplitBlobs(batch_size=24)
        trainer = L.Trainer(max_steps=1, callbacks=callbacks, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(Classifier(), datamodule=data)
        return list(data.val.indices), _SplitBlobs.calls

    plain, with_probe = fit([]), fit([BatchSizeFromProbe(memory="4MiB")])
    assert with_probe == plain and plain[1] == 1


def test_a_configure_optimizers_that_reads_the_trainer(tmp_path):
    """``self.trainer.estimated_stepping_batches`` in configure_optimizers: from_lightning and
    the callback raised "not attached to a Trainer" as a traceback (review). The callback
    takes the optimizer the Trainer made; from_lightning says how, or takes it too."""
    from bsselect import Task
    from bsselect.errors import TaskError
    from tasks.lightning_tasks import ScheduledClassifier

    with pytest.raises(TaskError, match="optimizer=trainer.optimizers"):
        Task.from_lightning(ScheduledClassifier(), Blobs(batch_size=24))
    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    module = ScheduledClassifier()
    trainer.fit(module, datamodule=Blobs(batch_size=24))
    assert callback.batch_size >= 1 and callback.result.max_batch >= 1
    task = Task.from_lightning(module, Blobs(batch_size=24), optimizer=trainer.optimizers[0])
    built = task.make_optimizer(task.model().parameters(), task.lr)
    assert type(built) is torch.optim.AdamW and built.param_groups[0]["weight_decay"] == 0.01


def test_a_onecycle_schedule_gives_the_task_its_peak_lr(tmp_path):
    """OneCycleLR writes ``initial_lr = max_lr / 25`` into the groups: the task's lr was 25x
    below the run's (review). The peak is the lr the trials scale from."""
    from bsselect import Task
    from tasks.lightning_tasks import ScheduledClassifier

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    module = ScheduledClassifier()
    trainer.fit(module, datamodule=Blobs(batch_size=24))
    task = Task.from_lightning(module, Blobs(batch_size=24), optimizer=trainer.optimizers[0])
    assert task.lr == pytest.approx(1e-2)


def test_a_cyclic_schedule_says_the_lr_is_its_base():
    from bsselect.adapters.lightning import recipe_of

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2)
    with pytest.warns(UserWarning, match="base lr 0.001"):
        recipe = recipe_of(opt, model)
    assert recipe.groups[0]["lr"] == pytest.approx(1e-3)


class _LoaderInSetup(Blobs):
    """Builds its train loader in setup(), before the callback sets the batch size."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        from tasks.lightning_tasks import _as_dict

        self.loader = torch.utils.data.DataLoader(self.train, batch_size=self.batch_size,
                                                  collate_fn=_as_dict)

    def train_dataloader(self):
        return self.loader


def test_a_loader_built_before_the_callback_is_an_error_not_an_unused_answer(tmp_path):
    """The callback set batch_size, the run trained at the loader's 24 with no word (review)."""
    from bsselect.errors import UsageError

    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match="loads batches of 24"):
        trainer.fit(Classifier(), datamodule=_LoaderInSetup(batch_size=24))


def test_the_batch_leaves_room_for_every_accumulated_micro_batch(tmp_path):
    """A micro-batch of the whole training set under accumulate_grad_batches=4 made each
    epoch one micro-batch, and Lightning stepped on it alone (review)."""
    callback = BatchSizeFromProbe(memory="256MiB", margin=0.2, power_of_two=False)
    data = Blobs(batch_size=24)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        accumulate_grad_batches=4)
    trainer.fit(Classifier(), datamodule=data)
    assert callback.result.max_batch > 1000
    assert callback.batch_size == data.batch_size == 1000 // 4


@pytest.mark.parametrize("method", ["simulated", "measured"])
def test_a_power_of_two_under_the_training_set_whichever_method_probed(tmp_path, method):
    """The cap at the training set came after the power of two: 1,000 simulated (not a power
    of two, with power_of_two=True), 512 measured (review)."""
    callback = BatchSizeFromProbe(memory="64MiB", margin=0.2, method=method)
    data = Blobs(batch_size=24)
    trainer = L.Trainer(max_steps=1, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), datamodule=data)
    assert callback.result.max_batch >= 1000
    assert callback.batch_size == data.batch_size == 512


class _HparamsBlobs(L.LightningDataModule):
    """Blobs with its batch size in ``hparams`` (``save_hyperparameters()``), as Lightning's
    own finder sets it; no ``batch_size`` attribute."""

    setup = Blobs.setup

    def __init__(self, batch_size: int = 24) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.hparams.batch_size,
                                           shuffle=True, collate_fn=_as_dict)


def test_a_batch_size_kept_in_the_datamodules_hparams_is_set(tmp_path):
    # It was "neither the DataModule nor the module has an attribute" where Lightning's own
    # BatchSizeFinder sets hparams (review).
    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    data = _HparamsBlobs(batch_size=24)
    assert not hasattr(data, "batch_size")
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), datamodule=data)
    assert data.hparams.batch_size == callback.batch_size == 512
    assert trainer.train_dataloader.batch_size == 512
    assert callback.holder == "_HparamsBlobs.hparams.batch_size"


class _OwnLoader(Classifier):
    """A module with its own batch_size and train_dataloader(), fitted without a DataModule."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 24
        self.data = Blobs()
        self.data.setup("fit")

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data.train, batch_size=self.batch_size,
                                           shuffle=True, collate_fn=_as_dict)


def test_a_module_with_its_own_loader_is_probed_without_a_datamodule(tmp_path):
    """``trainer.fit(model)`` on a module whose train_dataloader() reads self.batch_size, as
    Lightning's BatchSizeFinder takes it, was refused: "needs ... datamodule=" (review)."""
    callback = BatchSizeFromProbe(memory="4MiB", margin=0.2)
    module = _OwnLoader()
    trainer = L.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    assert callback.batch_size == 512 == module.batch_size
    assert trainer.train_dataloader.batch_size == 512
    # loaders handed to fit are built already: said, not ignored
    from bsselect.errors import UsageError

    plain = Classifier()
    loader = torch.utils.data.DataLoader(module.data.train, batch_size=24, collate_fn=_as_dict)
    trainer = L.Trainer(max_steps=2, callbacks=[BatchSizeFromProbe(memory="4MiB")],
                        accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with pytest.raises(UsageError, match="dataloaders passed to fit are built already"):
        trainer.fit(plain, train_dataloaders=loader)
