"""``sweep``: short trials at power-of-two batch sizes, journaled, ranked against the formula."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import distributed
from ..checkpoint import Checkpoint, branch_from
from ..errors import BsselectError, DoesNotFitError, InterruptedRun, TaskError, UsageError, one_line
from ..memory.capacity import largest_pow2_at_most
from ..oom import release_memory
from ..precision import Precision
from ..task import Task
from .choice import CONTENDER_FACTOR, NoiseInterval, contenders
from .formula import grad_accum_steps
from .lr_scaling import LrScaling, default_lr_scaling, scale_lr
from .rank import Ranking, choose_b_hat, rank_trials
from .timing import RoundTiming, cpu_threads, progress_units
from .trial_types import TrialResult
from .trials import (EVAL_BATCH, BudgetKind, TrialBudget, TrialSetup, branch_point, eval_subset,
                     initial_loss, keep_group_ratios, run_trial, split_validation,
                     time_batch_sizes)

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


@dataclass(frozen=True)
class SweepResult:
    task: str
    device: str
    batch_sizes: tuple[int, ...]
    settings: SweepSettings
    base_lr: float
    base_batch_size: int
    max_batch: int
    max_batch_source: str
    trials: tuple[TrialResult, ...]
    ranking: Ranking
    recommended_batch_size: int | None
    recommended_lr: float | None
    b_opt_accumulation: dict | None    # when b_opt exceeds what fits: micro-batch x steps
    journal: str
    resumed: tuple[int, ...]           # batch sizes taken from the journal, not re-run
    made_val_split: bool
    validation_items: int | None = None  # validated on a fixed subset of this many items
    threads: int | None = None  # CPU intra-op threads during the sweep (None: not set)
    timing: tuple[RoundTiming, ...] = ()  # interleaved timing rounds behind step_time_s
    timing_note: str | None = None  # why there are none, or which sizes kept their own
    skipped: tuple[int, ...] = ()  # batch sizes larger than the training set: not run
    n_train: int | None = None  # items the trials train on
    # --from-checkpoint: path, sha256, format, step, optimizer_state (bool); None: no checkpoint
    from_checkpoint: dict | None = None

    def not_timed(self) -> list[int]:
        """The ok batch sizes whose step time is their own trial's, not the rounds' (all of
        them when there were no rounds)."""
        return _not_timed(self.trials, self.timing)

    def failure(self) -> BsselectError | None:
        """Why the sweep as a whole failed (no trial finished ok), as the error the CLI exits
        with after printing the table: DoesNotFitError when every trial ran out of memory,
        else TaskError with what to try; None when there is a recommendation."""
        if any(t.ok for t in self.trials):
            return None
        again = (f" (batch sizes {_sizes(self.resumed)} came from the journal as they were: "
                 "--resume keeps every finished trial, --overwrite runs them again)"
                 if self.resumed else "")
        statuses = {t.status.value for t in self.trials}
        if statuses == {"oom"}:
            return DoesNotFitError(
                f"every batch size ran out of memory ({_sizes(self.batch_sizes)}); try smaller "
                f"batches (--min-batch, --batch-sizes) or --accumulate{again}")
        lrs = ", ".join(f"{t.lr:.3g}" for t in self.trials)
        errors = [t for t in self.trials if t.status.value == "error"]
        if errors and len(errors) == len(self.trials):
            return TaskError(f"every trial failed; the first: batch {errors[0].batch_size}: "
                             f"{errors[0].error}{again}")
        tried = ", ".join(f"{t.batch_size}: {t.status.value}" for t in self.trials)
        flat = [t for t in self.trials if t.status.value == "no_progress"
                and t.train_loss_end == t.train_loss_start]
        if flat and len(flat) == len(self.trials):
            return TaskError(
                f"the training loss never changed in any trial ({_sizes(self.batch_sizes)}: "
                f"{flat[0].train_loss_start:.4g} at the start and the end of each): no gradient "
                "reaches the trainable parameters (a detached or constant output, frozen "
                "parameters, an optimizer given no parameters) or the lr is 0; nothing to "
                f"recommend{again}")
        plateau = (", or a longer --budget if the loss sat on a plateau (no_progress: it did "
                   "not fall, without blowing up)"
                   if any(t.status.value == "no_progress" for t in self.trials) else "")
        if self.from_checkpoint:
            return TaskError(
                f"no trial trained from the checkpoint ({tried}); "
                f"the learning rates tried were {lrs} ({self.settings.lr_scaling.value} scaling "
                f"from lr {self.base_lr:g} at batch {self.base_batch_size}), likely above the lr "
                "the run trains at by now (a decayed schedule): pass --lr "
                + (f"{self.from_checkpoint['lr']:.3g} (the checkpoint's)"
                   if self.from_checkpoint.get("lr") else "with the run's current lr")
                + ", or try --lr-scaling sqrt or none")
        return TaskError(
            f"no trial trained ({tried}); "
            f"the learning rates tried were {lrs} ({self.settings.lr_scaling.value} scaling from "
            f"lr {self.base_lr:g} at batch {self.base_batch_size}): try a lower lr (--lr, or "
            f"the task's), --lr-scaling sqrt or none, or --warmup-steps{plateau}{again}")

    def to_json(self) -> dict:
        return {
            "task": self.task, "device": self.device, "batch_sizes": list(self.batch_sizes),
            "budget": {"kind": self.settings.budget.kind.value,
                       "amount": self.settings.budget.amount},
            "lr_scaling": self.settings.lr_scaling.value, "base_lr": self.base_lr,
            "base_batch_size": self.base_batch_size,
            "max_batch": self.max_batch, "max_batch_source": self.max_batch_source,
            "precision": self.settings.precision.value, "accumulate": self.settings.accumulate,
            "warm_start_steps": self.settings.warm_start_steps,
            "from_checkpoint": self.from_checkpoint,
            "warmup_steps": self.settings.warmup_steps,
            "lr_ramp_samples": self.settings.lr_ramp_samples,
            "trials": [self._trial_json(t) for t in self.trials],
            "fit": self.ranking.fit_dict(),
            "ranking": list(self.ranking.ranking),
            "rows": [dict(asdict(r), status=r.status.value) for r in self.ranking.rows],
            "recommended_batch_size": self.recommended_batch_size,
            "recommended_lr": self.recommended_lr,
            "tied_with_best": list(self.ranking.tied_with_best),
            "threads": self.threads,
            "skipped_batch_sizes": list(self.skipped),
            "timing": {"method": "interleaved rounds", "rounds": [t.to_dict() for t in self.timing],
                       "note": self.timing_note, "not_timed": self.not_timed()},
            "b_opt_accumulation": self.b_opt_accumulation,
            "verdict": self.ranking.verdict,
            "journal": self.journal, "resumed": list(self.resumed),
            "validation": ("held-out 10% of train_data" if self.made_val_split else "val_data")
            + (f", a fixed subset of {self.validation_items} items"
               if self.validation_items else ""),
        }

    def to_dict(self) -> dict:
        """The ``--json`` output (``to_json``'s name in the Python API)."""
        return self.to_json()

    def _trial_json(self, trial: TrialResult) -> dict:
        """A trial as journaled; with accumulation also its micro-batch (what must fit) next
        to ``batch_size``, the effective batch that trains."""
        data = trial.to_dict()
        if self.settings.accumulate > 1:
            data.update(micro_batch=trial.batch_size // self.settings.accumulate,
                        effective_batch=trial.batch_size)
        return data


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
            raise UsageError(f"every batch size ({_sizes(skipped)}) is larger than the "
                             f"{n_train:,} items the sweep trains on{where}; choose batch sizes "
                             f"<= {n_train:,}")
        if hooks.warn:
            hooks.warn(f"batch sizes {_sizes(skipped)} are larger than the {n_train:,} training "
                       f"items{where}: skipped (a batch cannot hold more items than the data)")
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
    done = journal.resumed
    for warning in journal.warnings:
        if hooks.warn:
            hooks.warn(warning)
    trials: dict[int, TrialResult] = {b: done[b] for b in batch_sizes if b in done}
    if len(trials) < len(batch_sizes):
        if settings.warm_start_steps:
            if hooks.trial_start:
                hooks.trial_start(task.base_batch_size, -1, settings.warm_start_steps)
            setup = branch_point(setup, settings.warm_start_steps, hooks.step)
        setup = with_initial_loss(setup)
        if setup.loss_start is not None and not math.isfinite(setup.loss_start):
            raise TaskError(f"the training loss at the initial weights is {setup.loss_start}, "
                            "before any step, so no learning rate can help: the model's output "
                            "or the task's loss_fn makes it (check them on one batch)")
        check_resumed_start(done, setup.loss_start)
    elif done and not settings.warm_start_steps:  # nothing to run: still the same task?
        check_resumed_start(done, with_initial_loss(setup).loss_start)
    try:
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
        timing, note = _time_ok_trials(setup, trials, hooks)
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
                                      branched)
    except KeyboardInterrupt:
        raise InterruptedRun(
            f"interrupted; {len(trials)} finished trial(s) are in {journal_path} — "
            "rerun with --resume to continue"
        ) from None
    return result


