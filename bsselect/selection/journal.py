"""Append-only JSONL journal of sweep trials, so that an interrupted sweep can ``--resume``.

Line 1 is a header: the task spec, the settings that shape a trial, and ``key``, a stable hash
of both (``journal_key``). Every later line is ``{"trial": {...}}`` (``TrialResult.to_dict``). Each line is
written with one ``os.write`` of the whole line plus its newline and then ``os.fsync``ed, so a
SIGKILL or power loss leaves at most the last line incomplete; ``load`` skips such a line (and
any other unreadable one) with a warning instead of failing.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from ..errors import UsageError, one_line
from .journal_io import JournalWriteError, append_line, check_path, fsync_dir, lock
from .trial_types import TrialResult

FORMAT_VERSION = 1
_HEADER_TAG = "bsselect_journal"
# Records other than trials and timing that a journal may hold: ``bsselect schedule`` writes
# one line per branched trial and one per noise measurement of its base run.
# ``plan``: the batch sizes a sweep (or a resume of it) set out to run, written before its
# first trial; ``report`` says which of them an interrupted sweep never ran (review).
RECORD_TAGS = ("branch", "point_noise", "plan")


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit fingerprint of ``settings`` (sha256 of canonical JSON: sorted keys,
    no whitespace). Values must be JSON types; Enums count as their value, paths as strings."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def journal_key(task: str, settings: Mapping[str, Any]) -> str:
    """The key in the header of a journal for ``task`` run with ``settings``; pass it to
    ``completed``."""
    return settings_key({"task": task, "settings": dict(settings)})


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
    # The last complete set of interleaved timing rounds (``timing.RoundTiming`` dicts), if any.
    timing: tuple[dict[str, Any], ...] = field(default=())
    # The batch sizes of the sweep that wrote that timing record and its timing note (None:
    # a journal from before they were recorded). ``bsselect report`` re-renders that sweep.
    timing_batch_sizes: tuple[int, ...] | None = None
    timing_note: str | None = None
    # What that sweep recommended (None: none, or a journal from before it was recorded), so
    # that ``report`` can say when re-ranking the same trials gives another answer.
    timing_recommended: int | None = None
    # The checkpoint that sweep's trials branched from (``SweepResult.from_checkpoint``).
    timing_from_checkpoint: dict[str, Any] | None = None
    # The device that sweep ran on (None: a journal from before it was recorded).
    timing_device: str | None = None
    # Batch sizes with a trial record after the last timing record: run (again) by a resume
    # that stopped before it timed them (``sweep --resume`` reruns failed trials).
    after_timing: tuple[int, ...] = ()
    # Other commands' records (``RECORD_TAGS``: ``bsselect schedule``'s branches and noise
    # points), as (tag, payload) in the order written.
    records: tuple[tuple[str, dict[str, Any]], ...] = field(default=())


def _checkpoint_record(value: Any) -> bool:
    """A timing record's ``from_checkpoint`` as the sweep writes it (report shows it)."""
    return (isinstance(value, dict) and isinstance(value.get("path"), str)
            and isinstance(value.get("sha256"), str) and isinstance(value.get("format"), str)
            and (value.get("step") is None or type(value.get("step")) is int)
            and isinstance(value.get("optimizer_state"), bool)
            and (value.get("lr") is None or (type(value.get("lr")) in (int, float)
                                             and math.isfinite(value["lr"]) and value["lr"] > 0)))


