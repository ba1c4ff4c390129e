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
])
def test_wrong_argument_types_are_usage_errors_not_raw_exceptions(call, tmp_path, monkeypatch):
    from bsselect import api
    from bsselect.errors import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        call(api)
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written
