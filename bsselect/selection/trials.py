"""One short training trial at one batch size -> TrialResult.

Every trial starts from the same initial weights and draws its batches from the same seeded
stream, so trials differ only by batch size and the learning rate scaled for it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from enum import Enum
from statistics import median
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed
from ..errors import one_line
from ..oom import caused_by_oom, is_oom_error, release_memory
from ..precision import Precision, make_scaler
from ..step import to_device
from ..task import Task, loss_units
from .lr_scaling import trial_lr, warmup_lr
from .noise_math import NoiseEstimate
from .timing import RoundTiming, interleaved_rounds
from .trial_types import LossPoint, TrialResult, TrialStatus, thin_curve

TIMING_WARMUP_STEPS = 3     # first steps pay for allocation and kernel selection
WARM_START_SEED_OFFSET = 7919  # the warm start's batch stream: not the trials' stream
DIVERGENCE_FACTOR = 10.0    # loss above 10x its start counts as diverged
MAX_CURVE_POINTS = 200
EVAL_ITEMS = 512            # fixed train subset on which start/end loss is measured
EVAL_BATCH = 256            # evaluation batch, unless the sweep's smallest batch is smaller


class BudgetKind(str, Enum):
    samples = "samples"
    steps = "steps"
    seconds = "seconds"


@dataclass(frozen=True)
class TrialBudget:
    kind: BudgetKind
    amount: float

    def steps_for(self, batch_size: int) -> int | None:
        """Step count for ``batch_size``; None for a time budget."""
        if self.kind is BudgetKind.samples:
            return max(1, math.ceil(self.amount / batch_size))
        if self.kind is BudgetKind.steps:
            return max(1, int(self.amount))
        return None


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares."""

    task: Task
    initial_state: dict[str, torch.Tensor]
    train_data: Dataset          # the task's, minus a held-out split when it has no val_data
    eval_train: Dataset
    val_data: Dataset
    device: torch.device
    budget: TrialBudget
    seed: int = 0
    warmup_steps: int = 0        # linear LR warm-up from 0 (--warmup-steps N)
    # Goyal et al.'s gradual warm-up (--warmup-steps auto): a trial whose scaled lr is above
    # the task's ramps linearly from the task's lr to its own over this many samples.
    lr_ramp_samples: int = 0
    noise_measurements: int = 0  # gradient-noise measurements at the end of each trial
    # No larger than the smallest trial batch: a batch that fits for training must not go out
    # of memory in evaluation. One value for every trial, so their losses compare exactly.
    eval_batch_size: int = EVAL_BATCH
    precision: Precision = Precision.fp32  # forward under autocast (fp16: with GradScaler)
    accumulate: int = 1          # micro-steps per optimizer step; a trial's batch is effective
    # Training loss of the shared initial weights on eval_train: the same for every trial, so
    # measured once per sweep (None: each trial measures it).
    loss_start: float | None = None
    # Warm start: the base configuration's optimizer state at the branch point (None: trials
    # start from a fresh optimizer at ``initial_state``).
    optimizer_state: dict[str, Any] | None = None
    branch_steps: int = 0  # base-configuration steps behind ``initial_state``
    loss_init: float | None = None  # warm start: the training loss at initialisation
    validate: bool = True  # False: no validation pass at the end (``bsselect schedule``'s
    # branches compare training-subset losses only)
    from_checkpoint: bool = False  # initial_state is a user's checkpoint (``rise_limit``)
    checkpoint_lr: float | None = None  # its optimizer's lr as a base lr (``--lr``)
    checkpoint_lr_zero: bool = False  # its optimizer was at lr 0


def cycle_batches(setup: TrialSetup, batch_size: int):
    """Shuffled batches forever (reshuffled each epoch, same seed for every trial)."""
    data = setup.train_data
    gen = torch.Generator().manual_seed(setup.seed)
    drop_last = len(data) >= batch_size  # type: ignore[arg-type]
    if distributed.active():  # under torchrun: this rank's share of each global batch
        yield from distributed.cycle_shards(data, batch_size, setup.seed, setup.task.collate_fn)
    while True:
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen,
                            drop_last=drop_last, collate_fn=setup.task.collate_fn)
        yield from loader


