"""``sweep``: short trials at power-of-two batch sizes, journaled, ranked against the formula.

Settings (``SweepSettings``, the budget) are in ``sweep_settings``, the finished sweep
(``SweepResult``, ``summarize``) in ``sweep_result``; both are importable from here too."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import distributed
from ..checkpoint import Checkpoint, branch_from
from ..errors import InterruptedRun, TaskError, UsageError, one_line
from ..oom import release_memory
from ..task import Task
from .choice import NoiseInterval, contenders, warm_lower_bounds
from .lr_scaling import scale_lr, trial_lr
from .rank import choose_b_hat, sizes_text
from .sweep_result import SweepResult, apply_timing, summarize
from .sweep_settings import (BASE_STEPS, RAMP_BASE_STEPS, VAL_ITEMS, WARM_START_STEPS,
                             SweepSettings, check_accumulation, data_cap, default_budget,
                             parse_budget, powers_of_two, resolve_lr_scaling, validation_cap)
from .timing import RoundTiming, cpu_threads, progress_units
from .trial_types import RERUN_ON_RESUME, TrialResult
from .trials import (EVAL_BATCH, TIMING_WARMUP_STEPS, BudgetKind, TrialSetup, branch_point,
                     eval_subset, initial_loss, keep_group_ratios, run_trial, split_validation,
                     time_batch_sizes)

__all__ = ["BASE_STEPS", "RAMP_BASE_STEPS", "VAL_ITEMS", "WARM_START_STEPS", "SweepHooks",
           "SweepResult", "SweepSettings", "apply_timing", "check_accumulation",
           "check_resumed_start", "checkpoint_lr_note", "data_cap", "default_budget",
           "from_checkpoint", "make_setup", "parse_budget", "powers_of_two",
           "resolve_lr_scaling", "run_sweep", "summarize", "task_fingerprint", "timing_plan",
           "validation_cap", "with_initial_loss"]


@dataclass
class SweepHooks:
    """Progress callbacks for the CLI (all optional)."""

    trial_start: Callable[[int, int, int | None], None] | None = None  # (b, index, steps)
    step: Callable[[int, int | None], None] | None = None
    trial_end: Callable[[TrialResult], None] | None = None
    warn: Callable[[str], None] | None = None
    timing_start: Callable[[int], None] | None = None  # (progress units)
    timing_step: Callable[[], None] | None = None


def make_setup(task: Task, settings: SweepSettings, device: torch.device,
               eval_batch_size: int = EVAL_BATCH) -> tuple[TrialSetup, bool]:
    torch.manual_seed(settings.seed)
    initial = copy.deepcopy(task.model().state_dict())
    train, val, made = split_validation(task, settings.seed)
    return TrialSetup(task=task, initial_state=initial, train_data=train,
                      eval_train=eval_subset(train, settings.seed),
                      val_data=eval_subset(val, settings.seed + 1, VAL_ITEMS), device=device,
                      budget=settings.budget, seed=settings.seed,
                      warmup_steps=settings.warmup_steps,
                      lr_ramp_samples=settings.lr_ramp_samples,
                      noise_measurements=settings.noise_measurements,
                      eval_batch_size=eval_batch_size, precision=settings.precision,
                      accumulate=settings.accumulate), made


def with_initial_loss(setup: TrialSetup) -> TrialSetup:
    """``setup`` with the shared initial weights' training loss measured once, for every
    trial's ``train_loss_start``."""
    with distributed.agreement():
        model = setup.task.model().to(setup.device)
        model.load_state_dict(setup.initial_state)
        loss = initial_loss(model, setup)
    del model
    return dataclasses.replace(setup, loss_start=loss)