def load(path: str | Path) -> JournalContents:
    """Read a journal. A missing file raises UsageError; unreadable lines are skipped with a
    warning (the last one is usually a write cut short by SIGKILL)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"journal {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{str(path)!r} is a directory; give the sweep's journal file "
                         "(bsselect-sweep-TASK.jsonl)") from None
    except PermissionError:
        raise UsageError(f"journal {str(path)!r} cannot be read (permission denied)") from None
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if lines and lines[-1] == b"":
        lines.pop()
    header: JournalHeader | None = None
    trials: list[TrialResult] = []
    warnings: list[str] = []
    timing: tuple[dict[str, Any], ...] = ()
    timing_sizes: tuple[int, ...] | None = None
    timing_note: str | None = None
    timing_recommended: int | None = None
    timing_checkpoint: dict[str, Any] | None = None
    timing_device: str | None = None
    after_timing: list[int] = []
    records: list[tuple[str, dict[str, Any]]] = []
    for number, raw in enumerate(lines, start=1):
        last_and_cut = number == len(lines) and not complete
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # an editor that saved the file as "UTF-8 with BOM"
        record, problem = _parse_line(raw)
        if problem is None and number == 1 and _HEADER_TAG in record:
            header, problem = _header_from(record)
            if header is not None:
                _check_header(path, header)
        elif problem is None and _HEADER_TAG in record:
            other = record.get("task", "?")
            raise UsageError(f"{path} holds a second journal header at line {number} (task "
                             f"{other!r}): two sweeps' journals in one file, whose trials must "
                             "not be mixed; split the file, or keep one sweep per --journal")
        elif problem is None and "trial" in record:
            problem = _append_trial(record["trial"], trials)
            if problem is None and timing_sizes is not None:
                after_timing.append(trials[-1].batch_size)
        elif problem is None and "timing" in record:
            rounds, problem = _timing_from(record["timing"])
            sizes, note = record.get("batch_sizes"), record.get("note")
            if problem is None and not (sizes is None or (
                    isinstance(sizes, list) and all(type(b) is int and b > 0 for b in sizes))):
                problem = "its batch_sizes are not a list of positive integers"
            if problem is None and not (note is None or isinstance(note, str)):
                problem = "its note is not a string"
            recommended = record.get("recommended_batch_size")
            if not (type(recommended) is int and recommended > 0):
                recommended = None  # only what report compares with: a bad one is not kept
            checkpoint = record.get("from_checkpoint")
            if problem is None:
                timing, timing_note = rounds, note
                timing_sizes = None if sizes is None else tuple(sizes)
                timing_recommended = recommended
                timing_checkpoint = checkpoint if _checkpoint_record(checkpoint) else None
                device = record.get("device")
                timing_device = device if isinstance(device, str) and device else None
                after_timing = []
        elif problem is None and len(record) == 1 and next(iter(record)) in RECORD_TAGS:
            tag, payload = next(iter(record.items()))
            if isinstance(payload, dict):
                records.append((tag, payload))
            else:
                problem = f"its {tag} record is not an object"
        elif problem is None:
            problem = "neither a header, a trial nor a timing record"
        if problem is not None:
            cause = ("incomplete (the run was probably killed while writing it)" if last_and_cut
                     else problem)
            warnings.append(f"{path}: line {number} skipped: {cause}")
    if header is None and lines:
        warnings.append(f"{path}: no readable header line; its task and settings are unknown")
    return JournalContents(header, tuple(trials), tuple(warnings), timing=timing,
                           records=tuple(records), timing_batch_sizes=timing_sizes,
                           timing_note=timing_note, timing_recommended=timing_recommended,
                           timing_from_checkpoint=timing_checkpoint,
                           timing_device=timing_device, after_timing=tuple(sorted(set(after_timing))))


def _check_header(path: Path, header: JournalHeader) -> None:
    """UsageError for a header of another format, or one whose settings were edited."""
    if header.format_version != FORMAT_VERSION:  # never compared, before (review)
        raise UsageError(f"{path}: the journal's format is {header.format_version} (written by "
                         f"bsselect {header.bsselect_version or '?'}), and this bsselect "
                         f"({__version__}) reads format {FORMAT_VERSION}; rerun the sweep, or "
                         "use the bsselect that wrote it")
    keyed = {k: v for k, v in header.settings.items() if k != TASK_FINGERPRINT}
    if journal_key(header.task, keyed) != header.key:
        if all(name in header.settings for name, required, _, _ in _SWEEP_SETTINGS if required):
            check_sweep_header(path, header)  # a sweep's: name a setting of the wrong type
        # an edited setting: report showed budget 1,024 and lr 0.5 for trials that ran with
        # 512 samples at lr 0.0025-0.02, and --resume went on under it (review)
        raise UsageError(f"{path}: line 1 (the header) was edited or damaged: its task and "
                         f"settings do not give its key {header.key}, so what the file says its "
                         "trials ran with cannot be trusted; restore the line, or start again "
                         "with --overwrite")


def _timing_from(raw: Any) -> tuple[tuple[dict[str, Any], ...], str | None]:
    from .timing import RoundTiming

    if not isinstance(raw, list):
        return (), "timing record is not a JSON list"
    try:
        for item in raw:
            RoundTiming.from_dict(item)
    except (KeyError, TypeError, ValueError) as exc:
        return (), f"bad timing record ({exc!r})"
    return tuple(raw), None


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
        trial = TrialResult.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        return f"bad trial record ({exc!r})"
    problem = _trial_fields_problem(trial)
    if problem is not None:
        return f"bad trial record ({problem})"
    trials.append(trial)
    return None


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _trial_fields_problem(trial: TrialResult) -> str | None:
    """What is wrong with the fields ``TrialResult`` keeps as they were read (an edited line:
    ``"lr": "0.1"`` would reach the ranking and the table as a string), or None."""
    for name, ok, what in (("lr", _number, "a number"), ("wall_s", _number, "a number"),
                           ("steps", _count, "an integer >= 0"),
                           ("samples", _count, "an integer >= 0")):
        value = getattr(trial, name)
        if not ok(value):
            return f"its {name} is {value!r}, not {what}"
    for name in ("step_time_s", "trial_step_time_s"):   # a step takes time (review: 0 raised)
        value = getattr(trial, name)
        if value is not None and not value > 0:
            return f"its {name} is {value!r}, not a positive number"
    for name in ("error", "noise_error"):
        value = getattr(trial, name)
        if value is not None and not isinstance(value, str):
            return f"its {name} is {value!r}, not a string"
    return None


# The header settings that ``bsselect report`` reads back (``SweepSettings.from_journal`` and
# ``summarize``), with the type each must have; a missing optional one takes its default.
_SWEEP_SETTINGS: tuple[tuple[str, bool, Any, str], ...] = (
    ("budget_kind", True, lambda v: isinstance(v, str), "a string"),
    ("budget", True, lambda v: _number(v) and v > 0, "a positive number"),
    ("lr_scaling", True, lambda v: isinstance(v, str), "a string"),
    ("seed", True, lambda v: type(v) is int, "an integer"),
    ("warmup_steps", True, _count, "an integer >= 0"),
    ("noise_measurements", True, _count, "an integer >= 0"),
    ("base_lr", True, lambda v: _number(v) and v > 0, "a positive number"),
    ("base_batch_size", True, lambda v: type(v) is int and v > 0, "an integer >= 1"),
    ("precision", False, lambda v: isinstance(v, str), "a string"),
    ("accumulate", False, lambda v: type(v) is int and v > 0, "an integer >= 1"),
    ("warm_start_steps", False, _count, "an integer >= 0"),
    ("lr_ramp_samples", False, _count, "an integer >= 0"),
    ("held_out_validation", False, lambda v: isinstance(v, bool), "true or false"),
    ("validation_items", False, lambda v: v is None or _count(v), "an integer >= 0 or null"),
    ("from_checkpoint_sha256", False, lambda v: v is None or isinstance(v, str),
     "a string or null"),
)


def check_sweep_header(path: str | Path, header: JournalHeader) -> None:
    """UsageError naming the file, line 1 and the setting, when a sweep journal's header
    holds a setting of the wrong type (an edited or damaged line) that re-rendering it would
    trip over: ``"base_lr": "0.1"``, a missing ``budget``."""
    settings = header.settings
    for name, required, ok, what in _SWEEP_SETTINGS:
        if name not in settings and not required:
            continue
        value = settings.get(name)
        if name not in settings or not ok(value):
            found = "missing" if name not in settings else f"{value!r}, not {what}"
            raise UsageError(f"{path}: line 1 (the header) is damaged: its setting {name} is "
                             f"{found}; restore the file, or rerun the sweep with --overwrite")


def completed(path: str | Path, key: str) -> dict[int, TrialResult]:
    """Trials already journaled at ``path`` for the run whose ``journal_key`` is ``key``, by
    batch size (a batch size journaled twice: the later trial). Every status counts as done.
    A missing or empty file (or one holding only a cut-off header) gives ``{}``; a journal for
    another task or other settings, or trials without a readable header, raise UsageError."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return {}
    contents = load(path)
    if _killed_in_header(path, contents):
        return {}  # killed while writing the header: nothing was recorded
    _check_key(path, contents, key)
    return {t.batch_size: t for t in contents.trials}