def evaluate(model: nn.Module, task: Task, data: Dataset, device: torch.device,
             batch_size: int = EVAL_BATCH, metric: bool = True) -> tuple[float, float | None]:
    """Mean loss (and metric) over ``data`` in eval mode, weighted by batch length (the loss
    by ``Task.loss_weight``'s units where the task has one: a token mean over the whole set)."""
    was_training = model.training
    model.eval()
    total_loss, total_metric, n, units = 0.0, 0.0, 0, 0.0
    with distributed.agreement(), torch.no_grad():  # each rank a share, summed below
        share = distributed.shard_dataset(data)
        left = len(share)  # type: ignore[arg-type]
        for x, y in DataLoader(share, batch_size=batch_size, collate_fn=task.collate_fn):
            x, y = to_device((x, y), device)
            out = model(x)
            # items in this batch, in order and the last one short: whatever the targets' type
            # (a tuple or dict of targets counted the last batch as full: review)
            k = min(batch_size, left)
            left -= k
            u = k if task.loss_weight is None else loss_units(task, y)
            if u:  # a batch with no unit of the loss (all labels ignored) adds nothing
                total_loss += float(task.loss_fn(out, y)) * u
            if metric and task.metric is not None:
                total_metric += _metric(task, out, y) * k
            n += k
            units += u
    total_loss, total_metric, n, units = distributed.sum_floats(total_loss, total_metric, n,
                                                                units)
    model.train(was_training)
    score = total_metric / n if (metric and task.metric is not None) else None
    return total_loss / units if units else math.nan, score


def _metric(task: Task, out: Any, y: Any) -> float:
    """The task's metric on one batch; a failure names the metric, so that a trial's error
    does not read like a training failure."""
    try:
        return float(task.metric(out, y))  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - re-raised with the metric's name
        name = getattr(task.metric, "__qualname__", None) or repr(task.metric)
        raise RuntimeError(f"the task's metric {name} failed: {one_line(exc)}") from exc


def _sync(device: torch.device) -> None:
    # A CPU-GPU sync point: without it the clock reads kernel-launch time, not compute time.
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


def run_trial(setup: TrialSetup, batch_size: int, lr: float,
              on_step: Callable[[int, int | None], None] | None = None) -> TrialResult:
    """Train ``batch_size`` for the setup's budget; never raises for OOM/divergence/errors
    (they become the trial's status) — only KeyboardInterrupt propagates."""
    base = dict(batch_size=batch_size, lr=lr)
    try:
        return _train(setup, batch_size, lr, on_step)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        status = TrialStatus.oom if is_oom_error(exc) else TrialStatus.error
        message = one_line(exc)
    # Released after the except block: inside it the exception's frames hold the trial's
    # model and activations, and the next trial would start on a fragmented cache.
    release_memory()
    return TrialResult(**base, status=status, steps=0, samples=0, wall_s=0.0, error=message)