def from_checkpoint(setup: TrialSetup, checkpoint: Checkpoint,
                    warn: Callable[[str], None] | None = None,
                    suggest_lr: bool = True) -> TrialSetup:
    """``setup`` with its trials branching from the user's ``checkpoint``: its weights and
    (where it has one that fits the task's optimizer) its optimizer state. The divergence
    rule's reference loss is the task's loss at initialisation (``rise_limit``).
    ``suggest_lr``: warn when the file's lr is 1.5x or more from the task's, naming ``--lr``
    (the sweep's option)."""
    loss_init = with_initial_loss(setup).loss_start
    task = setup.task

    def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        optimizer = task.make_optimizer(params, lr)
        keep_group_ratios(optimizer, lr)  # a group's own lr ratio (a frozen part) is kept
        return optimizer

    with distributed.agreement():
        branch = branch_from(checkpoint, task.model, make_optimizer, task.lr)
    messages = list(branch.messages)
    note = checkpoint_lr_note(branch.run_lr, branch.run_lr_zero, task.lr, task.base_batch_size)
    if suggest_lr and note:
        messages.append(note + (f": to ask from where the run's lr is now, pass --lr "
                                f"{branch.run_lr:.3g}" if branch.run_lr else
                                ": pass --lr with the lr the run will go on at"))
    for message in messages:
        if warn:
            warn(message)
    return dataclasses.replace(setup, initial_state=branch.model_state,
                               optimizer_state=branch.optimizer_state, loss_start=None,
                               loss_init=loss_init, from_checkpoint=True,
                               checkpoint_lr=branch.run_lr,
                               checkpoint_lr_zero=branch.run_lr_zero)


def checkpoint_lr_note(run_lr: float | None, run_lr_zero: bool, lr: float,
                       base_batch_size: int) -> str | None:
    """What to say when a checkpoint's optimizer is not at the lr the trials scale from
    (``lr``): 1.5x or more away from it (``run_lr``, as a base lr), or at lr 0 (the last step
    of a schedule that decays to 0); None when it is near (or says nothing). Each command
    adds what to do about it."""
    if run_lr and max(run_lr, lr) / min(run_lr, lr) >= 1.5:
        return (f"the checkpoint's optimizer trains at the equivalent of lr {run_lr:.3g} at "
                f"batch {base_batch_size}; the trials scale from lr {lr:.3g}")
    if run_lr_zero:
        return (f"the checkpoint's optimizer is at lr 0 (its lr schedule's end?); the trials "
                f"train at lr {lr:.3g} scaled to each batch size, not at the run's")
    return None


def checkpoint_json(checkpoint: Checkpoint, setup: TrialSetup) -> dict:
    """What the result and the table say about the checkpoint the trials branched from."""
    return checkpoint.describe(setup.optimizer_state is not None, lr=setup.checkpoint_lr)


def run_sweep(task: Task, *, task_name: str, batch_sizes: Sequence[int], settings: SweepSettings,
              device: torch.device, journal_path: Path, resume: bool, max_batch: int,
              max_batch_source: str, overwrite: bool = False,
              hooks: SweepHooks | None = None, threads: int | None = None,
              checkpoint: Checkpoint | None = None) -> SweepResult:
    """Run (or resume) one trial per batch size, journal each, time the ok batch sizes in
    interleaved rounds (journaled too), then rank. ``threads``: CPU intra-op threads for the
    whole sweep (None: torch's current setting). ``checkpoint``: every trial branches from it
    (``settings.checkpoint_sha256`` must be its digest)."""
    if (checkpoint.sha256 if checkpoint else None) != settings.checkpoint_sha256:
        raise UsageError("the sweep's settings name another checkpoint than the one passed "
                         "(build them with api.plan_sweep(from_checkpoint=...))")
    with cpu_threads(threads) as in_force:
        result = _run_sweep(task, task_name=task_name, batch_sizes=batch_sizes,
                            settings=settings, device=device, journal_path=journal_path,
                            resume=resume, max_batch=max_batch,
                            max_batch_source=max_batch_source, overwrite=overwrite, hooks=hooks,
                            checkpoint=checkpoint)
    return dataclasses.replace(result, threads=in_force if device.type == "cpu" else None)


