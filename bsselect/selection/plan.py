"""What a ``sweep`` or a ``schedule`` will run, worked out from its options before anything
trains: the batch sizes (explicit, or powers of two up to what the probe says fits), the sweep's
settings, the journal's name, the CPU threads, the checkpoints a schedule branches from, and the
checks of the options and of the task's data that refuse a run up front (UsageError,
TaskError; ``noise`` shares the seed and data checks). ``bsselect.api`` calls these. Not to be
confused with ``schedule_plan``: the batch-size schedule drawn from a schedule's measurements.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import TaskError, UsageError

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint
    from ..step import StepSettings
    from ..task import Task
    from .sweep import SweepSettings


_AT_STEP = re.compile(r"^(.+)@([0-9]+)$")


def _run_checkpoints(specs: Sequence[str | Path]) -> tuple[list["Checkpoint"], list[int]]:
    """``schedule --from-checkpoint``: each checkpoint loaded (a directory of a run's
    checkpoints: each one in it, ``checkpoint.checkpoints_in``), with the run's optimizer step
    at it (the file's, or ``PATH@STEP``'s where it holds none: the two must not disagree), in
    the order of the steps. One line and exit 2 for a file without a step, two at the same
    step, a directory without checkpoints, or a path that is not there."""
    from ..checkpoint import checkpoints_in, load_checkpoint

    expanded: list[tuple[str, str, int | None]] = []  # (as given, path, named step)
    for spec in specs or ():
        text = str(spec)
        match = _AT_STEP.match(text)
        if match and not Path(text).expanduser().exists():  # PATH@STEP, not a name with '@'
            expanded.append((text, match.group(1), int(match.group(2))))
        elif "@" in text and not Path(text).expanduser().exists() and Path(
                text.rpartition("@")[0]).expanduser().exists():
            # PATH@-3 or PATH@x: the file exists, the step is not a step (it said "no such
            # file or directory", review)
            path, _, step = text.rpartition("@")
            raise UsageError(f"--from-checkpoint {text}: @{step} is not a step: name the "
                             f"optimizer step as an integer >= 0, e.g. {path}@2000")
        else:  # a run's checkpoint directory stands for the checkpoints in it
            expanded.extend((str(c), str(c), None) for c in checkpoints_in(text) or [text])
    checkpoints, steps = [], []
    for text, path, step in expanded:
        checkpoint = load_checkpoint(path)
        if step is None:
            step = checkpoint.step
        elif checkpoint.step is not None and checkpoint.step != step:
            raise UsageError(f"--from-checkpoint {text}: the checkpoint itself says step "
                             f"{checkpoint.step}; leave @{step} out, or pass a file without a "
                             "step of its own")
        if step is None:
            raise UsageError(f"--from-checkpoint {path}: the checkpoint does not say how far the "
                             f"run was (no global_step/step): name it, e.g. {path}@2000 for the "
                             "checkpoint after optimizer step 2000")
        if step < 0:
            raise UsageError(f"--from-checkpoint {path}: step {step} is negative")
        if step in steps:
            other = checkpoints[steps.index(step)].path
            raise UsageError(f"--from-checkpoint: {other} and {path} are both at step {step}; "
                             "give each point once")
        same = [c.path for c in checkpoints if c.sha256 == checkpoint.sha256]
        if same:  # one state named at two steps: two points that are one (review)
            raise UsageError(f"--from-checkpoint: {same[0]} and {text} hold the same weights "
                             "(the same file contents) at two steps; give each checkpoint "
                             "once")
        checkpoints.append(checkpoint)
        steps.append(step)
    order = sorted(range(len(steps)), key=steps.__getitem__)  # the run's order, whatever given
    return [checkpoints[i] for i in order], [steps[i] for i in order]


MAX_THREADS = 4096  # torch.set_num_threads takes an int; far more than any machine's cores


def check_integers(**options: Any) -> None:
    """UsageError for an option given as something other than an integer (a string, a float,
    a bool): ``check_integers(horizon=...)`` names ``--horizon``. None is "not given"."""
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")


def check_number(name: str, value: Any) -> None:
    """UsageError for an option given as something other than a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"--{name.replace('_', '-')} must be a number, got {value!r}")


