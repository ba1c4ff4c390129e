"""A message in the words of the caller: the CLI's options for the CLI, keyword arguments for
Python.

bsselect writes its messages once, in the CLI's words (``use --method simulated``), because
the CLI calls the same ``bsselect.api`` functions a Python user does. A Python caller who
passed ``method="auto"`` should not be told about a flag it never typed (new-user review):
the public API functions (``python_words``) reword a ``BsselectError`` that leaves them,
unless the CLI is the caller (``cli_surface``):

- ``--method simulated`` -> ``method="simulated"``; ``--seq-len 4096`` -> ``seq_len=4096``;
  ``--batch-sizes 8,16`` -> ``batch_sizes=[8, 16]``;
- ``--resume`` -> ``resume=True``; ``--no-reshard-after-forward`` ->
  ``reshard_after_forward=False``;
- ``--memory`` named without a value -> ``memory=``.

A CLI option with no keyword in the API (``--json``, ``--plot``, ``--debug``) and a command
quoted whole (``bsselect probe --method measured``, ``torchrun ...``) are left as written.
Which options take a value and which keyword each is comes from the CLI's own definitions, so
an option added to both is reworded without a word here.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from .errors import BsselectError

F = TypeVar("F", bound=Callable[..., Any])

_cli: ContextVar[bool] = ContextVar("bsselect_cli_surface", default=False)


@contextmanager
def cli_surface() -> Iterator[None]:
    """The CLI is the caller: messages keep its options' words."""
    token = _cli.set(True)
    try:
        yield
    finally:
        _cli.reset(token)


def python_words(fn: F) -> F:
    """A public API function whose errors name keyword arguments, not CLI options (unless the
    CLI called it). The exception is the same object, its message reworded."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BsselectError as exc:
            if not _cli.get() and exc.args and isinstance(exc.args[0], str):
                exc.args = (in_python_words(exc.args[0]),) + exc.args[1:]
            raise
    return wrapper  # type: ignore[return-value]


def python_warning(message: str) -> None:
    """A warning for a Python caller that gave no warning callback: Python's ``warnings``
    (a ``UserWarning``, in its words), where it was dropped (review)."""
    import warnings

    warnings.warn(in_python_words(message), UserWarning, stacklevel=2)


def warn_channel(warn: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``warn``, or for a Python caller without one, ``python_warning``; the CLI always
    passes its own."""
    return warn if warn is not None or _cli.get() else python_warning


class _Option(NamedTuple):
    keyword: str  # the API's keyword argument
    value: bool | None  # None: takes a value; True/False: a switch and what it sets
    listed: bool = False  # the keyword takes a sequence (``--batch-sizes 8,16``)


@functools.lru_cache(maxsize=1)
def _options() -> dict[str, _Option]:
    """Every CLI option that has a keyword of the same name in a public API function."""
    import inspect

    import typer

    from . import api
    from .cli import app

    keywords: dict[str, bool] = {}  # keyword -> whether it takes a sequence
    for fn in (api.probe, api.check, api.noise_scale, api.plan_sweep, api.sweep,
               api.schedule):
        for name, param in inspect.signature(fn).parameters.items():
            keywords[name] = keywords.get(name, False) or "Sequence[" in str(param.annotation)
    found: dict[str, _Option] = {}
    for command in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if param.name not in keywords:
                continue
            switch = bool(getattr(param, "is_flag", False))
            for opt in param.opts:
                found[opt] = _Option(param.name, True if switch else None,
                                     keywords[param.name])
            for opt in param.secondary_opts:  # --no-...
                found[opt] = _Option(param.name, False)
    return found


# The values the messages give options: the choices of the options that have some, and the
# shapes of the rest (a number or size, a list, a placeholder, a path)
_CHOICES = {"auto", "same", "cuda", "cpu", "meta", "measured", "simulated", "fp32", "bf16",
            "fp16", "fsdp", "none", "linear", "sqrt", "worst-case", "typical"}
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|path")  # N, SIZE, NAME, path
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE]-?\d+)?")
_LIST = re.compile(r"\d+(,\d+)+")  # 8,16,32; or a number with thousands separators (10,000)
# a number, size or name with a digit (80GiB, h100-80gb), a class or placeholder, a path
_VALUE = re.compile(r"\S*\d\S*|[A-Z]\w*|\S*\w[/.]\w\S*")
# an option and what follows it; a command quoted whole is matched first and kept
_COMMAND = r"(?:bsselect (?:probe|check|sweep|noise|schedule)|torchrun)\b[^`\n);]*"
_TOKEN = re.compile(rf"({_COMMAND})|(?<![\w-])(--[a-z][a-z0-9-]*)"
                    r"(?:([ =])(\d+(?:,\d+)+|[^\s`'\",;:()]+))?")


def _is_value(token: str) -> bool:
    return token in _CHOICES or bool(_VALUE.fullmatch(token) or _PLACEHOLDER.fullmatch(token))


def _literal(token: str, listed: bool) -> str:
    if _NUMBER.fullmatch(token) or _PLACEHOLDER.fullmatch(token):
        return token  # a number, or a placeholder such as N or SIZE
    if _LIST.fullmatch(token):
        return "[" + ", ".join(token.split(",")) + "]" if listed else token.replace(",", "")
    return f'"{token}"'


def in_python_words(text: str) -> str:
    """``text`` with each CLI option that has an API keyword written as that keyword."""
    options = _options()

    def reword(match: re.Match[str]) -> str:
        command, flag, sep, token = match.groups()
        if command is not None or flag not in options:
            return match.group(0)
        option = options[flag]
        if option.value is not None:  # a switch; what follows is the sentence's
            rest = f"{sep}{token}" if token is not None else ""
            return f"{option.keyword}={option.value}{rest}"
        # a full stop after the value ends the sentence
        value, stop = (token[:-1], ".") if token is not None and token.endswith(".") \
            else (token, "")
        if value and (sep == "=" or _is_value(value)):
            return f"{option.keyword}={_literal(value, option.listed)}{stop}"
        rest = f"{sep}{token}" if token is not None else ""
        return f"{option.keyword}={rest}"

    return _TOKEN.sub(reword, text)
