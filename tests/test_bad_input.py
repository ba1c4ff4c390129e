"""Bad input a new user really types: one clear line and the documented exit code, through
the real command (issue 14). Exit codes: 1 the task or run failed, 2 usage error."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import one_error, run_cli


@pytest.mark.parametrize("args, code, message", [
    (["noise", "linreg", "--b-small", "0"], 2, "error: --b-small must be >= 1, got 0"),
    (["noise", "linreg", "--b-big", "-4"], 2, "error: --b-big must be >= 1, got -4"),
    (["probe", "digits-mlp", "--memory", "8"], 2,
     "error: memory size '8' has no unit, which would mean 8 bytes; write 8GiB or 8GB (or 8B if "
     "you mean bytes)"),
    (["probe", "digits-mlp", "--memory", "1e30"], 2,
     "error: memory size '1e30' is 8.67e+11 EiB, more than any device (the limit is 1 PiB); "
     "check the unit"),
    (["sweep", "digits-mlp", "--threads", "0"], 2,
     "error: --threads must be between 1 and 4096, got 0"),
    (["probe", "digits-mlp", "--memory", "1e999GiB"], 2,
     "error: memory size '1e999GiB' is more than any device (the limit is 1 PiB); check the "
     "unit"),
    # Options the chosen route would ignore are refused, not dropped.
    (["sweep", "linreg", "--batch-sizes", "8,16", "--max-batch", "8"], 2,
     "error: --batch-sizes lists the sizes to try, so --max-batch would be ignored; give one "
     "or the other"),
    (["sweep", "linreg", "--batch-sizes", "8,16", "--min-batch", "64", "--memory", "1KiB"], 2,
     "error: --batch-sizes lists the sizes to try, so --min-batch, --memory would be ignored; "
     "give one or the other"),
    (["schedule", "linreg", "--batch-sizes", "8,16", "--max-batch", "16"], 2,
     "error: --batch-sizes lists the sizes to try, so --max-batch would be ignored; give one "
     "or the other"),
    (["sweep", "linreg", "--max-batch", "64", "--memory", "1GiB"], 2,
     "error: --max-batch bounds the sizes without a probe, so --memory would be ignored; give "
     "one or the other"),
    (["sweep", "linreg", "--batch-sizes", "8,16", "--budget", "1.5steps"], 2,
     "error: --budget '1.5steps': a number of steps must be whole"),
    (["sweep", "linreg", "--batch-sizes", "8,16", "--budget", "4"], 2,
     "error: --budget 4 samples is less than one batch of 16: every trial takes at least one "
     "step, so the trials would not be equal; use --budget >= 16 (samples)"),
    (["check", "linreg", "--batch-size", "99999999999999999999", "--memory", "1GiB"], 2,
     "error: batch size must be an integer from 1 to 2,147,483,647, got 99999999999999999999"),
    (["probe", "linreg", "--memory", "1GiB", "--batch-sizes", "8,99999999999999999999"], 2,
     "error: batch sizes must be integers from 1 to 2,147,483,647, got [8, "
     "99999999999999999999]"),
    (["sweep", "linreg", "--device", "meta", "--batch-sizes", "8,16"], 2,
     "error: --device meta has shapes but no values, so it cannot train; this command needs a "
     "real device (cpu, cuda, ...). For memory without one: bsselect probe --method simulated"),
    (["schedule", "linreg", "--branch-samples", "0"], 2,
     "error: --branch-samples must be an integer >= 1, got 0"),
    (["check", "digits-mlp", "--batch-size", "8", "--memory", "1GiB", "--config",
      "missing.toml"], 2, "error: --config 'missing.toml' does not exist"),
    # a branch longer than the run it plans: hours of work, in silence (review)
    (["schedule", "linreg", "--branch-samples", "99999999"], 2,
     "error: --branch-samples 99,999,999 is longer than the run it plans (--horizon 100,000): a "
     "branch is a short piece of the run; the default is the horizon / 16"),
])
def test_usage_errors(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    proc = run_cli(*args)
    assert proc.returncode == code
    assert one_error(proc) == message


def test_report_on_a_directory(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2
    assert one_error(proc) == (f"error: '{tmp_path}' is a directory; give the sweep's journal "
                               "file (bsselect-sweep-TASK.jsonl)")


@pytest.mark.parametrize("toml, message", [
    ("[tool.bsselect]\nmemory = 12\nbatch_size = 8\n",
     "memory size '12' has no unit, which would mean 12 bytes"),
    ("[tool]\nbsselect = 5\n", "must be a table (a [tool.bsselect] section), got bsselect = 5"),
    ("[tool.bsselect]\nbatch_size = '8'\n", "batch_size must be an integer, got '8'"),
    ("[tool.bsselect]\nmargin = 'lots'\n", "margin must be a number, got 'lots'"),
    # the key the file holds, not a flag the user never passed (review)
    ("[tool.bsselect]\nmargin = 1\nbatch_size = 8\n",
     "(margin from [tool.bsselect] in pyproject.toml)"),
    ("[tool.bsselect]\nmemory = 1e16\nbatch_size = 8\n", "memory size '1e+16'"),
])
def test_bad_pyproject_values_keep_their_brackets(tmp_path, monkeypatch, toml, message):
    monkeypatch.chdir(tmp_path)
    Path("pyproject.toml").write_text(toml)
    proc = run_cli("check", "digits-mlp", *([] if "memory" in toml else ["--memory", "1GiB"]))
    assert proc.returncode == 2
    assert message in one_error(proc)


def test_check_without_a_batch_size_names_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("check", "digits-mlp", "--memory", "1GiB")
    assert proc.returncode == 2
    assert one_error(proc) == ("error: check needs --batch-size (or batch_size in [tool.bsselect] "
                               "of pyproject.toml)")


TASK_TEMPLATE = """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from bsselect import Task

    def make_task():
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        data = TensorDataset(x, (x[:, 0] > 0).long())  # seeded and learnable: no flaky trial
        return Task({fields})
