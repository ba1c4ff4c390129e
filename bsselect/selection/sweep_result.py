"""A finished sweep: ``summarize`` ranks its trials (at the interleaved timing rounds' step
times where there are any) into a ``SweepResult``, its JSON, and why a sweep with no ok trial
failed. Also what ``bsselect report`` re-renders from a journal."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import BsselectError, DoesNotFitError, TaskError
from ..memory.capacity import largest_pow2_at_most
from ..units import json_document
from .choice import CONTENDER_FACTOR
from .formula import grad_accum_steps
from .lr_scaling import scale_lr
from .rank import Ranking, choose_b_hat, rank_trials, sizes_text
from .sweep_settings import SweepSettings
from .timing import RoundTiming
from .trial_types import TrialResult

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
    # ``report`` of an interrupted sweep: the batch sizes it set out to run and never did
    not_run: tuple[int, ...] = ()
    # ``report``: trials in the journal that the ranking leaves out (trained by a later run
    # interrupted before its timing rounds, or not in the last sweep's sizes)
    unranked: tuple[int, ...] = ()
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
        again = (f" (batch sizes {sizes_text(self.resumed)} came from the journal as they were: "
                 "--resume keeps every finished trial, --overwrite runs them again)"
                 if self.resumed else "")
        statuses = {t.status.value for t in self.trials}
        if statuses == {"oom"}:
            return DoesNotFitError(
                f"every batch size ran out of memory ({sizes_text(self.batch_sizes)}); try smaller "
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
                f"the training loss never changed in any trial ({sizes_text(self.batch_sizes)}: "
                f"{flat[0].train_loss_start:.4g} at the start and the end of each): no gradient "
                "reaches the trainable parameters (a detached or constant output, frozen "
                "parameters, an optimizer given no parameters) or the lr is 0; nothing to "
                f"recommend{again}")
        nonfinite = [t for t in self.trials if t.status.value == "diverged"
                     and (t.error or "").split(" at step")[0] in ("loss nan", "loss inf")]
        # Each trial's last batch held samples (samples - b, samples]: where every window
        # overlaps, each trial met the same items there, at its own lr and step — the data,
        # not the lr (review: a NaN target in one row was "try a lower lr"). A too-high lr
        # blows up at about the same step, whose windows do not overlap across sizes.
        first = max((t.samples - t.batch_size for t in nonfinite), default=0)
        last = min((t.samples for t in nonfinite), default=0)
        if len(self.trials) > 1 and len(nonfinite) == len(self.trials) and first < last:
            return TaskError(
                f"every trial's loss became {nonfinite[0].error.split()[1]} on a batch "
                f"holding samples {first + 1:,}-{last:,} of the same data order ({tried}), "
                "whatever its batch size and lr: a training item read there (a NaN or inf in "
                "the data, an item the loss cannot take) is the likelier cause than the lr; "
                f"check train_data with torch.isfinite{again}")
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
        return json_document({
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
            "not_run_batch_sizes": list(self.not_run),
            "unranked_batch_sizes": list(self.unranked),
            "timing": {"method": "interleaved rounds", "rounds": [t.to_dict() for t in self.timing],
                       "clock": self.timing[0].clock if self.timing else None,
                       "note": self.timing_note, "not_timed": self.not_timed()},
            "b_opt_accumulation": self.b_opt_accumulation,
            "verdict": self.ranking.verdict,
            "journal": self.journal, "resumed": list(self.resumed),
            "validation": ("held-out 10% of train_data" if self.made_val_split else "val_data")
            + (f", a fixed subset of {self.validation_items} items"
               if self.validation_items else ""),
        })

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


def _not_timed(trials: Sequence[TrialResult], timing: Sequence[RoundTiming]) -> list[int]:
    """The ok batch sizes the rounds did not time (all of them when there were none)."""
    timed = {t.batch_size for t in timing}
    return [t.batch_size for t in trials if t.ok and t.batch_size not in timed]


def _untimed_note(sizes: Sequence[int]) -> str | None:
    if not sizes:
        return None
    whose = "the trial's own step time" if len(sizes) == 1 else "the trials' own step times"
    return (f"b={sizes_text(sizes)} not timed again: {'each ' if len(sizes) > 1 else ''}over "
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
