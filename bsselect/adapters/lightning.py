"""A ``Task`` from a Lightning setup: a ``LightningModule`` (class, factory or instance) and a
``LightningDataModule`` (or dataloaders), as they are.

    task = Task.from_lightning(MyModule, datamodule=MyDataModule())

The step is the module's own: ``training_step(batch, 0)`` is the forward and its loss (a tensor,
or a dict with ``"loss"``), on the batches of ``train_dataloader()`` (its dataset and
``collate_fn``; its ``batch_size`` is the base batch size). The optimizer is the one
``configure_optimizers`` returns, rebuilt at each trial's learning rate with the same class,
parameter groups and settings (each group's own weight decay, betas...; groups' lrs keep their
ratio to the first training group's, which is the task's ``lr``; parameters in no group stay
out, as in the user's run; a scheduler is not applied). ``self.log`` calls inside the step are
skipped (no Trainer). Manual optimization (``automatic_optimization=False``) is refused.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import TaskError, UsageError, meta_device_error, one_line
from . import batch_len, loader_sampling, model_factory, norm_or_none


class StepModule(nn.Module):
    """The LightningModule, called as its Trainer calls it in fit: ``training_step(batch, 0)``
    (``validation_step`` is not used: bsselect's validation loss is the same step's loss)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            warnings.filterwarnings("ignore", message=".*trainer.*")
            return self.module.training_step(batch, 0)


def step_loss(output: Any, _: Any) -> torch.Tensor:
    """``training_step``'s loss: a tensor, or the ``"loss"`` of the dict it returns."""
    if isinstance(output, dict):
        output = output.get("loss")
    if not isinstance(output, torch.Tensor):
        raise TaskError("training_step returned no loss tensor (nor a dict with 'loss'); "
                        "bsselect trains on the loss training_step returns")
    return output


def _optimizer_of(configured: Any) -> torch.optim.Optimizer:
    """The optimizer in whatever ``configure_optimizers`` returned (an optimizer, a list or
    tuple of them and schedulers, or a dict with ``"optimizer"``)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict) and "optimizer" in configured:
        return _optimizer_of(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _optimizer_of(configured[0])
    raise TaskError(f"configure_optimizers returned {type(configured).__name__}; bsselect "
                    "needs one optimizer (or a list/dict holding it)")


@dataclass(frozen=True)
class OptimizerRecipe:
    """What ``configure_optimizers`` makes, to rebuild it over another copy of the module at
    another lr: the class, each parameter group's constructor settings, and each group's
    parameters as positions in ``module.parameters()``, in the group's own order (an
    optimizer's state_dict is keyed by that order; parameters in no group are in none)."""

    cls: type
    groups: tuple[dict[str, Any], ...]
    members: tuple[tuple[int, ...], ...]
    n_params: int

    @property
    def lr(self) -> float | None:
        """The first group that trains' lr (the task's lr; other groups keep their ratio)."""
        return next((float(g["lr"]) for g in self.groups
                     if isinstance(g.get("lr"), (int, float)) and g["lr"] > 0), None)

    def build(self, params: Any, lr: float) -> torch.optim.Optimizer:
        params = list(params)
        ref = self.lr
        if len(params) != self.n_params:
            # not the module's own parameters in order: the first group's settings for all
            return self.cls(params, **{**self.groups[0], "lr": lr})
        built = []
        for settings, members in zip(self.groups, self.members):
            if members:
                ratio = float(settings.get("lr", ref)) / ref if ref else 1.0
                built.append({**settings, "params": [params[i] for i in members],
                              "lr": lr * ratio})
        return self.cls(built, lr=lr)


def _optimizer_recipe(build: Callable[[], nn.Module]) -> OptimizerRecipe:
    """The class, groups and settings of the optimizer ``configure_optimizers`` makes (asked
    of a module built on the meta device: nothing is allocated)."""
    module = _built(build)
    _check_automatic(module)
    try:
        made = module.configure_optimizers()
    except Exception as exc:
        # A scheduler sized by self.trainer.estimated_stepping_batches, as Lightning's docs
        # suggest, raised "not attached to a Trainer" as a traceback (review).
        raise TaskError(
            f"configure_optimizers() failed on a module with no Trainer attached: "
            f"{one_line(exc)}; from_lightning asks it for the optimizer outside any Trainer. "
            "Pass the optimizer your Trainer made (from_lightning(module, ..., "
            "optimizer=trainer.optimizers[0]), with the module instance it holds), or use "
            "the BatchSizeFromProbe callback in trainer.fit, which does") from exc
    return recipe_of(_optimizer_of(made), module)