def _sizes_and_threads(batch_sizes: Sequence[int] | None, threads: int | None
                       ) -> list[int] | None:
    """``--batch-sizes`` as a list (None when not given) and ``--threads``, checked."""
    check_integers(threads=threads)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    from ..memory.capacity import check_batch_sizes

    if batch_sizes is not None and not isinstance(batch_sizes, (str, bytes)) and hasattr(
            batch_sizes, "__iter__"):
        batch_sizes = list(batch_sizes)  # a numpy array or a range: its truth is not its length
    if batch_sizes is None:  # an empty list is refused, not the defaults (review)
        return None
    check_batch_sizes(batch_sizes, "--batch-sizes")
    return [int(b) for b in batch_sizes]


def local_processes() -> int:
    """Processes sharing this machine's cores under torchrun (1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def warn_threads(console: Any, threads: int | None) -> None:
    """A warning line on ``console`` where ``--threads`` (given) asks for more than this
    process's share of the usable CPUs."""
    from .timing import oversubscribed

    message = None if threads is None else oversubscribed(threads, local_processes())
    if message and console is not None:
        from rich.markup import escape

        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
    elif message:  # a Python caller without a console: its warnings
        from ..wording import warn_channel

        warn = warn_channel(None)
        if warn is not None:
            warn(message)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit("/", 1)[-1]).strip("-") or "task"


DEFAULT_MIN_BATCH = 8