def _run_sweep(task: Task, *, task_name: str, batch_sizes: Sequence[int],
               settings: SweepSettings, device: torch.device, journal_path: Path, resume: bool,
               max_batch: int, max_batch_source: str, overwrite: bool,
               hooks: SweepHooks | None, checkpoint: Checkpoint | None = None) -> SweepResult:
    from .journal import Journal, JournalMode

    hooks = hooks or SweepHooks()
    micro = check_accumulation(batch_sizes, settings.accumulate)
    setup, made_split = make_setup(task, settings, device,
                                   min(EVAL_BATCH, *micro) if micro else EVAL_BATCH)
    n_train = len(setup.train_data)  # type: ignore[arg-type]
    skipped = tuple(b for b in batch_sizes if b > n_train)
    if skipped:
        where = " (after holding out 10% for validation)" if made_split else ""
        if len(skipped) == len(batch_sizes):
            raise UsageError(f"every batch size ({sizes_text(skipped)}) is larger than the "
                             f"{n_train:,} items the sweep trains on{where}; choose batch sizes "
                             f"<= {n_train:,}")
        if hooks.warn:
            hooks.warn(f"batch sizes {sizes_text(skipped)} are larger than the {n_train:,} "
                       f"training items{where}: skipped (a batch cannot hold more items than "
                       "the data)")
        batch_sizes = [b for b in batch_sizes if b <= n_train]
    budget = settings.budget
    if budget.kind is BudgetKind.samples and budget.amount < max(batch_sizes):
        raise UsageError(f"--budget {budget.amount:g} samples is less than one batch of "
                         f"{max(batch_sizes)}: every trial takes at least one step, so the "
                         f"trials would not be equal; use --budget >= {max(batch_sizes)} "
                         "(samples)")
    branched = None
    if checkpoint is not None:  # before the journal: a checkpoint that does not fit the model
        # is refused with nothing written (and matched on --resume too: the result says so)
        setup = from_checkpoint(setup, checkpoint, hooks.warn)
        branched = checkpoint_json(checkpoint, setup)
    mode = JournalMode.resume if resume else (
        JournalMode.overwrite if overwrite else JournalMode.new)
    # Under torchrun only rank 0 reads and writes the journal; the others get what it read.
    fingerprint = task_fingerprint(task, setup)
    journal = distributed.run_on_main(lambda: Journal(
        journal_path, task=task_name,
        settings={**settings.journal_settings(task), **distributed.journal_settings()}, mode=mode,
        fingerprint=fingerprint))
    trials: dict[int, TrialResult] = {}
    try:
        done = _keep_finished(journal.resumed, batch_sizes, hooks)
        for warning in journal.warnings:
            if hooks.warn:
                hooks.warn(warning)
        trials = {b: done[b] for b in batch_sizes if b in done}
        if distributed.is_main():  # every run, resumes included: report reads the last one
            journal.append_record("plan", {"batch_sizes": list(batch_sizes)})
        if len(trials) < len(batch_sizes):
            if settings.warm_start_steps:
                if hooks.trial_start:
                    hooks.trial_start(task.base_batch_size, -1, settings.warm_start_steps)
                setup = branch_point(setup, settings.warm_start_steps, hooks.step)
            setup = with_initial_loss(setup)
            if setup.loss_start is not None and not math.isfinite(setup.loss_start):
                raise TaskError(
                    f"the training loss at the initial weights is {setup.loss_start}, before any "
                    "step, so no learning rate can help: a NaN or inf in the training data, the "
                    "model's output or the task's loss_fn makes it (check them on one batch)")
            check_resumed_start(done, setup.loss_start)
        elif done and not settings.warm_start_steps:  # nothing to run: still the same task?
            check_resumed_start(done, with_initial_loss(setup).loss_start)
        for i, b in enumerate(batch_sizes):
            if b in trials:
                continue
            lr = scale_lr(task.lr, task.base_batch_size, b, settings.lr_scaling)
            if hooks.trial_start:
                hooks.trial_start(b, i, settings.budget.steps_for(b))
            result = distributed.agree_trial(run_trial(setup, b, lr, hooks.step))
            if distributed.is_main():
                journal.append(result)
            trials[b] = result
            if hooks.trial_end:
                hooks.trial_end(result)
        _warn_unscored(task, setup, trials, hooks)
        warn_short_ramp(task, settings, trials, hooks.warn)
        warn_no_trial_progressed(trials, hooks.warn)
        warn_noise_failed(trials, hooks.warn)
        timing, note = _time_ok_trials(setup, trials, hooks,
                                       resumed=any(b in done for b in trials))
        ordered = tuple(trials[b] for b in batch_sizes)
        result = None
        try:
            result = summarize(task.lr, task.base_batch_size, task_name, device, ordered,
                               settings, max_batch, max_batch_source, str(journal_path),
                               tuple(b for b in batch_sizes if b in done), made_split,
                               validation_cap(task), timing=tuple(timing.values()),
                               timing_note=note, skipped=skipped, n_train=n_train)
            if checkpoint is not None:
                result = dataclasses.replace(result, from_checkpoint=branched)
        finally:  # the rounds are kept even when ranking them fails or is interrupted
            if distributed.is_main():  # what this sweep ranked, so that `report` re-renders it
                journal.append_timing([t.to_dict() for t in timing.values()], batch_sizes,
                                      note, result.recommended_batch_size if result else None,
                                      branched, device=str(device))
    except KeyboardInterrupt:
        raise InterruptedRun(
            f"interrupted; {len(trials)} finished trial(s) are in {journal_path} — "
            "rerun with --resume to continue"
        ) from None
    finally:  # another run (a notebook's next cell) may write it now
        journal.close()
    return result