"""


@pytest.mark.parametrize("fields, message", [
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, lr='0.1'",
     "TypeError: Task.lr must be a number > 0, got '0.1' (str)"),
    ("model=nn.Sequential(nn.Linear(4, 2)), train_data=data, loss_fn=F.cross_entropy",
     "TypeError: Task.model must be a function that builds a fresh model (e.g. "
     "`lambda: Sequential(...)`), not a model instance"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, lr=0",
     "ValueError: Task.lr must be a number > 0, got 0 (int)"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "lr=float('nan')", "ValueError: Task.lr must be a number > 0, got nan (float)"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "max_grad_norm=-1.0",
     "ValueError: Task.max_grad_norm must be a number > 0 or None, got -1.0 (float)"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "base_batch_size=0", "ValueError: Task.base_batch_size must be an int >= 1, got 0 (int)"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "base_batch_size=8.0",
     "TypeError: Task.base_batch_size must be an int >= 1, got 8.0 (float)"),
    ("model=lambda: nn.Linear(4, 2), train_data=[1, 2], loss_fn='mse'",
     "TypeError: Task.loss_fn must be callable, got 'mse' (str)"),
    ("model=lambda: nn.Linear(4, 2), train_data=5, loss_fn=F.cross_entropy",
     "TypeError: Task.train_data must be a map-style Dataset (with __len__ and __getitem__), "
     "got 5 (int)"),
])
def test_task_fields_are_checked_with_typed_messages(tmp_path, fields, message):
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(fields=fields)))
    proc = run_cli("probe", f"{path}:make_task", "--memory", "1GiB")
    assert proc.returncode == 1
    assert one_error(proc) == (f"error: `{path}:make_task` raised while building the task: "
                               f"{message}")


@pytest.mark.parametrize("command", [["probe", "--memory", "1GiB"],
                                     ["check", "--batch-size", "8", "--memory", "1GiB"],
                                     ["sweep", "--batch-sizes", "8,16"]])
def test_an_optimizer_factory_that_returns_nothing_is_a_task_error(tmp_path, monkeypatch,
                                                                   command):
    """A factory that forgot its return was "internal error: 'NoneType' object has no
    attribute 'step'" (review)."""
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(
        fields="model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
               "optimizer=lambda params, lr: None")))
    monkeypatch.chdir(tmp_path)
    proc = run_cli(command[0], f"{path}:make_task", *command[1:])
    assert proc.returncode == 1, proc.stderr
    assert one_error(proc) == ("error: Task.optimizer must return an optimizer (a torch.optim."
                               "Optimizer); it returned NoneType: did the function forget its "
                               "return?")


