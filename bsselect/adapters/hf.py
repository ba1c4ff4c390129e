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

Configs (reading, building, the ``--hf-config`` task) are in ``hf_config``; the Trainer
callback that measures the noise scale during training is in ``hf_callback`` (also
importable from here).
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import TaskError, UsageError, one_line
from . import model_factory, norm_or_none
from .hf_config import (RandomTokens, check_buildable, config_task, from_config, is_config,
                        load_config, shipped_configs)

__all__ = ["HFModel", "LabelTokens", "RandomTokens", "collate_with",
           "config_task", "from_hf", "from_trainer", "label_tokens", "logits", "model_loss",
           "shipped_configs"]  # and NoiseScaleCallback (hf_callback), by __getattr__ below


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


def _factory(model: Any, data: Any = None) -> Callable[[], nn.Module]:
    """A zero-argument builder of a freshly initialised model from what the user has (and
    the data it trains on, which decides whether a config's default class is said)."""
    if isinstance(model, (str, Path)):
        return _factory(load_config(model), data)
    if is_config(model):
        check_buildable(model)
        if not getattr(model, "architectures", None) and not isinstance(data, RandomTokens):
            _warn_causal_lm(model)  # --hf-config's random tokens are a causal LM's data
        return lambda: from_config(model)
    return model_factory(model, "a transformers config, a local config path, a zero-argument "
                                "factory or an nn.Module")


def _warn_causal_lm(config: Any) -> None:
    """A config that names no class builds the causal LM of its model type (``from_config``):
    said, since a classification dataset then fails with a shape mismatch that names no
    class (review: a BertConfig with num_labels=2 became BertLMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", "")
    built = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind, "AutoModelForCausalLM's class")
    warnings.warn(f"the config names no architectures, so bsselect builds {built}, the "
                  f"causal LM of model type {kind!r}; for another head set "
                  f"config.architectures (e.g. ['{type(config).__name__.removesuffix('Config')}"
                  f"ForSequenceClassification']) or pass a model or a factory",
                  stacklevel=_outside_bsselect())


def _outside_bsselect() -> int:
    """The ``stacklevel`` of the first caller outside this package: the user's line."""
    import sys

    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
            package):
        frame, level = frame.f_back, level + 1
    return level


def collate_with(data_collator: Optional[Callable[[list], Any]]) -> Callable[[list], Any]:
    """The Task's collate_fn: the HF collator's dict as inputs, its ``labels`` as targets."""
    stacks = data_collator is None  # the default collator stacks items as they are
    if data_collator is None:
        from transformers import default_data_collator

        data_collator = default_data_collator

    def collate(items: list) -> tuple[dict, Any]:
        try:
            batch = data_collator(items)
        except (RuntimeError, ValueError) as exc:
            if stacks and "size" in str(exc):
                # "stack expects each tensor to be equal size": ragged token lists (review)
                raise TaskError(
                    f"the items have different lengths and no data_collator pads them: pass "
                    f"one (DataCollatorWithPadding(tokenizer), or DataCollatorForLanguageModeling"
                    f"(tokenizer, mlm=False) for a causal LM) ({one_line(exc)})") from exc
            raise
        inputs = dict(batch)
        return inputs, inputs.get("labels")

    return collate