def _keep_finished(resumed: dict[int, TrialResult], batch_sizes: Sequence[int],
                   hooks: SweepHooks) -> dict[int, TrialResult]:
    """The journal's trials that ``--resume`` keeps: not those that failed with an error or
    out of memory, which say more about the moment (a bug since fixed, a GPU another job
    held) than about the batch size, and run again, said in a warning (they were kept: a
    resume could never retry them). A diverged or stalled trial is the batch size's answer
    and is kept; the rerun's record follows the old one, which ``report`` then skips."""
    again = [b for b in batch_sizes if b in resumed and resumed[b].status in RERUN_ON_RESUME]
    if again and hooks.warn:
        hooks.warn("--resume runs again the trials the journal holds as failed: "
                   + ", ".join(f"b={b} ({resumed[b].status.value})" for b in again))
    return {b: t for b, t in resumed.items() if b not in again}


def _warn_unscored(task: Task, setup: TrialSetup, trials: dict[int, TrialResult],
                   hooks: SweepHooks) -> None:
    """Say why the metric column is empty where ``Task.metric`` gave NaN or inf (the
    trial's score is the mean over the validation batches, so one such batch empties it)."""
    if task.metric is None or not setup.validate or not hooks.warn:
        return
    unscored = sorted(b for b, t in trials.items() if t.ok and t.val_metric is None)
    if unscored:
        hooks.warn(f"Task.metric gave NaN or inf on the validation data at batch size(s) "
                   f"{sizes_text(unscored)}: their metric shows as — (a mean over the "
                   "validation batches; check the metric on a small or degenerate batch)")


def warn_short_ramp(task: Task, settings: SweepSettings, trials: dict[int, TrialResult],
                    warn: Callable[[str], None] | None) -> None:
    """Say which trials ended inside their lr ramp: they never trained at the lr their row
    shows (a 50-step --warmup-steps over 2-step trials: b=512 peaked at 4% of it, and its
    columns understated it without a word, review). A ramp in steps is a larger share of a
    larger batch's trial; --warmup-steps auto ramps over the same share of every trial."""
    short = {}
    for b, t in sorted(trials.items()):
        if not t.ok or t.steps < 1:
            continue
        peak = trial_lr(t.steps - 1, t.lr, b, task.lr, settings.warmup_steps,
                        settings.lr_ramp_samples)
        if peak < t.lr * (1 - 1e-9):
            short[b] = peak / t.lr
    if short and warn:
        how = (f"--warmup-steps {settings.warmup_steps}" if not settings.lr_ramp_samples
               else f"the lr ramp over {settings.lr_ramp_samples:,} samples")
        warn(f"{how} is longer than the trials at b={sizes_text(list(short))}: they ended "
             "below the lr their rows show ("
             + ", ".join(f"b={b} at {f:.0%} of it" for b, f in short.items())
             + "), so their columns understate them; use fewer warm-up steps"
             + (", --warmup-steps auto (the same share of every trial)"
                if not settings.lr_ramp_samples else "") + " or a longer --budget")


def warn_no_trial_progressed(trials: dict[int, TrialResult],
                             warn: Callable[[str], None] | None) -> None:
    """Say when no ok trial lowered the training loss (from a checkpoint near a minimum,
    every trial's loss rose a little and the sweep still picked, on the noise scale's
    arithmetic alone, review): the loss columns then rank noise."""
    ok = [t for t in trials.values() if t.ok and t.train_loss_end is not None]
    if ok and warn and all(t.train_loss_end >= t.train_loss_start for t in ok):
        start = ok[0].train_loss_start
        warn(f"no trial lowered the training loss (from {start:.4g}: "
             + ", ".join(f"b={t.batch_size} {t.train_loss_end:.4g}"
                         for t in sorted(ok, key=lambda t: t.batch_size))
             + "): the pick rests on the step times and the noise scale alone; a lower lr, "
             "or a longer --budget, lets the trials show which size trains")