BROKEN_TASKS = """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset
    from bsselect import Task

    def build():
        raise ValueError("config has no n_layers")

    def factory_raises():
        return Task(model=build, train_data=TensorDataset(torch.randn(8, 4), torch.zeros(8).long()),
                    loss_fn=F.cross_entropy)

    class Negative(Dataset):
        def __len__(self):
            return -1

        def __getitem__(self, i):
            return torch.randn(4), 0

    def negative_len():
        return Task(model=lambda: nn.Linear(4, 2), train_data=Negative(), loss_fn=F.cross_entropy)
"""


@pytest.mark.parametrize("factory, message", [
    # the factory's own error, not "building the model on the meta device failed" and a hint
    # to measure with real steps, which fail the same way (review)
    ("factory_raises", "error: building the model failed: ValueError: config has no n_layers"),
    # len() refuses a negative __len__: was "internal error" (review)
    ("negative_len", "error: len(Task.train_data) failed: ValueError: __len__() should return "
                     ">= 0"),
])
@pytest.mark.parametrize("command", [["probe", "--memory", "1GiB"],
                                     ["check", "--batch-size", "8", "--memory", "1GiB"]])
def test_a_broken_factory_or_dataset_is_named_as_the_tasks_error(tmp_path, monkeypatch, factory,
                                                                 message, command):
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(BROKEN_TASKS))
    monkeypatch.chdir(tmp_path)
    proc = run_cli(command[0], f"{path}:{factory}", *command[1:])
    assert proc.returncode == 1, proc.stderr
    assert one_error(proc) == message


def test_report_on_a_sweeps_json_output_is_one_error_not_a_flood(tmp_path):
    out = tmp_path / "full.json"
    out.write_text(json.dumps({"trials": [{"b": b} for b in range(50)]}, indent=1))
    proc = run_cli("report", str(out))
    assert proc.returncode == 2
    assert one_error(proc) == (f"error: {out} has no readable header; cannot report it (a "
                               "sweep's journal is its .jsonl file, not its --json output)")


@pytest.mark.parametrize("command", [["probe", "--memory", "1GiB"],
                                     ["probe", "--memory", "1GiB", "--method", "measured"],
                                     ["sweep", "--batch-sizes", "8,16"]])
def test_a_closure_optimizer_is_refused_with_what_is_unsupported(tmp_path, command):
    # LBFGS's step needs a closure, which a training loop's optimizer.step() never passes;
    # the simulation's failure told users to try real steps, which failed the same way
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(
        fields="model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
               "optimizer=lambda p, lr: torch.optim.LBFGS(p, lr=lr)")))
    proc = run_cli(command[0], f"{path}:make_task", *command[1:],
                   "--journal" if command[0] == "sweep" else "--json",
                   *([str(tmp_path / "s.jsonl")] if command[0] == "sweep" else []))
    assert proc.returncode == 1, proc.stderr
    assert one_error(proc) == (
        "error: LBFGS.step needs a closure (it re-evaluates the loss itself): bsselect steps "
        "the optimizer as a training loop does, optimizer.step() once per batch, so closure "
        "optimizers (LBFGS) are not supported")


def test_check_github_format_annotates_a_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("check", "digits-mlp", "--memory", "1GiB", "--format", "github")
    assert proc.returncode == 2
    assert proc.stdout == ("::error title=bsselect check::check needs --batch-size (or "
                           "batch_size in [tool.bsselect] of pyproject.toml)\n")
    assert "error: check needs --batch-size" in proc.stderr


