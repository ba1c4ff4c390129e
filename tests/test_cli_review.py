"""Bad input found by a review of the CLI: one clear line and the documented exit code, never a
traceback, an internal error or a printed result that is not true (docs/contract.md: 1 the
task or run failed, 2 usage error, 3 does not fit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import one_error, run_cli

SWEEP = ["--batch-sizes", "8,16", "--budget", "64", "--noise-measurements", "0"]


# 1. --accumulate: a range like --threads and --world-size, not an effective batch of 8e20

@pytest.mark.parametrize("args, message", [
    (["check", "TASK", "--batch-size", "8", "--memory", "1GiB", "--accumulate",
      "100000000000000000000"],
     "error: accumulate must be an integer from 1 to 2,147,483,647 (micro-steps per optimizer "
     "step; each takes at least one sample), got 100000000000000000000"),
    (["check", "TASK", "--batch-size", "8", "--memory", "1GiB", "--accumulate", "1000000000"],
     "error: batch size 8 x accumulate 1000000000 is an effective batch of 8,000,000,000, more "
     "than the largest batch (2,147,483,647); check the numbers"),
    (["probe", "TASK", "--memory", "1GiB", "--accumulate", "100000000000000000000"],
     "error: --accumulate must be an integer from 1 to 2,147,483,647 (micro-steps per optimizer "
     "step; each takes at least one sample), got 100000000000000000000"),
    (["sweep", "TASK", "--batch-sizes", "8,16", "--accumulate", "2147483648"],
     "error: --accumulate must be an integer from 1 to 2,147,483,647 (micro-steps per optimizer "
     "step; each takes at least one sample), got 2147483648"),
])
def test_an_accumulation_beyond_any_batch_is_a_usage_error(task_file, args, message):
    # before: check and probe printed a result (exit 0) with "effective batch
    # 800000000000000000000"; sweep printed its plan, then a divisibility error
    proc = run_cli(*[f"{task_file}:make_task" if a == "TASK" else a for a in args])
    assert proc.returncode == 2, proc.stderr
    assert one_error(proc) == message


# 2. --margin: printed as given, and refused when it leaves less than a byte

def test_a_margin_is_printed_with_the_digits_it_has():
    from bsselect.units import format_percent

    # 0.9999999 printed "100%" (six significant digits): a margin that leaves nothing
    assert [format_percent(x) for x in (0.9999999, 0.9999999999999999, 0.12345, 0.2, -0.0)] == [
        "99.99999%", "99.99999999999999%", "12.345%", "20%", "0%"]


def test_check_prints_a_tiny_budget_margin_truly_and_refuses_one_that_leaves_nothing(task_file):
    proc = run_cli("check", f"{task_file}:make_task", "--batch-size", "8", "--memory", "1GiB",
                   "--margin", "0.9999999")
    assert proc.returncode == 3, proc.stderr
    assert "(1 GiB --memory, 99.99999% margin)" in proc.stdout
    # 0.0107 bytes usable: a ZeroDivisionError, exit 1, "internal error" before
    for command in (["check", "--batch-size", "8"], ["probe"]):
        proc = run_cli(command[0], f"{task_file}:make_task", *command[1:], "--memory", "1GiB",
                       "--margin", "0.99999999999")
        assert proc.returncode == 2, proc.stderr
        assert one_error(proc) == (
            "error: --margin 0.99999999999 leaves 0.0107 bytes of the 1 GiB budget, less than "
            "one byte: nothing can fit; give a margin well below 1 (the default is 0.2)")


# 3. task names and paths are printed as written: no emoji, no markup

def test_a_task_path_is_printed_as_written(tmp_path, task_file):
    (tmp_path / "d:smile:").mkdir()
    shutil.copy(task_file, tmp_path / "d:smile:" / "t.py")
    proc = run_cli("check", "d:smile:/t.py:make_task", "--batch-size", "8", "--memory", "1GiB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("batch 8 of d:smile:/t.py:make_task fits")  # not d😄/t.py
    # a folder `a[` holding `]b.py`: the probe's progress bar read `[/]` as a closing tag,
    # an internal error (MarkupError) before any result
    (tmp_path / "a[").mkdir()
    shutil.copy(task_file, tmp_path / "a[" / "]b.py")
    proc = run_cli("probe", "a[/]b.py:make_task", "--memory", "1GiB")
    assert proc.returncode == 0, proc.stderr
    assert "Peak memory of one training step — a[/]b.py:make_task" in proc.stdout


# 4. check --format github --json: both, the annotation on stderr

def test_check_github_format_with_json_keeps_both(task_file):
    # before: --json won and the annotation was dropped
    proc = run_cli("check", f"{task_file}:make_task", "--batch-size", "8", "--memory", "1KiB",
                   "--format", "github", "--json")
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["fits"] is False
    assert "::error title=bsselect check::batch 8 of " in proc.stderr
    proc = run_cli("check", f"{task_file}:make_task", "--memory", "1GiB", "--format", "github",
                   "--json")  # the check cannot run: no batch size
    assert proc.returncode == 2
    assert one_error(proc).startswith("error: check needs --batch-size")
    assert "::error title=bsselect check::check needs --batch-size" in proc.stderr


# 5. a journal edited by hand: a BOM is read past; a bad value names the file and line

def _sweep_journal(task_file) -> Path:
    proc = run_cli("sweep", f"{task_file.name}:make_task", *SWEEP)
    assert proc.returncode == 0, proc.stderr
    return Path("bsselect-sweep-tiny_task.py-make_task.jsonl")


def test_a_journal_saved_with_a_bom_or_a_string_lr_still_resumes(task_file):
    path = _sweep_journal(task_file)
    original = path.read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + original)  # "UTF-8 with BOM", as some editors save
    proc = run_cli("sweep", f"{task_file.name}:make_task", *SWEEP, "--resume")
    assert proc.returncode == 0, proc.stderr  # before: "has no readable header", exit 2
    assert "(resumed batch sizes [8, 16])" in proc.stdout
    # a trial whose lr is a string: skipped with a warning, like any damaged line, and run
    # again (before: an internal error at the table, "Unknown format code 'g'")
    lines = original.decode().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith('{"trial"'))
    trial = json.loads(lines[first])
    trial["trial"]["lr"] = "abc"
    lines[first] = json.dumps(trial) + "\n"
    path.write_text("".join(lines))
    proc = run_cli("sweep", f"{task_file.name}:make_task", *SWEEP, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: {path}: line {first + 1} skipped: bad trial record (its lr is 'abc', "
            "not a number)" in " ".join(proc.stderr.split()))
    assert "(resumed batch sizes [16])" in proc.stdout


def test_report_on_a_damaged_header_names_the_line_and_the_setting(task_file):
    path = _sweep_journal(task_file)
    header, rest = path.read_text().split("\n", 1)
    record = json.loads(header)
    record["settings"]["base_lr"] = "0.1"
    path.write_text(json.dumps(record) + "\n" + rest)
    proc = run_cli("report", str(path))
    assert proc.returncode == 2  # before: exit 1, internal error: TypeError
    assert one_error(proc) == (
        f"error: {path}: line 1 (the header) is damaged: its setting base_lr is '0.1', not a "
        "positive number; restore the file, or rerun the sweep with --overwrite")
    path.write_text(header[:40] + "\n" + rest)  # a header cut short: --overwrite restarts it
    proc = run_cli("sweep", f"{task_file.name}:make_task", *SWEEP, "--resume")
    assert proc.returncode == 2
    message = one_error(proc)
    assert message.startswith(f"error: journal '{path}' has no readable header, so it cannot "
                              "be resumed (line 1: not valid JSON (")
    assert message.endswith("--overwrite starts it again (its trials are lost), or use a new "
                            "--journal path")


# 6. --resume with the task file spelled another way

def test_resume_accepts_another_spelling_of_the_same_task_file(tmp_path, task_file):
    path = _sweep_journal(task_file)  # written for `tiny_task.py:make_task`
    for spelling in (f"./{task_file.name}", str(task_file)):
        proc = run_cli("sweep", f"{spelling}:make_task", *SWEEP, "--resume")
        assert proc.returncode == 0, proc.stderr  # before: "written for a different task"
        assert "(resumed batch sizes [8, 16])" in proc.stdout
    # another file of the same name is another task
    (tmp_path / "other").mkdir()
    shutil.copy(task_file, tmp_path / "other" / task_file.name)
    before = path.read_bytes()
    proc = run_cli("sweep", f"other/{task_file.name}:make_task", *SWEEP, "--resume")
    assert proc.returncode == 2
    assert (f"task '{task_file.name}:make_task' -> 'other/{task_file.name}:make_task'"
            in one_error(proc))
    assert path.read_bytes() == before


# 7. a one-item dataset: the task cannot run, exit 1, one line

ONE_ITEM = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task

def make_task():
    x = torch.randn(1, 4)
    return Task(model=lambda: nn.Linear(4, 2), train_data=TensorDataset(x, torch.zeros(1).long()),
                loss_fn=F.cross_entropy, lr=0.1, base_batch_size=1)
'''


@pytest.mark.parametrize("command, message", [
    (["sweep", "--batch-sizes", "1,2"],
     "error: the task's training data has 1 item: without val_data the sweep holds out 10% of "
     "it (at least one item) for validation, which leaves none to train on; give the task more "
     "training data, or val_data"),
    (["noise"],
     "error: the task's training data has 1 item: the noise scale compares the gradients of two "
     "batch sizes, so it needs at least 2 items"),
])
def test_a_one_item_dataset_is_a_task_that_cannot_run(tmp_path, command, message):
    # before: exit 2, and for the sweep "choose batch sizes <= 0"
    (tmp_path / "one.py").write_text(ONE_ITEM)
    proc = run_cli(command[0], "one.py:make_task", *command[1:])
    assert proc.returncode == 1, proc.stderr
    assert one_error(proc) == message