def _built(build: Callable[[], nn.Module]) -> nn.Module:
    """The module, on the meta device where it builds there (nothing allocated), else on the
    CPU: an __init__ that reads a tensor's value (``float(torch.tensor(64.0).sqrt())``)
    cannot run on meta, and the user never asked for meta tensors (review: a raw
    RuntimeError). A class that needs arguments is said in API terms."""
    try:
        with torch.device("meta"):
            return build()
    except TypeError as exc:
        if isinstance(build, type) and "required" in str(exc):
            raise UsageError(f"from_lightning builds {build.__name__}() without arguments, "
                             f"which it cannot ({one_line(exc)}): pass an instance or a "
                             f"factory, e.g. lambda: {build.__name__}(...)") from exc
    except Exception as exc:  # noqa: BLE001 - meta-hostile code: built for real below
        if not meta_device_error(exc):  # the module's own error: building for real repeats it
            raise TaskError(f"building the LightningModule failed: {one_line(exc)}") from exc
    try:
        return build()
    except Exception as exc:
        raise TaskError(f"building the LightningModule failed: {one_line(exc)}") from exc


def _check_automatic(module: nn.Module) -> None:
    if not getattr(module, "automatic_optimization", True):
        raise TaskError("from_lightning does not support manual optimization "
                        "(automatic_optimization=False): bsselect trains on the loss "
                        "training_step returns, with one optimizer; write a Task for it instead")


def recipe_of(optimizer: torch.optim.Optimizer, module: nn.Module) -> OptimizerRecipe:
    """The recipe of ``optimizer`` over ``module``'s parameters: each group's constructor
    settings (its lr before any scheduler: ``initial_lr``) and members."""
    # Only what the constructor takes: a scheduler adds 'initial_lr' to the group, and
    # torch 2.13's AdamW keeps 'decoupled_weight_decay' in its groups but takes no such argument
    accepted = inspect.signature(type(optimizer).__init__).parameters
    groups = tuple({**{k: v for k, v in group.items() if k != "params" and k in accepted},
                    **({"lr": _scheduled_lr(group)} if "initial_lr" in group else {})}
                   for group in optimizer.param_groups)
    position = {id(p): i for i, p in enumerate(module.parameters())}
    members = tuple(tuple(position[id(p)] for p in group["params"] if id(p) in position)
                    for group in optimizer.param_groups)
    return OptimizerRecipe(type(optimizer), groups, members, len(position))


def _scheduled_lr(group: dict) -> float:
    """A scheduled group's lr before the scheduler: ``initial_lr``, which warm-ups and decays
    start from; OneCycleLR's peak ``max_lr`` (its ``initial_lr`` is ``max_lr / 25``: the task's
    lr was 25x low, review). CyclicLR leaves only its base lr in the group: said."""
    if "max_lr" in group:
        return group["max_lr"]
    if "base_momentum" in group:  # CyclicLR with cycle_momentum; the peak is not in the group
        warnings.warn(f"the optimizer follows a cyclic schedule (CyclicLR): the task's lr is "
                      f"its base lr {group['initial_lr']:g}, not the cycle's peak; pass lr= to "
                      "choose the lr the trials scale from", stacklevel=4)
    return group["initial_lr"]


