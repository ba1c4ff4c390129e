"""CLI options that make memory numbers hold for the whole real run: --precision,
--accumulate and --inputs; their parsing, the dataset scan's progress bar, and the lines that
say how a step was measured. Kept out of cli.py so that each command only wires them in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Sequence

import typer

from .errors import UsageError, parse_choice

if TYPE_CHECKING:  # torch is imported when a command runs, not for --help
    from .memory.inputs import InputMode, InputScan
    from .precision import Precision
    from .step import StepSettings
    from .task import Task

PrecisionOpt = Annotated[str, typer.Option(
    help="fp32, bf16 or fp16: the forward under torch.autocast with that dtype (fp16 also with "
         "GradScaler loss scaling); parameters, gradients and optimizer state stay in the "
         "model's dtype (fp32 unless it is built in another; fp16 needs fp32 parameters).")]
AccumulateOpt = Annotated[int, typer.Option(
    help="Gradient accumulation: micro-steps per optimizer step. Batch sizes are then "
         "micro-batches (what must fit); the effective batch is micro-batch x N.")]
SweepAccumulateOpt = Annotated[int, typer.Option(
    "--accumulate",
    help="Gradient accumulation: micro-steps per optimizer step. The batch sizes swept are "
         "then effective batches (what the optimizer sees, and what the lr is scaled for), "
         "each trained as N micro-batches of batch/N; the micro-batch is what must fit.")]
InputsOpt = Annotated[str, typer.Option(
    help="worst-case: measure batches of the largest items (by element count, text in its "
         "collate_fn's tokens, the longest in each dimension first; one scan of the dataset, "
         "at most 100,000 items); typical: random batches.")]


ShardOpt = Annotated[Optional[str], typer.Option(
    help="fsdp: answer for one rank of a PyTorch FSDP2 (fully_shard) run over --world-size "
         "ranks, simulated in this process (sharded parameters, gradients and optimizer "
         "state; all-gather and reduce-scatter buffers). With --precision bf16: "
         "MixedPrecisionPolicy(bf16 parameters, fp32 reduction) instead of autocast.",
    show_default="none")]
WorldSizeOpt = Annotated[Optional[int], typer.Option(
    help="With --shard fsdp: the number of ranks the model is sharded over.")]
ShardUnitOpt = Annotated[Optional[str], typer.Option(
    help="Class name of the modules each wrapped by fully_shard (and checkpointed).",
    show_default="the blocks of the model's largest ModuleList/Sequential of one class")]
ReshardOpt = Annotated[Optional[bool], typer.Option(
    "--reshard-after-forward/--no-reshard-after-forward",
    help="FSDP2's reshard_after_forward: free each unit's unsharded parameters after its "
         "forward (all-gather again in backward), or keep them until the backward.",
    show_default="reshard")]
CheckpointingOpt = Annotated[Optional[bool], typer.Option(
    "--activation-checkpointing/--no-activation-checkpointing",
    help="Recompute each unit's activations in the backward (checkpoint_wrapper, "
         "non-reentrant); the output says how much it saves.", show_default="off")]


def shard_plan(shard: str | None, world_size: int | None, unit: str | None = None,
               reshard_after_forward: bool | None = None, checkpointing: bool | None = None,
               precision: str = "fp32") -> Any:
    """A ``memory.sharded.ShardPlan`` from the sharding options, or None when neither
    sharding nor checkpointing is asked for. UsageError on an inconsistent combination."""
    import torch

    from .memory.sharded import ShardPlan

    # The Python API passes these unchecked: "no" for a flag turned checkpointing on, and a
    # string world size was a raw TypeError (review); the CLI and pyproject check their own.
    for name, value in (("activation_checkpointing", checkpointing),
                        ("reshard_after_forward", reshard_after_forward)):
        if value is not None and not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")
    if world_size is not None and (isinstance(world_size, bool)
                                   or not isinstance(world_size, int)):
        raise UsageError(f"world_size must be a whole number of ranks, got {world_size!r}")
    if shard is not None and not isinstance(shard, str):
        raise UsageError(f"shard must be 'fsdp' or 'none', got {shard!r}")
    if unit is not None and not isinstance(unit, str):
        raise UsageError(f"shard_unit must be a module class name, got {unit!r}")
    kind = (shard or "none").strip().lower()
    if kind not in ("none", "fsdp"):
        raise UsageError(f"--shard must be fsdp or none, got {shard!r}")
    if kind == "none":
        if world_size not in (None, 1) or unit and not checkpointing:
            raise UsageError("--world-size and --shard-unit need --shard fsdp (or, for "
                             "--shard-unit, --activation-checkpointing)")
        if reshard_after_forward is not None:
            raise UsageError("--reshard-after-forward needs --shard fsdp")
        return ShardPlan(fsdp=False, unit=unit, checkpointing=True) if checkpointing else None
    if world_size is None:
        raise UsageError("--shard fsdp needs --world-size N (the ranks it shards over)")
    if not 1 <= world_size <= 2**20:
        raise UsageError(f"--world-size must be between 1 and {2**20:,} ranks, got "
                         f"{world_size}")
    prec = parse_precision(precision).value
    if prec == "fp16":
        raise UsageError("--shard fsdp with --precision fp16 is not supported (loss scaling "
                         "under FSDP2); use bf16")
    return ShardPlan(world_size=world_size, unit=unit,
                     reshard_after_forward=True if reshard_after_forward is None
                     else reshard_after_forward,
                     param_dtype=torch.bfloat16 if prec == "bf16" else None,
                     checkpointing=bool(checkpointing))


def parse_precision(value: str) -> "Precision":
    from .precision import Precision

    return parse_choice(Precision, value, "--precision")


def parse_inputs(value: str) -> "InputMode":
    from .memory.inputs import InputMode

    return parse_choice(InputMode, value, "--inputs")


# Each micro-step takes at least one sample, so the effective batch (micro-batch x N) is at
# least N: more steps than the largest batch (2**31 - 1, memory.capacity.MAX_BATCH_SIZE) is a
# typo, and a result for it would print an effective batch no run can have.
MAX_ACCUMULATE = 2**31 - 1


def check_accumulate(accumulate: Any, option: str = "--accumulate") -> int:
    """``accumulate`` as an int in [1, MAX_ACCUMULATE]; UsageError naming the range otherwise."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) \
            or not 1 <= accumulate <= MAX_ACCUMULATE:
        raise UsageError(f"{option} must be an integer from 1 to {MAX_ACCUMULATE:,} (micro-steps "
                         f"per optimizer step; each takes at least one sample), got "
                         f"{accumulate!r}")
    return accumulate