@pytest.mark.parametrize("plot, message", [
    ("notes.txt/plots/sweep.png", "--plot 'notes.txt/plots/sweep.png': 'notes.txt' is a file, "
                                  "not a folder"),
    (".", "--plot '.' is a directory; give a file name like plot.png"),
    (f"{'x' * 300}/sweep.png", f"--plot '{'x' * 300}/sweep.png': File name too long"),
    ("out.txt", "--plot 'out.txt': matplotlib cannot write .txt files; use one of "),
])
def test_a_bad_plot_path_fails_before_any_trial(tmp_path, monkeypatch, plot, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file where the plot's folder would be\n")
    proc = run_cli("sweep", "digits-mlp", "--batch-sizes", "8,16", "--plot", plot)
    assert proc.returncode == 2
    assert one_error(proc).startswith(f"error: {message}")
    assert not list(tmp_path.glob("*.jsonl"))  # nothing ran, no journal started


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="root passes the access check that /proc fails for other users")
def test_a_plot_folder_that_cannot_be_made_is_refused_before_any_work():
    """/proc takes no new folder, though root may write there: the folder is made by the
    check, before any trial, so the refusal comes first (it came after the sweep)."""
    from bsselect.errors import UsageError
    from bsselect.plots import check_plot_target

    with pytest.raises(UsageError, match=r"^--plot '/proc/bsselect-plots/s.png': cannot "
                                         r"create folder '/proc/bsselect-plots' \("):
        check_plot_target(Path("/proc/bsselect-plots/s.png"))


@pytest.mark.parametrize("journal, message", [
    (".", "journal '.' is a directory; give a file path, e.g. 'journal.jsonl'"),
    ("/dev/null", "journal '/dev/null' is not a regular file (a device or a pipe); give a file "
                  "path"),
    ("/proc/nope.jsonl", "cannot write the journal '/proc/nope.jsonl' ("),
])
def test_a_journal_path_that_cannot_be_one_is_a_usage_error(tmp_path, monkeypatch, journal,
                                                            message):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        proc = run_cli("sweep", "linreg", "--batch-sizes", "8,16", "--budget", "32",
                       "--journal", journal, *extra)
        assert proc.returncode == 2, proc.stderr
        assert one_error(proc).startswith(f"error: {message}")


