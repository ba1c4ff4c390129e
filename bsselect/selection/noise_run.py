"""``measure_noise``: the noise scale of a task over a run — at fresh initial weights or a
checkpoint, then along warm-up steps at the task's base batch size, every ``every`` steps
(``bsselect noise --warmup-steps N --every K``). Each point is one ``estimate_noise`` (noise.py)
on measurement batches of its own, so the training run is the same whatever is measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..checkpoint import Checkpoint, branch_from
from ..errors import TaskError, UsageError
from ..precision import Precision, make_scaler
from ..step import collate, sample_indices, to_device
from ..task import Task
from ..units import json_document
from .noise import (DEFAULT_MEASUREMENTS, Progress, _run_task, active_dropout, check_settings,
                    default_batch_sizes, estimate_noise)
from .noise_math import NoiseEstimate

__all__ = ["NoisePoint", "NoiseReport", "estimate_json", "measure_noise", "measurement_steps"]


class NoisePoint(NamedTuple):
    """One point of a run: optimizer ``step``, the mean training loss over the measurement
    batches at that step, and the estimate."""

    step: int
    train_loss: float
    estimate: NoiseEstimate


@dataclass(frozen=True)
class NoiseReport:
    """What ``measure_noise`` found. ``final`` is the estimate after ``warmup_steps`` training
    steps (the same object as ``initial`` when there was no warm-up)."""

    initial: NoiseEstimate
    final: NoiseEstimate
    initial_loss: float
    final_loss: float
    trajectory: tuple[NoisePoint, ...]  # every ``every`` steps from 0 to warmup_steps; () if off
    warmup_steps: int
    passes: int  # forward/backward passes in total: measurement passes + training steps
    measure_passes: int
    train_steps: int
    samples: int  # examples through forward/backward, measurement and training together
    wall_s: float
    precision: str = "fp32"  # the forward's autocast dtype; gradients are fp32 and unscaled
    # --from-checkpoint: path, sha256, format, step, optimizer_state (bool); None: from init
    from_checkpoint: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """docs/contract.md's ``noise`` fields (of ``final``) plus siblings; JSON-safe (no inf/NaN)."""
        out = estimate_json(self.final)
        out.update(
            final_loss=self.final_loss, initial_loss=self.initial_loss,
            initial=estimate_json(self.initial), warmup_steps=self.warmup_steps,
            trajectory=[{"step": p.step, "train_loss": p.train_loss, **estimate_json(p.estimate)}
                        for p in self.trajectory],
            passes=self.passes, measure_passes=self.measure_passes,
            train_steps=self.train_steps, samples_total=self.samples, wall_s=self.wall_s,
            precision=self.precision, from_checkpoint=self.from_checkpoint,
        )
        return json_document(out)

    def to_dict(self) -> dict:
        """The ``--json`` output (``to_json``'s name in the Python API)."""
        return self.to_json()


# The least for one estimate with its interval (`bsselect noise`): a 90% interval from 2
# measurements covered the truth in 53% of 30 seeds, from 4 in 87%, from 32 in 90% (review,
# against B_simple from per-example gradients). A sweep pools its trials' measurements.
MIN_MEASUREMENTS = 4

def estimate_json(est: NoiseEstimate) -> dict[str, Any]:
    """One estimate as JSON: docs/contract.md's ``noise`` fields and their siblings."""

    def pair(p: tuple[float, float] | None) -> list[float] | None:
        return None if p is None else [p[0], p[1]]

    return {
        "b_simple": est.b_simple, "grad_sq_norm": est.grad_sq_norm,
        "trace_sigma": est.trace_sigma, "b_small": est.b_small, "b_big": est.b_big,
        "measurements": est.measurements, "resolved": est.resolved,
        "b_simple_ci": pair(est.b_simple_ci), "b_simple_lower": est.b_simple_lower,
        "grad_sq_norm_ci": pair(est.grad_sq_norm_ci), "trace_sigma_ci": pair(est.trace_sigma_ci),
        "grad_sq_norm_se": est.grad_sq_norm_se, "trace_sigma_se": est.trace_sigma_se,
        "samples": est.samples, "n_data": est.n_data, "confidence": est.confidence,
        "dropout": list(est.dropout), "trace_sigma_dropout": est.trace_sigma_dropout,
        "notes": list(est.notes),
    }