def loader_batch_size(loader: Any) -> Optional[int]:
    """The batch a DataLoader loads: its ``batch_size``, or its batch sampler's (a
    ``DataLoader(batch_sampler=...)`` has ``batch_size`` None: the task's base batch became
    32 where the run trained at 128, and every trial's lr was scaled from it, review)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _loader_parts(loader: Any, role: str) -> tuple[Any, Any, Optional[int]]:
    """Dataset, collate_fn and batch size of the ``role`` dataloader. Lightning's several
    loaders: the first validation loader (said); a list or dict of training loaders is
    refused (its batches combine them: no one dataset to sample)."""
    if isinstance(loader, (list, tuple, dict)):
        loaders = list(loader.values()) if isinstance(loader, dict) else list(loader)
        if role == "train" or not loaders:
            raise UsageError(f"from_lightning takes one {role} dataloader; got a "
                             f"{type(loader).__name__} of {len(loaders)}: pass "
                             f"{role}_dataloader= with the one to use")
        if len(loaders) > 1:
            warnings.warn(f"from_lightning: {len(loaders)} validation dataloaders; the trials "
                          "validate on the first", stacklevel=3)
        loader = loaders[0]
    if not hasattr(loader, "dataset"):
        raise UsageError(f"from_lightning: the {role} dataloader is a "
                         f"{type(loader).__name__}, not a torch DataLoader")
    return loader.dataset, getattr(loader, "collate_fn", None), loader_batch_size(loader)


def from_lightning(module: Any, datamodule: Any = None, *, train_dataloader: Any = None,
                   val_dataloader: Any = None, lr: float | None = None,
                   base_batch_size: int | None = None,
                   optimizer: torch.optim.Optimizer | None = None,
                   max_grad_norm: float | None = None) -> Any:
    """A ``bsselect.Task`` from a LightningModule and a LightningDataModule (or dataloaders):
    see the module's doc. ``lr`` and ``base_batch_size`` default to the optimizer's and the
    train dataloader's. ``optimizer``: the one a Trainer made for ``module`` (an instance;
    ``trainer.optimizers[0]``), instead of asking ``configure_optimizers`` again, which may
    need the Trainer (``self.trainer.estimated_stepping_batches``). ``max_grad_norm``: the
    Trainer's ``gradient_clip_val`` (norm clipping), applied before every optimizer step.
    Validation batches are made by the val dataloader's own ``collate_fn``."""
    from ..task import Task, same_freshness

    build = model_factory(module, "a LightningModule class, factory or instance")
    if datamodule is not None:
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        if hasattr(datamodule, "setup"):
            datamodule.setup("fit")
        train_dataloader = datamodule.train_dataloader()
        try:
            val_dataloader = val_dataloader or datamodule.val_dataloader()
        except Exception:  # noqa: BLE001 - a DataModule without val_dataloader raises
            val_dataloader = None  # MisconfigurationException: sweep holds out 10% instead
    if train_dataloader is None:
        raise UsageError("from_lightning needs a datamodule or a train_dataloader")
    train, collate, loader_batch = _loader_parts(train_dataloader, "train")
    val, val_collate, _ = (_loader_parts(val_dataloader, "validation")
                           if val_dataloader is not None else (None, None, None))
    if base_batch_size is None and loader_batch is None:
        raise UsageError("from_lightning cannot read the train dataloader's batch size (a "
                         "custom batch sampler?): pass base_batch_size=, the batch the lr is "
                         "for")
    if optimizer is None:
        recipe = _optimizer_recipe(build)
    elif not isinstance(module, nn.Module):
        raise UsageError("from_lightning(optimizer=...) needs the module instance whose "
                         "parameters the optimizer holds, not a class or factory")
    else:
        _check_automatic(module)
        recipe = recipe_of(optimizer, module)
    collate = collate or torch.utils.data.default_collate
    val_collate = val_collate or torch.utils.data.default_collate
    if val is not None and val_collate != collate and _steps_on(build, val, val_collate):
        val = _ValData(val)  # its items are collated by its own loader's collate_fn

    def collate_either(items: list) -> tuple[Any, None]:
        if items and isinstance(items[0], _ValItem):
            return val_collate([item.item for item in items]), None
        return collate(items), None

    return Task(model=same_freshness(build, lambda: StepModule(build())), train_data=train,
                val_data=val,
                loss_fn=step_loss, optimizer=recipe.build,
                lr=float(lr if lr is not None else (recipe.lr or 1e-3)),
                base_batch_size=base_batch_size or loader_batch,
                collate_fn=collate_either, max_grad_norm=norm_or_none(max_grad_norm))


