"""A user's training checkpoint as the point a sweep's trials branch from (``--from-checkpoint``).

The noise scale that decides the best batch size grows as training goes on (McCandlish et al.
2018; Merrill et al. 2025), so trials from initialisation answer for the start of a run. From a
checkpoint of the user's own run they answer for where that run is. Read, never executed:
every file is loaded with ``torch.load(weights_only=True)`` (tensors and plain containers
only), so a checkpoint cannot run code.

Formats, recognised by their keys:

- ``torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, PATH)``;
  also ``model_state_dict`` / ``optimizer_state_dict`` (PyTorch's tutorial names);
- a Lightning ``.ckpt`` (``state_dict``, ``optimizer_states``);
- a Hugging Face ``Trainer`` checkpoint directory (``model.safetensors`` or
  ``pytorch_model.bin``, and ``optimizer.pt``);
- a bare ``model.state_dict()`` (no optimizer state: the trials start a fresh optimizer).

Parameter names may differ from the task's model by a leading module prefix (Lightning's
``model.``, bsselect's own wrappers ``module.`` / ``model.``); weights tied in the model may be
stored once (safetensors drops the copy). Anything else that does not match is a usage error
naming the keys, never a partial load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pathlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import UsageError

_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds, before it is matched to a model."""

    path: str
    sha256: str
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    format: str                      # "dict", "lightning", "hf-trainer" or "state_dict"
    step: int | None = None          # the run's global step, where the file says it

    def describe(self, optimizer_state: bool, **extra: Any) -> dict[str, Any]:
        """The JSON's ``from_checkpoint``: which file, whether its optimizer state was used,
        and a command's own fields (``extra``)."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format,
                "step": self.step, "optimizer_state": optimizer_state, **extra}


@dataclass(frozen=True)
class Branch:
    """A checkpoint matched to the task's model: the state every trial starts from."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    warnings: tuple[str, ...] = ()   # about the optimizer state (what training starts from)
    renamed: str | None = None       # how the parameter names were matched, when not obvious
    run_lr: float | None = None      # the file's lr as the base lr to scale from (``--lr``)
    run_lr_zero: bool = False        # every group of the file's optimizer at lr 0

    @property
    def messages(self) -> tuple[str, ...]:
        """Everything to tell the user: the renaming first, then the optimizer's."""
        return ((self.renamed,) if self.renamed else ()) + self.warnings


class _Hasher:
    """SHA-256 of every file a checkpoint is loaded from (a directory: each file's name, then
    its bytes; a single file: its bytes, what ``sha256sum`` prints), streamed, so that memory
    holds only the loaded tensors. A file rewritten between hashing and loading (a live run's
    ``last.ckpt``) is refused: the key must be of the bytes the trials used."""

    def __init__(self, directory: bool) -> None:
        self.sha = hashlib.sha256()
        self.directory = directory

    def hash(self, path: Path) -> tuple[int, int]:
        try:
            before = path.stat()
            if self.directory:
                self.sha.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    self.sha.update(chunk)
        except OSError as exc:
            raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None
        return before.st_size, before.st_mtime_ns

    @staticmethod
    def unchanged(path: Path, stamp: tuple[int, int]) -> None:
        now = path.stat()
        if (now.st_size, now.st_mtime_ns) != stamp:
            raise UsageError(f"{path} changed while bsselect read it (a run still writing "
                             "it?); pass a checkpoint that is no longer being written")


_SAFE_GLOBALS = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                 pathlib.PureWindowsPath)  # Lightning's save_hyperparameters often holds paths


def _load(path: Path) -> Any:
    with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
        try:  # memory-mapped: the file's pages, not a second copy of it
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a legacy file


def _torch_load(path: Path, hasher: _Hasher) -> Any:
    stamp = hasher.hash(path)
    try:
        data = _load(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is the file's
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if what or "Unsupported class" in text:
            raise UsageError(
                f"{path} holds objects other than tensors and plain containers"
                + (f" (it names {what.group(1)})" if what else "")
                + ", and bsselect loads checkpoints without running code from them: save "
                "{'model': model.state_dict(), 'optimizer': optimizer.state_dict()} with "
                "torch.save and pass that file") from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        first = detail.group(1).strip() if detail else (
            text.strip().splitlines()[0] if text.strip() else "")
        if len(first) < 12 or isinstance(exc, (KeyError, IndexError)):
            first = "not a file torch.save wrote"
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint (torch.save's format): "
                         f"{first[:200]}") from exc
    hasher.unchanged(path, stamp)
    return data


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in value.items()))


