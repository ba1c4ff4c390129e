"""The Python API: what each command does, as a function with the CLI's defaults.

    from bsselect import probe, check, noise_scale, sweep

    result = probe("digits-mlp", memory="8GiB")          # a Task or a "module:function" spec
    result.max_batch, result.to_json()                      # to_json() is the --json output

Every function takes the task as a ``Task`` or as the CLI's task argument (a built-in example
name, ``package.module:function`` or ``path/to/file.py:function``), keyword arguments named
and defaulted as the CLI's options (memory as ``"24GiB"`` or bytes), and returns the result
the CLI renders. Errors are the ``BsselectError`` family (``TaskError``, ``UsageError``,
``DoesNotFitError``), each with the CLI's one-line message. The CLI calls these functions;
``console`` (a ``rich.console.Console``) adds its progress bars and notes, and is None here by
default: a library call prints nothing.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

from .errors import CannotSimulate, TaskError, UsageError, one_line, parse_choice
from .oom import caused_by_oom
from .selection.plan import (_branch_samples, _check_enough_data, _check_lr, _check_seed,
                             _run_checkpoints, _sizes_and_threads, check_integers,
                             check_number, local_processes, parse_warmup, plan_sizes, slug,
                             sweep_settings, warn_threads)
from .wording import python_words, warn_channel

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint
    from .gate.check import CheckResult
    from .memory.inputs import InputMode, InputScan
    from .memory.probe import Method, ProbeResult
    from .selection.noise_run import NoiseReport
    from .selection.schedule import ScheduleResult
    from .selection.sweep import SweepHooks, SweepResult, SweepSettings
    from .task import Task

TaskLike = Union["Task", str, None]
Size = Union[str, int, None]


def _keeps_callers_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with torch's CPU RNG forked around it: building models, batches and trials
    draws from it and seeds it, and the caller's stream must go on as if bsselect had not run.
    (An accelerator's RNG is forked where the device is known: ``device.callers_rng``.)"""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return wrapper


def _name(task: "Task") -> str:
    name = getattr(getattr(task, "model", None), "__qualname__", "")
    return name if name and "<" not in name else "task"


def resolve_task(task: TaskLike, *, on_meta: bool = False, precision: Any = None
                 ) -> tuple["Task", str]:
    """(Task, display name) from a Task or a CLI task spec; validated (``on_meta``: on fake
    tensors, as the simulation runs it, without allocating the model)."""
    from .task import Task, load_task, validate_task

    if isinstance(task, Task):
        validate_task(task, on_meta=on_meta, precision=precision)
        return task, _name(task)
    if task is not None and not isinstance(task, str):
        raise UsageError(f"task must be a bsselect.Task or a spec string, got "
                         f"{type(task).__name__}")
    loaded, name = load_task(task)
    validate_task(loaded, on_meta=on_meta, precision=precision)
    return loaded, name


def hf_config_task(task: TaskLike, hf_config: str | Path | None, seq_len: int | None
                   ) -> tuple[Any, str | None]:
    """(task, name): a causal-LM Task from a local transformers config when ``hf_config`` is
    given (``--hf-config``), else ``task`` as it is (name None)."""
    if hf_config is None:
        if seq_len is not None:
            raise UsageError("--seq-len goes with --hf-config")
        return task, None
    if task is not None:
        raise UsageError("give a task or --hf-config, not both")
    if seq_len is not None and (isinstance(seq_len, bool) or seq_len < 2):
        raise UsageError(f"--seq-len must be an integer >= 2, got {seq_len!r}")
    from .adapters.hf_config import config_task

    return config_task(hf_config, seq_len), f"hf-config:{hf_config}"