def plan_sizes(task: "Task", name: str, explicit: list[int] | None, min_batch: int | None,
               max_batch: int | None, memory: int | None, dev: "torch.device",
               step: "StepSettings | None" = None, console: Any = None
               ) -> tuple[list[int], int, str]:
    """Batch sizes to try, the largest allowed, and where that maximum came from. With
    accumulation (``step``) they are effective batches of N micro-batches, and the probe
    answers for the micro-batch, on the largest items. ``min_batch`` None: 8. Options that
    the chosen route would ignore are refused (UsageError), never dropped in silence."""
    if explicit:
        ignored = [o for o, v in (("--min-batch", min_batch), ("--max-batch", max_batch),
                                  ("--memory", memory)) if v is not None]
        if ignored:
            raise UsageError(f"--batch-sizes lists the sizes to try, so {', '.join(ignored)} "
                             "would be ignored; give one or the other")
    elif max_batch is not None and memory is not None:
        raise UsageError("--max-batch bounds the sizes without a probe, so --memory would be "
                         "ignored; give one or the other")
    min_batch = DEFAULT_MIN_BATCH if min_batch is None else min_batch
    from ..api import _record_value_shaped_ops, _scan
    from ..device import Budget, default_budget
    from ..distributed import per_device, world_size
    from ..memory.inputs import InputMode
    from ..memory.probe import run_probe
    from ..step import StepSettings
    from .sweep import data_cap, powers_of_two

    # Under torchrun these are global batches: a power of two per device x world size w
    # (the probe answers per device), times the accumulation steps.
    w = world_size() * (step.accumulate if step is not None else 1)

    def powers(lo: int, per_device_hi: int) -> list[int]:
        return [w * b for b in powers_of_two(-(-lo // w), per_device_hi)]

    if explicit:
        for b in explicit:
            per_device(b, "--batch-sizes value")
        return sorted(set(explicit)), max(explicit), "--batch-sizes"
    if min_batch < 1:
        raise UsageError("--min-batch must be >= 1")
    n_train = len(task.train_data)  # type: ignore[arg-type]
    cap = data_cap(n_train)
    if max_batch is not None:
        return powers(min_batch, max_batch // w), max_batch, "--max-batch"
    budget = Budget(memory, "--memory") if memory else default_budget(dev)
    _record_value_shaped_ops(task)  # the sweep validated for real; rank as the probe does
    probed = run_probe(task, task_name=name, device=dev, budget=budget,
                       settings=step or StepSettings(),
                       inputs=_scan(task, InputMode.worst_case, console))
    fits = probed.max_batch * w
    if probed.max_batch_pow2 * w <= cap:
        return powers(min_batch, probed.max_batch_pow2), fits, "probe"
    if cap // w < min_batch:
        raise UsageError(f"the {n_train:,} training items allow batches up to {cap} (half of "
                         "them, so that every trial sees two batches an epoch), below "
                         f"--min-batch {min_batch}: pass a smaller --min-batch, --batch-sizes, "
                         "or more data")
    return (powers(min_batch, cap // w), fits,
            f"probe allows {fits}; capped at half the {n_train} training items")


def parse_warmup(value: int | str) -> int | str:
    """``--warmup-steps``: "auto" or an integer >= 0 (UsageError otherwise)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = -1
    if isinstance(value, bool) or steps < 0 or (isinstance(value, float) and value != steps):
        raise UsageError(f"--warmup-steps must be auto or an integer >= 0, got {value!r}")
    return steps


def sweep_settings(task: "Task", budget: Any, lr_scaling: str, seed: int,
                   warmup_steps: int | str, noise_measurements: int,
                   step: "StepSettings | None" = None,
                   warm_start_steps: int = 0) -> "SweepSettings":
    """``warmup_steps`` "auto": trials above the task's lr ramp up from it over
    ``RAMP_BASE_STEPS`` base batches' worth of samples; N: every trial from 0 over N steps."""
    from .sweep import RAMP_BASE_STEPS, SweepSettings, resolve_lr_scaling

    extra = {} if step is None else dict(precision=step.precision, accumulate=step.accumulate)
    auto = parse_warmup(warmup_steps) == "auto"
    return SweepSettings(budget=budget, lr_scaling=resolve_lr_scaling(task, lr_scaling),
                         seed=seed, warmup_steps=0 if auto else int(warmup_steps),
                         lr_ramp_samples=RAMP_BASE_STEPS * task.base_batch_size if auto else 0,
                         noise_measurements=noise_measurements,
                         warm_start_steps=warm_start_steps, **extra)


def _branch_samples(value: int | None) -> int:
    """``--branch-samples``: None means the default (0 in ``ScheduleSettings``); else >= 1."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--branch-samples must be an integer >= 1, got {value!r}")
    return value


MAX_SEED = 2**31 - 1


def _check_lr(lr: Any) -> float:
    """``--lr``: a finite number > 0 (UsageError otherwise)."""
    import math

    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a number > 0, got {lr!r}")
    return float(lr)


def _check_seed(seed: Any) -> int:
    """``--seed``: an integer in [0, 2**31 - 1] (UsageError otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer from 0 to {MAX_SEED:,}, got {seed!r}")
    return seed


def _check_enough_data(task: "Task", command: str) -> None:
    """TaskError (the task cannot run: no option helps) when the training data is too small
    for ``command`` at any batch size: ``noise`` compares two batch sizes (at least 2 items);
    ``sweep`` and ``schedule`` train on what the validation split leaves (without val_data,
    10% and at least one item are held out: ``trials.split_validation``)."""
    n = len(task.train_data)  # type: ignore[arg-type]
    items = f"{n:,} item{'s' * (n != 1)}"
    if command == "noise" and n < 2:
        raise TaskError(f"the task's training data has {items}: the noise scale compares the "
                        "gradients of two batch sizes, so it needs at least 2 items")
    if command != "noise" and task.val_data is None and n - max(1, n // 10) < 1:
        raise TaskError(f"the task's training data has {items}: without val_data the {command} "
                        "holds out 10% of it (at least one item) for validation, which leaves "
                        "none to train on; give the task more training data, or val_data")
