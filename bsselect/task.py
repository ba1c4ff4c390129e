"""The ``Task`` contract, entry-point loading and validation.

A task is what the user hands the tool: how to build a fresh model, the data, the loss, and
optionally validation data, a metric, an optimizer factory and the base learning rate that is
valid at ``base_batch_size``. Everything else is a CLI option.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import CannotSimulate, RealTooError, TaskError, UsageError, one_line


# A task whose code left autograd off (review: said as a detached output, or a failed step)
GRADIENTS_OFF = ("gradients are off: the task's code turned them off (torch.set_grad_enabled("
                 "False) or torch.no_grad() left entered while building it), so no step can "
                 "train; turn them off only inside its evaluation")


@dataclass
class Task:
    """Everything bsselect needs from the user (docs/contract.md, "Task contract")."""

    model: Callable[[], nn.Module]
    train_data: Dataset
    loss_fn: Callable[[Any, Any], torch.Tensor]
    val_data: Optional[Dataset] = None
    metric: Optional[Callable[[Any, Any], float]] = None
    optimizer: Optional[Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]] = None
    lr: float = 0.1
    base_batch_size: int = 32
    collate_fn: Optional[Callable[[list], Any]] = None
    # For a loss that is a mean over units whose number varies per item (a padded LM's label
    # tokens): the number of units in a batch with targets ``y``. The noise measurement then
    # weights sub-batches by it, and evaluation averages over the units. None: items.
    loss_weight: Optional[Callable[[Any], float]] = None
    # Gradient clipping as the run does it: the gradients' global L2 norm clipped to this
    # before every optimizer step (``clip_grad_norm_``; the HF Trainer's ``max_grad_norm``,
    # Lightning's ``gradient_clip_val``). None: no clipping.
    max_grad_norm: Optional[float] = None

    def __post_init__(self) -> None:
        """Typed checks of every field, each a one-line message that says what to pass."""
        if isinstance(self.model, nn.Module):
            raise TypeError("Task.model must be a function that builds a fresh model (e.g. "
                            f"`lambda: {type(self.model).__name__}(...)`), not a model instance")
        for name in ("model", "loss_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Task.{name} must be callable, got {_kind(getattr(self, name))}")
        for name in ("metric", "optimizer", "collate_fn", "loss_weight"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"Task.{name} must be callable or None, got {_kind(value)}")
        for name, args in _CALLED_WITH.items():
            value = getattr(self, name)
            if value is not None and not _takes(value, len(args)):
                raise TypeError(f"Task.{name} is called as {name}({', '.join(args)}), which "
                                f"{_name(value)}{_signature(value)} does not take")
        for name in ("train_data", "val_data"):
            value = getattr(self, name)
            if (value is not None or name == "train_data") and not (
                    hasattr(value, "__len__") and hasattr(value, "__getitem__")):
                streaming = (" — a streaming (iterable) dataset: bsselect picks items by index "
                             "(the largest, reshuffled per trial); materialise a map-style "
                             "sample of it (a list, or datasets' .take(n) to a Dataset)"
                             if hasattr(value, "__iter__") and value is not None else "")
                if isinstance(value, torch.utils.data.DataLoader):
                    # batches at its own size: bsselect makes its batches from the items
                    streaming = (f" — a DataLoader: pass its dataset ({name}=loader.dataset) "
                                 f"and its collate_fn (collate_fn=loader.collate_fn)")
                raise TypeError(f"Task.{name} must be a map-style Dataset (with __len__ and "
                                f"__getitem__), got {_kind(value)}{streaming}")
        # A value of the wrong type is a TypeError; a number out of range, a ValueError.
        if not _positive_number(self.lr):
            raise _number_error(self.lr)(f"Task.lr must be a number > 0, got {_kind(self.lr)}")
        if self.max_grad_norm is not None and not _positive_number(self.max_grad_norm):
            raise _number_error(self.max_grad_norm)(
                f"Task.max_grad_norm must be a number > 0 or None, got "
                f"{_kind(self.max_grad_norm)}")
        if isinstance(self.base_batch_size, bool) or not isinstance(self.base_batch_size, int) \
                or self.base_batch_size < 1:
            wrong_type = isinstance(self.base_batch_size, bool) or not isinstance(
                self.base_batch_size, int)
            raise (TypeError if wrong_type else ValueError)(
                f"Task.base_batch_size must be an int >= 1, got {_kind(self.base_batch_size)}")

    @classmethod
    def from_hf(cls, model: Any, train_dataset: Any, **options: Any) -> "Task":
        """A Task from a Hugging Face setup: ``bsselect.adapters.hf.from_hf``."""
        from .adapters.hf import from_hf

        return from_hf(model, train_dataset, **options)

    @classmethod
    def from_trainer(cls, trainer: Any) -> "Task":
        """A Task from a ``transformers.Trainer``: ``bsselect.adapters.hf.from_trainer``."""
        from .adapters.hf import from_trainer

        return from_trainer(trainer)

    @classmethod
    def from_lightning(cls, module: Any, datamodule: Any = None, **options: Any) -> "Task":
        """A Task from a LightningModule and DataModule:
        ``bsselect.adapters.lightning.from_lightning``."""
        from .adapters.lightning import from_lightning

        return from_lightning(module, datamodule, **options)

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The task's optimizer at ``lr``; default SGD with momentum 0.9. ``params`` reach the
        factory as a list: ``model.parameters()`` is a generator, and a factory that reads it
        twice (weight decay for matrices, none for biases) found the second group empty, and
        those parameters never trained (review)."""
        if not isinstance(params, (list, tuple)):
            params = list(params)
        if self.optimizer is not None:
            made = self.optimizer(params, lr)
            if not (hasattr(made, "step") and hasattr(made, "param_groups")):
                # a factory that forgot its return: "internal error: 'NoneType' object has
                # no attribute 'step'" (review)
                raise TaskError(f"Task.optimizer must return an optimizer (a torch.optim."
                                f"Optimizer); it returned {type(made).__name__}: did the "
                                "function forget its return?")
            return made
        return torch.optim.SGD(params, lr=lr, momentum=0.9)


