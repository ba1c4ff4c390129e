"""The trial record and the append-only journal: round trips, resume keys, and lines cut short
by a real SIGKILL."""

from __future__ import annotations

import enum
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bsselect.selection.journal as journal_module
from bsselect.errors import UsageError
from bsselect.selection.journal import (Journal, JournalMode, completed, journal_key, load,
                                        settings_key)
from bsselect.selection.trial_types import LossPoint, TrialResult, TrialStatus

TASK = "digits-mlp"
SETTINGS = {"budget": ["samples", 4096.0], "lr_scaling": "linear", "seed": 0, "warmup_steps": 0}
KEY = journal_key(TASK, SETTINGS)
DESIGN_TRIAL_FIELDS = ["batch_size", "status", "lr", "steps", "samples", "wall_s", "step_time_s",
                       "samples_per_s", "train_loss_start", "train_loss_end", "loss_drop_per_s",
                       "val_loss", "val_metric"]


def trial(b: int, status: str = "ok", **extra: object) -> TrialResult:
    if status != "ok":
        return TrialResult(batch_size=b, status=status, lr=0.1, steps=0, samples=0, wall_s=0.0,
                           error=f"{status} at batch {b}", **extra)  # type: ignore[arg-type]
    return TrialResult(
        batch_size=b, status=status, lr=0.05 * b / 32, steps=20, samples=20 * b, wall_s=0.5,
        step_time_s=0.025, samples_per_s=b / 0.025, train_loss_start=2.3, train_loss_end=1.1,
        loss_drop_per_s=2.4, val_loss=1.2, val_metric=0.61,
        loss_curve=((1, b, 0.03, 2.25), (20, 20 * b, 0.5, 1.1)), b_simple=41.5,
        loss_drop_per_sample=1.2 / (20 * b), loss_drop_per_step=0.06, **extra)  # type: ignore


# --------------------------------------------------------------------------- TrialResult


def test_trial_dict_has_design_fields_first_then_siblings():
    data = trial(32).to_dict()
    assert list(data)[:13] == DESIGN_TRIAL_FIELDS
    assert {"loss_curve", "error", "b_simple", "loss_drop_per_sample",
            "loss_drop_per_step"} <= set(data)
    assert data["status"] == "ok" and data["loss_curve"] == [[1, 32, 0.03, 2.25],
                                                             [20, 640, 0.5, 1.1]]


@pytest.mark.parametrize("t", [trial(8), trial(1024, "oom"), trial(4, "error"),
                               trial(16, "diverged", train_loss_start=2.3)])
def test_trial_json_round_trip(t):
    text = t.to_json()
    assert "\n" not in text
    assert TrialResult.from_json(text) == t


def test_non_finite_measurements_become_none_and_survive_json():
    t = TrialResult(batch_size=64, status=TrialStatus.diverged, lr=0.4, steps=3, samples=192,
                    wall_s=0.1, train_loss_end=math.inf, loss_drop_per_s=-math.inf,
                    loss_curve=[[1, 64, 0.03, 2.3], [3, 192, 0.1, math.nan]])
    assert t.train_loss_end is None and t.loss_drop_per_s is None
    assert t.loss_curve[-1] == LossPoint(3, 192, 0.1, None)
    text = t.to_json()  # strict JSON: would raise on NaN
    assert "NaN" not in text and "Infinity" not in text
    assert TrialResult.from_json(text) == t


def test_status_strings_and_enums_are_equal():
    assert trial(8) == TrialResult(**{**trial(8).__dict__, "status": TrialStatus.ok})
    assert trial(8).ok and not trial(8, "oom").ok


def test_from_dict_ignores_unknown_siblings_and_requires_the_core():
    data = {**trial(8).to_dict(), "added_in_a_later_version": 1}
    assert TrialResult.from_dict(data) == trial(8)
    missing = trial(8).to_dict()
    del missing["wall_s"]
    with pytest.raises(KeyError):
        TrialResult.from_dict(missing)
    with pytest.raises(ValueError):
        TrialResult.from_dict({**trial(8).to_dict(), "status": "exploded"})
    with pytest.raises(ValueError):
        TrialResult.from_json("[1, 2]")


@pytest.mark.parametrize("bad", [0, -8, 8.0, True])
def test_batch_size_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError)):
        TrialResult(batch_size=bad, status="ok", lr=0.1, steps=1, samples=1, wall_s=1.0)


