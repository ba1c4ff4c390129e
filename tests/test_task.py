import pytest

from bsselect.errors import TaskError, UsageError
from bsselect.examples import EXAMPLES
from bsselect.task import Task, load_task, validate_task

from conftest import run_cli  # tests/ is on sys.path


def test_every_example_loads_and_validates():
    for name in EXAMPLES:
        task, shown = load_task(name)
        assert isinstance(task, Task) and shown == name
        validate_task(task)


def test_default_is_digits_mlp():
    assert load_task(None)[1] == "digits-mlp"


def test_digits_data_is_real():
    from bsselect.examples.digits import load_digits

    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert set(y.tolist()) == set(range(10)) and 0.0 <= float(x.min()) and float(x.max()) == 1.0


def test_loads_from_file(task_file):
    task, _ = load_task(f"{task_file}:make_task")
    validate_task(task)
    assert task.base_batch_size == 16


def test_loads_from_module(task_file, monkeypatch):
    monkeypatch.syspath_prepend(str(task_file.parent))
    task, _ = load_task("tiny_task:make_task")
    assert len(task.train_data) == 384


@pytest.mark.parametrize("suffix,error,message", [
    ("make_tsk", UsageError, "`make_tsk` not found in"),
    ("value", UsageError, "is not callable"),
    ("not_a_task", TaskError, "returned int, not a bsselect.Task"),
    ("raises", TaskError, "ValueError: no data here"),
])
def test_file_entry_point_errors(task_file, suffix, error, message):
    with pytest.raises(error, match=message):
        load_task(f"{task_file}:{suffix}")


@pytest.mark.parametrize("suffix,message", [
    ("empty", "Task.train_data is empty"),
    ("bad_items", "items must be \\(input, target\\) pairs"),
    ("bad_forward", "the model's forward failed: RuntimeError: mat1 and mat2 shapes"),
])
def test_validation_errors(task_file, suffix, message):
    task, _ = load_task(f"{task_file}:{suffix}")
    with pytest.raises(TaskError, match=message):
        validate_task(task)


def test_missing_module_and_file():
    with pytest.raises(UsageError, match="module 'no_such_mod' not found"):
        load_task("no_such_mod:make")
    with pytest.raises(UsageError, match="does not exist"):
        load_task("missing/file.py:make")
    with pytest.raises(UsageError, match="neither a built-in example"):
        load_task("nonsense")


def test_version_and_help_do_not_import_torch():
    # `bsselect --version` is what CI scripts call first; torch takes seconds to import.
    import subprocess
    import sys

    import bsselect

    code = ("import sys; from bsselect.cli import app; import bsselect; "
            "print(bsselect.__version__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [bsselect.__version__, "False"]
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"bsselect {bsselect.__version__}"
    assert bsselect.Task is Task  # the public name still resolves


def test_unknown_attribute_of_the_package():
    import bsselect

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bsselect.nope  # noqa: B018