def warn_noise_failed(trials: dict[int, TrialResult], warn: Callable[[str], None] | None
                      ) -> None:
    """Say which trials trained but could not measure their noise scale, and why: they stand
    (their training is done and ranked) without a B_simple of their own."""
    failed = sorted(b for b, t in trials.items() if t.noise_error)
    if failed and warn:
        warn(f"the noise measurement failed at batch size(s) {sizes_text(failed)} "
             f"({trials[failed[0]].noise_error}); those trials stand without a B_simple "
             "(--noise-measurements 0 skips the measurement)")


def _time_ok_trials(setup: TrialSetup, trials: dict[int, TrialResult], hooks: SweepHooks,
                    resumed: bool = False) -> tuple[dict[int, RoundTiming], str | None]:
    """Interleaved timing rounds (``trials.time_batch_sizes``) over the ok batch sizes that
    can still be the fastest (``choice.contenders``); the others keep their trials' own step
    times, and the note says which and why. ``resumed`` (some trials come from the journal,
    timed in another session, perhaps on another machine or thread count): every ok size is
    timed, so that no old step time is ranked against new ones (review: an old 0.8 ms against
    24 ms now picked it). A failure here never loses the trials: the ranking then uses their
    own step times."""
    sizes = sorted(b for b, t in trials.items() if t.ok)
    if len(sizes) < 2:
        return {}, "fewer than two ok trials: each trial's own step time is used"
    timed = sizes if resumed else timing_plan([trials[b] for b in sizes])
    if hooks.timing_start:
        hooks.timing_start(progress_units(len(timed)))
    try:
        return time_batch_sizes(setup, list(timed), hooks.timing_step), None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the trials stand; say why
        note = (f"interleaved timing failed ({one_line(exc)}); each trial's own step time is "
                "used")
    release_memory()  # after the except block, which holds the failed step's tensors
    if hooks.warn:
        hooks.warn(note)
    return {}, note


def timing_plan(ok: Sequence[TrialResult]) -> tuple[int, ...]:
    """Which ok trials' batch sizes to time again in interleaved rounds: those that can still
    be the fastest at their own trials' step times and the noise scale the ranking will use
    (``choice.contenders``). ``summarize`` names the rest in the result's timing note."""
    b_hat = choose_b_hat(ok)
    interval = b_hat.interval or (NoiseInterval.exact(b_hat.value)
                                  if b_hat.value is not None else None)
    cold = [t.batch_size for t in ok if t.steps <= TIMING_WARMUP_STEPS]
    return contenders(warm_lower_bounds({t.batch_size: t.step_time_s for t in ok}, cold),
                      interval)

def task_fingerprint(task: Task, setup: TrialSetup) -> dict[str, Any]:
    """What identifies the task behind a journal beyond its entry point: the model's
    parameter count and a hash of its state's names and shapes, the training and validation
    items the trials use, the optimizer class, the loss and the metric."""
    import hashlib

    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in setup.initial_state.items())

    def name(fn: Any) -> str | None:
        return None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)

    optimizer = name(task.optimizer) if task.optimizer is not None else "SGD(momentum=0.9)"
    model = _meta_model(task)
    return {"parameters": sum(v.numel() for v in setup.initial_state.values()),
            "state_shapes": hashlib.sha256(shapes.encode()).hexdigest()[:12],
            "train_items": len(setup.train_data),  # type: ignore[arg-type]
            "val_items": len(setup.val_data),  # type: ignore[arg-type]
            "optimizer": optimizer, "optimizer_settings": _optimizer_settings(task, model),
            "loss_fn": name(task.loss_fn), "metric": name(task.metric),
            "modules": _modules(model),
            # a journal without it (older) stands for None: journal.FINGERPRINT_DEFAULTS
            "max_grad_norm": task.max_grad_norm}


def _meta_model(task: Task) -> nn.Module | None:
    """The task's model built on the ``meta`` device (no memory), once for both fingerprint
    fields that read it; None when it cannot be (the trials build it for real and report)."""
    try:
        with torch.device("meta"):
            return task.model()
    except Exception:  # noqa: BLE001 - the trials build it for real and report
        return None


