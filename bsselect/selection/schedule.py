"""``bsselect schedule``: how the best batch size moves over a run, and a batch-size warm-up.

The base configuration (the task's batch size ``b0`` and lr) trains for the first half of the
run's horizon ``H``. At points ``0, H/2^(P-1), ..., H/4, H/2`` (samples seen) the run is
branched: every batch size trains ``branch_samples`` samples from that point's weights and
optimizer state, with its lr scaled by the sweep's rule, and its loss drop on a fixed training
subset is measured. At each point this gives

- the **critical batch size** (Merrill et al. 2025): the largest batch whose drop over the equal
  sample budget is within ``tolerance`` of the smallest batch's;
- the **fastest batch size**: the most loss drop per second of training, at step times
  measured in interleaved rounds (``trials.time_batch_sizes``) and fitted with the physics of a
  step (``steptime.physical_fit``); batch sizes within the rounds' spread of it are tied, and
  the tied one with the largest drop wins, so timing noise does not decide the plan
  (``point_fastest``);
- ``B_simple`` (McCandlish et al. 2018) at the point, with ``bsselect noise``'s estimator.

The schedule: stage ``k`` makes the progress the base run makes between points ``k`` and
``k+1`` (the last stage: to ``H``) at that point's fastest batch, never smaller than the batch
before it (a batch-size warm-up), with the lr scaled for it and ramped up from the previous
stage's over ``lr_ramp_samples``. Its predicted cost uses the measured relative sample
efficiency ``r_k(b) = drop_k(b0) / drop_k(b)``: stage ``k`` needs ``L_k * r_k(b)`` samples,
``L_k * r_k(b) / b`` steps and ``t(b)`` seconds a step. A point where the base batch's own
branch made no progress is not ``informative``: it has no fastest batch and no ratios, and
its stretch takes the ratios of the point before (``point_ratios``). The same prediction is
made for every fixed batch size, so the saving is stated against the base batch and the best
fixed one; a plan that prediction finds slower than a fixed batch (or cannot predict) gives
way to that fixed batch (``no_worse_than_fixed``). The pure decisions and the schedule's types
are in ``schedule_plan``; this module measures.
Method and measured results: docs/noise.md ("The noise scale over a run"),
docs/benchmarks-schedule.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import distributed
from ..checkpoint import Checkpoint
from ..device import callers_rng
from ..errors import InterruptedRun, TaskError, UsageError, one_line
from ..oom import caused_by_oom, drop_frames, is_oom_error, release_memory
from ..units import json_document
from .lr_scaling import LrScaling, scale_lr, warmup_lr
from .noise import default_batch_sizes
from .noise_run import MIN_MEASUREMENTS
from .schedule_plan import (BatchSchedule, Branch, Prediction, SchedulePoint, Stage, critical_batch,
                            fastest_batch, growth_exponent, informative, no_worse_than_fixed,
                            plan_stages, point_fastest, point_ratios, predict_fixed,
                            relative_samples, stage_batches, stage_lengths)
from .steptime import TimeInterval, physical_fit
from .timing import RoundTiming, cpu_threads, progress_units
from .trial_types import RERUN_ON_RESUME, TrialResult
from .trials import (EVAL_BATCH, WARM_START_SEED_OFFSET, BudgetKind, TrialBudget, TrialSetup,
                     _fresh_model, _step_options, _timed_step, cycle_batches, run_trial, set_lr,
                     time_batch_sizes, training_task)

__all__ = ["BatchSchedule", "Branch", "Prediction", "ScheduleHooks", "SchedulePoint",
           "ScheduleResult", "ScheduleSettings", "Stage", "critical_batch", "default_horizon",
           "fastest_batch", "growth_exponent", "informative", "no_worse_than_fixed",
           "plan_stages", "point_fastest", "point_ratios", "predict_fixed", "relative_samples",
           "run_schedule", "short_names", "stage_batches", "stage_lengths"]

DEFAULT_POINTS = 5          # 0, H/16, H/8, H/4, H/2
BRANCH_FRACTION = 16        # a branch trains H/16 samples
MIN_BRANCH_STEPS = 4        # the largest branched batch takes at least this many steps
DEFAULT_HORIZON_STEPS = 256  # default horizon: this many base steps, or one epoch if longer
DEFAULT_NOISE_MEASUREMENTS = 8
DEFAULT_TOLERANCE = 0.1     # critical batch: drop within 10% of the smallest batch's


@dataclass(frozen=True)
class ScheduleSettings:
    """What shapes a schedule measurement (and its journal's key)."""

    horizon: int                 # samples of the run to plan
    points: int = DEFAULT_POINTS
    branch_samples: int = 0      # 0: horizon // BRANCH_FRACTION
    lr_scaling: LrScaling = LrScaling.linear
    seed: int = 0
    lr_ramp_samples: int = 0
    noise_measurements: int = DEFAULT_NOISE_MEASUREMENTS
    tolerance: float = DEFAULT_TOLERANCE
    # The user's checkpoints as the points (no base run): the samples their run had seen at
    # each, and each file's SHA-256 (the journal's key), in the same order.
    checkpoint_samples: tuple[int, ...] = ()
    checkpoint_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise UsageError(f"--horizon must be >= 1 sample, got {self.horizon}")
        if self.points < 2:
            raise UsageError(f"--points must be at least 2 (the start and one later point), "
                             f"got {self.points}")
        if self.points > self.horizon.bit_length():  # H/2^(P-1) below one sample
            raise UsageError(f"--points {self.points} exceeds what --horizon {self.horizon:,} "
                             f"spaces: the points are at H/2^k samples, at most "
                             f"{self.horizon.bit_length()} of them")
        if self.branch_samples < 0 or self.noise_measurements < 0:
            raise UsageError("--branch-samples and --noise-measurements must be >= 0")
        if self.branch_samples > self.horizon:
            # a branch past the run it plans (a typo started hours of work in silence, review)
            raise UsageError(f"--branch-samples {self.branch_samples:,} is longer than the "
                             f"run it plans (--horizon {self.horizon:,}): a branch is a short "
                             f"piece of the run; the default is the horizon / "
                             f"{BRANCH_FRACTION}")
        if not 0 < self.tolerance < 1:
            raise UsageError(f"--tolerance must be between 0 and 1, got {self.tolerance}")
        if 0 < self.noise_measurements < MIN_MEASUREMENTS:
            # Each point's B_simple is one estimate with its own interval, as `bsselect noise`
            # gives: from fewer, a "90%" interval covers the truth about half the time.
            raise UsageError(f"--noise-measurements must be 0 (off) or at least "
                             f"{MIN_MEASUREMENTS}: each point's B_simple interval comes from "
                             f"its own measurements, got {self.noise_measurements}")
        if len(self.checkpoint_samples) != len(self.checkpoint_sha256):
            raise ValueError("checkpoint_samples and checkpoint_sha256 differ in length")
        late = [n for n in self.checkpoint_samples if n >= self.horizon]
        if late:
            raise UsageError(f"a checkpoint at sample {late[0]:,} is not before the end of the "
                             f"run (--horizon {self.horizon:,}): the schedule plans up to the "
                             "horizon; give a longer --horizon")

    @property
    def branch(self) -> int:
        return self.branch_samples or max(1, self.horizon // BRANCH_FRACTION)

    def point_samples(self) -> list[int]:
        """Samples seen by the base run at each point: 0, then H/2^(P-1) .. H/2; with the
        user's checkpoints, 0 (initialisation) and theirs."""
        if self.checkpoint_samples:
            return sorted({0, *self.checkpoint_samples})
        later = [self.horizon >> k for k in range(self.points - 1, 0, -1)]
        return sorted({0, *[s for s in later if s > 0]})

    def journal_settings(self, task: Any, batch_sizes: Sequence[int]) -> dict[str, Any]:
        return {"command": "schedule", "horizon": self.horizon, "points": self.points,
                "branch_samples": self.branch, "lr_scaling": self.lr_scaling.value,
                "seed": self.seed, "lr_ramp_samples": self.lr_ramp_samples,
                "noise_measurements": self.noise_measurements, "base_lr": task.lr,
                "base_batch_size": task.base_batch_size, "batch_sizes": list(batch_sizes),
                **({"checkpoints": [[n, h] for n, h in zip(self.checkpoint_samples,
                                                          self.checkpoint_sha256)]}
                   if self.checkpoint_samples else {}),
                **({"loss_weight": True} if getattr(task, "loss_weight", None) else {})}


@dataclass(frozen=True)
class ScheduleResult:
    task_name: str
    settings: ScheduleSettings
    base_batch_size: int
    base_lr: float
    batch_sizes: tuple[int, ...]
    step_times_s: dict[int, float]       # fitted (physical_fit of the interleaved rounds)
    timing: tuple[RoundTiming, ...]
    points: tuple[SchedulePoint, ...]
    schedule: BatchSchedule
    fixed: dict[int, Prediction]          # predicted cost of each fixed batch size
    predicted: Prediction                 # the schedule's
    growth: dict[str, float | None]       # exponents of B ~ samples^k (critical, fastest,
    # b_simple)
    journal: str
    resumed: int
    wall_s: float
    notes: tuple[str, ...] = field(default=())

    @property
    def best_fixed(self) -> int | None:
        finite = [(p.time_s, b) for b, p in self.fixed.items() if math.isfinite(p.time_s)]
        return min(finite)[1] if finite else None

    def saving(self, against: int | None) -> dict[str, float | None]:
        """Predicted steps and time of the schedule over those of fixed batch ``against``."""
        if against is None or against not in self.fixed:
            return {"steps": None, "time": None}
        ref = self.fixed[against]
        return {"steps": _ratio(self.predicted.steps, ref.steps),
                "time": _ratio(self.predicted.time_s, ref.time_s)}

    def to_json(self) -> dict[str, Any]:
        best = self.best_fixed
        return json_document({
            "task": self.task_name, "horizon_samples": self.settings.horizon,
            "branch_samples": self.settings.branch, "tolerance": self.settings.tolerance,
            "base_batch_size": self.base_batch_size, "base_lr": self.base_lr,
            "lr_scaling": self.settings.lr_scaling.value,
            "lr_ramp_samples": self.settings.lr_ramp_samples,
            "batch_sizes": list(self.batch_sizes),
            "step_time_s": {str(b): t for b, t in self.step_times_s.items()},
            "timing": [t.to_dict() for t in self.timing],
            "points": [p.to_json() for p in self.points],
            "stages": [s.to_json() for s in self.schedule.stages],
            "predicted": self.predicted.to_json(),
            "fixed": {str(b): p.to_json() for b, p in self.fixed.items()},
            "best_fixed_batch_size": best,
            "vs_base": self.saving(self.base_batch_size), "vs_best_fixed": self.saving(best),
            "growth_exponent": self.growth, "notes": list(self.notes),
            "from_checkpoints": [{"samples": n, "sha256": h} for n, h in zip(
                self.settings.checkpoint_samples, self.settings.checkpoint_sha256)],
            "journal": self.journal, "resumed_trials": self.resumed, "wall_s": self.wall_s,
        })

    def to_dict(self) -> dict[str, Any]:
        return self.to_json()


@dataclass
class ScheduleHooks:
    """Progress callbacks (all optional): ``phase(description, total)`` starts a bar,
    ``advance()`` moves it, ``start(line)`` says what is about to run. Warnings are the
    result's ``notes``."""

    phase: Callable[[str, int | None], None] | None = None
    advance: Callable[[], None] | None = None
    start: Callable[[str], None] | None = None  # one line: what is about to run


def _ratio(a: float, b: float) -> float | None:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else None


# --- the measurement --------------------------------------------------------------------------

def branch_sizes(sizes: Sequence[int], branch_samples: int, b0: int) -> tuple[list[int], list[int]]:
    """(kept, dropped): batch sizes that take at least MIN_BRANCH_STEPS steps of a branch, with
    the base batch always kept (``run_schedule`` refuses a branch too short for it)."""
    kept = sorted({b for b in sizes if b * MIN_BRANCH_STEPS <= branch_samples} | {b0})
    return kept, sorted(b for b in sizes if b not in kept)


def _base_run(setup: TrialSetup, point_samples: Sequence[int], hooks: ScheduleHooks
              ) -> Iterator[tuple[int, int, torch.nn.Module, dict, dict]]:
    """Train the base configuration and yield ``(samples, steps, model, model state,
    optimizer state)`` at each of ``point_samples`` (the first step that reaches it)."""
    task, device = setup.task, setup.device
    model, optimizer = _fresh_model(setup, task.lr)
    b = task.base_batch_size
    warm = dataclasses.replace(setup, seed=setup.seed + WARM_START_SEED_OFFSET)
    # Its own random stream (dropout, augmentation): the same whatever ran before it (the
    # timing rounds) and between its points (``run_schedule`` forks the RNG around each
    # point's branches), so a resumed schedule's base run is the uninterrupted one's
    # (review: with dropout, a resume skipped journaled branches and drifted).
    torch.manual_seed(warm.seed)
    batches = cycle_batches(warm, b // setup.accumulate)
    options = _step_options(setup, batches, device)
    samples = steps = 0
    for target in point_samples:
        while samples < target:
            set_lr(optimizer, warmup_lr(steps, task.lr, setup.warmup_steps))
            value, y, _ = _timed_step(model, optimizer, task, batches, device, options)
            steps += 1
            samples += len(y) if isinstance(y, torch.Tensor) else b
            if not math.isfinite(value):
                raise TaskError(f"the base configuration (batch {b}, lr {task.lr:g}) diverged at "
                                f"step {steps}; lower the task's lr")
            if hooks.advance:
                hooks.advance()
        yield samples, steps, model, copy.deepcopy(model.state_dict()), \
            copy.deepcopy(optimizer.state_dict())


def _checkpoint_run(setup: TrialSetup, checkpoints: Sequence[Checkpoint],
                    settings: ScheduleSettings, hooks: ScheduleHooks, notes: list[str]
                    ) -> Iterator[tuple[int, int, torch.nn.Module, dict, dict | None,
                                    str | None]]:
    """The points of ``_base_run`` from the user's checkpoints instead of a base run:
    initialisation (unless a checkpoint is at sample 0), then each checkpoint in the order of
    the samples its run had seen, as ``(samples, the run's steps, model, model state,
    optimizer state, path)``. Each file is matched to the task's model and optimizer as
    ``sweep --from-checkpoint`` matches it (its warnings become notes)."""
    from .sweep import checkpoint_lr_note, from_checkpoint

    b0 = setup.task.base_batch_size
    order = sorted(zip(settings.checkpoint_samples, checkpoints), key=lambda x: x[0])
    if order[0][0] > 0:
        for samples, steps, model, mstate, ostate in _base_run(setup, [0], hooks):
            yield samples, steps, model, mstate, ostate, None
    names = short_names([c.path for _, c in order])
    for (samples, checkpoint), name in zip(order, names):
        def note(message: str, name: str = name, path: str = checkpoint.path) -> None:
            notes.append(message if path in message else f"{name}: {message}")

        branched = from_checkpoint(setup, checkpoint, note, suggest_lr=False)
        said = checkpoint_lr_note(branched.checkpoint_lr, branched.checkpoint_lr_zero,
                                  setup.task.lr, b0)
        if said:
            notes.append(f"{name}: {said}, as the schedule's stages do (a schedule for a "
                         "constant base lr)")
        model = setup.task.model().to(setup.device)
        model.load_state_dict(branched.initial_state)
        model.train()
        yield (samples, samples // b0, model, branched.initial_state, branched.optimizer_state,
               checkpoint.path)


def short_names(paths: Sequence[str]) -> list[str]:
    """Each path's file name, or as many trailing parts as it takes to tell it from the
    others (``a/model.pt``, ``b/model.pt``)."""
    parts = [Path(p).parts for p in paths]
    out = []
    for i, mine in enumerate(parts):
        k = 1
        while k < len(mine) and any(j != i and other[-k:] == mine[-k:]
                                    for j, other in enumerate(parts)):
            k += 1
        out.append(str(Path(*mine[-k:])) if mine else paths[i])
    return out


def _noise_at(setup: TrialSetup, model: torch.nn.Module, measurements: int, seed: int,
              failed: list[str]) -> dict[str, Any] | None:
    """The noise scale at a point, or None: out of memory, or a failure whose reason is
    added to ``failed`` (a batch that cannot be cut into sub-batches). The point and its
    branches stand without it, as a sweep's trial does."""
    from .noise import estimate_noise
    from .noise_run import estimate_json

    if not measurements:
        return None
    b_small, b_big = default_batch_sizes(setup.task)
    try:
        est, _ = estimate_noise(model, training_task(setup), b_small=b_small, b_big=b_big,
                                measurements=measurements, seed=seed,
                                precision=setup.precision)
    except Exception as exc:  # noqa: BLE001 - the point stands without it
        if not caused_by_oom(exc):
            failed.append(one_line(exc))
        est = None
    if est is None:
        release_memory()  # after the except block, which holds the failed step's tensors
        return None
    return estimate_json(est)


def _branch(trial: TrialResult, step_time_s: float | None) -> Branch:
    if not trial.ok or trial.train_loss_start is None or trial.train_loss_end is None:
        return Branch(trial, None, None)
    drop = trial.train_loss_start - trial.train_loss_end
    rate = drop / (trial.steps * step_time_s) if step_time_s and trial.steps else None
    return Branch(trial, drop, rate)


def run_schedule(task: Any, *, task_name: str, batch_sizes: Sequence[int],
                 settings: ScheduleSettings, device: torch.device, journal_path: Path,
                 resume: bool = False, overwrite: bool = False,
                 hooks: ScheduleHooks | None = None, threads: int | None = None,
                 checkpoints: Sequence[Checkpoint] = ()) -> ScheduleResult:
    """Measure and plan (see the module docstring). Every branched trial and noise point is
    journaled as it finishes; ``resume`` reruns only the base run (deterministic) and what is
    missing. ``checkpoints`` (the user's, at ``settings.checkpoint_samples``): the points are
    initialisation and those files, and there is no base run."""
    from .journal import Journal, JournalMode
    from .sweep import SweepSettings, make_setup, task_fingerprint, with_initial_loss

    if distributed.active():
        raise UsageError("bsselect schedule runs in one process; run it without torchrun")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    hooks = hooks or ScheduleHooks()
    start = time.perf_counter()
    b0 = task.base_batch_size
    sweep_like = SweepSettings(budget=TrialBudget(BudgetKind.samples, settings.branch),
                               lr_scaling=settings.lr_scaling, seed=settings.seed,
                               lr_ramp_samples=settings.lr_ramp_samples)
    setup, _ = make_setup(task, sweep_like, device, min(EVAL_BATCH, *batch_sizes))
    n_train = len(setup.train_data)  # type: ignore[arg-type]
    notes: list[str] = []
    if b0 * MIN_BRANCH_STEPS > settings.branch:
        raise UsageError(
            f"a branch of {settings.branch} samples gives the base batch size {b0} fewer than "
            f"{MIN_BRANCH_STEPS} steps, too few to compare branches by: use --branch-samples >= "
            f"{b0 * MIN_BRANCH_STEPS} or --horizon >= {b0 * MIN_BRANCH_STEPS * BRANCH_FRACTION}")
    too_big = sorted(b for b in batch_sizes if b > n_train)
    if too_big:  # left out in silence before (review)
        notes.append(f"batch sizes {too_big} left out: larger than the {n_train:,} items the "
                     "branches train on")
    sizes, dropped = branch_sizes([b for b in batch_sizes if b <= n_train], settings.branch, b0)
    if dropped:
        notes.append(f"batch sizes {dropped} left out: a branch of {settings.branch} samples "
                     f"gives them fewer than {MIN_BRANCH_STEPS} steps (raise --branch-samples "
                     "or --horizon)")
    if len(sizes) < 2:
        raise UsageError(f"only batch size {sizes} can branch: give more batch sizes, or a "
                         f"longer --horizon / --branch-samples (now {settings.branch} samples "
                         "per branch)")
    # Equal samples for every branch: whole steps of every size (a branch of 200 trained
    # 200, 208 and 224 samples at 8, 16 and 32, and the larger batches' drops were compared
    # on up to 12% more data, past the critical batch's 10% tolerance: review).
    whole = math.lcm(*sizes)
    equal = -(-settings.branch // whole) * whole
    if equal != settings.branch:
        setup = dataclasses.replace(setup, budget=TrialBudget(BudgetKind.samples, equal))
        notes.append(f"each branch trains {equal:,} samples: {settings.branch:,} rounded up to "
                     f"whole batches of every size branched, so that all see the same samples")
    mode = JournalMode.resume if resume else (
        JournalMode.overwrite if overwrite else JournalMode.new)
    journal = Journal(journal_path, task=task_name,
                      settings=settings.journal_settings(task, sizes), mode=mode,
                      fingerprint=task_fingerprint(task, setup))
    try:
        for w in journal.warnings:
            notes.append(w)
        noise_failed: list[str] = []
        done_branch, done_noise = _resumed(journal.records, notes, noise_failed)
        again = sorted(k for k, t in done_branch.items() if t.status in RERUN_ON_RESUME)
        if again:  # as sweep --resume: a failure of the moment, not of the batch size
            notes.append("--resume ran again the branches the journal held as failed: "
                         + ", ".join(f"point {p} b={b} ({done_branch[(p, b)].status.value})"
                                     for p, b in again))
            done_branch = {k: t for k, t in done_branch.items() if k not in again}
        if len(checkpoints) != len(settings.checkpoint_samples):
            raise ValueError("give the checkpoints with their samples (settings.checkpoint_samples)")
        point_samples = settings.point_samples()
        if not checkpoints and len(point_samples) < settings.points:
            notes.append(f"{settings.points} points asked, but halving the horizon of "
                         f"{settings.horizon:,} samples gives {len(point_samples)} distinct ones")
        if hooks.start:  # what is about to run, before any of it (review: a typo's hours of
            # work started in silence)
            hooks.start(f"planning {task_name}: horizon {settings.horizon:,} samples, "
                        f"{len(point_samples)} points, branches of {equal:,} samples at batch "
                        f"sizes {list(sizes)}"
                        + (f" ({', '.join(map(str, dropped))} left out: fewer than "
                           f"{MIN_BRANCH_STEPS} steps per branch)" if dropped else "")
                        + f", journal {journal_path}")
        lr_of = {b: scale_lr(task.lr, b0, b, settings.lr_scaling) for b in sizes}
        trials: dict[tuple[int, int], TrialResult] = dict(done_branch)
        loss_init = with_initial_loss(setup).loss_start  # the branches' divergence rule
        noises: dict[int, dict[str, Any] | None] = dict(done_noise)
        bases: list[tuple[int, int, int, str | None]] = []  # (point, samples, steps, checkpoint)
        merged = 0

        def _measure_point(k: int, samples: int, steps: int, model: Any, mstate: dict,
                           ostate: dict | None, path: str | None) -> None:
            """The noise scale and the branches at point ``k`` (those not journaled yet)."""
            if k not in noises:
                failures = len(noise_failed)
                noises[k] = _noise_at(setup, model, settings.noise_measurements,
                                      settings.seed + 1000 + k, noise_failed)
                record: dict[str, Any] = {"point": k, "estimate": noises[k]}
                if len(noise_failed) > failures:
                    record["error"] = noise_failed[-1]
                journal.append_record("point_noise", record)
            point = dataclasses.replace(
                setup, initial_state=mstate, optimizer_state=ostate if steps else None,
                branch_steps=steps, loss_start=None, noise_measurements=0,
                validate=False, from_checkpoint=path is not None)
            if steps or path is not None:
                point = dataclasses.replace(point, loss_init=loss_init)
            for b in sizes:
                if (k, b) in trials:
                    continue
                if hooks.phase:
                    hooks.phase(f"point {k + 1}/{len(point_samples)} ({samples} samples): "
                                f"batch {b}", None)
                result = run_trial(point, b, lr_of[b])
                journal.append_record("branch", {"point": k, "trial": result.to_dict()})
                trials[(k, b)] = result

        with cpu_threads(threads):
            timing = _timing(setup, sizes, hooks)
            if hooks.phase:
                hooks.phase("base run and branches", None)
            source = (_checkpoint_run(setup, checkpoints, settings, hooks, notes)
                      if checkpoints else
                      ((*point, None) for point in _base_run(setup, point_samples, hooks)))
            for k, (samples, steps, model, mstate, ostate, path) in enumerate(source):
                if bases and bases[-1][2] == steps:  # no base step between the two points
                    merged += 1
                    continue
                bases.append((k, samples, steps, path))
                with callers_rng(setup.device):  # the base run's stream goes on untouched
                    _measure_point(k, samples, steps, model, mstate, ostate, path)
    except KeyboardInterrupt:
        raise InterruptedRun(f"interrupted; the finished branches are in {journal_path} — "
                             "rerun with --resume to continue") from None
    finally:  # another run (a notebook's next cell) may write it now
        journal.close()
    if noise_failed:
        notes.append(f"the noise measurement failed at {len(noise_failed)} point(s) "
                     f"({noise_failed[0]}); they stand without a B_simple "
                     "(--noise-measurements 0 skips the measurement)")
    if merged:
        notes.append(f"{merged} of the {len(point_samples)} points fell on the base step of the "
                     f"point before (a base step is {b0} samples): measured once")
    intervals = _fit_times(timing, sizes)
    spread = timing_spread_note(timing)
    if spread:
        notes.append(spread)
    fitted = {b: t.mid for b, t in intervals.items()}
    points = []
    for k, samples, steps, path in bases:
        branches = tuple(_branch(trials[(k, b)], fitted.get(b)) for b in sizes)
        drops = {br.trial.batch_size: br.drop for br in branches}
        point = SchedulePoint(samples, steps, branches, noises.get(k),
                              critical_batch(drops, settings.tolerance), None, path)
        points.append(dataclasses.replace(
            point, fastest_batch_size=point_fastest(point, b0, intervals)))
    silent = [p for p in points if not informative(p, b0)]
    if silent:
        said = ", ".join(f"{p.samples:,}" + ("" if p.drop_of(b0) is None else
                                              f" (drop {p.drop_of(b0):+.3g})") for p in silent)
        one = len(silent) == 1
        rest = (f"{'its stretch' if one else 'their stretches'} of the run "
                f"{'is' if one else 'are'} predicted from the nearest point before where it "
                "did (before the first such point: from that point)"
                if len(silent) < len(points) else
                f"no batch but the base batch {b0} can be predicted, and the schedule is "
                f"{b0} throughout")
        notes.append(f"the base batch {b0} made no progress in its branch at run sample"
                     f"{'' if one else 's'} {said}: such a point says nothing about relative "
                     f"rates and rules no batch size in or out; {rest}")
    measured = plan_stages(points, settings.horizon, b0, fitted, lambda b: lr_of[b])
    fixed = {b: predict_fixed(points, settings.horizon, b, b0, fitted[b]) for b in sizes}
    stuck = [st for st in measured if not math.isfinite(st.steps)]
    if stuck:
        notes.append("the stage batch "
                     + ", ".join(f"{st.batch_size} (from run sample {st.base_samples:,})"
                                 for st in stuck)
                     + " made no progress in that point's branch; a longer --branch-samples "
                     "measures the drop above its noise")
    stages, predicted, fallback = no_worse_than_fixed(measured, fixed, lambda b: lr_of[b])
    if fallback:
        notes.append(fallback)
    xs = [p.samples for p in points]
    growth = {"critical_batch_size": growth_exponent(xs, [p.critical_batch_size for p in points]),
              "fastest_batch_size": growth_exponent(xs, [p.fastest_batch_size for p in points]),
              "b_simple": growth_exponent(xs, [(p.noise or {}).get("b_simple") for p in points])}
    if points and points[-1].fastest_batch_size == max(sizes):
        notes.append(f"the largest batch branched ({max(sizes)}) was still the fastest at the "
                     "last point: the batch may grow further (allow larger batches, or a "
                     "longer --branch-samples)")
    return ScheduleResult(task_name, settings, b0, task.lr, tuple(sizes), fitted, timing,
                          tuple(points),
                          BatchSchedule(tuple(stages), settings.lr_ramp_samples, task.lr),
                          fixed, predicted, growth, str(journal_path),
                          len(done_branch), time.perf_counter() - start, tuple(notes))


def _resumed(records: Sequence[tuple[str, dict[str, Any]]], notes: list[str],
             noise_failed: list[str]
             ) -> tuple[dict[tuple[int, int], TrialResult], dict[int, dict[str, Any] | None]]:
    """The branches and noise points a journal holds; a record that does not read as one is
    skipped with a note (it is measured again). A noise point that failed adds why to
    ``noise_failed``, as it did when it was measured (a resumed plan lost the note: review)."""
    branches: dict[tuple[int, int], TrialResult] = {}
    noises: dict[int, dict[str, Any] | None] = {}
    for tag, payload in records:
        try:
            if tag == "branch":
                trial = TrialResult.from_dict(payload["trial"])
                branches[(int(payload["point"]), trial.batch_size)] = trial
            elif tag == "point_noise":
                estimate = payload.get("estimate")
                if estimate is not None and not isinstance(estimate, dict):
                    raise TypeError("estimate is not an object")
                noises[int(payload["point"])] = estimate
                if estimate is None and isinstance(payload.get("error"), str):
                    noise_failed.append(payload["error"])
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"a {tag} record of the journal was skipped ({one_line(exc)}); "
                         "measured again")
    return branches, noises


def _timing(setup: TrialSetup, sizes: list[int], hooks: ScheduleHooks
            ) -> tuple[RoundTiming, ...]:
    if hooks.phase:
        hooks.phase("timing rounds", progress_units(len(sizes)))
    try:
        return tuple(time_batch_sizes(setup, sizes, hooks.advance).values())
    except Exception as exc:  # noqa: BLE001 - a batch that cannot step cannot be scheduled
        if is_oom_error(exc):
            # The error raised below keeps this one as its cause, and its traceback would keep
            # the failed step's frames and tensors alive for as long as the caller holds it.
            drop_frames(exc)
        release_memory()
        raise TaskError(f"timing the batch sizes {sizes} failed: {one_line(exc)}; give "
                        "smaller ones (--max-batch)") from exc


TIMING_SPREAD = 1.25  # rounds' slowest over fastest above which a note says the clock moved


def timing_spread_note(timing: Sequence[RoundTiming]) -> str | None:
    """A note naming the batch sizes whose timing rounds spread by more than TIMING_SPREAD:
    a busy machine. Their wide interval ties them with slower batches at a point, and the
    tie goes to the largest drop at equal samples, so the fastest batch per point, and the
    plan, can move between runs (review: one round at 2.5x moved a plan from 16 -> 64 ->
    128 to 128 throughout, with every branch's drop the same)."""
    wide = [(t.batch_size, min(t.round_medians), max(t.round_medians)) for t in timing
            if t.round_medians and max(t.round_medians) > TIMING_SPREAD * min(t.round_medians)]
    if not wide:
        return None
    return ("timing rounds spread on a busy machine: "
            + ", ".join(f"b={b} {lo * 1e3:.3g}–{hi * 1e3:.3g} ms" for b, lo, hi in wide)
            + "; where their intervals tie batches, the fastest batch per point and the plan "
            "may differ from run to run: rerun on a quieter machine (--threads) to confirm")


def _fit_times(timing: Sequence[RoundTiming], sizes: Sequence[int]
               ) -> dict[int, TimeInterval]:
    """Each batch size's fitted step time (``physical_fit`` of the rounds' summaries) with the
    rounds' relative spread around it, as the sweep's ranking scales them."""
    by = {t.batch_size: t for t in timing}
    shape = physical_fit(list(sizes), [by[b].step.mid for b in sizes],
                         [by[b].step.lo for b in sizes])
    return {b: by[b].step.scaled(shape.at(b) / by[b].step.mid) for b in sizes}


def default_horizon(task: Any) -> int:
    """DEFAULT_HORIZON_STEPS base steps, or one epoch if that is longer."""
    return max(DEFAULT_HORIZON_STEPS * task.base_batch_size, len(task.train_data))