# --------------------------------------------------------------------------- settings key


class Rule(str, enum.Enum):
    linear = "linear"


def test_settings_key_is_stable_and_order_free():
    reordered = dict(reversed(list(SETTINGS.items())))
    assert journal_key(TASK, reordered) == KEY
    assert journal_key(TASK, {**SETTINGS, "budget": ("samples", 4096.0)}) == KEY  # tuple == list
    assert journal_key(TASK, {**SETTINGS, "lr_scaling": Rule.linear}) == KEY  # Enum == value
    assert journal_key(TASK, {**SETTINGS, "seed": 1}) != KEY
    assert journal_key("digits-cnn", SETTINGS) != KEY
    assert KEY == settings_key({"task": TASK, "settings": SETTINGS})
    assert len(KEY) == 16 and int(KEY, 16) >= 0
    assert settings_key({"a": Path("/x")}) == settings_key({"a": "/x"})


def test_settings_key_pinned_value():
    # Pinned: a journal written by this version must resume under the next one.
    import hashlib
    expected = hashlib.sha256(b'{"seed":0,"task":"t"}').hexdigest()[:16]
    assert settings_key({"task": "t", "seed": 0}) == expected


def test_settings_key_rejects_values_without_a_stable_form():
    with pytest.raises(TypeError):
        settings_key({"model": object()})
    with pytest.raises(ValueError):
        settings_key({"lr": math.nan})


# --------------------------------------------------------------------------- journal


def write(path: Path, trials: list[TrialResult], mode: JournalMode = JournalMode.new,
          task: str = TASK, settings: dict = SETTINGS) -> Journal:
    j = Journal(path, task=task, settings=settings, mode=mode)
    for t in trials:
        j.append(t)
    return j


def test_round_trip(tmp_path):
    path = tmp_path / "sweep.jsonl"
    trials = [trial(8), trial(16, "diverged"), trial(32), trial(1024, "oom")]
    write(path, trials)
    contents = load(path)
    assert contents.trials == tuple(trials) and contents.warnings == ()
    header = contents.header
    assert header is not None and header.key == KEY and header.task == TASK
    assert header.settings == SETTINGS and header.format_version == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["bsselect_journal"] == 1
    assert json.loads(lines[1]) == {"trial": trials[0].to_dict()}


def test_completed_returns_trials_by_batch_size_for_the_same_key(tmp_path):
    path = tmp_path / "sweep.jsonl"
    first = trial(32, "error")
    rerun = trial(32)
    write(path, [trial(8), first, trial(1024, "oom"), rerun])
    done = completed(path, KEY)
    assert sorted(done) == [8, 32, 1024]
    assert done[32] == rerun and done[1024].status is TrialStatus.oom


def test_completed_on_a_missing_or_empty_journal_is_empty(tmp_path):
    assert completed(tmp_path / "nope.jsonl", KEY) == {}
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert completed(tmp_path / "empty.jsonl", KEY) == {}


def test_completed_with_another_key_is_a_usage_error(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    with pytest.raises(UsageError) as err:
        completed(path, journal_key(TASK, {**SETTINGS, "seed": 1}))
    assert err.value.exit_code == 2
    assert "different task or settings" in str(err.value)
    assert str(err.value).endswith("use a new --journal path or drop --resume")


def test_resume_with_other_settings_names_what_changed(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    other = {**SETTINGS, "lr_scaling": "sqrt"}
    with pytest.raises(UsageError, match=r": lr_scaling 'linear' -> 'sqrt'; use a new --journal "
                                         r"path or drop --resume$"):
        Journal(path, task=TASK, settings=other, mode=JournalMode.resume)
    with pytest.raises(UsageError, match=r": task 'digits-mlp' -> 'digits-cnn';"):
        Journal(path, task="digits-cnn", settings=SETTINGS, mode=JournalMode.resume)
    assert load(path).trials == (trial(8),)  # untouched


def test_resume_continues_overwrite_replaces_new_refuses(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8), trial(16)])
    j = Journal(path, task=TASK, settings=SETTINGS, mode=JournalMode.resume)
    assert sorted(j.resumed) == [8, 16] and j.warnings == () and j.key == KEY
    j.append(trial(32))
    assert [t.batch_size for t in load(path).trials] == [8, 16, 32]
    assert len(path.read_text().splitlines()) == 4  # still one header
    # one writer at a time: a second run on the journal of one that is still going left its
    # trials under the other's header (review)
    for mode in JournalMode:
        with pytest.raises(UsageError, match="is being written by another bsselect run"):
            Journal(path, task=TASK, settings=SETTINGS, mode=mode)
    j.close()
    with pytest.raises(UsageError, match="already exists; pass --resume to continue it, "
                                         "--overwrite to replace it, or choose a new --journal "
                                         "path"):
        Journal(path, task=TASK, settings=SETTINGS)
    assert len(load(path).trials) == 3
    write(path, [trial(64)], JournalMode.overwrite, settings={**SETTINGS, "seed": 5})
    assert [t.batch_size for t in load(path).trials] == [64]
    assert load(path).header.settings["seed"] == 5  # type: ignore[union-attr]


