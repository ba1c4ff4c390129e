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
import pickle
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


@dataclass(frozen=True)
class Branch:
    """A checkpoint matched to the task's model: the state every trial starts from."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    warnings: tuple[str, ...] = ()


def digest(path: str | Path) -> str:
    """SHA-256 of the checkpoint (a directory: of its weight and optimizer files, by name):
    what a journal keys its trials on, so ``--resume`` never mixes two checkpoints."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.name in (*_HF_WEIGHTS, "optimizer.pt"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as exc:
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
        first = (detail.group(1) if detail else
                 text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
        raise UsageError(f"cannot read {path} as a PyTorch checkpoint (torch.save's format): "
                         f"{first.strip()[:200]}") from exc


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in value.items()))


def _step_of(raw: dict) -> int | None:
    for key in ("global_step", "step", "steps"):
        value = raw.get(key)
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
    return model, optimizer, "dict", _step_of(raw)


def _hf_directory(path: Path) -> tuple[dict, dict | None, str, int | None]:
    weights = next((path / n for n in _HF_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise UsageError(f"{path} is a directory without {' or '.join(_HF_WEIGHTS)}: not a "
                         "Hugging Face Trainer checkpoint; pass a checkpoint file")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        model = load_file(str(weights), device="cpu")
    else:
        model = _torch_load(weights)
    opt_file = path / "optimizer.pt"
    optimizer = _torch_load(opt_file) if opt_file.is_file() else None
    step = None
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        import json

        try:
            step = json.loads(state_file.read_text()).get("global_step")
        except (ValueError, OSError):
            step = None
    return model, optimizer, "hf-trainer", step if isinstance(step, int) else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (file or Hugging Face checkpoint directory); UsageError when it is
    missing, unreadable or not one of the formats above."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"--from-checkpoint {path}: no such file or directory")
    if p.is_dir():
        model, optimizer, fmt, step = _hf_directory(p)
    else:
        model, optimizer, fmt, step = _from_dict(p, _torch_load(p))
    if optimizer is not None and not (isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        raise UsageError(f"{path}: its optimizer entry is not an optimizer.state_dict() "
                         "(no 'state' and 'param_groups')")
    return Checkpoint(str(p), digest(p), model, optimizer, fmt, step)


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


def _rename(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its keys renamed to the model's, by stripping a prefix every checkpoint
    key shares and adding one every model key shares; missing keys allowed only where the
    model ties them to a present one."""
    want = set(model.state_dict())
    tied = _tied(model)
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    for strip in _prefixes(set(state)):
        for add in _prefixes(want):
            renamed = {add + k[len(strip):]: v for k, v in state.items()}
            missing = want - set(renamed)
            if set(renamed) <= want and all(tied.get(k, set()) & set(renamed) for k in missing):
                return renamed
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


def _misshapen_state(optimizer: torch.optim.Optimizer) -> str | None:
    """A per-parameter state tensor (momentum, Adam's moments) whose shape is not its
    parameter's: ``load_state_dict`` matches parameters by position only."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0
                        and value.shape != param.shape):
                    return (f"a {name} of shape {tuple(value.shape)} for a parameter of shape "
                            f"{tuple(param.shape)}")
    return None


def branch_from(checkpoint: Checkpoint, model_factory: Callable[[], nn.Module],
                make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
                lr: float) -> Branch:
    """Match ``checkpoint`` to a fresh model from ``model_factory`` and an optimizer from
    ``make_optimizer``: the model's state_dict with the checkpoint's weights (shapes checked)
    and the optimizer state, loaded once to prove it fits. An optimizer state of another
    shape (other parameter groups, e.g. Hugging Face Trainer's weight-decay split) is left out
    with a warning: trials then start a fresh optimizer at the checkpoint's weights."""
    model = model_factory()
    renamed = _rename(model, checkpoint.model_state)
    try:
        model.load_state_dict(renamed, strict=False)
    except RuntimeError as exc:  # shapes
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise UsageError("the checkpoint's tensors do not fit the task's model: "
                         + ("; ".join(lines[:2]) or str(exc).splitlines()[0])) from exc
    warnings: list[str] = []
    optimizer_state = None
    if checkpoint.optimizer_state is None:
        warnings.append(f"{checkpoint.path} holds no optimizer state: every trial starts a "
                        "fresh optimizer at the checkpoint's weights (momentum and Adam's "
                        "moments at zero)")
    else:
        optimizer = make_optimizer(model.parameters(), lr)
        try:
            optimizer.load_state_dict(copy.deepcopy(checkpoint.optimizer_state))
        except (ValueError, KeyError, RuntimeError) as exc:
            warnings.append(f"the optimizer state in {checkpoint.path} does not fit the task's "
                            f"optimizer ({str(exc).splitlines()[0][:120]}): every trial starts "
                            "a fresh optimizer at the checkpoint's weights")
        else:
            wrong = _misshapen_state(optimizer)
            if wrong:
                warnings.append(f"the optimizer state in {checkpoint.path} does not fit the "
                                f"task's parameters ({wrong}): every trial starts a fresh "
                                "optimizer at the checkpoint's weights")
            else:
                optimizer_state = copy.deepcopy(optimizer.state_dict())
            del optimizer
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Branch(state, optimizer_state, tuple(warnings))