@contextmanager
def _positions_of(hf_config: Any, task: Any) -> Iterator[None]:
    """Inside: a ``--hf-config`` task whose step fails past the model's learned positions is
    a usage error (exit 2) that says the longest ``--seq-len`` it takes, not a failed task
    (exit 1). Its random tokens are within the vocabulary, so an embedding lookup out of
    range is a position (GPT-2's ``n_positions``; RoBERTa's and OPT's tables hold 2 more
    rows than the positions they take, which the limit allows for); a failure of another
    kind at a length past the config's ``max_position_embeddings`` / ``n_positions`` (BERT's
    token-type buffer) is the length's too. Rotary models run past that number and are not
    refused: only a failure is."""
    if hf_config is None:
        yield
        return
    length = int(task.train_data.seq_len)
    try:
        yield
    except (TaskError, IndexError) as exc:
        from .adapters.hf_config import load_config
        from .memory.values import IndexOutOfRange

        cause = exc if isinstance(exc, IndexOutOfRange) else exc.__cause__
        config = load_config(hf_config, "--hf-config")
        declared = next((int(v) for v in (getattr(config, name, None) for name in (
            "max_position_embeddings", "n_positions")) if isinstance(v, int)), None)
        if isinstance(cause, IndexOutOfRange):
            offset = max(0, cause.index - (length - 1))  # rows before position 0
            longest = cause.rows - offset
            what = (f"it looks positions up in a table of {cause.rows:,} rows, at index "
                    f"{cause.index:,}")
            limit = "learned positions"
        elif declared is not None and length > declared and not caused_by_oom(exc):
            # (out of memory is the length's size, not its position: a rotary model at a
            # length of 10^11 failed to allocate its batch: review)
            longest = declared
            what = f"a step at {length:,} tokens fails: {one_line(exc.__cause__ or exc)}"
            limit = "max_position_embeddings"
        else:
            raise
        told = (f"--seq-len {length:,}" if task.train_data.seq_len_given else
                f"the default --seq-len (the config's max_position_embeddings, {length:,})")
        raise UsageError(f"{told} is past this model's {limit} ({what}): use "
                         f"--seq-len {longest:,} or less") from exc


def _bytes(value: Size, name: str) -> int | None:
    from .units import parse_size

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{name} must be bytes (int) or a size such as '24GiB', got {value!r}")
    return parse_size(str(value)) if isinstance(value, str) else parse_size(f"{value}B")


def device_of(name: str = "auto", trains: bool = False) -> "torch.device":
    """The device to run on; under torchrun also joins the process group (docs/multi-gpu.md)
    and gives each rank its own accelerator. ``trains``: the command runs real training steps,
    which the ``meta`` device (shapes only) cannot."""
    from .device import resolve_device
    from .distributed import setup

    device = resolve_device(name)
    if trains and device.type == "meta":
        raise UsageError("--device meta has shapes but no values, so it cannot train; this "
                         "command needs a real device (cpu, cuda, ...). For memory without one: "
                         "bsselect probe --method simulated")
    return setup(device)


def _scan(task: "Task", mode: "InputMode", console: Any) -> "InputScan":
    """The items memory batches are made of; after a validation on fake tensors, ranked by
    the values that its shapes read where the items are all one size."""
    from .memory.inputs import scan_inputs
    from .memory.values import reads_batch_values, value_shaped_ops

    by_values, reads = value_shaped_ops(), reads_batch_values()
    if console is None:
        return scan_inputs(task.train_data, mode, by_values=by_values, reads_values=reads,
                           collate_fn=task.collate_fn, judge=_judge(task))
    from .run_options import scan

    return scan(task, mode, console, by_values=by_values, reads_values=reads,
                judge=_judge(task))


def _judge(task: "Task") -> Callable[[Sequence[int]], int | None]:
    """The simulated step's peak (fp32, the CPU's kernel scratch included: a packed LSTM's
    memory is mostly that) on a batch of the given items:
    how ``scan_inputs`` tells which ordering of the items makes the heaviest batch where the
    step's shapes follow the batch's values. None where the simulation cannot run it."""
    def judge(items: Sequence[int]) -> int | None:
        from .errors import BsselectError
        from .memory.inputs import InputMode, InputScan
        from .memory.simulated import simulate_step_peak

        n = len(task.train_data)  # type: ignore[arg-type]
        scan = InputScan(InputMode.worst_case, n, len(items), False, None, None, tuple(items))
        try:
            return simulate_step_peak(task, len(items), inputs=scan).peak_bytes
        except (BsselectError, RuntimeError, ValueError, TypeError, IndexError):
            return None
    return judge


