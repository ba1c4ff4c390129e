"""The command line's error boundary: a command body's errors become one line and an exit
code (``guarded``), and its output streams hold up on a terminal that cannot show a character,
a closed pipe or a full disk. ``cli`` parses and renders; this decides how a run ends."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from typing import Any, Callable, Iterator, TypeVar

import typer

from .errors import BsselectError
from .wording import cli_surface

T = TypeVar("T")

state = {"debug": False}   # --debug: tracebacks with the one-line errors


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body; BsselectError -> one line + its exit code, Ctrl-C -> 130. SIGTERM
    (what Slurm and Kubernetes send before SIGKILL) is taken as Ctrl-C: a sweep then says
    where its finished trials are and to --resume, where it died in silence (review)."""
    import signal
    import threading

    from . import report
    from .report import console

    _tolerant_streams()
    # Not under torchrun: a rank inside a collective cannot run the handler until it
    # returns, and the others waited in their teardown barrier until SIGKILL (review).
    previous = None
    if threading.current_thread() is threading.main_thread() \
            and "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        previous = signal.signal(signal.SIGTERM, _terminated)
    # --json: the task's own prints go to stderr, the document to the real stdout
    as_json = "--json" in sys.argv[1:] and sys.stdout is not None
    report.json_stream = sys.stdout if as_json else None
    quiet_task = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with quiet_task, cli_surface():  # its messages name the options it was given
            return fn()
    except BsselectError as exc:
        if state["debug"]:
            traceback.print_exc()
        _error(console, f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except SystemExit as exc:  # bsselect never calls sys.exit: the user's task code did
        if state["debug"]:
            traceback.print_exc()
        _error(console, f"[red]error:[/] the task's code called sys.exit({escape(repr(exc.code))}"
                        ") while bsselect was building or running it; a task file must return a "
                        "bsselect.Task, not exit (nothing was checked)")
        raise typer.Exit(1) from None
    except OSError as exc:
        if state["debug"]:
            traceback.print_exc()
        if exc.errno not in _FULL:
            _error(console, f"[red]internal error:[/] {type(exc).__name__}: "
                            f"{escape(str(exc))} (rerun with --debug for a traceback)")
            raise typer.Exit(1) from None
        # stdout on a full disk: "internal error", before (review)
        _error(console, f"[red]error:[/] a write failed ({escape(exc.strerror or str(exc))}): "
                        "the output, a plot or a file the task writes; a sweep's or schedule's "
                        "finished work is in its journal")
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the boundary: never a bare traceback
        if state["debug"]:
            traceback.print_exc()
        _error(console, f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
                        "(rerun with --debug for a traceback)")
        raise typer.Exit(1) from None
    finally:
        report.json_stream = None
        if previous is not None:  # a task's thread may outlive the command (review)
            signal.signal(signal.SIGTERM, previous)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _tolerant_streams() -> None:
    """Text the terminal's encoding cannot show (an ASCII locale; bsselect's tables use
    "—", "·", "≈") is escaped, not an error after all the work was done (review: "internal
    error: UnicodeEncodeError" at the end of a sweep)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if stream is not None and encoding != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change: left as it is
                pass


def escape(text: str) -> str:
    """User or library text as rich prints it literally: `[tool.bsselect]`, a shape
    `[batch, 32]` and `pip install 'bsselect[plot]'` keep their brackets."""
    from rich.markup import escape

    return escape(text)


def _error(console, text: str) -> None:
    """One error line on stderr. Under torchrun every rank's (ranks but 0 have quiet consoles:
    their results and progress are rank 0's), prefixed with its rank."""
    rank = os.environ.get("RANK", "0") if console.quiet else "0"
    console.quiet = False
    console.print(("" if rank == "0" else f"rank {rank}: ") + text, highlight=False,
                  soft_wrap=True)


@contextlib.contextmanager
def full_output_said() -> Iterator[None]:
    """Around the whole app: a command outside ``guarded`` (examples, presets, --version,
    --help) writing to a full stdout ends with one line, not typer's traceback (review)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        from .report import drop_stream

        drop_stream(sys.stdout)  # the buffered rest would fail again at exit
        print(f"error: a write failed ({exc.strerror or exc}): the output", file=sys.stderr)
        sys.exit(1)