def _train(setup: TrialSetup, batch_size: int, lr: float,
           on_step: Callable[[int, int | None], None] | None) -> TrialResult:
    task, device = setup.task, setup.device
    # Each trial's own RNG stream (dropout, random augmentation), from (seed, batch size): a
    # resumed sweep's trials are those of a fresh one, and trials differ only by batch and LR.
    torch.manual_seed(trial_seed(setup.seed, batch_size))
    model, optimizer = _fresh_model(setup, lr, branch=True)
    train_model = distributed.wrap_model(model, device)  # DDP under torchrun; else model
    loss_start = setup.loss_start
    if loss_start is None:
        loss_start = initial_loss(model, setup)
    # A step's loss above 10x this is divergence. From a warm start or a checkpoint the start
    # can be near zero (and eval-mode, below any train-mode step loss with dropout): the
    # reference is then the loss at initialisation, which a diverging run passes.
    reference = divergence_reference(loss_start, setup.loss_init)
    total_steps = setup.budget.steps_for(batch_size)
    # With accumulation the loader yields micro-batches, `accumulate` of them per step.
    batches = cycle_batches(setup, batch_size // setup.accumulate)
    options = _step_options(setup, batches, device)
    curve: list[LossPoint] = []
    step_times: list[float] = []
    samples, step, train_wall = 0, 0, 0.0
    status, error = TrialStatus.ok, None
    while (total_steps is None and train_wall < setup.budget.amount) or (
            total_steps is not None and step < total_steps):
        set_lr(optimizer, trial_lr(step, lr, batch_size, task.lr, setup.warmup_steps,
                                   setup.lr_ramp_samples))
        value, y, elapsed = _timed_step(train_model, optimizer, task, batches, device, options,
                                        careful=step < TIMING_WARMUP_STEPS)
        train_wall += elapsed
        if total_steps is None:  # a time budget: every rank must stop at the same step
            train_wall = distributed.max_float(train_wall)
        step += 1
        local = len(y) if isinstance(y, torch.Tensor) else distributed.per_device(batch_size)
        samples += local * distributed.world_size() * setup.accumulate
        if step > TIMING_WARMUP_STEPS or total_steps is not None and total_steps <= TIMING_WARMUP_STEPS:
            step_times.append(elapsed)
        curve.append(LossPoint(step, samples, train_wall, value if math.isfinite(value) else None))
        if not math.isfinite(value) or (reference is not None
                                        and value > DIVERGENCE_FACTOR * reference):
            status, error = TrialStatus.diverged, f"loss {value:.4g} at step {step}"
            break
        if on_step:
            on_step(step, total_steps)
    return _finish(setup, model, batch_size, lr, status, error, step, samples, train_wall,
                   step_times, curve, loss_start)


LR_SCALE_KEY = "bsselect_lr_scale"  # a param group's lr over the lr its factory was given


def keep_group_ratios(optimizer: torch.optim.Optimizer, built_lr: float) -> None:
    """Record each parameter group's lr relative to ``built_lr``, the lr the task's optimizer
    factory was called with: a factory may give groups their own lrs (lr 0 for a frozen
    part, a lower lr for a backbone), and ``set_lr`` keeps those ratios."""
    for group in optimizer.param_groups:
        group.setdefault(LR_SCALE_KEY, float(group["lr"]) / built_lr if built_lr else 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` times its own ratio (``keep_group_ratios``; 1 by default)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE_KEY, 1.0)


def trial_seed(seed: int, batch_size: int) -> int:
    """The global RNG seed of the trial at ``batch_size`` in a sweep seeded ``seed``."""
    return (seed * 1_000_003 + batch_size * 7_919 + 17) % (2**63 - 1)


def _fresh_model(setup: TrialSetup, lr: float, branch: bool = False
                 ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The task's model at ``setup.initial_state`` in training mode, and its optimizer at
    ``lr`` (built at the task's lr where ``lr`` is 0, so that optimizers that refuse lr 0
    still build): built at the trial's lr, for an optimizer that keeps the lr it was built
    with elsewhere than its groups (LARS-like ``self.base_lr``: a review's trained every
    batch size at the base lr), with each group's ratio to the task's lr read from one built
    at the task's lr (``_ratios_at_task_lr``: a backbone group at a fixed lr stayed there in
    fresh trials and was scaled in warm-started ones, review); with
    ``branch``, also the warm start's optimizer state. Under torchrun a failure on one rank
    fails all ranks."""
    task = setup.task
    with distributed.agreement():
        model = task.model().to(setup.device)
        model.load_state_dict(setup.initial_state)
        model.train()
        built = task.lr if lr == 0 else lr
        optimizer = task.make_optimizer(model.parameters(), built)
        if built != task.lr:
            _ratios_at_task_lr(optimizer, task, model)
        keep_group_ratios(optimizer, built)
        if branch and setup.optimizer_state is not None:  # the base run's moments
            optimizer.load_state_dict(copy.deepcopy(setup.optimizer_state))
        set_lr(optimizer, lr)
    return model, optimizer


def _ratios_at_task_lr(optimizer: torch.optim.Optimizer, task: Task, model: nn.Module) -> None:
    """Record in ``optimizer``'s groups their lr ratios as the factory makes them at the
    task's lr (``keep_group_ratios``): a group the factory gives a fixed lr (0.005 beside a
    task lr of 0.05) is a tenth of the task's lr at every batch size, not a fixed lr. Where
    the two builds' groups differ in number, the trial's own build decides."""
    reference = task.make_optimizer(model.parameters(), task.lr)
    if len(reference.param_groups) != len(optimizer.param_groups):
        return
    for group, ref in zip(optimizer.param_groups, reference.param_groups):
        group.setdefault(LR_SCALE_KEY, float(ref["lr"]) / task.lr)


def branch_point(setup: TrialSetup, steps: int,
                 on_step: Callable[[int, int | None], None] | None = None) -> TrialSetup:
    """``setup`` with its trials branching from the base configuration trained for ``steps``
    steps (the task's base batch size and lr, the setup's LR warm-up), from ``setup``'s
    weights and optimizer state (a checkpoint's, or initialisation): its weights become
    ``initial_state`` and its optimizer state ``optimizer_state``. The warm-up draws its
    batches from its own seeded stream, so the trials' streams do not repeat it. A warm-up
    whose loss diverges raises TaskError: no trial could branch from it."""
    from ..errors import TaskError

    task, device = setup.task, setup.device
    model, optimizer = _fresh_model(setup, task.lr, branch=True)  # a checkpoint's moments
    train_model = distributed.wrap_model(model, device)
    # from a checkpoint: the task's loss at initialisation, not the checkpoint's
    loss_init = setup.loss_init if setup.loss_init is not None else initial_loss(model, setup)
    b = task.base_batch_size
    warm = dataclasses.replace(setup, seed=setup.seed + WARM_START_SEED_OFFSET)
    batches = cycle_batches(warm, b // setup.accumulate)
    options = _step_options(setup, batches, device)
    for step in range(steps):
        set_lr(optimizer, warmup_lr(step, task.lr, setup.warmup_steps))
        value, _, _ = _timed_step(train_model, optimizer, task, batches, device, options)
        if not math.isfinite(value):
            raise TaskError(f"the warm start (the base configuration: batch {b}, lr "
                            f"{task.lr:g}) diverged at step {step + 1} of {steps}; lower the "
                            "task's lr, add --warmup-steps, or pass --warm-start-steps 0")
        if on_step:
            on_step(step + 1, steps)
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    del train_model, model, optimizer
    return dataclasses.replace(setup, initial_state=state, optimizer_state=opt_state,
                               branch_steps=steps, loss_start=None, loss_init=loss_init)


def time_batch_sizes(setup: TrialSetup, batch_sizes: list[int],
                     on_step: Callable[[], None] | None = None) -> dict[int, RoundTiming]:
    """Load-robust step times of ``batch_sizes`` (``timing.interleaved_rounds``): one model
    from the shared initial weights and one optimizer at learning rate 0 (every step does
    the full work; the weights never move, so nothing can diverge), a seeded batch stream per
    batch size, interleaved rounds. Under torchrun every rank runs the same steps and each
    round counts at the slowest rank's time."""
    if not batch_sizes:
        return {}
    task, device = setup.task, setup.device
    model, optimizer = _fresh_model(setup, 0.0)
    train_model = distributed.wrap_model(model, device)

    data_s: dict[int, list[float]] = {b: [] for b in batch_sizes}

    def stepper(b: int) -> Callable[[], float]:
        batches = _Clocked(cycle_batches(setup, b // setup.accumulate))
        options = _step_options(setup, batches, device)

        def step() -> float:
            before = batches.spent
            total = _timed_step(train_model, optimizer, task, batches, device, options)[2]
            data_s[b].append(batches.spent - before)
            return total
        return step

    agree = distributed.max_float if distributed.active() else None
    clock = step_clock(device)
    try:
        timings = interleaved_rounds({b: stepper(b) for b in batch_sizes}, on_step=on_step,
                                     agree=agree)
        # Step time includes fetching the batch (the sweep's loader has no worker processes):
        # how much of it, said per batch size.
        return {b: dataclasses.replace(t, data_s=agree(median(data_s[b])) if agree
                                       else median(data_s[b]), clock=clock)
                for b, t in timings.items()}
    finally:
        del train_model, model, optimizer
        release_memory()


THREAD_CPU, WALL = "thread_cpu", "wall"  # step_clock


def step_clock(device: torch.device) -> str:
    """How a step is timed. On a CPU with one intra-op thread, outside torchrun, every op of
    the step runs on this thread, and its CPU time is the step's work: the time the
    scheduler gives other processes is not in it. With more runnable processes than cores,
    wall time added that time unevenly across batch sizes (tiny-lm with two busy processes
    on two cores: -1% to +73% against a quiet machine; in CPU time -3% to +14%:
    docs/method.md). Elsewhere (threads, accelerators, ranks that wait on each other): wall
    time."""
    if device.type == "cpu" and torch.get_num_threads() == 1 and not distributed.active():
        return THREAD_CPU
    return WALL


def _timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, batches: Any,
                device: torch.device, options: dict[str, Any], careful: bool = False
                ) -> tuple[float, Any, float]:
    """One training step on the next batch: (loss value, targets, seconds), the clock read
    after a device sync; the seconds by ``step_clock``: in thread CPU time, the step's
    training, and its fetching of the batch at wall time (a loader that waits on a disk
    waits in the user's run too). Under torchrun: the loss over the global batch, and every
    rank fails together."""
    on_cpu = step_clock(device) == THREAD_CPU
    t0 = time.perf_counter()
    x, y = to_device(next(batches), device)
    fetched, c0 = time.perf_counter(), time.thread_time() if on_cpu else 0.0
    loss = distributed.train_step(model, optimizer, task, x, y, careful=careful, **options)
    value = loss.item()  # also a sync point on the CPU
    _sync(device)
    if on_cpu:
        return value, y, (fetched - t0) + (time.thread_time() - c0)
    return value, y, time.perf_counter() - t0


class _Clocked:
    """An iterator that adds up the seconds spent in its ``next`` (fetching and collating
    batches), so the input pipeline is timed apart from the training step."""

    def __init__(self, it: Any) -> None:
        self.it, self.spent = it, 0.0

    def __iter__(self) -> "_Clocked":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.spent += time.perf_counter() - t0


def _step_options(setup: TrialSetup, batches: Any, device: torch.device) -> dict[str, Any]:
    """train_step's precision and accumulation arguments ({} for plain fp32 steps)."""
    if setup.precision is Precision.fp32 and setup.accumulate == 1:
        return {}
    return dict(precision=setup.precision, scaler=make_scaler(setup.precision, device.type),
                accumulate=setup.accumulate,
                next_micro_batch=lambda: to_device(next(batches), device))


def _finish(setup: TrialSetup, model: nn.Module, batch_size: int, lr: float,
            status: TrialStatus, error: str | None, steps: int, samples: int, wall_s: float,
            step_times: list[float], curve: list[LossPoint], loss_start: float) -> TrialResult:
    task, device = setup.task, setup.device
    common: dict[str, Any] = dict(batch_size=batch_size, lr=lr, steps=steps, samples=samples,
                                  wall_s=wall_s, loss_curve=thin_curve(curve, MAX_CURVE_POINTS),
                                  error=error,
                                  train_loss_start=loss_start)
    if status is not TrialStatus.ok:
        return TrialResult(status=status, **common)
    step_time = median(step_times) if step_times else wall_s / max(steps, 1)
    loss_end, _ = evaluate(model, task, setup.eval_train, device, setup.eval_batch_size,
                           metric=False)
    val_loss, val_metric = (evaluate(model, task, setup.val_data, device, setup.eval_batch_size)
                            if setup.validate else (None, None))
    if not math.isfinite(loss_end) or val_loss is not None and not math.isfinite(val_loss):
        # The last step's update made the weights non-finite after its own loss was read:
        # every comparison below is False for NaN, and the trial passed as ok (review).
        val = "not measured" if val_loss is None else f"{val_loss:.4g}"
        return TrialResult(status=TrialStatus.diverged,
                           **dict(common, error=f"the loss is not finite after training "
                                                f"(training {loss_end:.4g}, validation {val})"),
                           train_loss_end=loss_end)
    drop = loss_start - loss_end
    reference = divergence_reference(loss_start, setup.loss_init)  # as in _train
    if reference is not None and loss_end > DIVERGENCE_FACTOR * reference:
        # The last update blew the loss up: the step losses, each read before its update,
        # could not see it (a 1-step trial at 73x was "no_progress ... a plateau", review).
        return TrialResult(status=TrialStatus.diverged,
                           **dict(common, error=f"loss {loss_end:.4g} after the last step, "
                                                f"over {DIVERGENCE_FACTOR:g}x the start's "
                                                f"{reference:.4g}"),
                           train_loss_end=loss_end)
    if setup.loss_init is None and loss_end >= loss_start:
        return TrialResult(status=TrialStatus.no_progress,
                           **dict(common, error=no_progress_text(loss_start, loss_end, steps)),
                           train_loss_end=loss_end)
    limit = rise_limit(loss_start, setup.loss_init, setup.from_checkpoint)
    if loss_end > limit:  # the LR is too high for this batch
        if setup.loss_init is None:
            undone = ""
        elif setup.from_checkpoint:
            undone = (f", above {limit:.4g}: double the checkpoint's loss, or half of the "
                      f"progress from {setup.loss_init:.4g} at initialisation")
        else:
            undone = (f", undoing more than half of the warm start's progress from "
                      f"{setup.loss_init:.4g}")
        return TrialResult(status=TrialStatus.diverged,
                           **dict(common, error=f"loss rose from {loss_start:.4g} to "
                                                f"{loss_end:.4g}{undone}"),
                           train_loss_end=loss_end)
    fitted = distributed.per_device(batch_size) // setup.accumulate
    noise, noise_error = None, None
    if setup.noise_measurements:
        try:
            noise = measure_trial_noise(setup, model, fitted, batch_size)
        except Exception as exc:  # noqa: BLE001 - the trial's training stands (review)
            noise_error = one_line(exc)
    return TrialResult(
        status=status, **common, step_time_s=step_time, samples_per_s=batch_size / step_time,
        # Per second of steady-state training (median step time x steps): one-off warm-up
        # costs (first allocations, kernel selection) would otherwise dominate short trials.
        train_loss_end=loss_end, loss_drop_per_s=drop / (step_time * steps),
        val_loss=val_loss, val_metric=val_metric,
        b_simple=noise.b_simple if noise else None,
        grad_sq_norm=noise.grad_sq_norm if noise else None,
        trace_sigma=noise.trace_sigma if noise else None,
        grad_sq_norm_se=noise.grad_sq_norm_se if noise else None,
        trace_sigma_se=noise.trace_sigma_se if noise else None,
        loss_drop_per_sample=drop / samples, loss_drop_per_step=drop / steps,
        trial_step_time_s=step_time, noise_error=noise_error,
    )


def divergence_reference(loss_start: float, loss_init: float | None) -> float | None:
    """The loss whose DIVERGENCE_FACTOR multiple is divergence: the larger of the trial's
    start and the loss at initialisation. None where that is not above 0: a loss that can be
    negative (a Gaussian NLL, a negative ELBO) has no such multiple (with a floor of 1e-12,
    any positive loss after a start of -5 was "diverged", review); non-finite losses still
    are."""
    reference = max(loss_start, loss_init if loss_init is not None else -math.inf)
    return reference if reference > 0 else None


def no_progress_text(loss_start: float, loss_end: float, steps: int) -> str:
    """Why a trial from initialisation is ``no_progress``, without claiming a cause the loss
    alone cannot tell: a rise may be an lr too high for the batch or the noise on a plateau
    that the trial did not leave; an unchanged loss, gradients that do not reach it."""
    over = f"{steps} step{'' if steps == 1 else 's'}"
    if loss_end == loss_start:
        return (f"the training loss did not change over {over} ({loss_start:.4g}): "
                "no gradient reaches the trainable parameters, or the lr is 0")
    return (f"the training loss did not fall over {over} ({loss_start:.4g} -> "
            f"{loss_end:.4g}): the lr is too high for this batch, or the trial ended on a "
            "plateau it had not left")


def rise_limit(loss_start: float, loss_init: float | None,
               checkpoint: bool = False) -> float:
    """The end-of-trial training loss above which a trial counts as diverged. From
    initialisation: any rise over the whole trial (``_finish`` calls a trial from
    initialisation that did not fall ``no_progress`` before it asks). From a
    warm start at ``loss_start`` (reached from ``loss_init``): a rise that undoes more than
    half of the warm start's progress; a smaller rise is the noise floor of a larger LR near
    the branch point, which the same LR would not show from initialisation. From a user's
    ``checkpoint``, also a rise that doubles its loss: a trained model's loss is far below
    its initial one, and a trial that takes it from 0.001 to 0.2 has undone what matters even
    though the loss at initialisation is 2.3."""
    if loss_init is None or loss_init <= loss_start:
        return loss_start
    limit = loss_start + 0.5 * (loss_init - loss_start)
    return min(limit, 2 * loss_start) if checkpoint else limit


def initial_loss(model: nn.Module, setup: TrialSetup) -> float:
    """Training loss on the fixed ``eval_train`` subset (no metric)."""
    return evaluate(model, setup.task, setup.eval_train, setup.device, setup.eval_batch_size,
                    metric=False)[0]


def measure_trial_noise(setup: TrialSetup, model: nn.Module,
                        fitted_batch: int | None = None,
                        batch_size: int = 0) -> NoiseEstimate | None:
    """The noise scale at the trial's final weights, with the same estimator as ``bsselect
    noise`` (in training mode, as training sees the gradients; not part of the trial's time).

    Its sub-batches are the task's base batch size, which need not fit in memory. When they
    run out of memory, the measurement is repeated on sub-batches of ``fitted_batch`` (the
    trial's own, which just trained); None if that fails too. The trial's other results stand
    either way, and the pooled noise scale stays unbiased whatever sub-batch size a trial
    used."""
    from .noise import default_batch_sizes

    b_small, _ = default_batch_sizes(setup.task)
    sizes = [b_small] + ([fitted_batch] if fitted_batch and fitted_batch < b_small else [])
    for small in sizes:
        try:
            return _estimate_noise(setup, model, *default_batch_sizes(setup.task, b_small=small),
                                   seed=noise_seed(setup.seed, batch_size))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not caused_by_oom(exc):  # TaskError wraps it
                raise
        release_memory()  # out of memory: after the except block, which holds its tensors
    return None


def noise_seed(seed: int, batch_size: int) -> int:
    """The seed of the trial at ``batch_size``'s noise measurement: its own batches, so that
    the trials' errors are independent and their pooled interval (``rank.pooled_interval``)
    holds. One seed for every trial (``seed + 1000``, before) measured them all on the same
    batches: in 18 of 30 sweeps of a review all five trials' |G|^2 errors had one sign."""
    return (trial_seed(seed, batch_size) + 1000) % (2**63 - 1)


def training_task(setup: TrialSetup) -> Task:
    """The task as the trials train it: without the held-out split ``split_validation`` made
    where it has no val_data (the noise measured on items the run validates on, and the
    finite-population correction over them, before: review)."""
    if setup.train_data is setup.task.train_data:
        return setup.task
    return dataclasses.replace(setup.task, train_data=setup.train_data)


def _estimate_noise(setup: TrialSetup, model: nn.Module, b_small: int, b_big: int,
                    seed: int) -> NoiseEstimate:
    from .noise import estimate_noise

    model.train()
    estimate, _ = estimate_noise(model, training_task(setup), b_small=b_small, b_big=b_big,
                                 measurements=setup.noise_measurements, seed=seed,
                                 precision=setup.precision)
    return estimate


def split_validation(task: Task, seed: int) -> tuple[Dataset, Dataset, bool]:
    """(train, val, made_split): the task's val_data, or a held-out 10% of train."""
    if task.val_data is not None:
        return task.train_data, task.val_data, False
    n = len(task.train_data)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, n // 10)
    return Subset(task.train_data, perm[n_val:]), Subset(task.train_data, perm[:n_val]), True


def eval_subset(data: Dataset, seed: int, items: int = EVAL_ITEMS) -> Dataset:
    n = len(data)  # type: ignore[arg-type]
    if n <= items:
        return data
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).tolist()[:items]
    return Subset(data, idx)