def step_settings(precision: str, accumulate: int = 1, shard: Any = None) -> "StepSettings":
    """``shard``: a ShardPlan (``shard_plan``) or None."""
    from .step import StepSettings

    return StepSettings(precision=parse_precision(precision),
                        accumulate=check_accumulate(accumulate), shard=shard)


def scan(task: "Task", mode: "InputMode", console: Any, seed: int = 0,
         by_values: Sequence[str] = (), reads_values: bool = False,
         judge: Any = None) -> "InputScan":
    """``inputs.scan_inputs`` over the task's training data with a rich progress bar on
    stderr (transient: it disappears when done; the result's ``how`` says what was read)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .memory.inputs import InputMode, scan_inputs

    if mode is InputMode.typical:
        return scan_inputs(task.train_data, mode)
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                   disable=not console.is_terminal)  # off a terminal it left a blank line
    with bar:
        job = bar.add_task("finding the largest items", total=None)
        return scan_inputs(task.train_data, mode, seed=seed, by_values=by_values,
                           reads_values=reads_values, collate_fn=task.collate_fn, judge=judge,
                           progress=lambda done, total: bar.update(job, completed=done,
                                                                   total=total))


class progress_bar:
    """A rich progress bar on stderr; yields ``advance(done, total)``. The description is
    plain text, not markup: it may hold the task's name (a path with ``[`` or ``[/]``)."""

    def __init__(self, console, description: str, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=console, transient=True,
                            disable=not console.is_terminal)
        self.task_id = self.bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int, int], None]:
        self.bar.start()
        return lambda done, total: self.bar.update(self.task_id, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()



def step_lines(data: dict[str, Any]) -> list[str]:
    """Lines under probe's or check's table: which items, which precision, optimizer
    implementation, micro- vs effective batch (from the result's JSON fields)."""
    lines = []
    if data.get("method_note"):
        lines.append(f"method: {data['method']} — {data['method_note']}")
    inputs = data.get("inputs")
    if inputs == "worst-case" and data.get("uniform_items"):
        lines.append(f"inputs: worst-case = typical ({data.get('inputs_note')})")
    elif inputs == "worst-case":
        note = data.get("inputs_note") or ""
        largest = data.get("largest_item_elements")
        size = f"largest item {largest:,} elements; " if largest is not None else ""
        lines.append(f"inputs: worst-case — batches of the largest items ({size}{note})")
    elif inputs == "typical":
        lines.append("inputs: typical — random batches (a batch of longer items needs more)")
    precision = data.get("precision", "fp32")
    if precision != "fp32" and data.get("sharding"):  # world size 1 too (review)
        dtype = data.get("parameter_dtype") or "float32"
        lines.append(f"precision: FSDP2 MixedPrecisionPolicy — {precision} copies of the "
                     f"parameters for compute, {dtype} sharded parameters, gradients reduced "
                     "in fp32")
    elif precision != "fp32":
        scaling = " with GradScaler" if precision == "fp16" else ""
        dtype = data.get("parameter_dtype")
        lines.append(f"precision: {precision} autocast{scaling}"
                     + (f", {dtype} parameters and gradients" if dtype else ""))
    if data.get("optimizer_impl"):
        lines.append(f"optimizer: {data['optimizer_impl']} implementation"
                     + (" (as CUDA runs it)" if data.get("target") == "cuda" else ""))
    if data.get("target") == "same" and "fits" in data:
        # check simulates on the CPU: a GPU's --memory against this machine's step, in
        # silence (review)
        lines.append("target: this machine's CPU step, without CUDA's terms (context, "
                     "workspaces, fragmentation); for a GPU: --target cuda or --device-preset")
    accumulate = data.get("accumulate", 1)
    if accumulate > 1:
        ranks = data.get("shard_ranks", 1)
        over = (f" per rank; {data['global_batch']} over the {ranks} ranks" if ranks > 1
                else "")
        lines.append(f"accumulation: micro-batch {data['micro_batch']} must fit; x {accumulate} "
                     f"micro-steps = effective batch {data['effective_batch']} per optimizer "
                     f"step{over}")
    return lines


def print_step_lines(data: dict[str, Any]) -> None:
    from .report import out

    for line in step_lines(data):  # plain text: notes may quote the user's errors or paths
        out.print(line, highlight=False, markup=False)


__all__ = ["PrecisionOpt", "AccumulateOpt", "SweepAccumulateOpt", "InputsOpt", "ShardOpt",
           "WorldSizeOpt", "ShardUnitOpt", "ReshardOpt", "CheckpointingOpt", "shard_plan",
           "parse_precision", "parse_inputs", "check_accumulate", "MAX_ACCUMULATE",
           "step_settings", "scan", "step_lines", "print_step_lines", "progress_bar"]