def _killed_in_header(path: Path, contents: JournalContents) -> bool:
    """Whether ``path`` (read as ``contents``) is what a run killed while writing its header
    leaves: no header or trial read, and only the start of a header line — one line, no
    newline, the beginning of ``{"bsselect_journal":``. Anything else without a readable
    header is not ours to overwrite."""
    if contents.header is not None or contents.trials:
        return False
    data = path.read_bytes()
    tag = b'{"' + _HEADER_TAG.encode() + b'":'
    return b"\n" not in data and (data.startswith(tag) or tag.startswith(data))


def _check_key(path: Path, contents: JournalContents, key: str,
               now: tuple[str, Mapping[str, Any]] | None = None) -> None:
    """UsageError unless the journal's header carries ``key``; ``now`` = (task, settings) of
    this run, to name what changed."""
    header = contents.header
    if header is None:
        first = next((w.split(" skipped: ", 1)[1] for w in contents.warnings
                      if w.startswith(f"{path}: line 1 skipped: ")), None)
        why = f" (line 1: {first})" if first else ""
        if _HEADER_TAG.encode() in path.read_bytes().split(b"\n", 1)[0]:
            remedy = ("--overwrite starts it again (its trials are lost), or use a new --journal "
                      "path")
        else:  # not a journal of ours: never suggest writing over it
            remedy = "it is not a bsselect journal; use a new --journal path or drop --resume"
        raise UsageError(f"journal {str(path)!r} has no readable header, so it cannot be "
                         f"resumed{why}; {remedy}")
    if header.key != key:
        diff = _describe_difference(header, *now) if now is not None else ""
        raise UsageError(f"journal {str(path)!r} was written for a different task or settings "
                         f"(key {header.key}, this run {key}){diff}; use a new --journal path "
                         "or drop --resume")


