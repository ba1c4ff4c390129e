"""The command line: parse, call one core function, render. Errors become exit codes here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from . import __version__
from .cli_boundary import escape, full_output_said, guarded, state
from .errors import BsselectError, UsageError, one_line
from .progress import ScheduleProgress, SweepProgress
from .run_options import (AccumulateOpt, CheckpointingOpt, InputsOpt, PrecisionOpt, ReshardOpt,
                          ShardOpt, ShardUnitOpt, SweepAccumulateOpt, WorldSizeOpt)

T = TypeVar("T")

app = typer.Typer(
    help="Choose the batch size for training a PyTorch model.\n\n"
    "TASK is a built-in example (see `bsselect examples`), `package.module:function` or "
    "`path/to/file.py:function` returning a bsselect.Task. Without TASK: the digits-mlp example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

HfConfigOpt = Annotated[Optional[Path], typer.Option(
    "--hf-config", help="Instead of a task: a local transformers config.json (or its "
    "directory), random weights of the class its architectures names (a causal LM if none), "
    "trained on random tokens; or llama-7b, a Llama-2-7B-shaped config that ships with "
    "bsselect. Never downloads.")]
SeqLenOpt = Annotated[Optional[int], typer.Option(
    help="With --hf-config: tokens per sequence.",
    show_default="the config's max_position_embeddings")]
TaskArg = Annotated[
    Optional[str],
    typer.Argument(help="Built-in example name, module:function or file.py:function.",
                   show_default="digits-mlp"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout (logs go to stderr).")]
MarginOpt = Annotated[float, typer.Option(help="Safety margin: use (1 - margin) of the budget.")]
MemoryOpt = Annotated[Optional[str], typer.Option(
    "--memory", help="Memory budget, e.g. 24GiB, 16GB (10^9 bytes), 512MiB; a bare G, M or K "
                     "is binary (24G = 24GiB). Default: free device memory.")]


def _note(command: str, data: dict) -> None:
    """Under torchrun, one line under the table saying which batch is per device, which global."""
    from .distributed import describe
    from .report import out

    line = describe(command, data)
    if line:
        out.print(line, highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"bsselect {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    state["debug"] = debug


def _write_plot(draw: Callable[..., None], result, plot: Path) -> None:
    """Draw ``result`` to ``plot`` after the results were printed: a plot that fails to write
    loses nothing (the journal holds them too)."""
    from .report import console

    try:
        draw(result, plot)
    except OSError as exc:
        raise UsageError(f"writing the plot {str(plot)!r} failed: {one_line(exc)}; the "
                         f"results above are also in {result.journal}") from None
    # matplotlib adds ".png" to a name without a suffix; paths print as they are (no markup)
    written = plot if plot.suffix else plot.with_name(plot.name + ".png")
    console.print(f"plot written to {written}", highlight=False, markup=False)


def _journal_and_plot_options(resume: bool, overwrite: bool, plot: Optional[Path]) -> None:
    """Before any work: --resume and --overwrite exclude each other, and a --plot can be
    written (matplotlib importable, the folder writable)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if plot is not None:
        from .plots import check_plot_target

        check_plot_target(plot)


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes integers >= 1, got {text!r}")
    return values


@app.command()
def examples() -> None:
    """List the built-in example tasks."""
    from .examples import DEFAULT, DESCRIPTIONS

    for name, text in DESCRIPTIONS.items():
        mark = " (default)" if name == DEFAULT else ""
        print(f"{name:12s} {text}{mark}")


