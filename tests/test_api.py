"""The Python API (docs/api.md): its examples run as written, its results are the CLI's
JSON, and `from bsselect import probe, check, sweep` stays the functions although
submodules of those names exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli

import bsselect

DOC = Path(__file__).parent.parent / "docs" / "api.md"


def test_the_api_doc_examples_run_in_order(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
    assert (tmp_path / "sweep.jsonl").exists()


def test_the_names_stay_the_functions_after_the_modules_behind_them_import():
    import bsselect.gate.check  # noqa: F401 - the methods live in memory/, selection/, gate/
    import bsselect.memory.probe  # noqa: F401
    import bsselect.selection.schedule  # noqa: F401
    import bsselect.selection.sweep  # noqa: F401
    from bsselect import api
    from bsselect.memory.probe import run_probe

    assert bsselect.probe is api.probe and bsselect.check is api.check
    assert bsselect.sweep is api.sweep and bsselect.noise_scale is api.noise_scale
    assert bsselect.schedule is api.schedule
    assert callable(run_probe)


def test_api_results_are_the_cli_json():
    from bsselect import check, probe

    via_api = json.loads(json.dumps(probe("digits-mlp", memory="1GiB").to_json()))
    done = run_cli("probe", "digits-mlp", "--memory", "1GiB", "--json")
    assert done.returncode == 0, done.stderr
    via_cli = json.loads(done.stdout)
    assert {k: via_cli[k] for k in via_api} == via_api
    via_api = json.loads(json.dumps(check("digits-mlp", batch_size=64, memory=2**28).to_json()))
    done = run_cli("check", "digits-mlp", "--batch-size", "64", "--memory", "256MiB", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == via_api


@pytest.mark.parametrize("call", [
    lambda api: api.probe(42, memory="1GiB"),
    lambda api: api.probe("linreg", memory="1GiB", accumulate=2.5),
    lambda api: api.probe("linreg", memory="1GiB", margin="0.2"),
    lambda api: api.probe("linreg", memory="1GiB", batch_sizes=[True, 16]),
    lambda api: api.check("linreg", batch_size=8, device_preset=5),
    lambda api: api.noise_scale("linreg", b_small=8.0),
    lambda api: api.noise_scale("linreg", seed="a"),
    lambda api: api.sweep("linreg", batch_sizes="8,16", budget="32"),
    lambda api: api.sweep("linreg", batch_sizes=[8, 16], budget=1.5),
    # an int, and an empty list (a computed one that came out empty): the latter was the
    # defaults, a different experiment without a word (review)
    lambda api: api.probe("linreg", memory="1GiB", batch_sizes=8),
    lambda api: api.probe("linreg", memory="1GiB", batch_sizes=[]),
    lambda api: api.plan_sweep("linreg", batch_sizes=[]),
    lambda api: api.sweep("linreg", batch_sizes=(), budget="32"),
    lambda api: api.schedule("linreg", batch_sizes=[]),
])
def test_wrong_argument_types_are_usage_errors_not_raw_exceptions(call, tmp_path, monkeypatch):
    from bsselect import api
    from bsselect.errors import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        call(api)
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written


def _small_task(model):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return bsselect.Task(model=model, train_data=TensorDataset(x, y),
                         loss_fn=nn.functional.cross_entropy, lr=0.05, base_batch_size=8)


@pytest.mark.parametrize("call", ["noise", "sweep", "probe-measured", "schedule"])
def test_api_calls_leave_the_callers_rng_where_it_was(call, tmp_path):
    """bsselect seeds torch's RNG for its trials: a caller who seeds, asks, then initialises
    and trains must get the run of their own seed (before: the same numbers whatever the
    seed, after noise_scale, sweep or a measured probe)."""
    import torch
    from torch import nn

    task = _small_task(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    run = {
        "noise": lambda: bsselect.noise_scale(task, measurements=4, device="cpu"),
        "sweep": lambda: bsselect.sweep(task, batch_sizes=[8, 16], journal=tmp_path / "s.jsonl",
                                        overwrite=True,
                                        device="cpu", budget="64"),
        "probe-measured": lambda: bsselect.probe(task, memory="256MiB", method="measured",
                                                 batch_sizes=[2, 4], device="cpu"),
        "schedule": lambda: bsselect.schedule(task, batch_sizes=[8, 16], horizon=1024,
                                              points=2, journal=tmp_path / "p.jsonl", overwrite=True,
                                              branch_samples=128,
                                              device="cpu", noise_measurements=4),
    }[call]
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        run()
        assert torch.equal(torch.rand(3), expected)


def test_a_factory_that_returns_the_users_model_is_refused_before_anything_changes_it():
    """`lambda: net` would have the simulation turn net's parameters into fake tensors (and
    a measured probe or a sweep train it in place); a factory around a pre-built part, the
    same for that part. Refused with one line; net untouched."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor

    from bsselect.errors import TaskError

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = [p.detach().clone() for p in net.parameters()]
    for method in ("simulated", "measured"):
        with pytest.raises(TaskError, match="must build a new model each time"):
            bsselect.probe(_small_task(lambda: net), memory="64MiB", method=method)
    with pytest.raises(TaskError, match="share modules or tensors"):
        bsselect.check(_small_task(lambda: nn.Sequential(net[0], nn.ReLU(), nn.Linear(16, 2))),
                       batch_size=8, memory="64MiB")
    assert not any(isinstance(p, FakeTensor) for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # a copy per call is what the message advises, and it runs
    import copy

    assert bsselect.probe(_small_task(lambda: copy.deepcopy(net)), memory="64MiB").max_batch > 0


def test_probe_batch_sizes_may_be_a_generator():
    """check_batch_sizes read them twice, and a generator came out empty (review)."""
    result = bsselect.probe("digits-mlp", batch_sizes=(b for b in [8, 16]), memory="1GiB",
                            method="simulated")
    assert [p.batch_size for p in result.points] == [8, 16]


def test_batch_sizes_may_be_a_numpy_array_or_a_range(tmp_path):
    """``not batch_sizes`` on an array raised numpy's "truth value is ambiguous" (review)."""
    import numpy as np

    for sizes in (np.array([8, 16]), range(8, 17, 8)):
        result = bsselect.sweep("linreg", batch_sizes=sizes, budget="64", device="cpu",
                                noise_measurements=0, journal=tmp_path / "s.jsonl",
                                overwrite=True)
        assert [t.batch_size for t in result.trials] == [8, 16]