def measurement_steps(warmup_steps: int, every: int | None) -> list[int]:
    """Steps at which to measure: 0, then every ``every`` steps, always ending at warmup_steps.

    >>> measurement_steps(10, 4)
    [0, 4, 8, 10]
    """
    if warmup_steps < 0:
        raise UsageError(f"warmup steps must be >= 0, got {warmup_steps}")
    if every is None:
        return sorted({0, warmup_steps})
    if every < 1:
        raise UsageError(f"--every must be at least 1, got {every}")
    if warmup_steps == 0:
        raise UsageError("--every needs --warmup-steps N: the length of the run to follow")
    return sorted(set(range(0, warmup_steps, every)) | {warmup_steps})


def _point_seed(seed: int, step: int) -> int:
    """A seed for the measurement batches at ``step``: independent of the training batches'
    stream and of which other steps are measured, so ``every`` does not change any point."""
    return int(np.random.SeedSequence([seed, step, 0x6E6F697365]).generate_state(1)[0])


class _Counter:
    """Counts passes and forwards them to the progress callback."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _train_one(model: nn.Module, opt: torch.optim.Optimizer, task: Task,
               gen: torch.Generator, device: torch.device, step: int,
               **options: Any) -> None:
    n_data = len(task.train_data)  # type: ignore[arg-type]
    idx = distributed.shard(sample_indices(n_data, task.base_batch_size, gen))
    x, y = to_device(collate(task, [task.train_data[i] for i in idx]), device)
    loss = _run_task(lambda: distributed.train_step(model, opt, task, x, y, **options),
                     "a warm-up training step")
    if not math.isfinite(float(loss)):
        raise TaskError(
            f"training diverged at warm-up step {step + 1} (loss {float(loss)}); "
            "lower the task's lr or use fewer --warmup-steps"
        )


def _point_counter(counter: "_Counter", n_sub: int, extra: int) -> Callable[[int], None]:
    """``counter.add`` for one point's measurements that raises the total by ``extra`` when
    the point's second measurement repeats a sub-batch: the first (the test, without a dropout
    module) found the forward random, and the point's other measurements each cost a pass
    more than the total assumed."""
    seen = [0]

    def add(n: int) -> None:
        seen[0] += 1
        if seen[0] == 2 and n > n_sub:
            counter.total += extra
        counter.add(n)
    return add


def measure_noise(
    task: Task, *, b_small: int | None = None, b_big: int | None = None,
    measurements: int = DEFAULT_MEASUREMENTS, seed: int = 0, warmup_steps: int = 0,
    every: int | None = None, progress: Progress | None = None,
    device: str | torch.device = "cpu", precision: Precision = Precision.fp32,
    checkpoint: Checkpoint | None = None, warn: Callable[[str], None] | None = None,
) -> NoiseReport:
    """B_simple of ``task`` at fresh initial weights (``torch.manual_seed(seed)``) or at
    ``checkpoint`` (its weights, and its optimizer state for the warm-up steps), and after
    ``warmup_steps`` optimizer steps at ``task.base_batch_size`` with ``task.make_optimizer``
    and ``task.lr``; with ``every=K`` also every K steps in between. ``b_small``/``b_big`` left
    as None take ``default_batch_sizes``.

    Measurement batches come from their own generator and the global RNG is forked while
    measuring, so the training run is the same whatever ``every`` is. ``progress(done, total)``
    counts forward/backward passes. ``precision``: forward passes (measurement and warm-up)
    under autocast, warm-up steps with a GradScaler for fp16; norms of unscaled gradients.
    """
    n_data = len(task.train_data)  # type: ignore[arg-type]
    b_small, b_big = default_batch_sizes(task, b_small, b_big)
    if measurements < MIN_MEASUREMENTS:
        raise UsageError(f"measurements must be at least {MIN_MEASUREMENTS} (32 is a good start), "
                         f"got {measurements}: with fewer, a bootstrap interval cannot reach past "
                         "the values measured (a '90%' interval from 2 covered the truth about "
                         "half the time)")
    n_sub = check_settings(b_small, b_big, measurements, n_data)
    steps = measurement_steps(warmup_steps, every)
    counter = _Counter(len(steps) * measurements * n_sub + warmup_steps, progress)
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(device)
    model = _run_task(task.model, "building the model").to(device)
    branch = None
    if checkpoint is not None:
        branch = branch_from(checkpoint, task.model, task.make_optimizer, task.lr)
        model.load_state_dict(branch.model_state)
        # the weights' renaming always; the optimizer's state only matters if it trains
        messages = branch.messages if warmup_steps else (
            (branch.renamed,) if branch.renamed else ())
        if warmup_steps:  # they train at the task's lr: said when the file's differs, as
            from .sweep import checkpoint_lr_note  # sweep and schedule say it (review)

            if checkpoint_lr_note(branch.run_lr, branch.run_lr_zero, task.lr,
                                  task.base_batch_size):
                theirs = ("at lr 0" if branch.run_lr is None else
                          f"at the equivalent of lr {branch.run_lr:.3g}")
                messages = (*messages, f"the checkpoint's optimizer trains {theirs}; the "
                            f"warm-up steps train at the task's lr {task.lr:.3g}")
        for message in messages:
            if warn:
                warn(message)
    model.train()  # the noise of the gradients training sees (dropout on, batch statistics)
    # A random forward costs one more pass per measurement; without a dropout module the
    # first measurement of a point runs it as the test (estimate_noise), and a point that
    # finds the forward random adds the rest to the total.
    modules = bool(active_dropout(model))
    per_point = measurements * (n_sub + 1) if modules else measurements * n_sub + 1
    extra = 0 if modules else measurements - 1
    counter.total = len(steps) * per_point + warmup_steps
    opt = (_run_task(lambda: task.make_optimizer(model.parameters(), task.lr),
                     "building the optimizer") if warmup_steps else None)
    if opt is not None and branch is not None and branch.optimizer_state is not None:
        # the moments under the task's own groups and lrs (branch_from put them there)
        opt.load_state_dict(branch.optimizer_state)
    train_gen = torch.Generator().manual_seed(seed)
    train_model = distributed.wrap_model(model, device) if warmup_steps else model
    options = {} if precision is Precision.fp32 else dict(
        precision=precision, scaler=make_scaler(precision, device.type))
    points: list[NoisePoint] = []
    measure_passes = 0
    for step in range(warmup_steps + 1):
        if step in steps:
            passes = counter.done
            est, loss = estimate_noise(model, task, b_small=b_small, b_big=b_big,
                                       measurements=measurements, seed=_point_seed(seed, step),
                                       on_pass=_point_counter(counter, n_sub, extra),
                                       precision=precision)
            measure_passes += counter.done - passes
            points.append(NoisePoint(step, loss, est))
        if step < warmup_steps:
            assert opt is not None
            _train_one(train_model, opt, task, train_gen, device, step, **options)
            counter.add(1)
    return NoiseReport(
        initial=points[0].estimate, final=points[-1].estimate,
        initial_loss=points[0].train_loss, final_loss=points[-1].train_loss,
        trajectory=tuple(points) if every is not None else (),
        warmup_steps=warmup_steps, passes=measure_passes + warmup_steps,
        measure_passes=measure_passes, train_steps=warmup_steps,
        samples=measure_passes * b_small + warmup_steps * task.base_batch_size,
        wall_s=time.perf_counter() - start, precision=precision.value,
        from_checkpoint=None if checkpoint is None else checkpoint.describe(
            bool(warmup_steps and branch and branch.optimizer_state)),
    )