def test_new_journal_in_an_empty_file_is_fine(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_bytes(b"")
    write(path, [trial(8)])
    assert load(path).trials == (trial(8),)


def test_resume_of_a_missing_journal_starts_one(tmp_path):
    path = tmp_path / "new" / "dir" / "sweep.jsonl"
    j = write(path, [trial(8)], JournalMode.resume)
    assert j.resumed == {} and load(path).trials == (trial(8),)


def test_truncated_last_line_is_skipped_then_repaired_on_resume(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8), trial(16)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last write was cut 40 bytes short
    contents = load(path)
    assert contents.trials == (trial(8),)
    assert contents.warnings == (f"{path}: line 3 skipped: incomplete (the run was probably "
                                 "killed while writing it)",)
    assert completed(path, KEY) == {8: trial(8)}
    j = write(path, [trial(16)], JournalMode.resume)
    assert j.warnings == contents.warnings
    assert load(path).warnings == ()
    assert load(path).trials == (trial(8), trial(16))


def test_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8), trial(16)])
    path.write_bytes(path.read_bytes()[:-1])
    assert load(path).trials == (trial(8), trial(16)) and load(path).warnings == ()
    write(path, [trial(32)], JournalMode.resume)
    assert [t.batch_size for t in load(path).trials] == [8, 16, 32]


def test_corrupted_middle_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8), trial(16), trial(32)])
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:30] + b"\x00garbage" + lines[2][30:]
    lines.insert(3, b'{"comment": "hand-edited"}')
    path.write_bytes(b"\n".join(lines))
    contents = load(path)
    assert [t.batch_size for t in contents.trials] == [8, 32]
    assert len(contents.warnings) == 2
    assert contents.warnings[0].startswith(f"{path}: line 3 skipped: not valid JSON")
    assert contents.warnings[1] == f"{path}: line 4 skipped: neither a header, a trial nor a timing record"


def test_bad_trial_record_is_skipped(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    with path.open("a") as fh:
        fh.write(json.dumps({"trial": {"batch_size": 16, "status": "ok"}}) + "\n")
        fh.write(json.dumps({"trial": [1]}) + "\n")
    contents = load(path)
    assert contents.trials == (trial(8),)
    assert "line 3 skipped: bad trial record (KeyError(\"trial record has no 'lr'\"))" in \
        contents.warnings[0]
    assert contents.warnings[1].endswith("line 4 skipped: trial record is not a JSON object")


def test_a_trial_whose_step_time_is_not_positive_is_skipped(tmp_path):
    """A hand-edited step time of 0 reached the step-time fit, which raised ValueError from
    `bsselect report` (review); it is a damaged line like any other."""
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8), trial(16, trial_step_time_s=0.02)])
    lines = path.read_text().splitlines(keepends=True)
    for i, field in ((1, "step_time_s"), (2, "trial_step_time_s")):
        record = json.loads(lines[i])
        record["trial"][field] = 0
        lines[i] = json.dumps(record) + "\n"
    path.write_text("".join(lines))
    contents = load(path)
    assert contents.trials == ()
    assert contents.warnings[0].endswith(
        "line 2 skipped: bad trial record (its step_time_s is 0.0, not a positive number)")
    assert "its trial_step_time_s is 0.0" in contents.warnings[1]