def _step_of(raw: dict) -> int | None:
    for key in ("global_step", "step", "steps"):
        value = raw.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
                value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            value = int(value.item())  # a step counter kept as a tensor
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _from_dict(path: Path, raw: Any) -> tuple[dict, dict | None, str, int | None]:
    if _is_state_dict(raw):
        return raw, None, "state_dict", None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a state_dict or a dict "
                         "with 'model' and 'optimizer' state_dicts")
    if "optimizer_states" in raw and _is_state_dict(raw.get("state_dict")):  # Lightning
        states = raw["optimizer_states"] or []
        if len(states) > 1:
            raise UsageError(f"{path} holds {len(states)} optimizers' states (Lightning); "
                             "bsselect trains with one")
        return raw["state_dict"], (states[0] if states else None), "lightning", _step_of(raw)
    model = next((raw[k] for k in _MODEL_KEYS if _is_state_dict(raw.get(k))), None)
    if model is None:
        keys = ", ".join(repr(k) for k in list(raw)[:8])
        raise UsageError(f"{path} has no model state_dict under 'model', 'model_state_dict' "
                         f"or 'state_dict' (its keys: {keys})")
    optimizer = next((raw[k] for k in _OPTIMIZER_KEYS if isinstance(raw.get(k), dict)), None)
    other = next((raw[k] for k in _OPTIMIZER_KEYS if raw.get(k) is not None), None)
    if optimizer is None and other is not None:
        raise UsageError(f"{path}: its optimizer entry is a {type(other).__name__}, not an "
                         "optimizer.state_dict()")
    return model, optimizer, "dict", _step_of(raw)


def _weights_file(path: Path, hasher: _Hasher) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        stamp = hasher.hash(path)
        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - the file's problem
            raise UsageError(f"cannot read {path} as safetensors: {exc}") from exc
        hasher.unchanged(path, stamp)
        return tensors
    return _torch_load(path, hasher)


def _hf_directory(path: Path, hasher: _Hasher) -> tuple[dict, dict | None, str, int | None]:
    weights = next((path / n for n in _HF_WEIGHTS if (path / n).is_file()), None)
    index = next((path / f"{n}.index.json" for n in _HF_WEIGHTS
                  if (path / f"{n}.index.json").is_file()), None)
    if weights is not None:
        model = _weights_file(weights, hasher)
    elif index is not None:  # a sharded checkpoint: the index names each tensor's shard
        try:
            hasher.hash(index)
            weight_map = json.loads(index.read_text()).get("weight_map")
            shards = sorted(set(weight_map.values()))
        except (ValueError, AttributeError, TypeError) as exc:
            raise UsageError(f"cannot read {index} (a sharded checkpoint's index): "
                             f"{exc}") from exc
        model = {}
        for shard in shards:
            model.update(_weights_file(path / shard, hasher))
    else:
        inside = [c.name for c in _run_listing(path) or ()]
        if inside:
            raise UsageError(f"{path} is a directory of {len(inside)} checkpoints ("
                             + ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
                             + "), not one: pass one of them")
        raise UsageError(f"{path} is a directory without {' or '.join(_HF_WEIGHTS)} (or their "
                         "sharded .index.json): not a Hugging Face Trainer checkpoint; pass a "
                         "checkpoint file")
    opt_file = path / "optimizer.pt"
    optimizer = _torch_load(opt_file, hasher) if opt_file.is_file() else None
    step = None
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        try:
            step = json.loads(state_file.read_text()).get("global_step")
        except (ValueError, OSError, AttributeError):
            step = None
    return model, optimizer, "hf-trainer", step if isinstance(step, int) else None


_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def is_hf_checkpoint(path: Path) -> bool:
    """A Hugging Face Trainer checkpoint directory: its weights, or their sharded index."""
    return path.is_dir() and any((path / n).is_file() or (path / f"{n}.index.json").is_file()
                                 for n in _HF_WEIGHTS)


# What a Hugging Face Trainer writes beside its weights: never a checkpoint of the model
_HF_AUXILIARY = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|"
                           r"rng_state(_\d+)?\.pth)$")


def _run_listing(p: Path) -> list[Path] | None:
    """The checkpoints one level down in directory ``p`` (``checkpoints_in``'s rule), or None
    when ``p`` is itself one Hugging Face checkpoint."""
    subdirs = sorted(c for c in p.iterdir() if is_hf_checkpoint(c))
    if subdirs:
        return subdirs
    if is_hf_checkpoint(p):
        return None
    return sorted(c for c in p.iterdir() if c.is_file() and c.suffix in _CHECKPOINT_SUFFIXES
                  and not _HF_AUXILIARY.match(c.name))