@pytest.mark.parametrize("command", ["sweep", "schedule"])
def test_resume_never_overwrites_a_file_that_is_not_a_journal(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    precious = '{"my": "results",\n "x": [1, 2, 3]}\n'
    Path("results.json").write_text(precious)
    extra = (["--budget", "32"] if command == "sweep" else
             ["--horizon", "2048", "--points", "2", "--noise-measurements", "0"])
    proc = run_cli(command, "linreg", "--batch-sizes", "8,16", *extra, "--journal",
                   "results.json", "--resume")
    assert proc.returncode == 2
    assert "has no readable header, so it cannot be resumed" in one_error(proc)
    assert Path("results.json").read_text() == precious
    # What a run killed while writing its header leaves is started again.
    Path("cut.jsonl").write_text('{"bsselect_journal":1,"key":"ab')
    proc = run_cli(command, "linreg", "--batch-sizes", "8,16", *extra, "--journal",
                   "cut.jsonl", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert Path("cut.jsonl").read_text().startswith('{"bsselect_journal":1,')


def test_report_refuses_a_file_holding_two_sweeps(tmp_path):
    from bsselect.selection.journal import Journal
    from bsselect.selection.trial_types import TrialResult

    def journal(path, task):
        j = Journal(path, task=task, settings={"seed": 0})
        j.append(TrialResult(batch_size=8, status="oom", lr=0.1, steps=0, samples=0,
                             wall_s=0.0, error="oom"))

    journal(tmp_path / "a.jsonl", "task-a")
    journal(tmp_path / "b.jsonl", "task-b")
    both = tmp_path / "both.jsonl"
    both.write_bytes((tmp_path / "a.jsonl").read_bytes() + (tmp_path / "b.jsonl").read_bytes())
    proc = run_cli("report", str(both))
    assert proc.returncode == 2
    assert one_error(proc) == (f"error: {both} holds a second journal header at line 3 (task "
                               "'task-b'): two sweeps' journals in one file, whose trials must "
                               "not be mixed; split the file, or keep one sweep per --journal")


def test_resume_after_the_task_changed_refuses_and_names_the_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "task.py"

    def write(width: int) -> None:
        path.write_text(textwrap.dedent(TASK_TEMPLATE.format(
            fields=f"model=lambda: nn.Sequential(nn.Linear(4, {width}), nn.ReLU(), "
                   f"nn.Linear({width}, 2)), train_data=data, loss_fn=F.cross_entropy, "
                   "base_batch_size=8")))

    args = ("sweep", f"{path}:make_task", "--batch-sizes", "8,16", "--budget", "64",
            "--journal", "j.jsonl")
    write(16)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    before = Path("j.jsonl").read_bytes()
    write(32)  # the same entry point now builds a wider model
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 2
    error = one_error(proc)
    assert error.startswith("error: journal 'j.jsonl' was written for another version of the "
                            "task (parameters 114 -> 226, state_shapes ")
    assert error.endswith("its trials do not apply: use a new --journal path or --overwrite")
    assert Path("j.jsonl").read_bytes() == before
    write(16)  # back to the journal's task: it resumes
    again = run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr


DICT_TASKS = Path(__file__).parent / "tasks" / "dict_tasks.py"


@pytest.mark.parametrize("command", [
    ("probe", "--memory", "1GiB", "--json"),
    ("check", "--batch-size", "64", "--memory", "1GiB", "--json"),
    ("sweep", "--batch-sizes", "8,16", "--budget", "64", "--journal", "j.jsonl", "--json"),
])
def test_dict_items_work_with_a_collate_fn(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    proc = run_cli(command[0], f"{DICT_TASKS}:make_task", *command[1:])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if command[0] == "sweep":
        assert [t["status"] for t in out["trials"]] == ["ok", "ok"]
        # --batch-sizes bounds the sweep; it is not what fits: no accumulation advice.
        assert out["b_opt_accumulation"] is None
    elif command[0] == "check":
        assert out["fits"] is True


@pytest.mark.parametrize("factory, message", [
    ("no_collate", "error: Task.train_data[0] is a dict; without a collate_fn, items must be "
                   "(input, target) pairs. Give Task.collate_fn that turns a list of items into "
                   "(inputs, targets) to use any other item type"),
    ("bad_collate", "error: collating a batch failed: TypeError: Task.collate_fn must return "
                    "(inputs, targets), got dict: the step calls model(inputs) and "
                    "loss_fn(output, targets)"),
])
def test_dict_items_without_a_fitting_collate_fn(tmp_path, monkeypatch, factory, message):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("probe", f"{DICT_TASKS}:{factory}", "--memory", "1GiB")
    assert proc.returncode == 1
    assert one_error(proc) == message


def test_an_absent_device_names_what_works_without_it(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has the device")  # the test is about one without it
    monkeypatch.chdir(tmp_path)
    proc = run_cli("sweep", "digits-mlp", "--device", "cuda")
    assert proc.returncode == 2
    assert one_error(proc) == (
        "error: device 'cuda' is not available on this machine; to plan memory for it without "
        "one, use `bsselect probe --target cuda --memory SIZE` or `bsselect check "
        "--device-preset NAME`")


def test_probe_says_when_its_answer_exceeds_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("probe", "digits-mlp", "--memory", "4GiB")
    assert proc.returncode == 0, proc.stderr
    assert ("note: that is larger than the 1,500-item training set: memory does not limit the "
            "batch here, the data does") in proc.stdout
    data = json.loads(run_cli("probe", "digits-mlp", "--memory", "4GiB", "--json").stdout)
    assert data["exceeds_dataset"] is True and data["train_items"] == 1500
    small = json.loads(run_cli("probe", "tiny-lm", "--memory", "256MiB", "--json").stdout)
    assert small["exceeds_dataset"] is False


def test_a_time_budget_says_what_it_bounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("sweep", "digits-mlp", "--batch-sizes", "8,16", "--budget", "0.2s",
                   "--noise-measurements", "0")
    assert proc.returncode == 0, proc.stderr
    assert ("a 0.2 s budget bounds each trial's training steps; its evaluation and noise "
            "measurements, and the timing rounds after the trials, come on top") in proc.stderr


def test_check_names_the_config_file_it_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ci.toml").write_text("[tool.bsselect]\nmemory = '1GiB'\n")
    proc = run_cli("check", "digits-mlp", "--config", "ci.toml")
    assert proc.returncode == 2
    assert one_error(proc) == ("error: check needs --batch-size (or batch_size in "
                               "[tool.bsselect] of ci.toml)")


def test_brackets_in_a_users_error_survive_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import TensorDataset
        from bsselect import Task

        class Picky(nn.Linear):
            def forward(self, x):
                if x.shape[0] == 16:
                    raise RuntimeError("expected [batch, 32], see [tool.bsselect]")
                return super().forward(x)

        def make_task():
            x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
            data = TensorDataset(x, (x[:, 0] > 0).long())  # learnable: b=8 trains
            return Task(model=lambda: Picky(4, 2), train_data=data, loss_fn=F.cross_entropy,
                        lr=0.05, base_batch_size=8)
    """))
    proc = run_cli("sweep", f"{path}:make_task", "--batch-sizes", "8,16", "--budget", "128",
                   "--noise-measurements", "0")
    assert proc.returncode == 0, proc.stderr
    assert ("batch 16 error: RuntimeError: expected [batch, 32], see [tool.bsselect]"
            in proc.stdout)


def test_the_sweep_table_reads_at_80_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("sweep", "digits-mlp", "--batch-sizes", "8,16,32,64", "--budget", "256",
                   "--noise-measurements", "2", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["#", "batch"])
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in "1234"
            and len(line.split()) >= 9]
    assert len(rows) == 4 and all(len(line) <= 80 for line in [header] + rows)
    assert "…" not in "".join([header] + rows)  # nothing cut


def test_plot_without_matplotlib_fails_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    proc = run_cli("sweep", "digits-mlp", "--batch-sizes", "8,16", "--plot", "s.png",
                   env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 2
    assert one_error(proc) == "error: --plot needs matplotlib: pip install 'bsselect[plot]'"
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.parametrize("where", ["factory", "import"])
def test_a_task_that_calls_sys_exit_is_an_error_not_a_pass(tmp_path, where):
    # `check` is a CI gate: SystemExit from the task's code escaped the CLI's guard, and
    # sys.exit(0) exited 0 ("fits") with nothing checked and nothing printed
    path = tmp_path / "task.py"
    path.write_text("import sys\n" + ("sys.exit(0)\n" if where == "import" else "")
                    + "def make_task():\n    sys.exit(0)\n")
    proc = run_cli("check", f"{path}:make_task", "--batch-size", "8", "--memory", "1GiB",
                   "--json")
    assert proc.returncode == 1
    assert one_error(proc).startswith("error: the task's code called sys.exit(0)")
    assert proc.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["sweep", "linreg", "--threads", "99999999999"], "--threads must be between 1 and 4096"),
    (["check", "--hf-config", "llama-7b", "--shard", "fsdp", "--world-size", "4294967296",
      "--batch-size", "1", "--memory", "80GiB"], "--world-size must be between 1 and"),
])
def test_out_of_range_counts_are_usage_errors_not_internal_errors(args, message):
    # an int too large for torch.set_num_threads, or for a fake process group: internal
    # errors (exit 1, a traceback's worth of lines) before (CLI review 7)
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in one_error(proc)


@pytest.mark.parametrize("fields, message", [
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "val_data=TensorDataset(torch.randn(8, 7), torch.zeros(8).long())",
     "error: evaluating on Task.val_data fails (the forward and loss on 2 of its items): "
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x7 and 4x2)"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
     "metric=lambda o, y: [1.0, 2.0]",
     "error: Task.metric must return a number (higher is better), got list"),
    ("model=lambda: nn.Linear(4, 2), train_data=data, "
     "loss_fn=lambda o, y: F.cross_entropy(o, y).reshape(1)",
     "error: Task.loss_fn returned a tensor of shape [1]; it must be a 0-d scalar (the MEAN "
     "over the batch): .mean(), or .squeeze() it"),
])
def test_evaluation_and_loss_shape_fail_before_any_trial_trains(tmp_path, fields, message):
    """Each of these trained every trial first and then failed them all (review), with a
    message that did not name the validation data, the metric or the loss's shape."""
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(fields=fields)))
    proc = run_cli("sweep", f"{path}:make_task", "--batch-sizes", "8,16", "--budget", "64",
                   "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 1
    assert one_error(proc) == message
    assert not (tmp_path / "j.jsonl").exists()  # nothing trained, nothing journaled


@pytest.mark.parametrize("extra, warned", [(1, True), (0, False)])
def test_more_threads_than_cpus_is_warned_about(tmp_path, extra, warned):
    """--threads 64 on 2 cores ran with no word (review): the threads take turns, and the
    step times that rank the batch sizes follow the machine's load."""
    from bsselect.selection.timing import usable_cpus

    threads = usable_cpus() + extra
    proc = run_cli("sweep", "linreg", "--batch-sizes", "8,16", "--budget", "64",
                   "--noise-measurements", "0", "--threads", str(threads),
                   "--journal", str(tmp_path / "j.jsonl"), "--json")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert (f"warning: --threads {threads} is more than the {usable_cpus()} usable CPU(s)"
            in text) is warned


def test_a_metric_that_gives_nan_is_named_not_shown_as_a_silent_dash(tmp_path):
    """A NaN metric on one validation batch emptied the trial's metric column with no word
    why (review)."""
    path = tmp_path / "task.py"
    fields = ("model=lambda: nn.Linear(4, 2), train_data=data, loss_fn=F.cross_entropy, "
              "metric=lambda o, y: float('nan')")
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(fields=fields)))
    proc = run_cli("sweep", f"{path}:make_task", "--batch-sizes", "8,16", "--budget", "64",
                   "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert ("warning: Task.metric gave NaN or inf on the validation data at batch size(s) "
            "8, 16") in " ".join(proc.stderr.split())
    assert all(t["val_metric"] is None for t in json.loads(proc.stdout)["trials"])


@pytest.mark.parametrize("args, message", [
    (["sweep", "linreg", "--batch-sizes", "8,16", "--noise-measurements", "1"],
     "error: --noise-measurements must be 0 (off) or at least 2"),
    (["noise", "linreg", "--measurements", "3"],
     "error: measurements must be at least 4 (32 is a good start), got 3: with fewer, a "
     "bootstrap interval cannot reach past the values measured (a '90%' interval from 2 "
     "covered the truth about half the time)"),
    (["schedule", "linreg", "--horizon", "2048", "--noise-measurements", "2"],
     "error: --noise-measurements must be 0 (off) or at least 4: each point's B_simple "
     "interval comes from its own measurements, got 2"),
])
def test_too_few_noise_measurements_is_a_usage_error_before_training(tmp_path, monkeypatch,
                                                                      args, message):
    monkeypatch.chdir(tmp_path)
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert one_error(proc) == message


def _cli(*args: str, **kw):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "bsselect", *args], env=env, **kw)