def _time_ok_trials(setup: TrialSetup, trials: dict[int, TrialResult], hooks: SweepHooks
                    ) -> tuple[dict[int, RoundTiming], str | None]:
    """Interleaved timing rounds (``trials.time_batch_sizes``) over the ok batch sizes that
    can still be the fastest (``choice.contenders``); the others keep their trials' own step
    times, and the note says which and why. A failure here never loses the trials: the
    ranking then uses their own step times."""
    sizes = sorted(b for b, t in trials.items() if t.ok)
    if len(sizes) < 2:
        return {}, "fewer than two ok trials: each trial's own step time is used"
    timed = timing_plan([trials[b] for b in sizes])
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
    return contenders({t.batch_size: t.step_time_s for t in ok}, interval)


def _not_timed(trials: Sequence[TrialResult], timing: Sequence[RoundTiming]) -> list[int]:
    """The ok batch sizes the rounds did not time (all of them when there were none)."""
    timed = {t.batch_size for t in timing}
    return [t.batch_size for t in trials if t.ok and t.batch_size not in timed]


def _untimed_note(sizes: Sequence[int]) -> str | None:
    if not sizes:
        return None
    whose = "the trial's own step time" if len(sizes) == 1 else "the trials' own step times"
    return (f"b={_sizes(sizes)} not timed again: {'each ' if len(sizes) > 1 else ''}over "
            f"{CONTENDER_FACTOR:g}x the fastest's predicted time to the target (at {whose}, "
            "across the noise scale's interval)")


