"""A ``Task`` from a Hugging Face setup: a model (factory, config or local config directory),
a dataset of dict items, a data collator, the model's own loss.

    from bsselect import Task
    task = Task.from_hf(GPT2Config(n_layer=4), train_dataset,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                        lr=5e-4, base_batch_size=16)

Batches are the collator's dicts (``BatchEncoding``), passed to the model as ``model(**batch)``;
the loss is the model's own (``outputs.loss``, computed from ``labels`` in the batch), a mean
over tokens as HF computes it. Padding collators give variable-length batches; probe and check
see the token lengths (the worst-case scan counts each item's tokens) and simulate the padded,
masked step exactly (docs/benchmarks-simulate.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import TaskError, UsageError
from . import batch_len, loader_sampling, model_factory


# Marks a parameter the Trainer's AdamW leaves out of weight decay (``_trainer_groups``).
NO_DECAY = "_bsselect_no_decay"
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                      r"_norm(?:$|\.)")


def _no_decay_names(model: nn.Module) -> set[str]:
    """The parameters ``transformers.Trainer`` exempts from weight decay: those of LayerNorm
    modules and those whose names say bias or norm (``Trainer.get_decay_parameter_names``,
    asked of transformers itself where it has it)."""
    names = {n for n, _ in model.named_parameters()}
    try:
        from transformers import Trainer

        return names - set(Trainer.get_decay_parameter_names(None, model))  # type: ignore
    except Exception:  # noqa: BLE001 - an older transformers: the same rule, written out
        import re

        out = set()
        for module_name, module in model.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if isinstance(module, nn.LayerNorm) or any(
                        re.search(p, full.lower()) for p in _NO_DECAY_PATTERNS):
                    out.add(full)
        return out


class HFModel(nn.Module):
    """The model, called as HF calls it: ``model(**batch)``; returns its ``ModelOutput``. Its
    parameters that the Trainer exempts from weight decay are marked (``NO_DECAY``) for the
    default optimizer's two groups."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        exempt = _no_decay_names(model)
        for name, param in model.named_parameters():
            if name in exempt:
                setattr(param, NO_DECAY, True)

    def forward(self, batch: Any) -> Any:
        if not hasattr(batch, "keys"):
            raise TypeError(f"an HF task's batch must be a dict of tensors (the collator's "
                            f"output), got {type(batch).__name__}")
        return self.model(**batch)


def model_loss(output: Any, labels: Any) -> torch.Tensor:
    """The model's own loss (``outputs.loss``), which it computes from ``labels``."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        raise TaskError("the model returned no loss: the batch has no 'labels' (let the "
                        "collator add them, e.g. DataCollatorForLanguageModeling(tokenizer, "
                        "mlm=False)) — or pass loss_fn=")
    return loss


def logits(output: Any) -> torch.Tensor:
    """``outputs.logits``, for metrics."""
    return output.logits if hasattr(output, "logits") else output["logits"]


def _factory(model: Any) -> Callable[[], nn.Module]:
    """A zero-argument builder of a freshly initialised model from what the user has."""
    if isinstance(model, (str, Path)):
        return _factory(_load_config(model))
    if _is_config(model):
        _check_buildable(model)
        return lambda: _from_config(model)
    return model_factory(model, "a transformers config, a local config path, a zero-argument "
                                "factory or an nn.Module")


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "data"


def shipped_configs() -> list[str]:
    """Names of the model configs that ship with bsselect (``--hf-config llama-7b``)."""
    return sorted(p.parent.name for p in SHIPPED_CONFIGS.glob("*/config.json"))


def _load_config(path: str | Path, option: str = "model") -> Any:
    """The transformers config in a local JSON file (any name) or a directory's
    ``config.json``; never downloads. UsageError naming ``option`` when it is missing or not
    a config."""
    from transformers import AutoConfig

    where = Path(path)
    shipped = SHIPPED_CONFIGS / str(path)
    if not where.exists() and (shipped / "config.json").is_file():
        where = shipped  # a config that ships with bsselect, by name: llama-7b
    if not where.exists():
        raise UsageError(f"{option} {path}: no such file or directory (a local config.json or "
                         "its directory, or a shipped one: "
                         f"{', '.join(shipped_configs())}; bsselect never downloads)")
    try:  # the file named, whatever its name (not the config.json beside it)
        return AutoConfig.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: not a transformers config ({exc})") from exc


def _is_config(value: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(value, PretrainedConfig)


def _check_buildable(config: Any) -> None:
    """UsageError, before anything is built, when ``_from_config`` has no class for
    ``config``: neither a class its ``architectures`` names that transformers has, nor a
    causal-LM class for its config (a T5 or ViT config without ``architectures``). Classes
    registered with ``AutoModelForCausalLM.register`` count, as ``from_config`` builds them
    (and an ``architectures`` name transformers lacks, such as a remote-code model's, falls
    back to them as before)."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if names and hasattr(transformers, names[0]):
        return
    try:
        if type(config) in transformers.AutoModelForCausalLM._model_mapping:
            return
    except Exception:  # noqa: BLE001 - a mapping that cannot say: let from_config decide
        return
    kind = getattr(config, "model_type", "") or type(config).__name__
    named = (f"names {names[0]}, which this transformers ({transformers.__version__}) does "
             f"not have, " if names else "names no architectures ")
    raise UsageError(f"the {kind} config {named}and {kind} has no causal-LM class: name the "
                     f"class to build in the config, e.g. "
                     f'"architectures": ["{_example_class(kind)}"]')