def test_header_cut_short_means_nothing_was_recorded(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_bytes(b'{"bsselect_journal":1,"key":"2ca9')
    assert load(path).header is None
    assert completed(path, KEY) == {}
    j = write(path, [trial(8)], JournalMode.resume)
    assert j.warnings[-1] == f"{path}: started again"
    assert load(path).header is not None and load(path).trials == (trial(8),)


def test_trials_without_a_readable_header_cannot_be_resumed(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([b"{oops"] + lines[1:]))
    contents = load(path)
    assert contents.header is None and contents.trials == (trial(8),)
    assert contents.warnings[-1] == (f"{path}: no readable header line; its task and settings "
                                     "are unknown")
    with pytest.raises(UsageError, match="no readable header"):
        completed(path, KEY)


def test_load_of_a_missing_journal_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load(tmp_path / "nope.jsonl")


def test_each_line_is_one_write_call_then_fsync(tmp_path, monkeypatch):
    path = tmp_path / "sweep.jsonl"
    j = Journal(path, task=TASK, settings=SETTINGS)
    calls: list[tuple[str, object]] = []
    real_write, real_fsync = os.write, os.fsync

    def spy_write(fd: int, data: bytes) -> int:
        calls.append(("write", bytes(data)))
        return real_write(fd, data)

    def spy_fsync(fd: int) -> None:
        calls.append(("fsync", fd))
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "write", spy_write)
    monkeypatch.setattr(journal_module.os, "fsync", spy_fsync)
    j.append(trial(8))
    assert [c[0] for c in calls] == ["write", "fsync"]
    data = calls[0][1]
    assert isinstance(data, bytes) and data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"trial": trial(8).to_dict()}


WRITER = textwrap.dedent('''
    import sys
    from bsselect.selection.journal import Journal
    from bsselect.selection.trial_types import TrialResult

    j = Journal(sys.argv[1], task="killed", settings={"seed": 0})
    curve = [(i, 64 * i, 0.01 * i, 2.0 - 0.001 * i) for i in range(1, 2001)]  # ~70 kB lines
    for n in range(1, 100000):
        j.append(TrialResult(batch_size=n, status="ok", lr=0.1, steps=2000, samples=128000,
                             wall_s=20.0, loss_curve=curve))
        print(n, flush=True)
''')


def test_lines_acknowledged_before_sigkill_survive(tmp_path):
    path = tmp_path / "killed.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    acknowledged = 0
    while acknowledged < 5:
        line = proc.stdout.readline()
        assert line, "the writer exited early"
        acknowledged = int(line)
    proc.send_signal(signal.SIGKILL)  # mid-way through some later append
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    contents = load(path)
    numbers = [t.batch_size for t in contents.trials]
    assert numbers[:acknowledged] == list(range(1, acknowledged + 1))
    assert numbers == list(range(1, len(numbers) + 1))  # a prefix, nothing reordered or lost
    assert all(len(t.loss_curve) == 2000 for t in contents.trials)
    assert len(contents.warnings) <= 1  # at most the line being written when killed
    done = completed(path, journal_key("killed", {"seed": 0}))
    assert sorted(done) == numbers
    j = Journal(path, task="killed", settings={"seed": 0}, mode=JournalMode.resume)
    j.append(TrialResult(batch_size=len(numbers) + 1, status="oom", lr=0.1, steps=0,
                         samples=0, wall_s=0.0))
    after = load(path)
    assert after.warnings == () and len(after.trials) == len(numbers) + 1


def test_timing_records_load_the_last_one_and_a_bad_one_is_skipped(tmp_path):
    path = tmp_path / "sweep.jsonl"
    j = write(path, [trial(8), trial(16)])
    first = [{"batch_size": 8, "round_medians_s": [0.01, 0.011], "steps_per_round": 2},
             {"batch_size": 16, "round_medians_s": [0.02, 0.021], "steps_per_round": 1}]
    second = [dict(r, round_medians_s=[v * 2 for v in r["round_medians_s"]]) for r in first]
    j.append_timing(first)
    j.append_timing(second)
    with path.open("a") as f:
        f.write('{"timing": [{"batch_size": 8}]}\n')  # unreadable: skipped, the last good kept
    contents = load(path)
    assert [t.batch_size for t in contents.trials] == [8, 16]
    assert list(contents.timing) == second
    assert len(contents.warnings) == 1 and "bad timing record" in contents.warnings[0]


@pytest.mark.parametrize("change", [("ACT = nn.ReLU", "ACT = nn.Tanh"),
                                    ("momentum=0.9", "momentum=0.0, weight_decay=0.5"),
                                    ("P = 0.0", "P = 0.9")])