def probe_method(task: "Task", method: "Method", device: "torch.device", target: Any,
                 precision: Any = None) -> tuple["Method", str]:
    """The probe's method after validating the task for it, and a note when it differs from
    the one asked for: ``auto`` falls back from a simulation the model cannot run (a branch
    on an activation's value) to real steps on this device."""
    from .memory.probe import Method, choose_method
    from .memory.targets import Target
    from .task import validate_task

    resolved = choose_method(method, device)
    if resolved is not Method.simulated:
        validate_task(task, precision=precision)
        _record_value_shaped_ops(task)
        return resolved, ""
    try:
        validate_task(task, on_meta=True, precision=precision)
        return resolved, ""
    except TaskError as exc:
        from .memory.values import IndexOutOfRange

        if (method is not Method.auto or target is not Target.same
                or isinstance(exc.__cause__, IndexOutOfRange)):  # a real step fails alike
            raise
        failure = exc
    validate_task(task, precision=precision)  # it fails for real too: the user's to see
    _record_value_shaped_ops(task)
    # It runs for real but not on fake tensors: a value read from the weights, or an op
    # without a fake kernel. Real steps answer for this device.
    return Method.measured, _measured_note(failure, device)


def _measured_note(failure: Exception, device: "torch.device") -> str:
    """Why ``auto`` measures with real steps: the simulation's failure, in one line."""
    what = getattr(failure.__cause__, "what", "")
    why = (f"{what} computed from its weights or the batch's floating-point tensors"
           if isinstance(failure, CannotSimulate) and what
           else str(failure))
    return f"real steps on {device.type}, because the simulation cannot run this model: {why}"


def _record_value_shaped_ops(task: "Task") -> None:
    """For real steps too, which ops took their output shape from the batch's values: one
    forward on fake tensors (as the simulation validates), so that ``_scan`` ranks items of
    one size by the values those shapes read (``h[mask]`` on padded rows: the fullest rows
    need the most memory, and measuring random ones answered above the truth). A model the
    fake forward cannot run records what it reached; the real validation before stands."""
    from .task import validate_task

    try:
        validate_task(task, on_meta=True)
    except Exception:  # noqa: BLE001 - the real validation already passed
        pass


