"""The command line: parse, call one core function, render. Errors become exit codes here."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Callable, Optional, TypeVar

import typer

from . import __version__
from .errors import BsselectError, UsageError

T = TypeVar("T")

app = typer.Typer(
    help="Choose the batch size for training a PyTorch model.\n\n"
    "TASK is a built-in example (see `bsselect examples`), `package.module:function` or "
    "`path/to/file.py:function` returning a bsselect.Task. Without TASK: the digits-mlp example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

TaskArg = Annotated[
    Optional[str],
    typer.Argument(help="Built-in example name, module:function or file.py:function.",
                   show_default="digits-mlp"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout (logs go to stderr).")]
MarginOpt = Annotated[float, typer.Option(help="Safety margin: use (1 - margin) of the budget.")]
MemoryOpt = Annotated[Optional[str], typer.Option(
    "--memory", help="Memory budget, e.g. 24GiB, 16GB, 512MiB. Default: free device memory.")]


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body; BsselectError -> one line + its exit code, Ctrl-C -> 130."""
    from .report import console

    try:
        return fn()
    except BsselectError as exc:
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: never a bare traceback
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} "
                      "(rerun with --debug for a traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


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
    _state["debug"] = debug


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
             "rounding, fragmentation) to a simulation.")] = "same",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps, xpu ...")] = "auto",
    batch_sizes: Annotated[Optional[str], typer.Option(
        help="Comma-separated batch sizes to measure.", show_default="8,16,32,64,128")] = None,
    as_json: JsonOpt = False,
) -> None:
    """What fits? Peak memory per sample and fixed, and the largest batch under the budget.

    Examples:

      bsselect probe                              # digits-mlp, simulated, RAM budget

      bsselect probe tiny-lm --memory 8GiB --json

      bsselect probe train.py:make_task --target cuda --memory 80GiB
    """

    def body() -> None:
        from .device import Budget, default_budget, resolve_device
        from .probe import DEFAULT_BATCH_SIZES, Method, run_probe
        from .report import console, emit_json, render_probe
        from .targets import Target
        from .task import load_task, validate_task
        from .units import parse_size

        meth = _enum(Method, method, "--method")
        tgt = _enum(Target, target, "--target")
        sizes = parse_int_list(batch_sizes, "--batch-sizes") or list(DEFAULT_BATCH_SIZES)
        dev = resolve_device(device)
        if memory is not None:
            budget = Budget(parse_size(memory), "--memory")
        elif tgt is not Target.same:
            raise UsageError(f"--target {tgt.value} needs --memory (the target device's memory)")
        else:
            budget = default_budget(dev)
        loaded, name = load_task(task)
        validate_task(loaded)
        with _progress(console, f"probing {name}", len(sizes)) as advance:
            result = run_probe(loaded, task_name=name, device=dev, budget=budget, method=meth,
                               margin=margin, batch_sizes=sizes, target=tgt,
                               budget_is_total=memory is not None, on_point=advance)
        emit_json(result.to_json()) if as_json else render_probe(result)

    guarded(body)


E = TypeVar("E")


def _enum(cls: type[E], value: str, option: str) -> E:
    try:
        return cls(value)  # type: ignore[call-arg]
    except ValueError:
        choices = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise UsageError(f"{option} must be one of {choices}; got {value!r}") from None


class _progress:
    """A rich progress bar on stderr; yields ``advance(done, total)``."""

    def __init__(self, console, description: str, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=console, transient=True)
        self.task_id = self.bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int, int], None]:
        self.bar.start()
        return lambda done, total: self.bar.update(self.task_id, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def main() -> None:
    app()
