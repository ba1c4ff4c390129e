"""One exception family; the CLI turns each into its documented exit code.

Exit codes (docs/contract.md): 0 success · 1 the task or the run failed · 2 usage error ·
3 does not fit / nothing fits · 130 interrupted.
"""

from __future__ import annotations

from typing import Any


class BsselectError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; the message is one line."""

    exit_code = 1


class TaskError(BsselectError):
    """The user's task failed to build or to run a training step."""

    exit_code = 1


class CannotSimulate(TaskError):
    """The simulated step needed a value it does not have (a branch on an activation's
    value). ``probe --method auto`` falls back to real steps; ``check`` cannot."""


class RealTooError(TaskError):
    """A task error that a real step meets the same way: never "the simulation cannot run
    it"."""


class UsageError(BsselectError):
    """A bad option value or an entry point that cannot be loaded."""

    exit_code = 2


class DoesNotFitError(BsselectError):
    """Nothing fits in the budget (or, for ``check``, the requested batch does not)."""

    exit_code = 3


class InterruptedRun(BsselectError):
    """The user pressed Ctrl-C; finished work was saved."""

    exit_code = 130


def parse_choice(enum: Any, value: Any, name: str) -> Any:
    """``enum(value)``, or a UsageError naming ``name`` and every allowed value."""
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(m.value for m in enum)
        raise UsageError(f"{name} must be one of {known}; got {value!r}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def one_line(exc: BaseException) -> str:
    """``TypeError: bad shape`` — the first line of an exception, for one-line errors."""
    first = first_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def meta_device_error(exc: BaseException) -> bool:
    """Whether an error raised while building on the ``meta`` device came from it: torch names
    the meta device in what it raises there (``.item()``, ``.tolist()``, ``.numpy()``, an op
    with no meta kernel). An error that does not (a missing config key, a bad argument) is the
    factory's own, and would be raised building for real too."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if "meta" in str(cause).lower():
            return True
        cause = cause.__cause__ or cause.__context__
    return False
