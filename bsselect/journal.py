"""Append-only JSONL journal of sweep trials, so that an interrupted sweep can ``--resume``.

Line 1 is a header: the settings that shape a trial (the task spec among them) and ``key``,
their stable hash (``settings_key``). Every later line is ``{"trial": {...}}`` (``TrialResult.to_dict``). Each line is
written with one ``os.write`` of the whole line plus its newline and then ``os.fsync``ed, so a
SIGKILL or power loss leaves at most the last line incomplete; ``load`` skips such a line (and
any other unreadable one) with a warning instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .errors import UsageError
from .trial_types import TrialResult

FORMAT_VERSION = 1
_HEADER_TAG = "bsselect_journal"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit fingerprint of ``settings`` (sha256 of canonical JSON: sorted keys,
    no whitespace). ``settings`` should hold the task spec and every option that shapes a
    trial. Values must be JSON types; Enums count as their value, paths as strings."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"settings value {value!r} ({type(value).__name__}) is not JSON-serialisable")


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as it reads back from JSON (tuples become lists, Enums their values)."""
    return json.loads(json.dumps(dict(settings), allow_nan=False, default=_canonical))


@dataclass(frozen=True)
class JournalHeader:
    """The first line of a journal."""

    key: str
    task: str
    settings: dict[str, Any]
    created: str = ""  # ISO 8601, UTC
    bsselect_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({_HEADER_TAG: self.format_version, "key": self.key, "task": self.task,
                           "settings": self.settings, "created": self.created,
                           "bsselect_version": self.bsselect_version},
                          separators=(",", ":"), allow_nan=False, default=_canonical)


@dataclass(frozen=True)
class JournalContents:
    """What ``load`` read: the header (None if missing or unreadable), the trials in the order
    written, and one warning per line that was skipped."""

    header: JournalHeader | None
    trials: tuple[TrialResult, ...]
    warnings: tuple[str, ...] = field(default=())


def load(path: str | Path) -> JournalContents:
    """Read a journal. A missing file raises UsageError; unreadable lines are skipped with a
    warning (the last one is usually a write cut short by SIGKILL)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"journal {str(path)!r} does not exist") from None
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if lines and lines[-1] == b"":
        lines.pop()
    header: JournalHeader | None = None
    trials: list[TrialResult] = []
    warnings: list[str] = []
    for number, raw in enumerate(lines, start=1):
        last_and_cut = number == len(lines) and not complete
        record, problem = _parse_line(raw)
        if problem is None and number == 1 and _HEADER_TAG in record:
            header, problem = _header_from(record)
        elif problem is None and "trial" in record:
            problem = _append_trial(record["trial"], trials)
        elif problem is None:
            problem = "neither a header nor a trial record"
        if problem is not None:
            cause = ("incomplete (the run was probably killed while writing it)" if last_and_cut
                     else problem)
            warnings.append(f"{path}: line {number} skipped: {cause}")
    if header is None and lines:
        warnings.append(f"{path}: no readable header line; its task and settings are unknown")
    return JournalContents(header, tuple(trials), tuple(warnings))


def _parse_line(raw: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, f"not valid JSON ({exc})"
    if not isinstance(record, dict):
        return {}, "not a JSON object"
    return record, None


def _header_from(record: dict[str, Any]) -> tuple[JournalHeader | None, str | None]:
    try:
        header = JournalHeader(key=str(record["key"]), task=str(record["task"]),
                               settings=dict(record["settings"]),
                               created=str(record.get("created", "")),
                               bsselect_version=str(record.get("bsselect_version", "")),
                               format_version=int(record[_HEADER_TAG]))
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"bad header ({exc!r})"
    return header, None


def _append_trial(raw: Any, trials: list[TrialResult]) -> str | None:
    if not isinstance(raw, dict):
        return "trial record is not a JSON object"
    try:
        trials.append(TrialResult.from_dict(raw))
    except (KeyError, TypeError, ValueError) as exc:
        return f"bad trial record ({exc!r})"
    return None


def completed(path: str | Path, key: str) -> dict[int, TrialResult]:
    """Trials already journaled at ``path`` for the run whose ``settings_key`` is ``key``, by
    batch size (a batch size journaled twice: the later trial). Every status counts as done.
    A missing or empty file (or one holding only a cut-off header) gives ``{}``; a journal for
    another task or other settings, or trials without a readable header, raise UsageError."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return {}
    contents = load(path)
    if contents.header is None and not contents.trials:
        return {}  # killed while writing the header: nothing was recorded
    _check_key(path, contents, key)
    return {t.batch_size: t for t in contents.trials}