@app.command()
def probe(
    task: TaskArg = None,
    memory: MemoryOpt = None,
    margin: MarginOpt = 0.2,
    method: Annotated[str, typer.Option(
        help="measured (real steps + allocator statistics), simulated (meta device), or auto: "
             "measured on an accelerator, simulated on the CPU.")] = "auto",
    target: Annotated[str, typer.Option(
        help="same: the probing device; cuda: add CUDA-only terms (workspaces, context, "
             "rounding, fragmentation) to a simulation (with --method measured: on a CUDA "
             "device only).")] = "same",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps, xpu ...")] = "auto",
    batch_sizes: Annotated[Optional[str], typer.Option(
        help="Comma-separated batch sizes to measure.", show_default="8,16,32,64,128")] = None,
    precision: PrecisionOpt = "fp32",
    accumulate: AccumulateOpt = 1,
    inputs: InputsOpt = "worst-case",
    hf_config: HfConfigOpt = None,
    seq_len: SeqLenOpt = None,
    shard: ShardOpt = None,
    world_size: WorldSizeOpt = None,
    shard_unit: ShardUnitOpt = None,
    reshard_after_forward: ReshardOpt = None,
    activation_checkpointing: CheckpointingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What fits? Peak memory per sample and fixed, and the largest batch under the budget.

    Examples:

      bsselect probe                              # digits-mlp, simulated, RAM budget

      bsselect probe tiny-lm --memory 8GiB --json

      bsselect probe train.py:make_task --target cuda --memory 80GiB

      bsselect probe --hf-config llama/config.json --seq-len 4096 --precision bf16 \\
          --target cuda --memory 80GiB --shard fsdp --world-size 8 --activation-checkpointing
    """

    def body() -> None:
        from . import api
        from .memory.probe import DEFAULT_BATCH_SIZES
        from .report import console, emit_json, render_probe
        from .run_options import print_step_lines

        sizes = parse_int_list(batch_sizes, "--batch-sizes") or list(DEFAULT_BATCH_SIZES)
        result = api.probe(task, memory=memory, margin=margin, method=method, target=target,
                           batch_sizes=sizes, precision=precision, accumulate=accumulate,
                           inputs=inputs, device=device, hf_config=hf_config,
                           seq_len=seq_len, shard=shard, world_size=world_size,
                           shard_unit=shard_unit, reshard_after_forward=reshard_after_forward,
                           activation_checkpointing=activation_checkpointing,
                           console=console)
        from .distributed import probe_json

        if as_json:
            emit_json(probe_json(result.to_json()))
        else:
            data = result.to_json()
            render_probe(result)
            print_step_lines(data)
            _note("probe", data)

    guarded(body)



@app.command()
def noise(
    task: TaskArg = None,
    b_small: Annotated[Optional[int], typer.Option(
        help="Small batch: one forward/backward each.",
        show_default="the task's base batch size")] = None,
    b_big: Annotated[Optional[int], typer.Option(
        help="Big batch, a multiple of --b-small.", show_default="8 x b_small")] = None,
    measurements: Annotated[int, typer.Option(help="Big batches per estimate (at least 4).")] = 32,
    warmup_steps: Annotated[int, typer.Option(
        help="Train this many steps at the task's base batch size first.")] = 0,
    every: Annotated[Optional[int], typer.Option(
        help="Also estimate every K steps during the warm-up run.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the initial weights and batches.")] = 0,
    from_checkpoint: Annotated[Optional[Path], typer.Option(
        help="Measure at a checkpoint of your run instead of at initialisation (the formats "
             "of sweep --from-checkpoint).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps, xpu ...")] = "auto",
    precision: PrecisionOpt = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """How noisy are the gradients? The gradient noise scale B_simple (McCandlish et al. 2018).

    Examples:

      bsselect noise linreg                     # closed form known: 16 + 1 + 16/|w*|²

      bsselect noise digits-mlp --warmup-steps 200 --every 50

      bsselect noise tiny-lm --json

      bsselect noise train.py:make_task --from-checkpoint ckpt/step-2000.pt
    """

    def body() -> None:
        from . import api
        from .report import console, render_noise
        from .run_options import progress_bar
        from .task import load_task

        loaded, name = load_task(task)  # once: its factory may load a dataset (review)
        with progress_bar(console, f"noise scale of {name} (passes)", 1) as advance:
            report = api.noise_scale(loaded, b_small=b_small, b_big=b_big,
                                     measurements=measurements, warmup_steps=warmup_steps,
                                     every=every, seed=seed, device=device,
                                     precision=precision, progress=advance,
                                     from_checkpoint=from_checkpoint,
                                     warn=lambda w: console.print(
                                         f"[yellow]warning:[/] {escape(w)}", highlight=False))
        if as_json:
            from .distributed import noise_json
            from .report import emit_json

            emit_json({"task": name, **noise_json(report.to_json())})
        else:
            render_noise(report)
            _note("noise", report.to_json())

    guarded(body)


@app.command()
def sweep(
    task: TaskArg = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        help="Explicit comma-separated batch sizes (skips the probe).")] = None,
    min_batch: Annotated[Optional[int], typer.Option(
        help="Smallest power of two to try. [default: 8]")] = None,
    max_batch: Annotated[Optional[int], typer.Option(
        help="Largest batch to try. Default: probe's largest power of two that fits, "
             "capped at half the training set.")] = None,
    budget: Annotated[Optional[str], typer.Option(
        help="Per-trial budget, equal for every batch size: 4096 (samples), 200steps or 30s. "
             "Default: 32 steps of the task's base batch size, at least one step of the "
             "largest, at most 65536 samples.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Learning rate at the task's base batch size, scaled to each batch size "
             "(default: the task's own lr). From a checkpoint: the lr your run trains at "
             "now.", show_default="the task's lr")] = None,
    lr_scaling: Annotated[str, typer.Option(
        help="auto (linear for SGD-family, sqrt for Adam-family, by the optimizer's class "
             "name; none for any other class: the task's lr at every batch size), linear, "
             "sqrt or none.")] = "auto",
    warmup_steps: Annotated[str, typer.Option(
        help="LR warm-up per trial. auto: a trial whose scaled lr is above the task's ramps "
             "up to it linearly from the task's lr over the first 8 base batches' worth of "
             "samples (Goyal et al.); N: every trial ramps from 0 over N steps; 0: none.")
    ] = "auto",
    warm_start_steps: Annotated[int, typer.Option(
        help="Train the base configuration (base batch size and lr) this many steps first; "
             "every trial then branches from that state, optimizer state included "
             "(0: trials start from initialisation).")] = 0,  # sweep.WARM_START_STEPS (a test
    # keeps them equal; importing sweep here would import torch for --help)
    from_checkpoint: Annotated[Optional[Path], typer.Option(
        help="Branch every trial from a checkpoint of your run, to ask which batch size "
             "trains best from where the run is now: torch.save({'model': "
             "model.state_dict(), 'optimizer': optimizer.state_dict()}), a Lightning .ckpt "
             "or a Hugging Face Trainer checkpoint directory. Loaded without running code "
             "(weights_only).")] = None,
    noise_measurements: Annotated[int, typer.Option(
        help="Gradient-noise measurements at the end of each trial, pooled over trials "
             "for the ranking (0: off).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for initial weights and data order.")] = 0,
    journal: Annotated[Optional[Path], typer.Option(
        help="JSONL journal of finished trials.", show_default="bsselect-sweep-TASK.jsonl")
    ] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Skip trials already in the journal for the same task and settings "
        "(those that failed with an error or out of memory run again).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start the journal afresh if it exists.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps, xpu ...")] = "auto",
    memory: MemoryOpt = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write a PNG with loss curves, step-time fit and ranking (needs matplotlib).")] = None,
    precision: PrecisionOpt = "fp32",
    accumulate: SweepAccumulateOpt = 1,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for the trials and timing (on a CPU device). Default: half the "
             "usable cores, so a busy core does not stall every step.",
        show_default="half the usable cores")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What trains best? Short equal-budget trials at power-of-two batch sizes, ranked.

    Ranks by predicted time-to-target (1 + B/b)·t(b), with step times from interleaved timing
    rounds (robust to a busy machine) and B the noise scale measured in the trials (the larger
    of the pooled gradient noise scale B_simple and B_steps, from the trials' steps to common
    loss levels); batch sizes within uncertainty of the best are shown as tied. Compares with
    b_opt = sqrt(B_noise·tau_f/tau_d).

    Examples:

      bsselect sweep                                  # digits-mlp, about a minute on a laptop

      bsselect sweep tiny-lm --batch-sizes 8,16,32,64 --budget 60s

      bsselect sweep train.py:make_task --resume --json > sweep.json

      bsselect sweep train.py:make_task --from-checkpoint ckpt/step-2000.pt
    """

    def body() -> None:
        from . import api
        from .report import console
        from .selection.plan import warn_threads

        _journal_and_plot_options(resume, overwrite, plot)
        plan = api.plan_sweep(
            task, batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), min_batch=min_batch,
            max_batch=max_batch, budget=budget, lr_scaling=lr_scaling, seed=seed,
            warmup_steps=warmup_steps, noise_measurements=noise_measurements,
            warm_start_steps=warm_start_steps, journal=journal, device=device, memory=memory,
            precision=precision, accumulate=accumulate, threads=threads,
            from_checkpoint=from_checkpoint, lr=lr, console=console)
        settings = plan.settings
        console.print(f"sweeping {plan.task_name}: batch sizes {list(plan.batch_sizes)} "
                      f"({plan.max_batch_source}), {settings.budget.amount:g} "
                      f"{settings.budget.kind.value} per trial, journal {plan.journal}",
                      highlight=False, markup=False)
        if plan.checkpoint is not None:
            ck = plan.checkpoint
            console.print(f"every trial branches from {escape(ck.path)} ({ck.format}"
                          + (f", step {ck.step}" if ck.step is not None else "")
                          + f", sha256 {ck.sha256[:12]})", highlight=False)
        if settings.budget.kind.value == "seconds":
            console.print(f"a {settings.budget.amount:g} s budget bounds each trial's training "
                          "steps; its evaluation and noise measurements, and the timing rounds "
                          "after the trials, come on top", highlight=False)
        if settings.accumulate > 1 or settings.precision.value != "fp32":
            console.print(f"{settings.precision.value}; each batch size is the effective "
                          f"batch: micro-batch x {settings.accumulate} accumulation steps",
                          highlight=False)
        if plan.task.max_grad_norm is not None:
            console.print(f"gradients clipped to norm {plan.task.max_grad_norm:g} before every "
                          "step (Task.max_grad_norm)", highlight=False)
        if plan.threads is not None:
            console.print(f"cpu threads: {plan.threads}"
                          + (" (--threads)" if plan.threads_given else
                             " (half the usable cores; set with --threads)"), highlight=False)
            warn_threads(console, plan.threads if plan.threads_given else None)
        with SweepProgress(console, len(plan.batch_sizes)) as hooks:
            result = api.sweep(plan=plan, resume=resume, overwrite=overwrite, hooks=hooks)
        _finish_sweep(result, as_json, plot)

    guarded(body)