def from_hf(model: Any, train_dataset: Any, *, data_collator: Any = None,
            eval_dataset: Any = None, optimizer: Any = None, lr: float = 5e-5,
            weight_decay: float = 0.0, base_batch_size: int = 8, loss_fn: Any = None,
            metric: Any = None, max_grad_norm: float | None = None) -> Any:
    """A ``bsselect.Task`` from a Hugging Face setup (see the module's doc).

    ``model``: a ``PretrainedConfig`` (random weights of the class it names), a local
    directory or ``config.json``, a zero-argument factory, or an ``nn.Module`` (copied per
    trial). ``optimizer``: ``(params, lr) -> Optimizer``; default AdamW as the Trainer's
    ``adamw_torch`` builds it: ``weight_decay`` on the trainable parameters but biases and
    norms, which get none (two groups, in the Trainer's order). ``loss_fn``: default the model's own
    loss. ``metric``: ``(outputs, labels) -> float``, higher is better (``logits(outputs)``
    gives the logits). ``max_grad_norm``: the run's gradient clipping (``Task.max_grad_norm``)."""
    from ..task import Task, same_freshness

    if optimizer is None:
        def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.AdamW(_trainer_groups(params, weight_decay), lr=lr)

    build = _factory(model, train_dataset)
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
                collate_fn=collate_with(data_collator), loss_weight=units,
                max_grad_norm=norm_or_none(max_grad_norm))


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
    there. Its gradient clipping (``max_grad_norm``, 1.0 by default; it clips only when
    above 0, and inf clips nothing) is the task's ``max_grad_norm``, on the mean gradient
    (``_summed_means``: a model whose loss ignores ``num_items_in_batch``)."""
    if not (hasattr(trainer, "args") and hasattr(trainer, "model")
            and hasattr(trainer, "train_dataset")):
        hint = (" (a model: Task.from_hf(model, train_dataset) builds a task from one)"
                if isinstance(trainer, nn.Module) else "")
        raise UsageError(f"from_trainer takes a transformers.Trainer, got "
                         f"{type(trainer).__name__}{hint}")
    if trainer.train_dataset is None:
        raise UsageError("the Trainer has no train_dataset, which bsselect trains on: build it "
                         "with Trainer(..., train_dataset=...)")
    args = trainer.args
    model = _model_init(trainer) or trainer.model
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
    _warn_run_settings(args)
    _warn_loss(trainer)
    train, collator = _without_unused_columns(trainer, trainer.train_dataset,
                                              trainer.data_collator)
    evaluation = trainer.eval_dataset
    if isinstance(evaluation, dict):  # the Trainer evaluates each; a task has one
        if evaluation:
            name = next(iter(evaluation))
            warnings.warn(f"the Trainer's eval_dataset holds {len(evaluation)} datasets; the "
                          f"task evaluates on the first, {name!r}", stacklevel=2)
        evaluation = next(iter(evaluation.values()), None)
    evaluation = _without_unused_columns(trainer, evaluation, None)[0]
    lr, max_grad_norm = _summed_means(trainer, lr, args.max_grad_norm)
    return from_hf(model, train, data_collator=collator,
                   eval_dataset=evaluation, lr=lr,
                   weight_decay=args.weight_decay, optimizer=optimizer,
                   base_batch_size=args.per_device_train_batch_size
                   * args.gradient_accumulation_steps,
                   max_grad_norm=max_grad_norm)  # from_hf reads it (norm_or_none)


def _summed_means(trainer: Any, lr: float, max_grad_norm: float) -> tuple[float, float]:
    """The task's lr and clipping for the step the Trainer takes. A model whose forward
    takes ``**kwargs`` gets ``num_items_in_batch`` and its loss is not divided by the
    accumulation steps; where that loss is a plain mean anyway (BERT's heads:
    ``loss_takes_items`` False), the Trainer steps with the sum of the ``a`` micro-batches'
    mean gradients, ``a`` times the mean gradient the task trains on. Its clipping at ``c`` is
    then clipping the mean at ``c / a`` (exactly), and an SGD-family lr ``a`` times larger;
    an Adam-family update does not depend on the gradient's scale. Each is said (the task's
    steps clipped 4x less than the Trainer's at 4 accumulation steps, review)."""
    from ..selection.lr_scaling import LrScaling, default_lr_scaling
    from .hf_callback import loss_takes_items

    a = int(getattr(trainer.args, "gradient_accumulation_steps", 1) or 1)
    if (a < 2 or not getattr(trainer, "model_accepts_loss_kwargs", False)
            or getattr(trainer, "loss_is_scaled_for_ga", None) is False
            or getattr(trainer, "compute_loss_func", None) is not None
            or loss_takes_items(trainer.model)):
        return lr, max_grad_norm
    said = []
    clips = max_grad_norm is not None and 0 < max_grad_norm < math.inf
    if clips:
        said.append(f"its max_grad_norm {max_grad_norm:g} is {max_grad_norm / a:g} on the "
                    "mean")
        max_grad_norm = max_grad_norm / a
    family = default_lr_scaling(_optimizer_class(trainer))
    if family is LrScaling.linear:
        said.append(f"its lr {lr:g} is {lr * a:g} on the mean")
        lr = lr * a
    elif family is LrScaling.none:
        said.append(f"an optimizer bsselect does not know may need {a}x the lr")
    warnings.warn(f"{type(trainer.model).__name__}'s loss is a plain mean that ignores the "
                  f"num_items_in_batch the Trainer passes it, so with {a} accumulation steps "
                  f"the Trainer steps with {a}x the mean gradient the task trains on: "
                  + ("; ".join(said) or "an Adam-family update does not depend on it")
                  + (", and the task takes that" if said else ""), stacklevel=3)
    return lr, max_grad_norm