TASK_FINGERPRINT = "task_fingerprint"
# Fingerprint fields added since journals were first written, with the value a journal
# without them stands for: one written before Task.max_grad_norm trained without clipping.
FINGERPRINT_DEFAULTS: dict[str, Any] = {"max_grad_norm": None}


def _check_fingerprint(path: Path, header: JournalHeader | None,
                       now: Mapping[str, Any]) -> None:
    """UsageError when the journal records a task fingerprint that differs from ``now``'s,
    naming what changed: the same entry point may build another model or data."""
    before = header.settings.get(TASK_FINGERPRINT) if header is not None else None
    if not before or not now:
        return
    before = {**FINGERPRINT_DEFAULTS, **before}
    if before == now:
        return
    # What both record: a journal of an earlier version lacks the fields added since.
    # The opaque hash of the modules last: a shape or a name says more when it changed too.
    changed = [f"{n} {before.get(n)!r} -> {now.get(n)!r}"
               for n in sorted(set(before) & set(now), key=lambda n: (n == "modules", n))
               if before.get(n) != now.get(n)]
    if not changed:
        return
    raise UsageError(f"journal {str(path)!r} was written for another version of the task "
                     f"({', '.join(changed[:4])}); its trials do not apply: use a new --journal "
                     "path or --overwrite")