@python_words
@_keeps_callers_rng
def probe(task: TaskLike = None, *, memory: Size = None, margin: float = 0.2,
          method: str = "auto", target: str = "same", batch_sizes: Sequence[int] | None = None,
          precision: str = "fp32", accumulate: int = 1, inputs: str = "worst-case",
          device: str = "auto", hf_config: str | Path | None = None,
          seq_len: int | None = None, shard: str | None = None,
          world_size: int | None = None, shard_unit: str | None = None,
          reshard_after_forward: bool | None = None,
          activation_checkpointing: bool | None = None, console: Any = None,
          on_point: Callable[[int, int], None] | None = None) -> "ProbeResult":
    """What fits: peak memory of a training step at several batch sizes, a line through them,
    and the largest batch that fits ``memory`` after ``margin``, checked where it lands
    (``bsselect probe``). ``memory`` None: the device's free memory (on the CPU, for real
    steps, half the available RAM). ``hf_config`` (instead of a task): a local transformers
    config, trained as a causal LM on ``seq_len``-token sequences."""
    from .device import Budget, default_budget
    from .memory.capacity import check_batch_sizes
    from .memory.probe import (DEFAULT_BATCH_SIZES, HOST_HEADROOM, Method, choose_method,
                               run_probe)
    from .memory.targets import Target
    from .run_options import parse_inputs, shard_plan, step_settings
    from .task import Task, load_task

    meth = parse_choice(Method, method, "--method")
    tgt = parse_choice(Target, target, "--target")
    plan = shard_plan(shard, world_size, shard_unit, reshard_after_forward,
                      activation_checkpointing, precision)
    if plan is not None:  # one rank of a sharded run: only the simulation plays it
        if meth is Method.measured:
            raise UsageError("--shard and --activation-checkpointing are simulated: use "
                             "--method simulated (or auto)")
        meth = Method.simulated
    settings, mode = step_settings(precision, accumulate, plan), parse_inputs(inputs)
    # None is the defaults; an empty list (a computed one that came out empty) is refused
    # where it was a different experiment without a word (review)
    sizes = (list(DEFAULT_BATCH_SIZES) if batch_sizes is None
             else check_batch_sizes(batch_sizes))
    dev = device_of(device)
    if meth is Method.measured and tgt is Target.cuda and dev.type != "cuda":
        # Real steps here run this device's kernels and optimizer implementation (the CPU's
        # for-loop Adam, its autocast lists), not CUDA's: the terms on top would not make
        # them a CUDA answer (review: accepted without a word).
        raise UsageError(f"--target cuda with --method measured: real steps on {dev.type} "
                         "run its own kernels, not CUDA's; use --method simulated (or auto) "
                         "for a CUDA answer without a GPU")
    size = _bytes(memory, "memory")
    if size is None and tgt is not Target.same:
        raise UsageError(f"--target {tgt.value} needs --memory (the target device's memory)")
    task, hf_name = hf_config_task(task, hf_config, seq_len)
    if not isinstance(task, (str, type(None), Task)):
        raise UsageError(f"task must be a bsselect.Task or a spec string, got "
                         f"{type(task).__name__}")
    loaded, name = (task, hf_name or _name(task)) if not isinstance(
        task, (str, type(None))) else load_task(task)
    with _positions_of(hf_config, loaded):
        if hf_config is not None and choose_method(meth, dev) is not Method.simulated:
            from .task import validate_task

            # A real step past the positions is a bare IndexError (on CUDA a device-side
            # assert): the meta-device check says it first, in words (review). A forward the
            # fake tensors cannot run (an MoE's loop over the experts a router picked) is
            # what real steps are for: measuring goes on (review).
            try:
                validate_task(loaded, on_meta=True, precision=settings.precision)
            except CannotSimulate:
                pass
        resolved, note = probe_method(loaded, meth, dev, tgt, settings.precision)
        if resolved is Method.simulated:
            from .memory.real_check import check_real_step

            check_real_step(loaded, settings.precision)
    items = _scan(loaded, mode, console)

    def run(advance: Callable[[int, int], None] | None, method: "Method", note: str
            ) -> "ProbeResult":
        if size is not None:
            budget = Budget(size, "--memory")
        elif method is Method.measured and dev.type == "cpu":
            # Real steps on the host: never plan to fill it (the OS, other jobs, the profiler).
            ram = default_budget(dev)
            budget = Budget(int(ram.bytes * HOST_HEADROOM),
                            f"half of the {ram.source}: a measured probe on the CPU allocates "
                            "for real (--memory to set it)")
        else:
            budget = default_budget(dev)
        return run_probe(loaded, task_name=name, device=dev, budget=budget, method=method,
                         margin=margin, batch_sizes=sizes, target=tgt,
                         budget_is_total=size is not None, on_point=advance,
                         settings=settings, inputs=items, method_note=note)

    def run_or_measure(advance: Callable[[int, int], None] | None) -> "ProbeResult":
        try:
            return run(advance, resolved, note)
        except CannotSimulate as exc:
            # The forward simulated (probe_method) but the step did not: a value read in the
            # backward or the optimizer (Adafactor reads each parameter's norm). auto falls
            # back to real steps here as it does for the forward.
            if not (meth is Method.auto and tgt is Target.same and resolved is Method.simulated):
                raise
            return run(advance, Method.measured, _measured_note(exc, dev))

    from .device import callers_rng

    with callers_rng(dev):  # a measured probe seeds its steps
        if console is None:
            return run_or_measure(on_point)
        from .run_options import progress_bar

        with progress_bar(console, f"probing {name}", len(sizes)) as advance:
            return run_or_measure(advance)


@python_words
@_keeps_callers_rng
def check(task: TaskLike = None, *, batch_size: int | None = None, memory: Size = None,
          device_preset: str | None = None, margin: float | None = None,
          target: str | None = None, precision: str | None = None,
          accumulate: int | None = None, inputs: str | None = None,
          config: str | Path | None = None, hf_config: str | Path | None = None,
          seq_len: int | None = None, shard: str | None = None,
          world_size: int | None = None, shard_unit: str | None = None,
          reshard_after_forward: bool | None = None,
          activation_checkpointing: bool | None = None,
          console: Any = None) -> "CheckResult":
    """Will this config fit: a simulated step at ``batch_size`` against ``memory`` (or a
    ``device_preset``) after ``margin`` (``bsselect check``): a large model is never
    allocated; a small one also runs one real step on two items (``memory.real_check``).
    Options left None come from ``[tool.bsselect]`` in ``config`` (default: ./pyproject.toml
    when it exists), then from the CLI's defaults. ``result.fits`` says yes or no.
    ``hf_config`` (instead of a task): a local transformers config, trained as a causal LM on
    ``seq_len``-token sequences. ``shard="fsdp"`` with ``world_size``: one rank of an FSDP2
    run (``shard_unit``, ``reshard_after_forward``, ``activation_checkpointing`` as the CLI's
    options)."""
    from .gate.check import merge_config, read_pyproject, run_check

    task, hf_name = hf_config_task(task, hf_config, seq_len)
    size = _bytes(memory, "memory")
    cfg = merge_config(
        {"task": task if isinstance(task, (str, type(None))) else None,
         "batch_size": batch_size, "memory": None if size is None else f"{size}B",
         "device_preset": device_preset, "margin": margin, "target": target,
         "precision": precision, "accumulate": accumulate, "inputs": inputs,
         "shard": shard, "world_size": world_size, "shard_unit": shard_unit,
         "reshard_after_forward": reshard_after_forward,
         "activation_checkpointing": activation_checkpointing},
        read_pyproject(Path(config or "pyproject.toml"), required=config is not None),
        str(config or "pyproject.toml"))
    from .memory.real_check import check_real_step

    with _positions_of(hf_config, task):
        loaded, name = resolve_task(
            task if not isinstance(task, (str, type(None))) else cfg.task, on_meta=True,
            precision=cfg.precision)
        check_real_step(loaded, cfg.precision)
    name = hf_name or name
    return run_check(loaded, name, cfg, _scan(loaded, cfg.inputs, console))