def apply_timing(trials: Sequence[TrialResult], timing: Sequence[RoundTiming]
                 ) -> tuple[TrialResult, ...]:
    """Trials whose ``step_time_s`` (and the rates derived from it) come from the
    interleaved timing rounds; ``trial_step_time_s`` keeps the trial's own."""
    by_size = {t.batch_size: t for t in timing}
    out = []
    for t in trials:
        round_timing = by_size.get(t.batch_size)
        if not t.ok or round_timing is None:
            out.append(t)
            continue
        step = round_timing.step.mid
        drop = (t.train_loss_start or 0.0) - (t.train_loss_end or 0.0)
        out.append(dataclasses.replace(
            t, step_time_s=step, samples_per_s=t.batch_size / step,
            loss_drop_per_s=drop / (step * t.steps) if t.steps else None,
            trial_step_time_s=t.trial_step_time_s or t.step_time_s))
    return tuple(out)


def task_fingerprint(task: Task, setup: TrialSetup) -> dict[str, Any]:
    """What identifies the task behind a journal beyond its entry point: the model's
    parameter count and a hash of its state's names and shapes, the training and validation
    items the trials use, the optimizer class, the loss and the metric."""
    import hashlib

    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in setup.initial_state.items())

    def name(fn: Any) -> str | None:
        return None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)

    optimizer = name(task.optimizer) if task.optimizer is not None else "SGD(momentum=0.9)"
    return {"parameters": sum(v.numel() for v in setup.initial_state.values()),
            "state_shapes": hashlib.sha256(shapes.encode()).hexdigest()[:12],
            "train_items": len(setup.train_data),  # type: ignore[arg-type]
            "val_items": len(setup.val_data),  # type: ignore[arg-type]
            "optimizer": optimizer, "optimizer_settings": _optimizer_settings(task),
            "loss_fn": name(task.loss_fn), "metric": name(task.metric)}