def _describe_difference(header: JournalHeader, task: str, settings: Mapping[str, Any]) -> str:
    """``: lr_scaling 'sqrt' -> 'linear'`` for the first few things that changed."""
    before = {"task": header.task, **{k: v for k, v in header.settings.items()
                                      if k != TASK_FINGERPRINT}}
    after = {"task": task, **_jsonable(settings)}
    changed = [f"{n} {before.get(n)!r} -> {after.get(n)!r}"
               for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)]
    return f": {', '.join(changed[:4])}" if changed else ""


class JournalMode(str, Enum):
    """What ``Journal`` does with a file that already holds a journal."""

    new = "new"  # refuse: the file must be missing or empty
    resume = "resume"  # continue it if it is for the same task and settings, else refuse
    overwrite = "overwrite"  # replace it with a fresh journal


class Journal:
    """A journal that trials are appended to, one fsync'd line each.

    The header's ``key`` is ``journal_key(task, settings)``; ``settings`` holds every option
    that shapes a trial. With ``mode=resume`` an existing journal for the same key is continued
    (a missing or empty one is started): ``resumed`` holds its trials by batch size and
    ``warnings`` the lines ``load`` skipped; a partial last line left by a killed writer is cut
    off first so that the next line is not glued to it. Another key raises UsageError.

    Each ``append`` opens, writes, fsyncs and closes the file, so there is nothing to close
    and an interrupted sweep leaves no half-open journal behind.
    """

    def __init__(self, path: str | Path, *, task: str, settings: Mapping[str, Any],
                 mode: JournalMode = JournalMode.new,
                 fingerprint: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.key = journal_key(task, settings)
        # What the task was (model shapes, data, optimizer, loss): stored beside the settings
        # but not in the key, so that journals written before it existed still resume; a
        # journal that has one must match it.
        self.fingerprint = _jsonable(fingerprint or {})
        stored = {**settings, TASK_FINGERPRINT: self.fingerprint} if fingerprint else settings
        self.header = JournalHeader(
            key=self.key, task=task, settings=_jsonable(stored),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            bsselect_version=__version__)
        self.resumed: dict[int, TrialResult] = {}
        self.records: tuple[tuple[str, dict[str, Any]], ...] = ()  # resumed RECORD_TAGS lines
        self.warnings: tuple[str, ...] = ()
        check_path(self.path)
        self._lock = lock(self.path)
        try:
            exists = self.path.exists() and self.path.stat().st_size > 0
            match JournalMode(mode):
                case JournalMode.new:
                    if exists:
                        raise UsageError(f"journal {str(self.path)!r} already exists; pass "
                                         "--resume to continue it, --overwrite to replace it, "
                                         "or choose a new --journal path")
                    self._start()
                case JournalMode.overwrite:
                    self._start()
                case JournalMode.resume:
                    if not exists or self._resume(task, settings):
                        self._start()
        except BaseException:
            # a refused journal must not stay locked while its traceback lives on (a
            # notebook keeps the last one: every later run on it was refused, review)
            self.close()
            raise

    def close(self) -> None:
        """Let another run write the file (the lock also ends with the process)."""
        fd, self._lock = getattr(self, "_lock", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # torchrun's other ranks get a copy (distributed.run_on_main): not the lock's
        # descriptor, whose number means another file there
        return {**self.__dict__, "_lock": None}

    def append(self, trial: TrialResult) -> None:
        """Write ``trial`` as one line and fsync it before returning."""
        append_line(self.path, json.dumps({"trial": trial.to_dict()}, separators=(",", ":"),
                                           allow_nan=False))

    def append_timing(self, rounds: list[dict[str, Any]], batch_sizes: Sequence[int] = (),
                      note: str | None = None, recommended: int | None = None,
                      from_checkpoint: dict[str, Any] | None = None,
                      device: str | None = None) -> None:
        """Write the sweep's interleaved timing rounds (``timing.RoundTiming.to_dict``; none
        when there were none), the batch sizes that sweep ranked, its timing note, what it
        recommended and the checkpoint its trials branched from as one line; ``load`` keeps
        the last such line."""
        record = {"timing": rounds, "batch_sizes": list(batch_sizes), "note": note,
                  "recommended_batch_size": recommended}
        if from_checkpoint is not None:
            record["from_checkpoint"] = from_checkpoint
        if device is not None:
            record["device"] = device
        append_line(self.path, json.dumps(record, separators=(",", ":"), allow_nan=False))

    def append_record(self, tag: str, payload: Mapping[str, Any]) -> None:
        """Write ``{tag: payload}`` (a ``RECORD_TAGS`` tag) as one fsync'd line."""
        if tag not in RECORD_TAGS:
            raise ValueError(f"unknown journal record {tag!r}")
        append_line(self.path, json.dumps({tag: dict(payload)}, separators=(",", ":"),
                                           allow_nan=False, default=_canonical))

    def _start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, self.header.to_json(), truncate=True)
            fsync_dir(self.path.parent)  # make the new directory entry itself durable
        except (OSError, JournalWriteError) as exc:  # before any work: the path is the problem
            cause = exc.__cause__ if isinstance(exc, JournalWriteError) else exc
            why = getattr(cause, "strerror", None) or one_line(cause)
            raise UsageError(f"cannot write the journal {str(self.path)!r} ({why}); choose "
                             "another --journal path") from None

    def _resume(self, task: str, settings: Mapping[str, Any]) -> bool:
        """Check and repair an existing journal; True when it must be started afresh."""
        contents = load(self.path)
        if _killed_in_header(self.path, contents):
            # Killed while writing the header: nothing was recorded, so start afresh.
            self.warnings = contents.warnings + (f"{self.path}: started again",)
            return True
        header = contents.header
        if header is not None and header.task != task and same_task_file(header.task, task,
                                                                         self.path):
            # The same task file spelled another way (`./tasks.py:fn`, its absolute path):
            # compare in the journal's spelling, which its key was made from, and keep it.
            task = header.task
            self.key = journal_key(task, settings)
        _check_key(self.path, contents, self.key, (task, settings))
        _check_fingerprint(self.path, contents.header, self.fingerprint)
        _repair_tail(self.path)
        self.resumed = {t.batch_size: t for t in contents.trials}
        self.records = contents.records
        self.warnings = contents.warnings
        return False


def _task_file(spec: str) -> tuple[str, str] | None:
    """(file, function) of a ``path/to/file.py:function`` task spec, as ``task.load_task``
    reads one (a ``.py`` name or a path separator); None for a module or an example name."""
    module, _, function = spec.rpartition(":")
    if not module or not function:
        return None
    if module.endswith(".py") or "/" in module or "\\" in module:
        return module, function
    return None


def same_task_file(journaled: str, now: str, journal_path: str | Path) -> bool:
    """Whether two task specs name the same function in the same file: ``tasks.py:fn``,
    ``./tasks.py:fn`` and ``/abs/tasks.py:fn``. A relative path in the journal is read from
    the working directory and from the journal's folder (where the run that wrote it stood,
    for a default --journal)."""
    if journaled == now:
        return True
    then, here = _task_file(journaled), _task_file(now)
    if then is None or here is None or then[1] != here[1]:
        return False
    for base in (Path.cwd(), Path(journal_path).absolute().parent):
        try:
            if os.path.samefile(base / then[0], here[0]):  # an absolute path ignores base
                return True
        except OSError:  # not there from this base
            continue
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
        if problem is None and ("trial" in record or any(t in record for t in RECORD_TAGS)):
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
