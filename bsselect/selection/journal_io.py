"""The journal's file operations: one durable line at a time (``append_line``: one
``os.write`` of the whole line, then ``os.fsync``), an exclusive advisory lock for the run, the
checks a journal path must pass, and making a new directory entry durable. What the lines
mean is ``journal``'s."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BsselectError, UsageError, one_line


class JournalWriteError(BsselectError):
    """Appending to the journal failed mid-run (disk full): the run stops, exit 1; what the
    journal holds is kept for --resume."""


def check_path(path: Path) -> None:
    """UsageError unless ``path`` can be a journal file: not a directory, not a device."""
    if path.is_dir():
        raise UsageError(f"journal {str(path)!r} is a directory; give a file path, e.g. "
                         f"{str(path / 'journal.jsonl')!r}")
    if path.exists() and not path.is_file():
        raise UsageError(f"journal {str(path)!r} is not a regular file (a device or a pipe); "
                         "give a file path")


def lock(path: Path) -> int | None:
    """An exclusive advisory lock on the journal for the run, held on a descriptor of its own:
    two runs appending to one journal (a second sweep with --overwrite while the first still
    ran) left one run's trials under the other's header, and ``report`` ranked them as that
    run's (review). UsageError when another process holds it; None where the platform or the
    file system has no locks."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None  # the write that follows says what is wrong with the path
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"journal {str(path)!r} is being written by another bsselect run; wait "
                         "for it to finish, or choose another --journal path") from None
    except OSError:  # a file system without locks (some network mounts)
        os.close(fd)
        return None
    return fd


def append_line(path: Path, line: str, truncate: bool = False) -> None:
    data = (line + "\n").encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, 0o644)
        try:
            # One write call for the whole line; the loop only runs again if the kernel
            # accepted part of it (disk full, a signal): the line ends up whole or visibly cut.
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # disk full, a file size limit: "internal error", before (review)
        raise JournalWriteError(
            f"cannot write to the journal {str(path)!r} ({exc.strerror or one_line(exc)}); "
            "what it already holds is kept: make room and rerun with --resume") from exc


def fsync_dir(directory: Path) -> None:
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