def _example_class(kind: str) -> str:
    from transformers.models.auto import modeling_auto

    for table in ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                  "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        found = getattr(modeling_auto, table, {}).get(kind)
        if isinstance(found, str):
            return found
    return "SomeModelClass"


def _from_config(config: Any) -> nn.Module:
    """Random weights from ``config``: the class its ``architectures`` names, else the
    causal-LM auto class."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is not None:
        return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def collate_with(data_collator: Optional[Callable[[list], Any]]) -> Callable[[list], Any]:
    """The Task's collate_fn: the HF collator's dict as inputs, its ``labels`` as targets."""
    if data_collator is None:
        from transformers import default_data_collator

        data_collator = default_data_collator

    def collate(items: list) -> tuple[dict, Any]:
        batch = data_collator(items)
        inputs = dict(batch)
        return inputs, inputs.get("labels")

    return collate


def from_hf(model: Any, train_dataset: Any, *, data_collator: Any = None,
            eval_dataset: Any = None, optimizer: Any = None, lr: float = 5e-5,
            weight_decay: float = 0.0, base_batch_size: int = 8, loss_fn: Any = None,
            metric: Any = None) -> Any:
    """A ``bsselect.Task`` from a Hugging Face setup (see the module's doc).

    ``model``: a ``PretrainedConfig`` (random weights of the class it names), a local
    directory or ``config.json``, a zero-argument factory, or an ``nn.Module`` (copied per
    trial). ``optimizer``: ``(params, lr) -> Optimizer``; default AdamW as the Trainer's
    ``adamw_torch`` builds it: ``weight_decay`` on the trainable parameters but biases and
    norms, which get none (two groups, in the Trainer's order). ``loss_fn``: default the model's own
    loss. ``metric``: ``(outputs, labels) -> float``, higher is better (``logits(outputs)``
    gives the logits)."""
    from ..task import Task, same_freshness

    if optimizer is None:
        def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.AdamW(_trainer_groups(params, weight_decay), lr=lr)

    build = _factory(model)
    # The model's own loss is a mean over the batch's label tokens: the noise measurement and
    # evaluation weight sub-batches by them (Task.loss_weight). A given loss_fn: items.
    units = LabelTokens() if loss_fn is None else None

    def wrapped() -> HFModel:
        built = HFModel(build())
        if units is not None:
            units.shifts = _loss_shifts_labels(built.model)
        return built

    return Task(model=same_freshness(build, wrapped), train_data=train_dataset,
                val_data=eval_dataset, loss_fn=loss_fn or model_loss, metric=metric,
                optimizer=optimizer, lr=lr, base_batch_size=base_batch_size,
                collate_fn=collate_with(data_collator), loss_weight=units)


class LabelTokens:
    """``Task.loss_weight`` of an HF task trained on the model's own loss: the label tokens
    that loss averages over — ``labels != -100`` (the ignore index of every HF loss), of
    ``labels[..., 1:]`` for a causal LM, whose loss predicts token t+1 from t
    (``_loss_shifts_labels``; set when the task builds its model). A batch without labels
    weighs 1: its loss raises the error that says so."""

    def __init__(self) -> None:
        self.shifts = False

    def __call__(self, labels: Any) -> float:
        return float(label_tokens(labels, self.shifts)) if torch.is_tensor(labels) else 1.0


def label_tokens(labels: torch.Tensor, shifts: bool) -> torch.Tensor:
    """The label tokens an HF loss averages over (a 0-d tensor: no host sync): ``labels !=
    -100``, of ``labels[..., 1:]`` where the loss ``shifts`` them (a causal LM's)."""
    if shifts and labels.dim() >= 2:
        labels = labels[..., 1:]
    return labels.ne(-100).sum()


def _trainer_groups(params: Any, weight_decay: float) -> list[dict[str, Any]]:
    """The Trainer's two AdamW groups, in its order: the trainable parameters it decays, then
    the ones it exempts (biases, norms), each in the model's order — so that a Trainer
    checkpoint's optimizer state lines up with them parameter by parameter."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if not getattr(p, NO_DECAY, False)],
             "weight_decay": weight_decay},
            {"params": [p for p in params if getattr(p, NO_DECAY, False)],
             "weight_decay": 0.0}]


def from_trainer(trainer: Any) -> Any:
    """A ``bsselect.Task`` from a ``transformers.Trainer``: its model (a fresh one from
    ``model_init`` when it has one, else a copy), datasets and collator, its optimizer (the
    one it was given, else the class and settings its arguments name, over its two
    weight-decay groups), and from its ``TrainingArguments`` the learning rate, weight decay,
    and per-device batch x gradient accumulation as the base batch size. Its activation
    checkpointing (``activation_checkpointing``, ``gradient_checkpointing`` before
    transformers 5) is applied to every model built, with its kwargs, as the Trainer applies
    it. The Trainer's precision (``bf16``/``fp16``) and its ``gradient_accumulation_steps``
    as micro-batches are the commands' ``--precision`` and ``--accumulate``: pass them
    there."""
    args = trainer.args
    model = getattr(trainer, "model_init", None) or trainer.model
    lr, optimizer = _trainer_optimizer(trainer)
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename (gradient_checkpointing)
        checkpointing = getattr(args, "gradient_checkpointing", False)
    if checkpointing:
        if not any(hasattr(trainer.model, name) for name in _ENABLE):  # the Trainer's too
            raise TaskError(f"the Trainer's activation checkpointing needs a model with "
                            f"activation_checkpointing_enable; {type(trainer.model).__name__} "
                            "has none")
        kwargs = (getattr(args, "activation_checkpointing_kwargs", None)
                  or getattr(args, "gradient_checkpointing_kwargs", None))
        model = _checkpointing(_factory(model), kwargs)
    return from_hf(model, trainer.train_dataset, data_collator=trainer.data_collator,
                   eval_dataset=trainer.eval_dataset, lr=lr,
                   weight_decay=args.weight_decay, optimizer=optimizer,
                   base_batch_size=args.per_device_train_batch_size
                   * args.gradient_accumulation_steps)


_ENABLE = ("activation_checkpointing_enable", "gradient_checkpointing_enable")  # new, old name


def _checkpointing(build: Callable[[], nn.Module], kwargs: Any) -> Callable[[], nn.Module]:
    """``build`` whose models have activation checkpointing on, as ``Trainer.train`` turns it
    on for ``TrainingArguments(activation_checkpointing=True)`` (``gradient_checkpointing``
    before transformers 5): left out, the probe answered for a run without it, about 3x too
    small a batch on a small GPT-2 (review). ``kwargs``: the arguments' checkpointing kwargs,
    whose ``every_n_layers`` and ``offload`` the Trainer passes on by name."""
    from ..task import same_freshness

    def built() -> nn.Module:
        model = build()
        options = dict(kwargs or {})
        layers, offload = options.pop("every_n_layers", None), options.pop("offload", None)
        extra = {k: v for k, v in (("every_n_layers", layers), ("offload", offload))
                 if v is not None}
        if hasattr(model, _ENABLE[0]):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options or None,
                                                  **extra)
        elif hasattr(model, _ENABLE[1]):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options or None,
                                                **extra)
        else:
            raise TaskError(f"the Trainer's activation checkpointing needs a model with "
                            f"activation_checkpointing_enable; {type(model).__name__} has none")
        return model

    return same_freshness(build, built)


def _trainer_optimizer(trainer: Any) -> tuple[float, Callable[[Any, float], torch.optim.Optimizer]]:
    """The lr and the optimizer the Trainer would train with, at any lr. The one it was given
    (``optimizers=(opt, scheduler)``) trains as given, ``args.learning_rate`` and
    ``weight_decay`` unused: its class, its own groups over the same parameters, each with its
    settings (weight decay, betas, eps...) and its lr in the same ratio to the first group's,
    which is the task's lr. Else the class and settings the arguments name (``optim``,
    ``adam_beta1/2``, ``adam_epsilon``: the Trainer's own ``get_optimizer_cls_and_kwargs``)
    over the Trainer's two weight-decay groups, at ``args.learning_rate``."""
    given = getattr(trainer, "optimizer", None)
    if given is not None:
        from .lightning import recipe_of

        recipe = recipe_of(given, trainer.model)
        return float(recipe.lr or trainer.args.learning_rate), recipe.build
    try:
        cls, kwargs = type(trainer).get_optimizer_cls_and_kwargs(trainer.args)
    except Exception as exc:  # noqa: BLE001 - an optim bsselect cannot rebuild
        raise TaskError(f"cannot rebuild the Trainer's optimizer (optim="
                        f"{trainer.args.optim}): {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TaskError(f"the Trainer's optim={trainer.args.optim} builds {cls!r}, not a "
                        "torch.optim.Optimizer bsselect can rebuild per lr; pass "
                        "Task.from_hf(..., optimizer=(params, lr) -> Optimizer)")
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("lr", "params", "differentiable") and not k.startswith("bsselect")}
    weight_decay = trainer.args.weight_decay
    kwargs.pop("weight_decay", None)  # per group, as the Trainer sets it

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        return cls(_trainer_groups(params, weight_decay), lr=lr, **kwargs)

    return trainer.args.learning_rate, optimizer


class RandomTokens(torch.utils.data.Dataset):
    """``items`` sequences of ``seq_len`` random token ids (seeded per item, made on demand),
    each its own causal-LM labels: the data of ``--hf-config`` tasks, where only shapes matter
    for memory. Every item has one shape (``uniform_items``), so no scan reads them."""

    uniform_items = True

    def __init__(self, vocab_size: int, seq_len: int, items: int = 1 << 20) -> None:
        self.vocab_size, self.seq_len, self.items = vocab_size, seq_len, items

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(self.vocab_size, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids}


def config_task(path: str | Path, seq_len: int | None = None, lr: float = 1e-4,
                base_batch_size: int = 8) -> Any:
    """A causal-LM Task from a local ``config.json`` (or its directory): random weights of the
    architecture it names, sequences of ``seq_len`` tokens (default: the config's
    ``max_position_embeddings``), the model's own loss, AdamW. For ``probe``/``check
    --hf-config``: what fits for a real architecture, without its weights."""
    config = _load_config(path, "--hf-config")
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        kind = getattr(config, "model_type", "") or "this"
        raise UsageError(f"--hf-config {path}: the {kind} config has no vocab_size; "
                         "--hf-config trains a language model on random tokens, so for this "
                         "model write a task (docs/contract.md) or use Task.from_hf with your "
                         "own data")
    length = seq_len or getattr(config, "max_position_embeddings", None)
    if not length or length < 2:
        raise UsageError("--seq-len is needed: the config has no max_position_embeddings")
    return from_hf(config, RandomTokens(vocab, int(length)), lr=lr,
                   base_batch_size=base_batch_size)


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise UsageError("NoiseScaleCallback needs transformers (pip install "
                         "'bsselect[hf]')") from exc
    return TrainerCallback


def _loss_shifts_labels(model: Any) -> bool:
    """Whether the model's own loss is the causal-LM one, which predicts token t+1 from t and
    so counts ``labels[..., 1:]`` (transformers' ``ForCausalLMLoss``)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - an older transformers without loss kwargs
        return False
    config = getattr(model, "config", None)
    if getattr(model, "loss_function", None) is not ForCausalLMLoss or getattr(
            config, "is_encoder_decoder", False):
        return False
    # ``loss_function`` falls back to ForCausalLMLoss for any model; of the ones that compute
    # their loss inline, some shift (GPT2DoubleHeadsModel) and some do not (XLNet, XLM,
    # BartForCausalLM: review). Their forward says which.
    import inspect

    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (a compiled or generated class): as it says
        return True
    return any(k in source for k in ("self.loss_function", "shift_logits", "shift_labels"))


def NoiseScaleCallback(every: int = 1, window: int = 64, ema: float = 0.95) -> Any:
    """A Hugging Face ``TrainerCallback`` that measures the gradient noise scale ``B_simple``
    during ``trainer.train()`` from the gradients the run computes anyway: the micro-batches
    of ``gradient_accumulation_steps`` and the ranks of DDP (``bsselect.selection.noise_monitor``).
    Each log line gains ``b_simple`` (in ``trainer.state.log_history`` and the callbacks after
    this one); the monitor is ``callback.monitor`` (``.estimate()`` gives an interval).

    Every step is measured, clipped or not: the Trainer clips (``max_grad_norm``) before
    callbacks run, but the monitor reads both norms during the backward passes, before the
    clipping. A step whose micro-batches differ in size (an epoch's last) is not measured. For
    a model that takes ``num_items_in_batch`` (GPT-2, Llama...), the Trainer divides each
    micro-batch's summed token loss by the whole step's token count rather than each mean by
    the number of micro-batches; the callback passes each micro-batch's label-token count
    (``labels != -100``), so each micro-batch's gradient is still taken as its own mean. fp16
    loss scaling is not supported (bf16 and fp32 are). Past the first epoch of the Trainer's
    shuffled epochs ``B_simple`` reads low (the batches come from the items not yet seen this
    epoch; docs/noise.md): each line's ``b_simple_past_first_epoch`` is then 1 (else 0) and the
    monitor warns once.

        trainer = Trainer(model, args, train_dataset=data, callbacks=[NoiseScaleCallback()])
    """
    Base = _trainer_callback_base()
    from ..selection.noise_monitor import GradientNoiseMonitor

    class _NoiseScaleCallback(Base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.monitor: Optional[GradientNoiseMonitor] = None
            self.advice: Optional[str] = None
            self._sizes: list[int] = []      # items of each micro-batch of this step
            self._tokens: list[Any] = []     # their label tokens, when the loss is per token
            self._handle: Any = None
            self._shifts = False             # a causal LM's loss drops each first label
            self._across = False             # token shares over all ranks (DDP)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           train_dataloader: Any = None, **kwargs: Any) -> None:
            import warnings

            if args.fp16:
                warnings.warn("NoiseScaleCallback: fp16 loss scaling is not supported; off",
                              stacklevel=2)
                return
            dataset = getattr(train_dataloader, "dataset", None)
            try:
                n_data = len(dataset) if dataset is not None else None
            except TypeError:
                n_data = None
            dist = torch.distributed
            world = (dist.get_world_size() if dist.is_available() and dist.is_initialized()
                     else 1)
            try:
                self.monitor = GradientNoiseMonitor(
                    model, accumulation_steps=args.gradient_accumulation_steps, every=every,
                    ema=ema, window=window, n_data=n_data, world_size=world,
                    sampling=loader_sampling(train_dataloader))
            except UsageError as exc:
                warnings.warn(f"NoiseScaleCallback is off: {exc}", stacklevel=2)
                return
            self._shifts = _loss_shifts_labels(model)
            # the Trainer divides by the token total over all ranks (its default) or each
            # rank's own
            self._across = bool(getattr(args, "average_tokens_across_devices", False))
            self._handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

        def _on_forward(self, module: Any, args: Any, kwargs: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            self._sizes.append(batch_len((*args, kwargs)))
            shifted = kwargs.get("shift_labels")  # already shifted by the collator
            labels = shifted if shifted is not None else kwargs.get("labels")
            # The Trainer passes num_items_in_batch exactly when the model's loss is the sum
            # over the micro-batch's label tokens divided by the step's total.
            if kwargs.get("num_items_in_batch") is not None and torch.is_tensor(labels):
                self._tokens.append(label_tokens(labels, self._shifts and shifted is None))

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sizes, self._tokens = [], []

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                                  **kwargs: Any) -> None:
            if self.monitor is None:
                return
            # One micro-batch size in the step, or the pair has no single b_small.
            micro = self._sizes[0] if len(set(self._sizes)) == 1 else 0
            tokens = self._tokens if len(self._tokens) == len(self._sizes) else None
            reading = self.monitor.step(micro, micro_weights=tokens,
                                        weights_across_ranks=self._across)
            if reading is not None and self.advice is None:
                self.advice = self.monitor.advice(reading.b_big)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            value = self.monitor.b_simple if self.monitor is not None else None
            if value is None or logs is None:
                return
            extra = {"b_simple": value,
                     "b_simple_past_first_epoch": int(self.monitor.past_first_epoch)}
            logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None:
                self.monitor.close()
            if self._handle is not None:
                self._handle.remove()

    return _NoiseScaleCallback()
