"""The result of one short training trial at one batch size, as ``sweep --json`` reports it and
as the journal stores it (one JSON object per trial).

The first thirteen fields of ``TrialResult`` are docs/contract.md's ``sweep`` trial fields, in that
order; the rest are siblings. JSON has no NaN or infinity, so an optional measurement that is
not finite (the loss of a diverged trial) is stored as ``None`` (``null``) from the start, and
a record survives the JSON round trip unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Mapping, NamedTuple, Sequence


class TrialStatus(str, Enum):
    """How a trial ended."""

    ok = "ok"  # ran all its steps; every measurement is filled in
    oom = "oom"  # out of device memory at this batch size
    diverged = "diverged"  # the loss became non-finite or blew up
    # From initialisation, the training loss did not fall over the trial (it rose, or never
    # changed) without blowing up: the lr too high for the batch, a plateau longer than the
    # trial, or gradients that do not reach the loss. Not a candidate, like ``diverged``, but
    # not called divergence: a 1% rise on a plateau is not one (spirals' b = 64 and 128 rose
    # 1.1% and 0.7% in their trials, and their full runs were the fastest to the target).
    no_progress = "no_progress"
    error = "error"  # anything else; ``TrialResult.error`` says what


# A resumed sweep or schedule runs these again: failures of the moment (a bug since fixed, a
# GPU another job held), not the batch size's answer, which diverged and stalled trials are.
RERUN_ON_RESUME = (TrialStatus.error, TrialStatus.oom)


class LossPoint(NamedTuple):
    """One point of a trial's training-loss curve, recorded after optimizer step ``step``
    (1-based): ``loss`` is the mini-batch loss of that step's forward pass, so the loss after
    ``step - 1`` updates; None where it was not finite. A thinned curve (``thin_curve``)
    stores the mean loss of the steps since the previous point instead."""

    step: int
    samples: int
    wall_s: float
    loss: float | None


def thin_curve(curve: Sequence[LossPoint], points: int) -> tuple[LossPoint, ...]:
    """At most ``points`` points: the curve cut into that many runs of consecutive steps,
    each stored at its last step with the mean of its finite losses (None when it has none).
    Means, not every k-th point, so that a thinned curve keeps the information of every step
    and a loss level is crossed where the curve crosses it (``pareto`` reads the crossings)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    if len(curve) <= points:
        return tuple(curve)
    out = []
    n = len(curve)
    for i in range(points):
        block = curve[i * n // points:(i + 1) * n // points]
        finite = [p.loss for p in block if p.loss is not None]
        last = block[-1]
        out.append(LossPoint(last.step, last.samples, last.wall_s,
                             sum(finite) / len(finite) if finite else None))
    return tuple(out)


@dataclass(frozen=True)
class TrialResult:
    """One trial. Rates are over the trial's measured (post warm-up) steps:

    - ``step_time_s``: median time of one optimizer step, seconds, by the step clock
      (``trials.step_clock``: thread CPU time on a CPU with one thread, else wall time);
      ``wall_s``, the trial's training seconds by the same clock (a time budget counts them).
    - ``loss_drop_per_s`` = (train_loss_start - train_loss_end) / wall_s, loss units per second.
    - ``loss_drop_per_sample`` = the same drop / samples; ``loss_drop_per_step`` = drop / steps.
      The per-step drop is what ``formula.fit_b_noise`` fits (McCandlish et al. 2018).
    - ``b_simple``: the gradient noise scale tr(Sigma)/|G|^2 measured in this trial, if it was
      resolved; ``grad_sq_norm`` (|G|^2) and ``trace_sigma`` (tr Sigma) are the unbiased
      estimates behind it (kept even when unresolved: the sweep pools them over trials),
      ``grad_sq_norm_se`` and ``trace_sigma_se`` their standard errors over measurements.
    - ``step_time_s`` is the sweep's interleaved, load-robust step time once the timing rounds
      ran (``bsselect.selection.timing``); ``trial_step_time_s`` the median inside the trial's own window.
    """

    batch_size: int
    status: TrialStatus
    lr: float
    steps: int
    samples: int
    wall_s: float
    step_time_s: float | None = None
    samples_per_s: float | None = None
    train_loss_start: float | None = None
    train_loss_end: float | None = None
    loss_drop_per_s: float | None = None
    val_loss: float | None = None
    val_metric: float | None = None
    loss_curve: tuple[LossPoint, ...] = ()
    error: str | None = None
    b_simple: float | None = None
    loss_drop_per_sample: float | None = None
    loss_drop_per_step: float | None = None
    grad_sq_norm: float | None = None
    trace_sigma: float | None = None
    grad_sq_norm_se: float | None = None  # standard errors of the two estimates
    trace_sigma_se: float | None = None
    trial_step_time_s: float | None = None  # median step time inside the trial's own window
    noise_error: str | None = None  # why its noise measurement failed (the trial stands)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise TypeError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        # Frozen: normalise through object.__setattr__ so that "ok" and TrialStatus.ok, or a
        # list of lists and a tuple of LossPoints, give equal results.
        object.__setattr__(self, "status", TrialStatus(self.status))
        for name in _OPTIONAL_FLOATS:
            object.__setattr__(self, name, _finite(getattr(self, name)))
        object.__setattr__(self, "loss_curve", tuple(_loss_point(p) for p in self.loss_curve))

    @property
    def ok(self) -> bool:
        return self.status is TrialStatus.ok

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: docs/contract.md's trial fields first, then the siblings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TrialStatus):
                value = value.value
            elif f.name == "loss_curve":
                value = [list(p) for p in value]
            elif isinstance(value, float):
                value = _finite(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """One line of compact JSON (no newline), as the journal stores it."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialResult":
        """Inverse of ``to_dict``. Unknown keys are ignored (a newer bsselect may add
        siblings); a missing required field raises KeyError, a bad value ValueError/TypeError."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for required in ("batch_size", "status", "lr", "steps", "samples", "wall_s"):
            if required not in kwargs:
                raise KeyError(f"trial record has no {required!r}")
        kwargs["loss_curve"] = kwargs.get("loss_curve") or ()
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "TrialResult":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a trial record must be a JSON object")
        return cls.from_dict(data)


_OPTIONAL_FLOATS = (
    "step_time_s", "samples_per_s", "train_loss_start", "train_loss_end", "loss_drop_per_s",
    "val_loss", "val_metric", "b_simple", "loss_drop_per_sample", "loss_drop_per_step",
    "grad_sq_norm", "trace_sigma", "grad_sq_norm_se", "trace_sigma_se", "trial_step_time_s",
)


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _loss_point(raw: Sequence[Any]) -> LossPoint:
    step, samples, wall_s, loss = raw
    return LossPoint(int(step), int(samples), float(wall_s), _finite(loss))