@app.command()
def schedule(
    task: TaskArg = None,
    horizon: Annotated[Optional[int], typer.Option(
        help="Samples of the run to plan (the length of your training run).",
        show_default="256 steps of the task's base batch size, or one epoch if longer; with "
                     "--from-checkpoint, twice the last checkpoint's samples")] = None,
    points: Annotated[Optional[int], typer.Option(
        help="Points of the base run to branch from: 0, then horizon/2^(points-1) .. "
             "horizon/2.", show_default="5")] = None,
    branch_samples: Annotated[Optional[int], typer.Option(
        help="Samples each branched trial trains.", show_default="horizon / 16")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        help="Explicit comma-separated batch sizes (skips the probe).")] = None,
    min_batch: Annotated[Optional[int], typer.Option(
        help="Smallest power of two to branch. [default: 8]")] = None,
    max_batch: Annotated[Optional[int], typer.Option(
        help="Largest batch to branch. Default: probe's largest power of two that fits, "
             "capped at half the training set (and at branch-samples / 4).")] = None,
    lr_scaling: Annotated[str, typer.Option(
        help="auto (linear for SGD-family, sqrt for Adam-family, by the optimizer's class "
             "name; none for any other class: the task's lr at every batch size), linear, "
             "sqrt or none.")] = "auto",
    tolerance: Annotated[float, typer.Option(
        help="Critical batch: the largest whose loss drop is within this fraction of the "
             "smallest batch's.")] = 0.1,
    noise_measurements: Annotated[int, typer.Option(
        help="B_simple measurements at each point (0: off; else at least 4, each point's "
             "interval comes from its own).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for initial weights and data order.")] = 0,
    journal: Annotated[Optional[Path], typer.Option(
        help="JSONL journal of finished branches.",
        show_default="bsselect-schedule-TASK.jsonl")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Skip branches already in the journal for the same task and "
                         "settings.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start the journal afresh if it exists.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps, xpu ...")] = "auto",
    memory: MemoryOpt = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write a PNG of the batch sizes over the run with the schedule (needs "
             "matplotlib).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads (on a CPU device).", show_default="half the usable cores")] = None,
    from_checkpoint: Annotated[Optional[list[str]], typer.Option(
        "--from-checkpoint", metavar="PATH[@STEP]",
        help="A checkpoint of your run to branch from, instead of a base run (repeat it: one "
             "point each, with initialisation): torch.save({'model': ..., 'optimizer': ...}), "
             "a Lightning .ckpt or a Hugging Face Trainer checkpoint directory; or a run's "
             "directory of them (a Trainer output_dir, a Lightning dirpath). @STEP names "
             "the run's optimizer step where the file does not hold one; the run is taken to "
             "train at the task's base batch size.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """How does the best batch size move over the run? A batch-size warm-up schedule.

    Trains the base configuration (the task's batch size and lr) and branches short
    equal-sample trials at every batch size from points of it; per point it reports B_simple,
    the critical batch (Merrill et al. 2025) and the fastest batch at measured step times,
    and plans stages that grow the batch, with the predicted steps and time against fixed
    batch sizes. With --from-checkpoint the points are your own run's checkpoints.

    Examples:

      bsselect schedule                               # digits-mlp, seconds on a laptop

      bsselect schedule tiny-lm --horizon 16384 --batch-sizes 8,16,32,64,128 --plot s.png

      bsselect schedule train.py:make_task --resume --json > schedule.json

      bsselect schedule train.py:make_task --from-checkpoint a.pt --from-checkpoint b.pt

      bsselect schedule hf_train.py:make_task --from-checkpoint out/   # out/checkpoint-N/
    """

    def body() -> None:
        from . import api
        from .report import console, emit_json, render_schedule

        _journal_and_plot_options(resume, overwrite, plot)
        with ScheduleProgress(console) as hooks:
            result = api.schedule(
                task, horizon=horizon, points=points, branch_samples=branch_samples,
                batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), min_batch=min_batch,
                max_batch=max_batch, lr_scaling=lr_scaling, tolerance=tolerance,
                noise_measurements=noise_measurements, seed=seed, journal=journal,
                resume=resume, overwrite=overwrite, device=device, memory=memory,
                threads=threads, hooks=hooks, console=console,
                from_checkpoints=from_checkpoint or ())
        if as_json:
            emit_json(result.to_json())
        else:
            render_schedule(result)
        if plot is not None:
            from .plots import plot_schedule

            _write_plot(plot_schedule, result, plot)

    guarded(body)


MAX_JOURNAL_WARNINGS = 5  # report's warnings about the journal's lines, then a count


@app.command()
def report(
    journal: Annotated[Path, typer.Argument(help="A sweep's JSONL journal.")],
    plot: Annotated[Optional[Path], typer.Option(
        help="Write the sweep's plots to this PNG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-render a sweep's table, JSON or plot from its journal, without running anything.

    Example:

      bsselect report bsselect-sweep-digits-mlp.jsonl --plot sweep.png
    """

    def body() -> None:
        from .report import console
        from .selection.journal import load
        from .selection.sweep import SweepSettings, summarize

        if plot is not None:
            from .plots import check_plot_target

            check_plot_target(plot)
        contents = load(journal)
        if contents.header is None:  # before its lines' warnings: a sweep's --json output
            # gave 2,859 "line N skipped" lines before this one (review)
            raise UsageError(f"{journal} has no readable header; cannot report it (a sweep's "
                             "journal is its .jsonl file, not its --json output)")
        shown = MAX_JOURNAL_WARNINGS
        for warning in contents.warnings[:shown]:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        if len(contents.warnings) > shown:
            console.print(f"[yellow]warning:[/] {len(contents.warnings) - shown} more "
                          "warnings about the journal's lines", highlight=False)
        if contents.header.settings.get("command") == "schedule":
            raise UsageError(f"{journal} is a `bsselect schedule` journal; report re-renders "
                             "sweeps. Rerun the schedule with --resume: it reuses every "
                             "finished branch and retrains only the base run")
        if not contents.trials:
            raise UsageError(f"{journal} holds no finished trial yet" if not contents.warnings
                             else f"{journal} holds no readable trial (see the skipped lines "
                             "above)")
        from .selection.journal import check_sweep_header
        from .selection.timing import RoundTiming

        check_sweep_header(journal, contents.header)
        s = contents.header.settings
        try:
            settings = SweepSettings.from_journal(s)
        except ValueError as exc:  # a budget_kind, lr_scaling or precision it does not know
            raise UsageError(f"{journal}: line 1 (the header) is damaged: {exc}; restore the "
                             "file, or rerun the sweep with --overwrite") from None
        trials = {t.batch_size: t for t in contents.trials}
        sizes = sorted(trials)
        timing = tuple(RoundTiming.from_dict(t) for t in contents.timing)
        note = None if timing else ("the journal holds no timing rounds: each trial's own "
                                    "step time is used")
        ran = [b for b in contents.timing_batch_sizes or () if b in trials]
        left: list[int] = []
        if ran:  # the last sweep's batch sizes, timing and note: what it ranked
            left = [b for b in sizes if b not in ran]
            sizes, note = ran, contents.timing_note
            later = [b for b in left if b in contents.after_timing]
            if later:  # a --resume that added them and was interrupted before its timing
                console.print(
                    f"[yellow]warning:[/] b={', '.join(map(str, later))}: trained by a later "
                    "run on this journal that stopped before its timing rounds, so not ranked "
                    f"here; this ranks the sweep before it ({', '.join(map(str, ran))}); "
                    "`bsselect sweep --resume` ranks them all, timed together", highlight=False)
            earlier = [b for b in left if b not in later]
            if earlier:
                console.print(
                    f"[yellow]warning:[/] b={', '.join(map(str, earlier))}: in the journal but "
                    f"not in its last sweep (which ranked {', '.join(map(str, ran))}), so left "
                    "out as that sweep left them out; `bsselect sweep --resume` with every "
                    "batch size ranks them all, timed together", highlight=False)
        not_run = _not_run(contents, trials)
        if not_run:
            console.print(
                f"[yellow]warning:[/] the sweep that wrote {escape(str(journal))} stopped "
                f"before b={', '.join(map(str, not_run))} (it set out to run them): this ranks "
                f"the {len(sizes)} it finished; `bsselect sweep --resume` runs the rest",
                highlight=False)
        ordered = tuple(trials[b] for b in sizes)
        # the device the sweep ran on (journals from before it was recorded: "journal")
        device = contents.timing_device or "journal"
        result = summarize(s["base_lr"], s["base_batch_size"], contents.header.task, device,
                           ordered, settings, max(sizes), "journal",
                           str(journal), (), bool(s.get("held_out_validation", False)),
                           s.get("validation_items"), timing=timing, timing_note=note)
        import dataclasses

        result = dataclasses.replace(result, not_run=tuple(not_run), unranked=tuple(left))
        if s.get("from_checkpoint_sha256"):  # trials from a checkpoint: say so, as the sweep did

            result = dataclasses.replace(result, from_checkpoint=contents.timing_from_checkpoint
                                         or {"path": None, "sha256": s["from_checkpoint_sha256"],
                                             "format": None, "step": None,
                                             "optimizer_state": None})
        then, now = contents.timing_recommended, result.recommended_batch_size
        rerun = sorted(set(contents.after_timing) & set(sizes))
        if rerun:  # a resume that stopped after rerunning them, before timing them
            console.print(
                f"[yellow]warning:[/] b={', '.join(map(str, rerun))}: trained after the "
                "journal's last timing rounds (a --resume that stopped before timing), so "
                "ranked at their trials' own step times; `bsselect sweep --resume` times them "
                "with the others", highlight=False)
        # Only when every batch size that sweep ranked is still here: the same trials.
        same = bool(ran) and set(contents.timing_batch_sizes or ()) <= set(trials) \
            and not rerun
        if same and then is not None and now is not None and then != now and then in ran:
            console.print(
                f"[yellow]warning:[/] the sweep that wrote {escape(str(journal))} recommended "
                f"b={then}; the same trials ranked by this bsselect give b={now}: its ranking "
                "rules have changed since", highlight=False)
        _finish_sweep(result, as_json, plot)

    guarded(body)


def _not_run(contents: Any, trials: dict) -> list[int]:
    """The batch sizes the journal's last sweep set out to run (its last ``plan`` record)
    that have no trial in it: an interrupted sweep's."""
    plans = [payload.get("batch_sizes") for tag, payload in contents.records if tag == "plan"]
    last = plans[-1] if plans else None
    if not (isinstance(last, list) and all(type(b) is int and b > 0 for b in last)):
        return []
    return [b for b in last if b not in trials]


def _finish_sweep(result, as_json: bool, plot: Optional[Path]) -> None:
    """The results first (table or JSON), then the plot: a plot that still fails to write
    loses nothing."""
    from .distributed import sweep_json
    from .report import emit_json, render_sweep

    if as_json:
        emit_json(sweep_json(result.to_json()))
    else:
        render_sweep(result)
        _note("sweep", result.to_json())
    if plot is not None:
        from .plots import plot_sweep

        _write_plot(plot_sweep, result, plot)
    failure = result.failure()
    if failure is not None:  # the table and the journal are kept; the exit code says it failed
        raise failure


@app.command()
def check(
    task: TaskArg = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="The batch size training will use.")] = None,
    memory: Annotated[Optional[str], typer.Option(
        help="The training device's memory, e.g. 80GiB.")] = None,
    device_preset: Annotated[Optional[str], typer.Option(
        help="Instead of --memory: a100-40gb, a100-80gb, h100-80gb, l4-24gb, rtx4090-24gb, "
             "t4-16gb, ... (`bsselect presets` lists them). Implies --target cuda.")] = None,
    margin: Annotated[Optional[float], typer.Option(
        help="Safety margin: require fitting in (1 - margin) of the memory.",
        show_default="0.2")] = None,
    target: Annotated[Optional[str], typer.Option(
        help="cuda adds the CUDA-only terms; same compares the simulated peak alone.",
        show_default="cuda with a preset, else same")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="pyproject.toml whose [tool.bsselect] supplies defaults (must exist when given).",
        show_default="./pyproject.toml, if present")] = None,
    output_format: Annotated[str, typer.Option(
        "--format", help="text, json or github (a GitHub Actions annotation on stdout; with "
        "--json, the JSON on stdout and the annotation on stderr, which GitHub reads too).")
    ] = "text",
    precision: Annotated[Optional[str], typer.Option(
        help="fp32, bf16 or fp16 autocast (fp16 with GradScaler).", show_default="fp32")] = None,
    accumulate: Annotated[Optional[int], typer.Option(
        help="Gradient accumulation steps: --batch-size is the micro-batch that must fit; "
             "the effective batch is batch size x N.", show_default="1")] = None,
    inputs: Annotated[Optional[str], typer.Option(
        help="worst-case (batches of the largest items) or typical (random items).",
        show_default="worst-case")] = None,
    hf_config: HfConfigOpt = None,
    seq_len: SeqLenOpt = None,
    shard: ShardOpt = None,
    world_size: WorldSizeOpt = None,
    shard_unit: ShardUnitOpt = None,
    reshard_after_forward: ReshardOpt = None,
    activation_checkpointing: CheckpointingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Will this config fit on that GPU? Exit 0 if it fits, 3 if not — no GPU needed.

    The training step is simulated on the meta device (a large model's parameters are never
    allocated, so a 7B-parameter model checks in seconds on a laptop; a small one also runs
    one real step on two items, which catches dtype and label errors a simulation cannot).

    Examples:

      bsselect check train.py:make_task --batch-size 256 --device-preset a100-80gb

      bsselect check tiny-lm --batch-size 64 --memory 16GiB --target cuda --json

      bsselect check            # everything from [tool.bsselect] in ./pyproject.toml

      bsselect check --hf-config llama/config.json --seq-len 4096 --batch-size 8 \\
          --precision bf16 --device-preset h100-80gb

      bsselect check --hf-config llama/config.json --seq-len 4096 --batch-size 4 \\
          --precision bf16 --device-preset h100-80gb --shard fsdp --world-size 8 \\
          --activation-checkpointing
    """

    def body() -> None:
        fmt = output_format
        if fmt not in ("text", "json", "github"):
            raise UsageError(f"--format must be text, json or github; got {fmt!r}")
        # --format github --json: both. The JSON keeps stdout to itself and the annotation goes
        # to stderr, whose workflow commands the GitHub runner reads as it reads stdout's.
        annotate = (sys.stderr if as_json else sys.stdout) if fmt == "github" else None
        try:
            _check_body(as_json or fmt == "json", annotate)
        except BsselectError as exc:
            if annotate is not None:  # the failure as an annotation too, not only a plain line
                text = str(exc).replace("%", "%25").replace("\n", "%0A")
                print(f"::error title=bsselect check::{text}", file=annotate, flush=True)
            raise

    def _check_body(as_json: bool, annotate) -> None:
        from . import api
        from .report import console, emit_json, render_check, render_check_github
        from .run_options import print_step_lines

        result = api.check(task, batch_size=batch_size, memory=memory,
                           device_preset=device_preset, margin=margin, target=target,
                           precision=precision, accumulate=accumulate, inputs=inputs,
                           config=config, hf_config=hf_config, seq_len=seq_len,
                           shard=shard, world_size=world_size, shard_unit=shard_unit,
                           reshard_after_forward=reshard_after_forward,
                           activation_checkpointing=activation_checkpointing,
                           console=console)
        if as_json:
            emit_json(result.to_json())
        if annotate is not None:
            render_check_github(result, annotate)
        if not as_json and annotate is None:
            render_check(result)
            print_step_lines(result.to_json())
        if not result.fits:
            raise typer.Exit(3)

    guarded(body)


@app.command()
def presets() -> None:
    """List the device presets for `check --device-preset` with their memory."""
    from .gate.check import PRESETS
    from .units import format_bytes

    for key, (size, name) in PRESETS.items():
        print(f"{key:14s} {format_bytes(size):>10s}  {name}")


def main() -> None:
    # transformers' per-call notices (config defaults, loss type) would interleave with the
    # tables; its errors still show. TRANSFORMERS_VERBOSITY set by the user wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with full_output_said():
        app()