def _check_key(path: Path, contents: JournalContents, key: str,
               settings: Mapping[str, Any] | None = None) -> None:
    header = contents.header
    if header is None:
        raise UsageError(f"journal {str(path)!r} has no readable header, so it cannot be resumed; "
                         "use a new --journal path or drop --resume")
    if header.key != key:
        diff = _describe_difference(header, settings) if settings is not None else ""
        raise UsageError(f"journal {str(path)!r} was written for a different task or settings "
                         f"(key {header.key}, this run {key}){diff}; use a new --journal path "
                         "or drop --resume")


def _describe_difference(header: JournalHeader, settings: Mapping[str, Any]) -> str:
    """``: lr_scaling 'sqrt' -> 'linear'`` for the first few settings that changed."""
    now = _jsonable(settings)
    names = sorted(set(header.settings) | set(now))
    changed = [f"{n} {header.settings.get(n)!r} -> {now.get(n)!r}" for n in names
               if header.settings.get(n) != now.get(n)]
    return f": {', '.join(changed[:4])}" if changed else ""


class Journal:
    """An open journal that trials are appended to, one fsync'd line each.

    ``key`` is ``settings_key(settings)``, where ``settings`` holds the task spec and every
    option that shapes a trial. ``append=False`` starts a fresh journal (an existing file is
    replaced). ``append=True`` continues an existing journal for the same key (a missing or
    empty file is started fresh): ``resumed`` holds its trials by batch size, ``warnings`` the
    lines ``load`` skipped, and a partial last line left by a killed writer is cut off first so
    that the next line is not glued to it. A different key raises UsageError.
    """

    def __init__(self, path: str | Path, key: str, settings: Mapping[str, Any], *,
                 append: bool = False) -> None:
        self.path = Path(path)
        self.key = key
        self.header = JournalHeader(
            key=key, task=str(settings.get("task", "")), settings=_jsonable(settings),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            bsselect_version=__version__)
        self.resumed: dict[int, TrialResult] = {}
        self.warnings: tuple[str, ...] = ()
        if append and self.path.exists() and self.path.stat().st_size > 0:
            fresh = self._resume(settings)
        else:
            fresh = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if fresh else 0)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        if fresh:
            self._write_line(self.header.to_json())
            _fsync_dir(self.path.parent)  # make the new directory entry itself durable

    @classmethod
    def open(cls, path: str | Path, key: str, settings: Mapping[str, Any], *,
             append: bool = False) -> "Journal":
        """Same as the constructor."""
        return cls(path, key, settings, append=append)

    def append(self, trial: TrialResult) -> None:
        """Write ``trial`` as one line and fsync it before returning."""
        self._write_line(json.dumps({"trial": trial.to_dict()}, separators=(",", ":"),
                                    allow_nan=False))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_line(self, line: str) -> None:
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")
        data = (line + "\n").encode("utf-8")
        # One write call for the whole line; the loop only runs again if the kernel accepted
        # part of it (disk full, a signal), so the line still ends up whole or visibly cut.
        written = os.write(self._fd, data)
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def _resume(self, settings: Mapping[str, Any]) -> bool:
        """Check and repair an existing journal; True when it must be started afresh."""
        contents = load(self.path)
        if contents.header is None and not contents.trials:
            # Killed while writing the header: nothing was recorded, so start afresh.
            self.warnings = contents.warnings + (f"{self.path}: started again",)
            return True
        _check_key(self.path, contents, self.key, settings)
        _repair_tail(self.path)
        self.resumed = {t.batch_size: t for t in contents.trials}
        self.warnings = contents.warnings
        return False


def _repair_tail(path: Path) -> None:
    """Make the file end in a newline before appending to it. Bytes after the last newline
    are a line whose write was cut short: cut them off, unless they happen to be a whole record
    (cut just before its newline), which ``load`` read and so gets its newline back."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep == len(data):
        return
    record, problem = _parse_line(data[keep:])
    with open(path, "r+b") as fh:
        if problem is None and "trial" in record:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
