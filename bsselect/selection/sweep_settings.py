"""The sweep's settings: the trial budget (``--budget``), the batch sizes it may try, the lr
scaling rule, validation's cap and accumulation's micro-batches, and ``SweepSettings`` (what
makes two sweeps' trials comparable: the journal's resume key)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import UsageError
from ..memory.capacity import largest_pow2_at_most
from ..precision import Precision
from ..task import Task
from .lr_scaling import LrScaling, default_lr_scaling
from .trials import BudgetKind, TrialBudget

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(samples|sample|steps|step|seconds|s|)\s*$",
                     re.IGNORECASE)


def parse_budget(text: str) -> TrialBudget:
    """``4096`` or ``4096samples`` · ``200steps`` · ``30s``/``30seconds``."""
    match = _BUDGET.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"cannot read --budget {text!r}; use e.g. 4096 (samples), 200steps, 30s")
    unit = match.group(2).lower()
    kind = (BudgetKind.steps if unit.startswith("step") else
            BudgetKind.seconds if unit.startswith("s") and unit not in ("samples", "sample")
            else BudgetKind.samples)
    amount = float(match.group(1))
    if kind is not BudgetKind.seconds and amount != int(amount):
        raise UsageError(f"--budget {text!r}: a number of {kind.value} must be whole")
    return TrialBudget(kind, amount)


VAL_ITEMS = 4096  # validation at the end of a trial: at most this many items (a fixed subset)
BASE_STEPS = 32  # the default budget: this many steps' worth of samples at the base batch size
# The CLI's default --warm-start-steps: trials start from initialisation. Branching from the
# base configuration trained BASE_STEPS steps, with the LR ramp (so nothing diverges), scored
# 1.10 / 1.15 (median / worst regret) on the tuning half against 1.02 / 1.15 from
# initialisation, and 1.14 / 1.28 on the held-out half against 1.14 / 1.31: the noise scale
# it measures rises, by amounts unrelated to the critical batch size (docs/benchmarks-sweep.md).
WARM_START_STEPS = 0
# --warmup-steps auto: trials above the task's lr ramp up to it over this many base steps'
# worth of samples (a quarter of the default budget), as Goyal et al. warm up linearly scaled
# lrs; without it, large-batch trials start at 16x+ the lr and diverge out of the ranking.
RAMP_BASE_STEPS = 8


def default_budget(max_batch: int, base_batch_size: int) -> TrialBudget:
    """BASE_STEPS steps' worth of samples at the task's base batch size, but at least one
    step of the largest batch; at most 65,536 samples.

    Short on purpose: the ranking needs step times (every trial times enough steps whatever
    its budget) and the noise scale pooled over the trials, not converged runs. Counted in
    steps of the configuration the task's learning rate was tuned for, not in epochs: how
    far training has moved (and so the noise scale) depends on the steps taken, not on the
    dataset's size. On the built-in examples the pick's regret stayed <= 1.13 from half to
    four times this budget (docs/benchmarks-sweep.md).
    """
    samples = max(BASE_STEPS * base_batch_size, max_batch)
    return TrialBudget(BudgetKind.samples, float(min(samples, 65_536)))


def powers_of_two(lo: int, hi: int) -> list[int]:
    if lo < 1 or hi < lo:
        raise UsageError(f"no power of two between --min-batch {lo} and the maximum {hi}")
    start = 1 << max(0, (lo - 1).bit_length())
    sizes = [b for b in (start << k for k in range(40)) if b <= hi]
    if not sizes:
        raise UsageError(f"no power of two between --min-batch {lo} and the maximum {hi}")
    return sizes


def data_cap(n_train: int) -> int:
    """Largest power of two <= half the training set, so that every trial sees >= 2 batches
    per epoch."""
    return largest_pow2_at_most(max(1, n_train // 2))


@dataclass(frozen=True)
class SweepSettings:
    budget: TrialBudget
    lr_scaling: LrScaling
    seed: int = 0
    warmup_steps: int = 0
    noise_measurements: int = 2  # per trial; the ranking pools them over all trials
    precision: Precision = Precision.fp32
    accumulate: int = 1  # micro-steps per optimizer step; trial batch sizes are effective
    warm_start_steps: int = 0  # base-configuration steps before every trial branches off
    lr_ramp_samples: int = 0  # --warmup-steps auto: see TrialSetup.lr_ramp_samples
    # --from-checkpoint: the SHA-256 of the user's checkpoint every trial branches from (the
    # journal keys its trials on it, so --resume never mixes two checkpoints)
    checkpoint_sha256: str | None = None

    def journal_settings(self, task: Task) -> dict[str, Any]:
        """What makes two sweeps' trials comparable (hashed into the journal's resume key);
        also what ``bsselect report`` needs to re-render without the task."""
        settings = {"budget_kind": self.budget.kind.value, "budget": self.budget.amount,
                    "lr_scaling": self.lr_scaling.value, "seed": self.seed,
                    "warmup_steps": self.warmup_steps,
                    "noise_measurements": self.noise_measurements,
                    "base_lr": task.lr, "base_batch_size": task.base_batch_size,
                    "held_out_validation": task.val_data is None}
        # Only when set, so that journals of plain fp32 sweeps keep their resume key.
        if (cap := validation_cap(task)) is not None:
            settings["validation_items"] = cap
        if self.precision is not Precision.fp32:
            settings["precision"] = self.precision.value
        if self.accumulate != 1:
            settings["accumulate"] = self.accumulate
        if self.warm_start_steps:
            settings["warm_start_steps"] = self.warm_start_steps
        if self.lr_ramp_samples:
            settings["lr_ramp_samples"] = self.lr_ramp_samples
        if self.checkpoint_sha256:
            settings["from_checkpoint_sha256"] = self.checkpoint_sha256
        if task.loss_weight is not None:  # noise and validation weighted by the loss's units
            settings["loss_weight"] = True
        return settings

    @classmethod
    def from_journal(cls, settings: dict[str, Any]) -> "SweepSettings":
        return cls(budget=TrialBudget(BudgetKind(settings["budget_kind"]), settings["budget"]),
                   lr_scaling=LrScaling(settings["lr_scaling"]), seed=settings["seed"],
                   warmup_steps=settings["warmup_steps"],
                   noise_measurements=settings["noise_measurements"],
                   precision=Precision(settings.get("precision", "fp32")),
                   accumulate=settings.get("accumulate", 1),
                   warm_start_steps=settings.get("warm_start_steps", 0),
                   lr_ramp_samples=settings.get("lr_ramp_samples", 0),
                   checkpoint_sha256=settings.get("from_checkpoint_sha256"))



def validation_cap(task: Task) -> int | None:
    """VAL_ITEMS when the sweep's validation set (the task's val_data, or the 10% of
    train_data that ``split_validation`` holds out) is larger, so that only a fixed subset of
    it is evaluated; None when all of it is."""
    if task.val_data is not None:
        size = len(task.val_data)  # type: ignore[arg-type]
    else:
        size = max(1, len(task.train_data) // 10)  # type: ignore[arg-type]
    return VAL_ITEMS if size > VAL_ITEMS else None


def check_accumulation(batch_sizes: Sequence[int], accumulate: int) -> list[int]:
    """The micro-batches of effective ``batch_sizes`` split into ``accumulate`` micro-steps;
    UsageError unless each divides evenly."""
    if accumulate < 1:
        raise UsageError(f"--accumulate must be >= 1, got {accumulate}")
    uneven = [b for b in batch_sizes if b % accumulate]
    if uneven:
        raise UsageError(f"batch sizes {uneven} are not multiples of --accumulate {accumulate}")
    return [b // accumulate for b in batch_sizes]


def resolve_lr_scaling(task: Task, rule: str | None) -> LrScaling:
    if rule in (None, "auto"):
        with torch.device("meta"):
            params = [torch.nn.Parameter(torch.empty(1))]
        return default_lr_scaling(task.make_optimizer(params, task.lr))
    try:
        return LrScaling(rule)
    except ValueError:
        raise UsageError(f"--lr-scaling must be auto, linear, sqrt or none; got {rule!r}") from None