@python_words
@_keeps_callers_rng
def noise_scale(task: TaskLike = None, *, b_small: int | None = None,
                b_big: int | None = None, measurements: int = 32, warmup_steps: int = 0,
                every: int | None = None, seed: int = 0, device: str = "auto",
                precision: str = "fp32",
                progress: Callable[[int, int], None] | None = None,
                from_checkpoint: str | Path | None = None,
                warn: Callable[[str], None] | None = None) -> "NoiseReport":
    """How noisy are the gradients: B_simple (McCandlish et al. 2018) at the initial weights
    (or at ``from_checkpoint``, a checkpoint of the user's run: ``bsselect.checkpoint``), after
    ``warmup_steps`` and every ``every`` steps in between (``bsselect noise``)."""
    from .run_options import parse_precision
    from .selection.noise_run import measure_noise

    check_integers(b_small=b_small, b_big=b_big, every=every, measurements=measurements,
                   warmup_steps=warmup_steps)
    _check_seed(seed)
    if every is not None and every < 1:
        raise UsageError("--every must be >= 1")
    if warmup_steps < 0:
        raise UsageError("--warmup-steps must be >= 0")
    checkpoint = None
    if from_checkpoint is not None:
        from .checkpoint import load_checkpoint

        checkpoint = load_checkpoint(from_checkpoint)
    dev = device_of(device, trains=True)
    loaded, _ = resolve_task(task, precision=parse_precision(precision))
    _check_enough_data(loaded, "noise")
    from .device import callers_rng

    with callers_rng(dev):
        return measure_noise(loaded, b_small=b_small, b_big=b_big, measurements=measurements,
                             seed=seed, warmup_steps=warmup_steps, every=every,
                             progress=progress, device=dev, precision=parse_precision(precision),
                             checkpoint=checkpoint, warn=warn_channel(warn))


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run, decided before any trial: ``sweep`` runs it; the CLI prints it
    first."""

    task: "Task"
    task_name: str
    batch_sizes: tuple[int, ...]
    max_batch: int
    max_batch_source: str
    settings: "SweepSettings"
    device: "torch.device"
    journal: Path
    threads: int | None      # CPU intra-op threads (None: not on a CPU)
    threads_given: bool
    checkpoint: "Checkpoint | None" = None  # --from-checkpoint: what every trial branches from


@python_words
@_keeps_callers_rng
def plan_sweep(task: TaskLike = None, *, batch_sizes: Sequence[int] | None = None,
               min_batch: int | None = None, max_batch: int | None = None,
               budget: str | None = None, lr_scaling: str = "auto", seed: int = 0,
               warmup_steps: int | str = "auto",
               noise_measurements: int = 2, warm_start_steps: int = 0,
               journal: str | Path | None = None, device: str = "auto", memory: Size = None,
               precision: str = "fp32", accumulate: int = 1, threads: int | None = None,
               from_checkpoint: str | Path | None = None, lr: float | None = None,
               console: Any = None) -> SweepPlan:
    """The batch sizes (explicit, or powers of two up to what the probe says fits), the
    per-trial budget, the settings and the journal of a sweep, with the CLI's defaults.
    ``from_checkpoint``: a checkpoint of the user's run (``bsselect.checkpoint`` lists the
    formats) that every trial branches from, read here so that a bad file fails first.
    ``lr``: the learning rate at the task's base batch size that the trials scale from,
    instead of the task's own (e.g. the run's current lr at a checkpoint)."""
    from .run_options import step_settings
    from .selection.sweep import default_budget, parse_budget
    from .selection.timing import default_threads

    warmup_steps = parse_warmup(warmup_steps)
    check_integers(min_batch=min_batch, max_batch=max_batch,
                   noise_measurements=noise_measurements, warm_start_steps=warm_start_steps)
    if noise_measurements < 0 or warm_start_steps < 0:
        raise UsageError("--warm-start-steps and --noise-measurements must be >= 0")
    if noise_measurements == 1:  # before any trial trains (each failed on it after training)
        raise UsageError("--noise-measurements must be 0 (off) or at least 2")
    explicit = _sizes_and_threads(batch_sizes, threads)
    checkpoint = None
    if from_checkpoint is not None:
        from .checkpoint import load_checkpoint

        checkpoint = load_checkpoint(from_checkpoint)
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = str(budget)  # a number of samples, as on the command line
    if budget is not None and not isinstance(budget, str):
        raise UsageError(f"budget must be a string such as '4096', '200steps' or '30s' (or a "
                         f"number of samples), got {budget!r}")
    trial_budget = parse_budget(budget) if budget is not None else None
    dev = device_of(device, trains=True)
    step = step_settings(precision, accumulate)
    loaded, name = resolve_task(task, precision=step.precision)
    _check_enough_data(loaded, "sweep")
    if lr is not None:
        loaded = replace(loaded, lr=_check_lr(lr))
    size = _bytes(memory, "memory")
    sizes, cap, cap_source = plan_sizes(loaded, name, explicit, min_batch, max_batch, size,
                                        dev, step, console)
    per_trial = trial_budget or default_budget(max(sizes), loaded.base_batch_size)
    settings = sweep_settings(loaded, per_trial, lr_scaling, _check_seed(seed), warmup_steps,
                              noise_measurements, step, warm_start_steps)
    if checkpoint is not None:
        settings = replace(settings, checkpoint_sha256=checkpoint.sha256)
    n_threads = None if dev.type != "cpu" else (threads or default_threads(local_processes()))
    if console is None and n_threads is not None:
        warn_threads(None, threads)  # a Python caller's warning; the CLI prints its own
    path = Path(journal) if journal else Path(f"bsselect-sweep-{slug(name)}.jsonl")
    return SweepPlan(loaded, name, tuple(sizes), cap, cap_source, settings, dev, path,
                     n_threads, threads is not None, checkpoint)


@python_words
@_keeps_callers_rng
def sweep(task: TaskLike = None, *, resume: bool = False, overwrite: bool = False,
          hooks: "SweepHooks | None" = None, plan: SweepPlan | None = None,
          **options: Any) -> "SweepResult":
    """What trains best: short equal-budget trials at power-of-two batch sizes, journaled,
    timed in interleaved rounds and ranked by predicted time to target (``bsselect sweep``).
    ``options`` are ``plan_sweep``'s; or pass a ``plan``. ``resume`` skips the trials already
    in the journal for the same task and settings."""
    from .selection.sweep import SweepHooks, run_sweep

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if plan is None:
        plan = plan_sweep(task, **options)
    elif options:
        raise UsageError(f"pass either a plan or plan options, not both: {sorted(options)}")
    hooks = replace(hooks or SweepHooks(), warn=warn_channel(hooks.warn if hooks else None))
    from .device import callers_rng

    with callers_rng(plan.device):
        return run_sweep(plan.task, task_name=plan.task_name, batch_sizes=plan.batch_sizes,
                         settings=plan.settings, device=plan.device, journal_path=plan.journal,
                         resume=resume, max_batch=plan.max_batch,
                         max_batch_source=plan.max_batch_source, overwrite=overwrite,
                         hooks=hooks, threads=plan.threads, checkpoint=plan.checkpoint)


@python_words
@_keeps_callers_rng
def schedule(task: TaskLike = None, *, horizon: int | None = None, points: int | None = None,
             branch_samples: int | None = None, batch_sizes: Sequence[int] | None = None,
             min_batch: int | None = None, max_batch: int | None = None, lr_scaling: str = "auto",
             tolerance: float = 0.1, noise_measurements: int = 8, seed: int = 0,
             journal: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             device: str = "auto", memory: Size = None, threads: int | None = None,
             hooks: Any = None, console: Any = None,
             from_checkpoints: Sequence[str | Path] = ()) -> "ScheduleResult":
    """How the best batch size moves over a run, and a batch-size warm-up that follows it
    (``bsselect schedule``): the base configuration trains for half of ``horizon`` samples
    (default: 256 base steps or one epoch); at ``points`` (default 5) geometrically spaced
    points every batch size branches for ``branch_samples`` (default ``horizon // 16``)
    samples. Returns a ``ScheduleResult``; its ``schedule`` (a ``BatchSchedule``) gives
    ``batch_size_at`` and ``lr_at`` for a training loop.

    ``from_checkpoints``: checkpoints of the user's own run (the formats of
    ``bsselect.checkpoint``; ``"PATH@STEP"`` names the run's optimizer step where the file
    does not hold one) are the points instead of a base run, with initialisation; the run is
    taken to have trained at the task's base batch size (a checkpoint at step ``s`` had seen
    ``s * base_batch_size`` samples); ``horizon`` defaults to twice the last one's samples."""
    from .selection.schedule import (DEFAULT_POINTS, ScheduleSettings, default_horizon,
                                     run_schedule)
    from .selection.sweep import RAMP_BASE_STEPS, resolve_lr_scaling
    from .selection.timing import default_threads

    check_integers(horizon=horizon, points=points, min_batch=min_batch, max_batch=max_batch,
                   noise_measurements=noise_measurements)
    check_number("tolerance", tolerance)
    explicit = _sizes_and_threads(batch_sizes, threads)
    if isinstance(from_checkpoints, (str, Path)):
        from_checkpoints = [from_checkpoints]
    from_checkpoints = list(from_checkpoints or ())
    if from_checkpoints and points is not None:
        raise UsageError("--points spaces the base run's points; with --from-checkpoint the "
                         "points are your checkpoints: leave --points out")
    checkpoints, steps = _run_checkpoints(from_checkpoints)
    dev = device_of(device, trains=True)
    loaded, name = resolve_task(task)
    _check_enough_data(loaded, "schedule")
    at = tuple(s * loaded.base_batch_size for s in steps)
    if horizon is None:
        horizon = 2 * max(at) if at and max(at) > 0 else default_horizon(loaded)
    settings = ScheduleSettings(
        horizon=horizon, points=DEFAULT_POINTS if points is None else points,
        branch_samples=_branch_samples(branch_samples),
        lr_scaling=resolve_lr_scaling(loaded, lr_scaling),
        seed=_check_seed(seed), lr_ramp_samples=RAMP_BASE_STEPS * loaded.base_batch_size,
        noise_measurements=noise_measurements, tolerance=tolerance,
        checkpoint_samples=at, checkpoint_sha256=tuple(c.sha256 for c in checkpoints))
    sizes, _, _ = plan_sizes(loaded, name, explicit, min_batch, max_batch, _bytes(memory, "memory"),
                             dev, None, console)
    path = Path(journal) if journal else Path(f"bsselect-schedule-{slug(name)}.jsonl")
    n_threads = None if dev.type != "cpu" else (threads or default_threads(local_processes()))
    if n_threads is not None:  # on a CPU device
        warn_threads(console, threads)
    from .device import callers_rng

    with callers_rng(dev):
        return run_schedule(loaded, task_name=name, batch_sizes=sizes, settings=settings,
                            device=dev, journal_path=path, resume=resume, overwrite=overwrite,
                            hooks=hooks, threads=n_threads, checkpoints=checkpoints)


@python_words
def find_batch_size(step: Callable[[int], Any], **options: Any) -> Any:
    """The largest batch for a plain loop's one-step function (``adapters.loop``)."""
    from .adapters.loop import find_batch_size as find

    return find(step, **options)


def fits_batch_size(_train: Any = None, **options: Any) -> Any:
    """Decorator: call ``train(batch_size, ...)`` with ``find_batch_size``'s answer."""
    from .adapters.loop import fits_batch_size as decorator

    return decorator(_train, **options)


__all__ = ["probe", "check", "noise_scale", "sweep", "plan_sweep", "SweepPlan", "schedule",
           "resolve_task", "device_of", "find_batch_size", "fits_batch_size"]