def test_resume_refuses_trials_of_a_task_that_changed_without_changing_shapes(tmp_path, change):
    # The fingerprint saw parameter shapes and the optimizer factory's name only: another
    # activation or the factory's momentum resumed the old trials (CLI review 1). Now the
    # journal's trials must start from this task's initial loss, and the optimizer's group
    # settings are part of the fingerprint. A dropout's p shows in neither (eval mode, no
    # shapes): the modules' repr is (review).
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "t.py"
    source = textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import TensorDataset
        from bsselect import Task
        ACT = nn.ReLU
        P = 0.0
        def make_task():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(256, 8, generator=g)
            return Task(model=lambda: nn.Sequential(nn.Linear(8, 16), ACT(), nn.Dropout(P),
                                                    nn.Linear(16, 2)),
                        train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                        loss_fn=F.cross_entropy, lr=0.05, base_batch_size=8,
                        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    """)
    path.write_text(source)
    journal = tmp_path / "j.jsonl"

    def sweep(*extra):
        return subprocess.run([sys.executable, "-m", "bsselect", "sweep", f"{path}:make_task",
                               "--batch-sizes", "8,16", "--budget", "64", "--journal",
                               str(journal), *extra], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    first = sweep()
    assert first.returncode == 0, first.stderr
    same = sweep("--resume")
    assert same.returncode == 0, same.stderr  # the unchanged task resumes
    kept = journal.read_text()
    path.write_text(source.replace(*change))
    changed = sweep("--resume")
    assert changed.returncode == 2, changed.stderr
    assert ("task changed since the journal" in changed.stderr
            or "another version of the task" in changed.stderr)
    assert journal.read_text() == kept  # refused with the journal as it was


def test_a_journal_of_another_format_is_refused(tmp_path):
    """The format version was written but never compared: a newer format was read under
    this one's rules (review)."""
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"bsselect_journal":1', '"bsselect_journal":2')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"the journal.s format is 2 .* reads format 1"):
        load(path)


def test_a_write_that_fails_mid_run_is_one_line_that_keeps_the_journal(tmp_path):
    """Disk full was "internal error: OSError ..." (review): now it names the journal and
    --resume."""
    from pathlib import Path

    from bsselect.selection.journal_io import JournalWriteError, append_line as _append_line

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(JournalWriteError, match=r"cannot write to the journal '/dev/full' "
                                                r"\(No space left on device\); what it already "
                                                r"holds is kept: make room and rerun with "
                                                r"--resume"):
        _append_line(Path("/dev/full"), '{"trial":{}}')


def test_a_second_process_cannot_write_a_journal_in_use(tmp_path):
    """The lock holds across processes: a second sweep on the same --journal, --overwrite
    included, exits 2 with one line while the first runs."""
    import subprocess
    import sys

    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    holder = Journal(path, task=TASK, settings=SETTINGS, mode=JournalMode.resume)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bsselect", "sweep", "linreg", "--batch-sizes", "8,16",
             "--journal", str(path), "--overwrite"], capture_output=True, text=True, timeout=300)
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr
    assert "is being written by another bsselect run" in proc.stderr
    assert [t.batch_size for t in load(path).trials] == [8]  # nothing overwritten


def test_a_header_whose_settings_were_edited_is_refused(tmp_path):
    """Only the key was compared on resume, and report trusted the settings beside it: an
    edited budget and lr were shown as what the trials ran with (review)."""
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["settings"]["seed"] = 7
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=r"line 1 \(the header\) was edited or damaged"):
        load(path)
    with pytest.raises(UsageError, match=r"line 1 \(the header\) was edited or damaged"):
        Journal(path, task=TASK, settings=SETTINGS, mode=JournalMode.resume)


def test_a_refused_journal_does_not_stay_locked_while_its_error_lives(tmp_path):
    """"already exists" kept the lock in the half-built object that the traceback holds (a
    notebook keeps the last one): every later run on the journal was refused (review)."""
    path = tmp_path / "sweep.jsonl"
    write(path, [trial(8)])
    try:
        Journal(path, task=TASK, settings=SETTINGS)
    except UsageError as exc:
        kept = exc  # noqa: F841 - as sys.last_value keeps it
    Journal(path, task=TASK, settings=SETTINGS, mode=JournalMode.resume).close()