def _optimizer_settings(task: Task) -> str | None:
    """The optimizer's class and its groups' settings but the lr (momentum, weight decay,
    betas, ...), hashed: a factory's name stays when its arguments change (the review's
    momentum 0.9 -> 0 resumed the old trials). Built on the model on the ``meta`` device;
    None when it cannot be."""
    import hashlib
    import json

    try:
        with torch.device("meta"):
            opt = task.make_optimizer(task.model().parameters(), task.lr)
    except Exception:  # noqa: BLE001 - the trials build it for real and report
        return None
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in opt.param_groups]
    text = json.dumps([type(opt).__qualname__, groups], default=repr, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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


def summarize(base_lr: float, base_batch_size: int, task_name: str, device: torch.device | str,
              trials: Sequence[TrialResult], settings: SweepSettings, max_batch: int,
              max_batch_source: str, journal: str, resumed: tuple[int, ...],
              made_val_split: bool, validation_items: int | None = None,
              timing: Sequence[RoundTiming] = (), timing_note: str | None = None,
              skipped: tuple[int, ...] = (),
              n_train: int | None = None) -> SweepResult:
    """Fits and ranking over finished trials (also used by ``bsselect report``), with the
    interleaved ``timing`` rounds' step times where there are any."""
    trials = apply_timing(trials, timing)
    times = {t.batch_size: t.step for t in timing}
    if times and timing_note is None:  # the sizes the rounds left out (choice.contenders)
        timing_note = _untimed_note(_not_timed(trials, timing))
    b_hat = choose_b_hat(trials)
    if b_hat.source:
        ranking = rank_trials(trials, b_hat.value, b_hat.source, times=times,
                              b_interval=b_hat.interval, b_hat_sizes=b_hat.from_sizes)
    else:
        ranking = rank_trials(trials, None, times=times)
    rec = ranking.recommended_batch_size
    rec_lr = scale_lr(base_lr, base_batch_size, rec, settings.lr_scaling) if rec else None
    accumulation = None
    # Only when the maximum is what fits (the probe's), not a bound the user chose.
    if (ranking.b_opt is not None and ranking.b_opt > max_batch >= 1
            and max_batch_source.startswith("probe")):
        target = 1 << max(0, round(ranking.b_opt).bit_length() - 1)
        micro = largest_pow2_at_most(max_batch)
        if target > micro:
            accumulation = {"effective_batch": target, "micro_batch": micro,
                            "steps": grad_accum_steps(target, micro)}
    return SweepResult(
        task=task_name, device=str(device), batch_sizes=tuple(t.batch_size for t in trials),
        settings=settings, base_lr=base_lr, base_batch_size=base_batch_size,
        max_batch=max_batch, max_batch_source=max_batch_source, trials=tuple(trials),
        ranking=ranking, recommended_batch_size=rec, recommended_lr=rec_lr,
        b_opt_accumulation=accumulation, journal=journal, resumed=resumed,
        made_val_split=made_val_split, validation_items=validation_items,
        timing=tuple(timing), timing_note=timing_note, skipped=skipped, n_train=n_train,
    )


def _sizes(sizes: Sequence[int]) -> str:
    return ", ".join(str(b) for b in sizes)


def resolve_lr_scaling(task: Task, rule: str | None) -> LrScaling:
    if rule in (None, "auto"):
        with torch.device("meta"):
            params = [torch.nn.Parameter(torch.empty(1))]
        return default_lr_scaling(task.make_optimizer(params, task.lr))
    try:
        return LrScaling(rule)
    except ValueError:
        raise UsageError(f"--lr-scaling must be auto, linear, sqrt or none; got {rule!r}") from None
