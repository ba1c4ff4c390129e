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


SUM_TASKS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Linear(16, 2))


def summed():
    return Task(model=_net, train_data=_data(), loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                lr=0.01)


def vae_like():  # a reconstruction and a penalty, both summed over the batch
    def loss(out, y):
        return nn.functional.cross_entropy(out, y, reduction="sum") + 1e-3 * (out ** 2).sum()
    return Task(model=_net, train_data=_data(), loss_fn=loss, lr=0.01)


class _Squeezed(nn.Module):  # a binary classifier's idiom: a batch of one comes out 0-d
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x):
        return self.lin(x).squeeze()


def squeezed_sum():  # a single item fails BCE's size check: checked on pairs (review)
    return Task(model=_Squeezed, train_data=_data(), lr=0.01,
                loss_fn=lambda out, y: nn.functional.binary_cross_entropy_with_logits(
                    out, y.float(), reduction="sum"))


def squeezed_mean():
    return Task(model=_Squeezed, train_data=_data(), lr=0.01,
                loss_fn=lambda out, y: nn.functional.binary_cross_entropy_with_logits(
                    out, y.float()))


def contrastive():  # batch-dependent, 0 for one item: not a sum
    def loss(out, y):
        z = nn.functional.normalize(out, dim=1)
        return nn.functional.cross_entropy(z @ z.T / 0.1, torch.arange(len(z)))
    return Task(model=lambda: nn.Linear(8, 4), train_data=_data(), loss_fn=loss, lr=0.01)


def weighted():  # a weighted mean: a ratio of sums, not a sum
    return Task(model=_net, train_data=_data(),
                loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])), lr=0.01)


def per_row_sum():  # a sum over each row's outputs, a mean over the batch: the contract
    return Task(model=lambda: nn.Linear(8, 3), train_data=_data(),
                loss_fn=lambda out, y: (out - y[:, None]).pow(2).sum(1).mean(), lr=0.01)
'''


def test_a_loss_summed_over_the_batch_is_refused_and_means_pass(tmp_path):
    # Before: a sum went through every command; `noise` printed |G|^2 279 where the mean
    # loss's is 0.279, and the sweep scaled lrs that were already b times too large.
    path = tmp_path / "sums.py"
    path.write_text(SUM_TASKS)
    for name in ("summed", "vae_like", "squeezed_sum"):
        task, _ = load_task(f"{path}:{name}")
        with pytest.raises(TaskError, match=r"Task.loss_fn sums over the batch: 4 items give "
                                             r"a loss of [\d.]+, 4x their mean loss"):
            validate_task(task)
    for name in ("contrastive", "weighted", "per_row_sum", "squeezed_mean"):
        validate_task(load_task(f"{path}:{name}")[0])
    done = run_cli("noise", f"{path}:summed")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: Task.loss_fn sums over the batch")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("field,value,called", [
    ("optimizer", lambda p: None, r"optimizer\(params, lr\)"),
    ("loss_fn", lambda out: None, r"loss_fn\(output, target\)"),
    ("model", lambda dim: None, r"model\(\)"),
    ("collate_fn", lambda: None, r"collate_fn\(items\)"),
    ("metric", lambda a, b, c: None, r"metric\(output, target\)"),
])
def test_a_function_that_cannot_take_its_arguments_is_refused_at_construction(field, value,
                                                                              called):
    """An optimizer factory of one argument failed inside the simulated step, whose message
    said the simulation could not run it (review)."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    fields = dict(model=lambda: nn.Linear(2, 1), loss_fn=nn.functional.mse_loss,
                  train_data=TensorDataset(torch.zeros(4, 2), torch.zeros(4, 1)))
    fields[field] = value
    with pytest.raises(TypeError, match=rf"^Task.{field} is called as {called}, which "):
        Task(**fields)
    # What the contract's own examples pass is accepted: classes, functions with defaults,
    # modules, partials.
    import functools
    Task(model=functools.partial(nn.Linear, 2, 1), train_data=fields["train_data"],
         loss_fn=nn.MSELoss(), optimizer=torch.optim.AdamW,
         collate_fn=lambda items, pad=0: items, metric=lambda out, y, *rest: 0.0)


def test_a_one_argument_optimizer_is_one_line_and_exit_1(tmp_path):
    from conftest import one_error

    path = tmp_path / "one_arg.py"
    path.write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "from bsselect import Task\n\n"
        "def make_task():\n"
        "    return Task(model=lambda: nn.Linear(2, 1), loss_fn=nn.functional.mse_loss,\n"
        "                train_data=TensorDataset(torch.zeros(8, 2), torch.zeros(8, 1)),\n"
        "                optimizer=lambda p: torch.optim.Adam(p, 1e-3))\n")
    proc = run_cli("check", f"{path}:make_task", "--batch-size", "4", "--memory", "1GiB")
    assert proc.returncode == 1
    assert "Task.optimizer is called as optimizer(params, lr)" in one_error(proc)


def test_a_dataloader_for_the_data_says_to_pass_its_dataset_and_collate_fn():
    """A DataLoader was called "a streaming (iterable) dataset" (review)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(TypeError, match=r"a DataLoader: pass its dataset "
                                        r"\(train_data=loader.dataset\) and its collate_fn"):
        Task(model=lambda: nn.Linear(4, 2), train_data=loader, loss_fn=F.cross_entropy)