def test_a_reader_that_went_away_keeps_checks_exit_code_and_blames_no_one(tmp_path):
    """`bsselect check ... | head -1`: rich raised SystemExit(1) on the broken pipe, read as
    the task's sys.exit: "the task's code called sys.exit(1) ... (nothing was checked)", and
    the "does not fit" exit code 3 was lost (review)."""
    import subprocess

    for extra in ([], ["--json"]):
        proc = _cli("check", "digits-mlp", "--batch-size", "999999", "--memory", "1GiB", *extra,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        proc.stdout.close()  # no reader: every write to stdout is a broken pipe
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 3, stderr
        assert "error" not in stderr, stderr


def test_an_ascii_terminal_gets_the_result_not_an_internal_error(tmp_path):
    """The tables hold "—" and "·": in an ASCII locale the result failed at the end with
    "internal error: UnicodeEncodeError" (review)."""
    import subprocess

    proc = _cli("check", "digits-mlp", "--batch-size", "8", "--memory", "1GiB",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                env={"PYTHONIOENCODING": "ascii"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert b"fits" in out and b"internal error" not in err


def test_a_task_that_prints_leaves_json_stdout_one_document(tmp_path):
    """A task printing on import or build put its lines ahead of the JSON (review)."""
    import subprocess

    (tmp_path / "printer.py").write_text(
        'print("hello from import")\n'
        "from bsselect.examples.linreg import linreg\n\n"
        "def make():\n"
        '    print("hello from the factory")\n'
        "    return linreg()\n")
    proc = _cli("probe", "printer.py:make", "--memory", "1GiB", "--json",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out)["max_batch"] > 0
    assert b"hello from import" in err and b"hello from the factory" in err


def test_output_to_a_full_disk_is_one_error_line(tmp_path):
    import os
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = _cli("check", "digits-mlp", "--batch-size", "8", "--memory", "1GiB",
                    stdout=full, stderr=subprocess.PIPE, cwd=tmp_path)
        err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 1
    assert "internal error" not in err and "Traceback" not in err
    assert "error: a write failed (No space left on device)" in err


@pytest.mark.parametrize("command", [["examples"], ["presets"], ["--version"], ["--help"]])
def test_listings_to_a_full_disk_are_one_error_line(tmp_path, command):
    """The commands that run no task (outside the error boundary) printed typer's
    traceback (review)."""
    import os
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = _cli(*command, stdout=full, stderr=subprocess.PIPE, cwd=tmp_path)
        err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 1
    assert err == "error: a write failed (No space left on device): the output\n"


@pytest.mark.parametrize("command", [["noise"], ["probe", "--memory", "1GiB"],
                                     ["check", "--batch-size", "8", "--memory", "1GiB"]])
def test_a_task_that_leaves_gradients_off_is_told_so(tmp_path, monkeypatch, command):
    """torch.set_grad_enabled(False) in the task's code: said as "is the model's output
    detached?" or as a failed real step (review)."""
    (tmp_path / "nograd.py").write_text(
        "import torch\nfrom bsselect.examples.linreg import linreg\n\n"
        "def make():\n    torch.set_grad_enabled(False)\n    return linreg()\n")
    monkeypatch.chdir(tmp_path)
    proc = run_cli(command[0], "nograd.py:make", *command[1:])
    assert proc.returncode == 1
    assert one_error(proc).startswith("error: gradients are off: the task's code turned them off")


def test_a_task_file_that_is_not_valid_python_is_a_usage_error(tmp_path, monkeypatch):
    """An entry point that cannot be loaded exits 2 (docs/contract.md); a syntax error
    exited 1, as a task that failed (review)."""
    (tmp_path / "bad.py").write_text("def make(:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    proc = run_cli("probe", "bad.py:make", "--memory", "1GiB")
    assert proc.returncode == 2
    assert one_error(proc).startswith("error: importing 'bad.py' failed: SyntaxError")


@pytest.mark.parametrize("command", [["check", "--batch-size", "8", "--memory", "1GiB"],
                                     ["probe", "--memory", "1GiB"], ["noise"],
                                     ["sweep", "--batch-sizes", "8,16"]])
def test_a_frozen_model_is_the_same_line_in_every_command(tmp_path, monkeypatch, command):
    """``check`` said "a real training step on 2 items fails ... element 0 of tensors does not
    require grad" where the other commands say the model has nothing to train."""
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(
        fields="model=lambda: nn.Linear(4, 2).requires_grad_(False), train_data=data, "
               "loss_fn=F.cross_entropy")))
    monkeypatch.chdir(tmp_path)  # a sweep's journal
    proc = run_cli(command[0], f"{path}:make_task", *command[1:])
    assert proc.returncode == 1
    assert one_error(proc) == ("error: the model has no trainable parameters (none, or all "
                               "frozen): there is nothing to train")


def test_a_model_built_on_meta_is_simulated_and_refused_for_training(tmp_path, monkeypatch):
    """A factory that builds on the meta device failed check and probe with "building the
    model failed: Cannot copy out of meta tensor" (bsselect's own .to() in its real check),
    and sweep with a device error from the forward (review)."""
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK_TEMPLATE.format(
        fields="model=lambda: nn.Linear(4, 2, device='meta'), train_data=data, "
               "loss_fn=F.cross_entropy")))
    monkeypatch.chdir(tmp_path)
    fits = run_cli("check", f"{path}:make_task", "--batch-size", "8", "--memory", "1GiB")
    assert fits.returncode == 0, fits.stderr
    proc = run_cli("sweep", f"{path}:make_task", "--batch-sizes", "8,16")
    assert proc.returncode == 1
    assert one_error(proc) == ("error: Task.model() builds the model on the meta device, "
                               "without weights, and this command trains it: build it on the "
                               "CPU (probe and check simulate it as it is)")