def checkpoints_in(path: str | Path) -> list[Path] | None:
    """The checkpoints a directory of a run holds, one level down, sorted by name: a Hugging
    Face Trainer ``output_dir``'s ``checkpoint-N/`` directories (only those, where it has any:
    a final ``save_model`` beside them is not one of the run's checkpoints), else a Lightning
    ``dirpath``'s ``.ckpt`` files and ``.pt``/``.pth``/``.bin``/``.safetensors`` files (not the
    Trainer's ``training_args.bin``, ``optimizer.pt``...). None when ``path`` is not a
    directory or is itself one Hugging Face checkpoint; UsageError when it holds none."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    found = _run_listing(p)
    if found is None:
        return None
    if not found:
        raise UsageError(f"{path} holds no checkpoints (no checkpoint-N/ directory with "
                         f"{' or '.join(_HF_WEIGHTS)}, no {', '.join(_CHECKPOINT_SUFFIXES)} "
                         "file): pass checkpoint files")
    return found


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (file or Hugging Face checkpoint directory); UsageError when it is
    missing, unreadable or not one of the formats above."""
    if not isinstance(path, (str, Path)):  # a list where one path goes (review)
        raise UsageError(f"--from-checkpoint takes one path, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        base, at, _ = str(path).rpartition("@")  # PATH@STEP: schedule's form
        hint = (f" (PATH@STEP names a step for `schedule`'s checkpoints only; here the file "
                f"is {base})" if at and Path(base).expanduser().exists() else "")
        raise UsageError(f"--from-checkpoint {path}: no such file or directory{hint}")
    hasher = _Hasher(p.is_dir())
    if p.is_dir():
        model, optimizer, fmt, step = _hf_directory(p, hasher)
    else:
        model, optimizer, fmt, step = _from_dict(p, _torch_load(p, hasher))
    if optimizer is not None and not (isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        raise UsageError(f"{path}: its optimizer entry is not an optimizer.state_dict() "
                         "(no 'state' and 'param_groups')")
    return Checkpoint(str(p), hasher.sha.hexdigest(), model, optimizer, fmt, step)


def _prefixes(keys: set[str]) -> list[str]:
    """'' and the leading module paths (up to two levels) that every key shares."""
    out = [""]
    for depth in (1, 2):
        heads = {".".join(k.split(".")[:depth]) + "." for k in keys if k.count(".") >= depth}
        if len(heads) == 1 and all(k.startswith(next(iter(heads))) for k in keys):
            out.append(next(iter(heads)))
    return out


def _tied(model: nn.Module) -> dict[str, set[str]]:
    """Each state_dict key -> the other keys whose tensor shares its storage."""
    by_ptr: dict[int, set[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            by_ptr.setdefault(v.untyped_storage().data_ptr(), set()).add(k)
    return {k: group - {k} for group in by_ptr.values() for k in group}


# Prefixes that wrappers add (DDP/DataParallel, torch.compile, Lightning's fabric, bsselect's
# own adapters and a LightningModule's usual attribute): renamed without a word.
_WRAPPERS = ("", "module.", "model.", "_orig_mod.", "_forward_module.")


def _rename(model: nn.Module, state: dict[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` with its keys renamed to the model's, by stripping a prefix every checkpoint
    key shares and adding one every model key shares; missing keys allowed only where the
    model ties them to a present one. Also a note when the renaming was not a known wrapper's
    prefix (the user should know that ``teacher.*`` went into ``student.*``)."""
    want = set(model.state_dict())
    tied = _tied(model)
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    for strip in _prefixes(set(state)):
        for add in _prefixes(want):
            renamed = {add + k[len(strip):]: v for k, v in state.items()}
            missing = want - set(renamed)
            if set(renamed) <= want and all(tied.get(k, set()) & set(renamed) for k in missing):
                note = None if strip in _WRAPPERS and add in _WRAPPERS else (
                    f"the checkpoint's parameter names were matched to the model's by "
                    f"renaming {strip or '(no prefix)'!s}* to {add or '(no prefix)'!s}*")
                return renamed, note
            overlap = len(want & set(renamed))
            if best is None or overlap > best[0]:
                best = (overlap, renamed)
    assert best is not None
    have = set(best[1])  # the differences under the alignment that matched the most keys
    missing = sorted(k for k in want - have if not tied.get(k, set()) & have)
    extra = sorted(have - want)
    raise UsageError(
        "the checkpoint's parameters do not match the task's model: "
        + "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})" if extra else "")
            if part)
        + " — pass a checkpoint of the same model")


# Group entries that are not constructor settings of the update
_NOT_ARGS = ("params", "initial_lr", "differentiable", "fused", "foreach", "capturable")


def _state_keys(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                ndim: int) -> dict[str, bool] | None:
    """The per-parameter state the task's optimizer keeps for a parameter of ``ndim``
    dimensions in ``group``, as name -> whether that tensor has the parameter's shape (SGD
    with momentum: momentum_buffer; Adam: step, exp_avg, exp_avg_sq; a factored optimizer's
    row and column statistics do not), from one zero-gradient step of the same class with
    that group's settings on a small parameter; None when the class cannot be probed."""
    try:
        probe = nn.Parameter(torch.zeros((2,) * max(ndim, 1)))
        settings = {k: v for k, v in group.items()
                    if k not in _NOT_ARGS and not k.startswith("bsselect")}
        twin = type(optimizer)([probe], **settings)
        probe.grad = torch.zeros_like(probe)
        twin.step()
        return {name: isinstance(value, torch.Tensor) and value.shape == probe.shape
                for name, value in twin.state[probe].items()}
    except Exception:  # noqa: BLE001 - a custom optimizer: no check of names, shapes checked
        return None


def _optimizer_fit(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """Why ``saved`` (an optimizer.state_dict()) cannot give ``optimizer`` its per-parameter
    state, or None. Groups must hold the same number of parameters in the same order (the
    state is keyed by position), the state must be the same kind (an Adam state does not
    make an SGD's momentum), and each state tensor that has its parameter's shape in the task's
    optimizer must have it here (without a probe: every tensor of the parameter's rank)."""
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g.get("params", ())) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        return (f"its parameter groups hold {saved_sizes} parameters, the task optimizer's "
                f"{sizes}")
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    probed: dict[tuple[int, int], dict[str, bool] | None] = {}
    for (param, group), index in zip(params, ids):
        entry = saved["state"].get(index)
        if not isinstance(entry, dict):
            continue  # a parameter that never had a gradient keeps no state
        key = (id(group), param.dim())
        if key not in probed:
            probed[key] = _state_keys(optimizer, group, param.dim())
        expected = probed[key]
        if expected is not None and set(entry) != set(expected):
            keeps = ", ".join(sorted(expected)) or "no state"
            return (f"it keeps {', '.join(sorted(entry)) or 'no state'} per parameter, the "
                    f"task's {type(optimizer).__name__} with its settings keeps {keeps}: "
                    "another optimizer's state, or a setting that changes it (momentum, "
                    "amsgrad)")
        for name, value in entry.items():
            shaped = (expected[name] if expected is not None else
                      isinstance(value, torch.Tensor) and value.dim() == param.dim() > 0)
            if shaped and isinstance(value, torch.Tensor) and value.shape != param.shape:
                return (f"a {name} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}")
    return None


_NOT_SETTINGS = _NOT_ARGS + ("lr",)


def _settings_differ(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> list[str]:
    """The optimizer settings (momentum, weight decay, betas ...) in which the checkpoint's
    groups differ from the task's: the task's are kept."""
    out = []
    for mine, theirs in zip(optimizer.param_groups, saved["param_groups"]):
        for key, value in mine.items():
            if key in _NOT_SETTINGS or key.startswith("bsselect") or key not in theirs:
                continue
            other = theirs[key]
            value = list(value) if isinstance(value, tuple) else value
            other = list(other) if isinstance(other, tuple) else other
            if value != other and key not in out:
                out.append(key)
    return out


def _lr(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    # A negative lr is no lr a run trains at: unreadable, not a base lr of -0.1 (review)
    return float(value) if ok and math.isfinite(value) and value >= 0 else None


def _file_lrs(saved: dict[str, Any]) -> list[float | None]:
    """The lr of each parameter group of a saved optimizer state (None where unreadable)."""
    return [_lr(g.get("lr")) for g in saved.get("param_groups", ()) if isinstance(g, dict)]


def base_lr_of_run(optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                   lr: float) -> float | None:
    """The checkpoint's lr expressed as the base lr the trials scale from (what ``--lr``
    takes): the file's lr over the task optimizer's, in the first group where both are > 0
    (a frozen group says nothing), times ``lr``. None when the file has no usable lr."""
    theirs = _file_lrs(saved)
    ours = [_lr(g.get("lr")) for g in optimizer.param_groups]
    pairs = list(zip(theirs, ours)) if len(theirs) == len(ours) else [
        (next((t for t in theirs if t), None), next((o for o in ours if o), None))]
    for t, o in pairs:
        if t and o:
            return t * lr / o
    return None


def branch_from(checkpoint: Checkpoint, model_factory: Callable[[], nn.Module],
                make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
                lr: float) -> Branch:
    """Match ``checkpoint`` to a fresh model from ``model_factory`` and an optimizer from
    ``make_optimizer``: the model's state_dict with the checkpoint's weights (shapes checked),
    and the task's optimizer (its own settings and parameter groups) with the checkpoint's
    per-parameter state (momentum, Adam's moments), when that state fits (``_optimizer_fit``).
    A state that does not fit (another optimizer's; other parameter groups, e.g. Hugging Face
    Trainer's weight-decay split) is left out with a warning: trials then start a fresh
    optimizer at the checkpoint's weights."""
    model = model_factory()
    renamed, note = _rename(model, checkpoint.model_state)
    try:
        model.load_state_dict(renamed, strict=False)
    except RuntimeError as exc:  # shapes
        text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        lines = [ln for ln in text if "size mismatch" in ln]
        # torch's first line only names the model ("Error(s) in loading state_dict for
        # Sequential:"): the reasons follow it (review: meta tensors gave no reason)
        raise UsageError("the checkpoint's tensors do not fit the task's model: "
                         + "; ".join(lines[:2] or text[1:3] or text[:1])) from exc
    bad = next((name for name, param in model.named_parameters()
                if not bool(torch.isfinite(param).all())), None)  # buffers may hold -inf masks
    if bad is not None:
        raise UsageError(f"{checkpoint.path} holds non-finite weights (nan or inf in {bad}): "
                         "no trial could train from it; pass an earlier checkpoint")
    warnings: list[str] = []
    own_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    cast = sorted({(str(v.dtype), str(own_dtypes[k])) for k, v in renamed.items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and k in own_dtypes
                   and own_dtypes[k].is_floating_point and v.dtype != own_dtypes[k]})
    if cast:  # loaded in silence before (review): the run the trials stand for is not this
        warnings.append(f"{checkpoint.path} holds "
                        + ", ".join(f"{a.removeprefix('torch.')} weights" for a, _ in cast)
                        + "; they are loaded cast to the task's model ("
                        + ", ".join(sorted({b.removeprefix('torch.') for _, b in cast}))
                        + "), and the trials train in its precision (--precision for mixed)")
    optimizer_state = None
    run_lr = None
    saved = checkpoint.optimizer_state
    fresh = "every trial starts a fresh optimizer at the checkpoint's weights"
    optimizer = None if saved is None else make_optimizer(model.parameters(), lr)
    run_lr_zero = False
    if optimizer is not None:  # the run's lr is in the groups, whether or not it kept state
        run_lr = base_lr_of_run(optimizer, saved, lr)
        theirs = _file_lrs(saved)
        run_lr_zero = bool(theirs) and all(t == 0 for t in theirs)  # a schedule's last step
    if optimizer is None or not saved["state"]:
        warnings.append(f"{checkpoint.path} holds "
                        + ("no optimizer state" if saved is None else
                           "no per-parameter optimizer state (plain SGD keeps none; or it "
                           "never stepped)")
                        + f": {fresh} (momentum and Adam's moments at zero)")
        differ = [] if optimizer is None else _settings_differ(optimizer, saved)
        if differ:  # said where the state was empty too: plain SGD saved beside momentum 0.9
            warnings.append(f"the optimizer settings in {checkpoint.path} differ from the "
                            f"task's ({', '.join(differ)}): the trials keep the task's")
    else:
        why = _optimizer_fit(optimizer, saved)
        if why is None:
            own = optimizer.state_dict()
            # the checkpoint's state, by position, under the task's own groups and settings
            theirs = [i for g in saved["param_groups"] for i in g["params"]]
            mine = [i for g in own["param_groups"] for i in g["params"]]
            moved = {m: copy.deepcopy(saved["state"][t]) for m, t in zip(mine, theirs)
                     if t in saved["state"]}
            try:
                optimizer.load_state_dict({"state": moved, "param_groups": own["param_groups"]})
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        if why is not None:
            warnings.append(f"the optimizer state in {checkpoint.path} does not fit the task's "
                            f"optimizer ({why}): {fresh}")
        else:
            differ = _settings_differ(optimizer, saved)
            if differ:
                warnings.append(f"the optimizer settings in {checkpoint.path} differ from the "
                                f"task's ({', '.join(differ)}): the trials keep the task's, "
                                "with the checkpoint's momentum/moments")
            optimizer_state = copy.deepcopy(optimizer.state_dict())
    del optimizer
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Branch(state, optimizer_state, tuple(warnings), note, run_lr, run_lr_zero)