def _optimizer_class(trainer: Any) -> Any:
    """The class of the optimizer the Trainer trains with (given, or named by ``optim``);
    None where it cannot tell."""
    given = getattr(trainer, "optimizer", None)
    inner = getattr(given, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        given = inner
    if given is not None:
        return type(given)
    try:
        return type(trainer).get_optimizer_cls_and_kwargs(trainer.args)[0]
    except Exception:  # noqa: BLE001 - _trainer_optimizer says why, where it matters
        return None


_ENABLE = ("activation_checkpointing_enable", "gradient_checkpointing_enable")  # new, old name


def _without_unused_columns(trainer: Any, dataset: Any, collator: Any) -> tuple[Any, Any]:
    """``dataset`` and ``collator`` as the Trainer's loaders take them: with
    ``remove_unused_columns`` (the default), a ``datasets.Dataset`` loses the columns the
    model's ``forward`` does not name, and other datasets are collated by a collator that
    drops them (a "text" column beside the tokens made the task's collation fail, blaming
    padding, where the Trainer trained: review). ``collator`` None: only the dataset."""
    if dataset is None or not getattr(trainer.args, "remove_unused_columns", False):
        return dataset, collator
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            return trainer._remove_unused_columns(dataset, description="training"), collator
    except ImportError:
        pass
    if collator is None or not hasattr(trainer, "_get_collator_with_removed_columns"):
        return dataset, collator
    return dataset, trainer._get_collator_with_removed_columns(collator,
                                                               description="training")


def _model_init(trainer: Any) -> Optional[Callable[[], nn.Module]]:
    """The Trainer's ``model_init`` as a zero-argument factory: one that takes the
    hyperparameter-search ``trial`` gets None, as ``Trainer.call_model_init`` passes it
    outside a search (it was refused: review)."""
    init = getattr(trainer, "model_init", None)
    if init is None:
        return None
    try:
        takes = len(inspect.signature(init).parameters)
    except (TypeError, ValueError):
        takes = 0
    return (lambda: init(None)) if takes == 1 else init


def _warn_loss(trainer: Any) -> None:
    """A warning where the Trainer trains on another loss than the model's own, which the
    Task uses (review: label smoothing 0.1, a compute_loss_func of twice the loss)."""
    import warnings

    from transformers import Trainer

    other = [name for name, on in (
        (f"label_smoothing_factor={trainer.args.label_smoothing_factor}",
         getattr(trainer.args, "label_smoothing_factor", 0)),
        ("compute_loss_func", getattr(trainer, "compute_loss_func", None) is not None),
        (f"{type(trainer).__name__}.compute_loss",
         getattr(type(trainer), "compute_loss", None) is not Trainer.compute_loss)) if on]
    if other:
        warnings.warn(f"the Trainer's loss is not the model's own ({', '.join(other)}): the "
                      "task trains and evaluates on the model's loss; for the Trainer's, "
                      "build the task with Task.from_hf(..., loss_fn=...)", stacklevel=3)


def _warn_run_settings(args: Any) -> None:
    """A warning naming the Trainer's precision and accumulation, which a Task does not hold
    (the commands' ``--precision``/``--accumulate`` do): without them a probe answered for
    an fp32 step of the whole batch, and said nothing (review)."""
    precision = "bf16" if getattr(args, "bf16", False) else (
        "fp16" if getattr(args, "fp16", False) else None)
    steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    # (what the Trainer does, the API option, the CLI flag) for each setting it uses
    used = ([(f"{precision} autocast", f"precision='{precision}'", f"--precision {precision}")]
            if precision else []) + ([(f"{steps} gradient-accumulation steps",
                                      f"accumulate={steps}", f"--accumulate {steps}")]
                                     if steps > 1 else [])
    if not used:
        return
    import warnings

    said, options, flags = zip(*used)
    warnings.warn(f"the Trainer trains with {' and '.join(said)}: probe and check answer for "
                  f"its step with {', '.join(options)} ({' '.join(flags)}); the task alone is "
                  "an fp32 step of the whole batch", stacklevel=3)


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
    inner = getattr(given, "optimizer", None)  # accelerate's wrapper, after trainer.train()
    if isinstance(inner, torch.optim.Optimizer):  # (its class takes no lr: review)
        given = inner
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


def __getattr__(name: str) -> Any:
    """``bsselect.adapters.hf.NoiseScaleCallback``, imported on first use (its module imports
    this one)."""
    if name == "NoiseScaleCallback":
        from .hf_callback import NoiseScaleCallback

        return NoiseScaleCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