def _modules(model: nn.Module | None) -> str | None:
    """The model's modules as ``repr`` prints them (their types and settings: a dropout's p,
    an activation's class), hashed: a change that only training mode shows (dropout 0 -> 0.9)
    leaves the shapes and the eval-mode start loss alike, and resumed the old trials (review)."""
    import hashlib

    if model is None:
        return None
    return hashlib.sha256(repr(model).encode()).hexdigest()[:12]


def _optimizer_settings(task: Task, model: nn.Module | None) -> str | None:
    """The optimizer's class and its groups' settings but the lr (momentum, weight decay,
    betas, ...), and each group's lr relative to the task's where it is not 1 (a backbone at
    0.1x: the ratio changed from one run to the next, and the resume compared trials of two
    setups, review), hashed: a factory's name stays when its arguments change (the review's
    momentum 0.9 -> 0 resumed the old trials). Built on ``model`` (on the ``meta`` device);
    None when it cannot be. TaskError: ``_lrs_following``."""
    import hashlib
    import json

    built = _built_optimizers(task, model)
    if built is None:
        return None
    opt, doubled = built
    lrs = _lrs_following(task, opt, doubled)
    groups = []
    for g, lr in zip(opt.param_groups, lrs):
        settings = {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
        ratio = lr / task.lr  # Task.lr > 0
        if ratio != 1.0:  # absent at 1, so a journal from before the ratio still resumes
            settings["lr_ratio"] = float(f"{ratio:.12g}")
        groups.append(settings)
    text = json.dumps([type(opt).__qualname__, groups], default=repr, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _built_optimizers(task: Task, model: nn.Module | None) -> tuple[Any, Any] | None:
    """The task's optimizer for ``model`` (on the ``meta`` device) at the task's lr and at
    twice it; None when it cannot be built (the trials build it for real and report)."""
    if model is None:
        return None
    try:
        with torch.device("meta"):
            return (task.make_optimizer(model.parameters(), task.lr),
                    task.make_optimizer(model.parameters(), 2 * task.lr))
    except Exception:  # noqa: BLE001 - the trials build it for real and report
        return None


def _lrs_following(task: Task, opt: Any, doubled: Any) -> list[float]:
    """The groups' lrs of the optimizer built at the task's lr. TaskError when a group has no
    number for its lr (Adafactor's ``lr=None``: every trial failed on it, and the fingerprint
    raised an internal error) or when no group's lr follows the factory's ``lr`` argument
    (``lambda p, lr: Adam(p, lr=1e-3)``: every trial would train at that one lr while the
    table said each batch size's scaled lr, review)."""
    name = getattr(task.optimizer, "__qualname__", type(opt).__qualname__)
    try:
        lrs = [float(g["lr"]) for g in opt.param_groups]
        again = [float(g["lr"]) for g in doubled.param_groups]
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskError(f"the task's optimizer {name} has a parameter group without a number "
                        f"for its lr ({one_line(exc)}); bsselect scales the lr per batch size "
                        "through each group's lr, so give it one") from exc
    if any(lrs) and lrs == again:
        raise TaskError(
            f"the task's optimizer {name} ignores its lr argument: called with lr "
            f"{task.lr:g} and {2 * task.lr:g} it built the same group lrs {lrs}; bsselect "
            "scales the lr per batch size through that argument, so build the optimizer "
            "with it (optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr))")
    return lrs


def check_resumed_start(done: dict[int, TrialResult], loss_start: float | None) -> None:
    """UsageError when the journal's trials started from another training loss than this
    task's shared initial weights give: the same entry point now builds another model (an
    activation changed, which no shape shows). Same machine and seed: equal to rounding."""
    if loss_start is None or not math.isfinite(loss_start):
        return
    for b, trial in sorted(done.items()):
        before = trial.train_loss_start
        if before is not None and math.isfinite(before) and not math.isclose(
                before, loss_start, rel_tol=1e-4, abs_tol=1e-7):
            raise UsageError(
                f"the journal's trials started from training loss {before:.6g} (b={b}), and "
                f"this task's initial weights give {loss_start:.6g}: the task changed since "
                "the journal was written, so its trials do not apply; use a new --journal "
                "path or --overwrite")