# How bsselect calls each function of a task; a signature that cannot take these fails at
# the first step, where a simulated step's message blamed the simulation (review).
_CALLED_WITH = {"model": (), "loss_fn": ("output", "target"), "metric": ("output", "target"),
                "optimizer": ("params", "lr"), "collate_fn": ("items",),
                "loss_weight": ("target",)}


def _takes(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when its signature
    cannot be read: a builtin)."""
    import inspect

    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _signature(fn: Any) -> str:
    import inspect

    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _number_error(value: Any) -> type[Exception]:
    """ValueError for a number out of range (0, -1, nan, inf), TypeError for anything else."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ValueError if is_number else TypeError


def _positive_number(value: Any) -> bool:
    """A finite int or float above 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0


def loss_units(task: Task, y: Any) -> float:
    """``task.loss_weight(y)`` as a float >= 0, or a TaskError that names it."""
    try:
        value = float(task.loss_weight(y))  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - the user's function
        raise TaskError(f"Task.loss_weight failed on a batch's targets: {one_line(exc)}"
                        ) from exc
    if not (math.isfinite(value) and value >= 0):
        raise TaskError(f"Task.loss_weight must return a finite number >= 0 (the units the "
                        f"loss averages over), got {value!r}")
    return value


def _kind(value: Any) -> str:
    """``'0.1' (str)`` — a value and its type, for messages."""
    text = repr(value)
    return f"{text[:60]}{'…' if len(text) > 60 else ''} ({type(value).__name__})"


def _import_target(module_part: str) -> Any:
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise UsageError(f"task file {module_part!r} does not exist")
        name = f"_bsselect_task_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot import {module_part!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        # Let the task file import its neighbours, as `python file.py` would.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:  # cannot be loaded: a usage error (contract: exit 2)
            raise UsageError(f"importing {module_part!r} failed: {one_line(exc)}") from exc
        except Exception as exc:
            raise TaskError(f"importing {module_part!r} failed: {one_line(exc)}") from exc
        return module
    # A module in the working directory imports, as with `python -m` (a console script's
    # sys.path does not hold the working directory).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name and module_part.startswith(exc.name):
            raise UsageError(
                f"module {module_part!r} not found; expected `package.module:function` "
                "or `path/to/file.py:function`"
            ) from exc
        raise TaskError(f"importing {module_part!r} failed: {one_line(exc)}") from exc
    except SyntaxError as exc:
        raise UsageError(f"importing {module_part!r} failed: {one_line(exc)}") from exc
    except Exception as exc:
        raise TaskError(f"importing {module_part!r} failed: {one_line(exc)}") from exc


def load_task(spec: str | None) -> tuple[Task, str]:
    """Resolve ``spec`` to a Task and a display name.

    ``spec`` is a built-in example name (``digits-mlp``), ``package.module:function`` or
    ``path/to/file.py:function``; ``None`` means the default example.
    """
    from . import examples

    if spec is None:
        spec = examples.DEFAULT
    if spec in examples.EXAMPLES:
        factory: Callable[[], Any] = examples.EXAMPLES[spec]
        return _build(factory, spec), spec
    if ":" not in spec:
        names = ", ".join(sorted(examples.EXAMPLES))
        raise UsageError(
            f"task {spec!r} is neither a built-in example ({names}) nor `module:function`"
        )
    module_part, _, func_name = spec.rpartition(":")
    if not module_part.strip() or not func_name.strip():
        raise UsageError(f"task {spec!r}: expected `module:function` or `path/to/file.py:"
                         "function`, with both parts")
    module = _import_target(module_part)
    if not hasattr(module, func_name):
        raise UsageError(
            f"`{func_name}` not found in `{module_part}`; expected `module:function`"
        )
    factory = getattr(module, func_name)
    if not callable(factory):
        raise UsageError(f"`{spec}` is not callable; it must be a function returning a Task")
    return _build(factory, spec), spec


def _build(factory: Callable[[], Any], spec: str) -> Task:
    import inspect

    try:  # the contract: a zero-argument callable; one that needs arguments is a usage error
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise UsageError(f"`{spec}` needs arguments ({one_line(exc)}); the entry point must be "
                         "a function that takes none and returns a Task") from exc
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    try:
        task = factory()
    except Exception as exc:
        raise TaskError(f"`{spec}` raised while building the task: {one_line(exc)}") from exc
    if not isinstance(task, Task):
        raise TaskError(
            f"`{spec}` returned {type(task).__name__}, not a bsselect.Task"
        )
    return task


def validate_task(task: Task, on_meta: bool = False, precision: Any = None) -> None:
    """Check the contract on real data: non-empty dataset, (input, target) items, and one
    forward + loss on a batch of two. Raises TaskError with the underlying error in one line.

    ``on_meta=True`` builds the model and runs the forward as the simulation does (on fake
    tensors, with the batch's integer and boolean tensors real), so that a model too large for
    this machine (a 7B ``check``) is validated without allocating it; where that fails and
    the model is small, one real step under ``precision`` (the run's ``Precision``; None:
    fp32) tells the task's own error from the simulation's limit. ``precision`` fp16 also
    needs trainable parameters GradScaler can unscale (``_check_precision``).
    """
    from .memory.values import clear_value_shaped
    from .step import collate

    clear_value_shaped()  # the forward on fake tensors below records what its shapes read
    if not callable(task.model):
        raise TaskError("Task.model must be a zero-argument callable that builds an nn.Module")
    if not callable(task.loss_fn):
        raise TaskError("Task.loss_fn must be callable as loss_fn(output, target)")
    if task.lr <= 0 or task.base_batch_size < 1:
        raise TaskError("Task.lr must be > 0 and Task.base_batch_size >= 1")
    _check_builds_new_models(task)
    for name in ("train_data", "val_data"):
        data = getattr(task, name)
        if data is None:
            continue
        try:
            n = len(data)
        except TypeError as exc:
            if not hasattr(data, "__len__"):
                raise TaskError(f"Task.{name} must be a map-style Dataset with __len__") from exc
            raise TaskError(f"len(Task.{name}) failed: {one_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - len() refuses a negative __len__ (ValueError)
            raise TaskError(f"len(Task.{name}) failed: {one_line(exc)}") from exc
        if n == 0:
            raise TaskError(f"Task.{name} is empty")
        try:
            item = data[0]
        except Exception as exc:
            raise TaskError(f"reading Task.{name}[0] failed: {one_line(exc)}") from exc
        if task.collate_fn is None and not (isinstance(item, (tuple, list)) and len(item) == 2):
            what = (f"a {len(item)}-tuple" if isinstance(item, (tuple, list))
                    else f"a {type(item).__name__}")
            raise TaskError(
                f"Task.{name}[0] is {what}; without a collate_fn, items must be (input, "
                "target) pairs. Give Task.collate_fn that turns a list of items into "
                "(inputs, targets) to use any other item type"
            )
    n = min(2, len(task.train_data))
    try:
        x, y = collate(task, [task.train_data[i] for i in range(n)])
    except Exception as exc:
        raise TaskError(f"collating a batch failed: {one_line(exc)}") from exc
    if on_meta:  # as the simulation runs it: fake tensors, the batch's integers real
        from .memory.fake import fake_step

        from .memory.simulated import SIMULATION_HINT

        try:
            with fake_step(task, (x, y)) as (model, (x, y), known):
                _check_precision(model, precision)
                _check_forward(task, model, x, y, known)
        except CannotSimulate:
            raise
        except RealTooError:
            raise
        except TaskError as exc:
            from .memory.values import IndexOutOfRange

            if isinstance(exc.__cause__, IndexOutOfRange):  # a real step fails the same way
                raise
            # A real step on two items, where the model is small enough: when it fails too,
            # its error is the user's (a float target for cross-entropy reads as a gather's
            # dtype on fake tensors), and "the simulation cannot run it" would be untrue.
            from .memory.real_check import check_real_step

            check_real_step(task, precision)
            raise TaskError(f"{exc}{SIMULATION_HINT}") from exc
        return
    try:
        model = task.model()
    except Exception as exc:
        raise TaskError(f"building the model failed: {one_line(exc)}") from exc
    _check_precision(model, precision)
    _check_forward(task, model, x, y)
    _check_mean_reduction(task, model)
    _check_evaluation(task, model)


FRESH = "bsselect_builds_fresh"  # set on the adapters' factories: a copy per call, not checked


def builds_fresh(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``factory``, marked as building a new model on every call (the adapters' copies of a
    user's instance), so that ``validate_task`` does not build it twice to check: a copy of
    a large instance costs its whole memory."""
    setattr(factory, FRESH, True)
    return factory


def same_freshness(build: Callable[[], Any], wrapper: Callable[[], nn.Module]
                   ) -> Callable[[], nn.Module]:
    """``wrapper`` (which calls ``build``), marked fresh when ``build`` is."""
    return builds_fresh(wrapper) if getattr(build, FRESH, False) else wrapper


def _check_builds_new_models(task: Task) -> None:
    """TaskError when two calls of ``Task.model`` share a module or a tensor: ``lambda: net``
    (the user's live model) or a factory around a pre-built backbone. Every command builds the
    model afresh and changes it — trains it, turns it into fake tensors for a simulation — so
    a shared one would be the user's own model, changed behind their back. Built twice on the
    ``meta`` device (nothing allocated; a 70B Llama in 0.13 s); a factory that cannot build
    there constructs its model, and is not checked."""
    if getattr(task.model, FRESH, False):
        return
    try:
        with torch.device("meta"):
            first, second = task.model(), task.model()
    except Exception:  # noqa: BLE001 - it constructs; the real build reports real errors
        return
    if not (isinstance(first, nn.Module) and isinstance(second, nn.Module)):
        return  # the real build says what is wrong with it
    mine = {id(m) for m in first.modules()}
    mine.update(id(t) for t in first.parameters())
    mine.update(id(t) for t in first.buffers())
    shared = (first is second or any(id(m) in mine for m in second.modules())
              or any(id(t) in mine for t in (*second.parameters(), *second.buffers())))
    if shared:
        what = ("the same model" if first is second else
                "models that share modules or tensors (a pre-built part)")
        raise TaskError(
            f"Task.model returned {what} on two calls: it must build a new model each time "
            "(`lambda: MyNet()`, or `lambda: copy.deepcopy(net)`, not `lambda: net`), "
            "because bsselect trains and changes the model it builds and would change yours")


ON_META = ("Task.model() builds the model on the meta device, without weights, and this "
           "command trains it: build it on the CPU (probe and check simulate it as it is)")


def on_meta(model: Any) -> bool:
    """Whether any of the module's parameters or buffers is on the meta device."""
    return isinstance(model, nn.Module) and any(
        t.is_meta for t in (*model.parameters(), *model.buffers()))


def check_trainable(model: nn.Module) -> None:
    """TaskError, in the line every command says it, when no parameter trains."""
    if not any(p.requires_grad for p in model.parameters()):
        raise TaskError("the model has no trainable parameters (none, or all frozen): there "
                        "is nothing to train")


def _failed(what: str, exc: Exception, known: Any = None) -> TaskError:
    """``known``: the simulation's RealWhereKnown, whose refusal (``values.refusal_behind``)
    is the reason where the task's code wrapped or swallowed it."""
    from .memory.values import refusal_behind

    refusal = refusal_behind(exc, known)
    if refusal is not None:
        return CannotSimulate(f"{what}: {one_line(refusal)}")
    return TaskError(f"{what}: {one_line(exc)}")


def _check_forward(task: Task, model: Any, x: Any, y: Any, known: Any = None) -> None:
    if not isinstance(model, nn.Module):
        raise TaskError(f"Task.model() returned {type(model).__name__}, not an nn.Module")
    if on_meta(model):
        raise TaskError(ON_META)
    check_trainable(model)
    try:
        out = model(x)
    except Exception as exc:
        raise _failed("the model's forward failed", exc, known) from exc
    try:
        loss = task.loss_fn(out, y)
    except Exception as exc:
        raise _failed("the loss failed", exc, known) from exc
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise TaskError("Task.loss_fn must return a scalar tensor (the MEAN over the batch)")
    if loss.dim():  # shape [1]: a training step sums it into a 0-d total and fails there
        raise TaskError(f"Task.loss_fn returned a tensor of shape {list(loss.shape)}; it must be "
                        "a 0-d scalar (the MEAN over the batch): .mean(), or .squeeze() it")
    if not loss.requires_grad:
        if not torch.is_grad_enabled():  # the cause, not a guess at detaching (review)
            raise TaskError(GRADIENTS_OFF)
        raise TaskError("the loss does not require grad; is the model's output detached?")
    _check_optimizer(task, model)


def _check_evaluation(task: Task, model: nn.Module) -> None:
    """TaskError, before anything trains, when evaluation fails: the forward and loss on two
    items of ``val_data`` (the trials' validation; a sweep found a broken one only after
    training every trial, review), and ``Task.metric`` returning a number (on those items,
    or on training items without ``val_data``)."""
    from .step import collate

    data = task.val_data if task.val_data is not None else task.train_data
    if task.val_data is None and task.metric is None:
        return
    where = "Task.val_data" if task.val_data is not None else "Task.train_data"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                x, y = collate(task, [data[i] for i in range(min(2, len(data)))])  # type: ignore[arg-type]
                out = model(x)
                task.loss_fn(out, y)
            except Exception as exc:
                raise TaskError(f"evaluating on {where} fails (the forward and loss on 2 of its "
                                f"items): {one_line(exc)}") from exc
            if task.metric is None:
                return
            try:
                value = task.metric(out, y)
            except Exception as exc:
                raise TaskError(f"Task.metric fails on 2 items of {where}: "
                                f"{one_line(exc)}") from exc
            try:
                float(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TaskError(f"Task.metric must return a number (higher is better), got "
                                f"{type(value).__name__}") from exc
    finally:
        model.train(was_training)


SUM_ITEMS = 4  # items of the reduction check: their batch's loss against their own losses


def _check_mean_reduction(task: Task, model: nn.Module) -> None:
    """TaskError when ``Task.loss_fn`` sums over the batch instead of averaging (the
    contract: the MEAN). A sum scales the gradient with the batch, so every lr the sweep
    scales is b times too large, and ``noise`` reports |G|^2 and tr(Sigma) scaled by its batch
    size (review: |G|^2 279 for 0.279, and 16x apart between two ``--b-small`` values).

    In eval mode, without gradients (dropout off, batch norm on its running statistics, so
    each item's loss is its own), the loss of ``SUM_ITEMS`` items together is their mean
    loss for a mean and ``SUM_ITEMS`` times it for a sum, both exactly up to rounding. Any
    other relation (a contrastive loss, whose one-item loss is 0; token means over rows of
    different lengths) is not a sum and passes. Where the model cannot take one item at a
    time (a ``.squeeze()`` that makes a batch of one 0-d: review, a summed BCE passed and
    every lr was b times too large), the items are taken in pairs; where it cannot take those
    either, the check is skipped."""
    n = min(SUM_ITEMS, len(task.train_data))  # type: ignore[arg-type]
    if n < 2:
        return
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            items = [task.train_data[i] for i in range(n)]
            together = float(task.loss_fn(*_forward(task, model, items)))
            grouped = _group_losses(task, model, items)
    except Exception:  # noqa: BLE001 - the batch itself fails: the step's own check says why
        return
    finally:
        model.train(was_training)
    if grouped is None:
        return
    size, groups = grouped
    mean_group = sum(groups) / len(groups)
    if not (mean_group > 0 and math.isfinite(together)):
        return
    times = len(groups)  # a sum over the n items is the groups' sum, len(groups) times their mean
    if abs(together - times * mean_group) <= 1e-3 * times * mean_group:
        mean_item = mean_group / size  # a group's summed loss over its items
        raise TaskError(
            f"Task.loss_fn sums over the batch: {n} items give a loss of {together:.4g}, {n}x "
            f"their mean loss {mean_item:.4g}; it must be the MEAN over the batch (e.g. "
            "reduction='mean', or divide the sum by the batch size), or every learning rate "
            "and gradient norm bsselect measures scales with the batch size")


def _group_losses(task: Task, model: nn.Module, items: list) -> tuple[int, list[float]] | None:
    """(group size, each group's loss): ``items`` one at a time, else in pairs; None where
    the model takes neither (or there are too few items for two groups)."""
    n = len(items)
    for size in (1, 2):
        if n < 2 * size:
            return None
        try:
            return size, [float(task.loss_fn(*_forward(task, model, items[i:i + size])))
                          for i in range(0, n - n % size, size)]
        except Exception:  # noqa: BLE001 - a batch this small the model cannot take
            continue
    return None


def _forward(task: Task, model: nn.Module, items: list) -> tuple[Any, Any]:
    """The model's output on ``items`` collated, and their targets."""
    from .step import collate

    x, y = collate(task, items)
    return model(x), y


def _check_precision(model: nn.Module, precision: Any) -> None:
    """An error a real step meets alike (the task's, not the simulation's) when ``precision``
    cannot train the model's parameters: fp16 scales the loss with GradScaler, which refuses
    float16 gradients ("Attempting to unscale FP16 gradients"), so the parameters it updates
    must be float32 (autocast computes in fp16)."""
    if precision is None or not precision.scales_loss:
        return
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise RealTooError(
            f"--precision fp16 scales the loss with GradScaler, which cannot unscale float16 "
            f"gradients, and {len(half)} of the model's trainable parameters are float16 (first: "
            f"{half[0]}): keep the parameters in float32 (autocast runs the forward in fp16), "
            "or use --precision bf16")


def _check_optimizer(task: Task, model: nn.Module) -> None:
    """TaskError for an optimizer whose ``step`` needs a closure (LBFGS): every command steps
    it as a training loop does, ``optimizer.step()`` once per batch, and a real step fails
    the same way as a simulated one (whose message sent users to real steps)."""
    import inspect

    try:
        opt = task.make_optimizer(model.parameters(), task.lr)
    except TaskError as exc:  # not an optimizer: the same for real steps
        raise RealTooError(str(exc)) from exc
    except Exception:  # noqa: BLE001 - the step builds it again and says what is wrong
        return
    try:
        closure = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise RealTooError(
            f"{type(opt).__name__}.step needs a closure (it re-evaluates the loss itself): "
            "bsselect steps the optimizer as a training loop does, optimizer.step() once "
            "per batch, so closure optimizers (LBFGS) are not supported")