def _steps_on(build: Callable[[], nn.Module], val: Any, val_collate: Any) -> bool:
    """Whether ``training_step`` takes a batch of the val dataloader's ``collate_fn`` (two
    items, no gradient). Lightning feeds those batches to ``validation_step``, which may take
    another layout (an index beside ``x, y``) that the training step, which bsselect
    evaluates with, cannot unpack: then the train loader's ``collate_fn`` batches the
    validation set as well, with a warning (review: the sweep failed where it had run)."""
    items = [val[i] for i in range(min(2, len(val)))]
    try:
        module = build()
        module.eval()
        with torch.no_grad():
            step_loss(StepModule(module)(val_collate(items)), None)
        return True
    except Exception as exc:  # noqa: BLE001 - the user's code: said, then the other collate
        warnings.warn(f"the val dataloader's collate_fn makes batches that training_step "
                      f"cannot take ({one_line(exc)}); the validation set is batched by the "
                      "train dataloader's collate_fn instead", stacklevel=3)
        return False


class _ValItem:
    """An item of the validation set, marked so that the task's one ``collate_fn`` batches it
    with the val dataloader's ``collate_fn`` (a DataModule may give the two loaders different
    ones: the train loader's augmenting or masking one, say; evaluating with it was wrong)."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item


class _ValData(torch.utils.data.Dataset):
    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> _ValItem:
        return _ValItem(self.data[i])


def _callback_base() -> type:
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the standalone package
        from pytorch_lightning.callbacks import Callback
    return Callback


def BatchSizeFromProbe(memory: Any = None, margin: float = 0.2, attribute: str = "batch_size",
                       power_of_two: bool = True, **probe_options: Any) -> Any:
    """A Lightning callback, like Lightning's ``BatchSizeFinder`` but without trial-and-OOM:
    on ``fit`` start it probes the module's own step (``Task.from_lightning`` on the module and
    the train dataloader of the Trainer's DataModule, as Lightning has set it up: no second
    ``prepare_data``/``setup``; simulated on a CPU, measured on an accelerator), and sets the
    DataModule's (or the module's) ``attribute`` to the largest batch that fits ``memory``
    after ``margin`` (its largest power of two with ``power_of_two``), capped at the training
    set. The probe's result is ``callback.result``, the batch ``callback.batch_size``. Without
    a DataModule, the module's own ``train_dataloader()`` (``trainer.fit(model)``) is the one.

        trainer = L.Trainer(callbacks=[BatchSizeFromProbe(memory="24GiB")])
        trainer.fit(model, datamodule=data)
    """
    Callback = _callback_base()

    class _BatchSizeFromProbe(Callback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.result: Any = None
            self.batch_size: Optional[int] = None
            self.holder = ""

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            from ..api import probe
            from ..memory.capacity import largest_pow2_at_most

            datamodule = getattr(trainer, "datamodule", None)
            # The loader that reads the attribute: the DataModule's, else the module's own
            # train_dataloader() (``trainer.fit(model)``, as Lightning's finder takes it).
            source = datamodule if datamodule is not None else (
                pl_module if _defines_train_dataloader(pl_module) else None)
            if source is None:
                raise UsageError("BatchSizeFromProbe sets the batch size a train_dataloader() "
                                 "reads: fit with trainer.fit(model, datamodule=...), or "
                                 "define train_dataloader() on the module (dataloaders passed "
                                 "to fit are built already)")
            holders = _attribute_holders(pl_module, datamodule, attribute)
            if not holders:
                owners = "the DataModule nor the module" if datamodule is not None else \
                    "the module"
                raise UsageError(f"neither {owners} has {attribute!r} as "
                                 f"an attribute or in its hparams, to set (attribute=...)")
            # Lightning ran prepare_data and setup("fit") before on_fit_start: the loader of
            # the DataModule as set up, not a second setup (a seeded random_split in it would
            # draw another split).
            # The optimizer the Trainer made (its configure_optimizers may read self.trainer,
            # which a copy of the module has none of).
            optimizers = list(getattr(trainer, "optimizers", None) or ())
            task = from_lightning(pl_module, train_dataloader=source.train_dataloader(),
                                  optimizer=optimizers[0] if optimizers else None,
                                  max_grad_norm=_norm_clipping(trainer))
            options = dict(probe_options)
            # The run's own step: the Trainer's mixed precision and gradient accumulation
            # (the batch attribute is the micro-batch each accumulation step loads).
            options.setdefault("accumulate", int(trainer.accumulate_grad_batches))
            if "precision" not in options:
                options["precision"] = _lightning_precision(str(trainer.precision))
            device = options.pop("device", None) or pl_module.device.type
            self.result = probe(task, memory=memory, margin=margin, device=device, **options)
            # Capped so that one optimizer step's micro-batches fit the training set: a
            # micro-batch of the whole set under accumulate_grad_batches=4 made every epoch one
            # micro-batch, and Lightning stepped on it alone (review). A power of two after
            # the cap, whichever method probed (it was 500 simulated, 256 measured, review).
            accumulate = int(options["accumulate"])
            best = max(1, min(self.result.max_batch, len(task.train_data) // accumulate))
            self.batch_size = largest_pow2_at_most(best) if power_of_two else best
            self.holder = " and ".join(name for name, _ in holders)
            for _, holder in holders:
                if isinstance(holder, dict):
                    holder[attribute] = self.batch_size
                else:
                    setattr(holder, attribute, self.batch_size)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # A DataModule that built its loader in setup() (before on_fit_start) trains at
            # the loader's batch size, whatever the attribute says: the callback's answer
            # then goes unused, silently (review).
            loaded = loader_batch_size(getattr(trainer, "train_dataloader", None))
            if self.batch_size is not None and loaded is not None and loaded != self.batch_size:
                raise UsageError(
                    f"BatchSizeFromProbe set {self.holder} = {self.batch_size}, but the train "
                    f"dataloader loads batches of {loaded}: it was built before the callback "
                    f"ran (in setup()?). Build it in train_dataloader() from self.{attribute}")

    return _BatchSizeFromProbe()


def _attribute_holders(pl_module: Any, datamodule: Any, attribute: str
                       ) -> list[tuple[str, Any]]:
    """Where the batch size may be read from, as Lightning's own ``BatchSizeFinder`` sets it
    (``lightning_setattr``): the module's attribute, its ``hparams``, the DataModule's
    attribute and its ``hparams`` (``save_hyperparameters()``); each that holds it, named.
    A DataModule reading ``self.hparams.batch_size`` kept its own (review)."""
    found = []
    for owner in (pl_module, datamodule):
        if owner is None:
            continue
        name = type(owner).__name__
        if hasattr(owner, attribute):
            found.append((f"{name}.{attribute}", owner))
        hparams = getattr(owner, "hparams", None)
        if hparams is not None and attribute in hparams:
            found.append((f"{name}.hparams.{attribute}", hparams))
    return found


def _defines_train_dataloader(pl_module: Any) -> bool:
    """Whether the LightningModule overrides ``train_dataloader`` (the base one raises)."""
    try:
        from lightning.pytorch.utilities.model_helpers import is_overridden
    except ImportError:  # pytorch_lightning, the package's older name
        from pytorch_lightning.utilities.model_helpers import is_overridden
    return bool(is_overridden("train_dataloader", pl_module))


def _norm_clipping(trainer: Any) -> float | None:
    """The Trainer's gradient clipping by norm (``gradient_clip_val`` with the default or
    ``"norm"`` algorithm; ``from_lightning`` reads 0 as none); None without clipping or with
    clipping by value."""
    value = getattr(trainer, "gradient_clip_val", None)
    algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
    if value and not algorithm.endswith("norm"):
        # Not expressible in a Task (max_grad_norm is the norm): say so, not train without it
        warnings.warn(f"the Trainer clips gradients by value ({value:g}); bsselect's steps "
                      "clip by norm only (Task.max_grad_norm), so its trials train without "
                      "this clipping", stacklevel=3)
    return float(value) if value is not None and algorithm.endswith("norm") else None


def _lightning_precision(name: str) -> str:
    """bsselect's ``--precision`` for a Trainer's ``precision``: autocast ``bf16-mixed`` and
    ``16-mixed`` as bf16 / fp16; everything else as fp32 (``bf16-true``/``16-true`` hold
    weights in half precision, so fp32 is the larger, safe answer; it says so)."""
    mixed = {"bf16-mixed": "bf16", "16-mixed": "fp16"}
    if name in mixed:
        return mixed[name]
    if name not in ("32-true", "32", "64-true", "64"):
        warnings.warn(f"BatchSizeFromProbe: precision {name!r} is probed as fp32 (more memory "
                      "than the run uses)", stacklevel=3)
    return "fp32"


def NoiseScaleMonitor(every: int = 1, window: int = 64, ema: float = 0.95,
                      name: str = "bsselect/b_simple") -> Any:
    """A Lightning callback that measures the gradient noise scale ``B_simple`` during
    ``fit`` from the gradients the run computes anyway: the micro-batches of
    ``accumulate_grad_batches`` and, under DDP, the ranks (``bsselect.selection.noise_monitor``). It
    logs ``name`` (the moving-average ``B_simple``) each measured step once the window's
    ``|G|^2`` is told from zero (``monitor.resolved``; not near a minimum), keeps the monitor as
    ``callback.monitor`` (``.estimate()`` gives an interval), and warns once when the interval
    says the global batch could grow. With neither accumulation nor several ranks there is no
    second batch size: it warns once and stays off. A step whose micro-batches differ in size
    (an epoch's last one without ``drop_last``) is skipped, not measured. Past the first epoch
    of a loader that shuffles per epoch, ``B_simple`` reads low (the batches come from the
    items not yet seen this epoch; docs/noise.md): it also logs ``name + "_past_first_epoch"``
    (1.0 from then on) and the monitor warns once.

        trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[NoiseScaleMonitor()])
    """
    Callback = _callback_base()
    from ..selection.noise_monitor import GradientNoiseMonitor

    class _NoiseScaleMonitor(Callback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.monitor: Optional[GradientNoiseMonitor] = None
            self.advice: Optional[str] = None
            self._sizes: list[int] = []   # items of each micro-batch of this step

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if not pl_module.automatic_optimization:
                warnings.warn("NoiseScaleMonitor: manual optimization is not supported; off",
                              stacklevel=2)
                return
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                # The per-micro-batch hooks see gradients still multiplied by the loss scale;
                # Lightning unscales only the accumulated .grad (as the HF callback refuses).
                warnings.warn("NoiseScaleMonitor: fp16 loss scaling is not supported (bf16 and "
                              "fp32 are); off", stacklevel=2)
                return
            loader = trainer.train_dataloader
            dataset = getattr(loader, "dataset", None)
            try:
                n_data = len(dataset) if dataset is not None else None  # type: ignore[arg-type]
            except TypeError:
                n_data = None
            model = trainer.strategy.model
            if trainer.world_size > 1 and not isinstance(
                    model, torch.nn.parallel.DistributedDataParallel):
                warnings.warn("NoiseScaleMonitor: only DDP is supported across ranks (not "
                              f"{type(trainer.strategy).__name__}); off", stacklevel=2)
                return
            try:
                self.monitor = GradientNoiseMonitor(
                    model, accumulation_steps=trainer.accumulate_grad_batches,
                    every=every, ema=ema, window=window, n_data=n_data,
                    world_size=trainer.world_size, sampling=loader_sampling(loader),
                    optimizer=trainer.optimizers[0] if trainer.optimizers else None)
            except UsageError as exc:
                warnings.warn(f"NoiseScaleMonitor is off: {exc}", stacklevel=2)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                 batch_idx: int) -> None:
            self._sizes.append(batch_len(batch))

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any
                                     ) -> None:
            sizes, self._sizes = self._sizes, []
            if self.monitor is None:
                return
            # Micro-batches of different sizes (an epoch's last, [8, 8, 8, 4]) have no single
            # b_small, and .grad is not their mean gradient: the step is skipped (0).
            reading = self.monitor.step(sizes[0] if len(set(sizes)) == 1 else 0)
            if reading is None:
                return
            pl_module.log(f"{name}_past_first_epoch", float(reading.past_first_epoch),
                          on_step=True, on_epoch=False)
            # near a minimum |G|^2 is noise: no number rather than a ratio of it
            if self.monitor.b_simple is not None and self.monitor.resolved:
                pl_module.log(name, self.monitor.b_simple, on_step=True, on_epoch=False)
            if self.advice is None:
                self.advice = self.monitor.advice(reading.b_big)
                if self.advice:
                    warnings.warn(f"NoiseScaleMonitor: {self.advice}", stacklevel=2)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.monitor is not None:
                self.monitor.close()

    return _NoiseScaleMonitor()

