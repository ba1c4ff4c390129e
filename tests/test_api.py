"""The Python API (docs/api.md): its examples run as written, its results are the CLI's
JSON, and `from bsselect import probe, check, sweep` stays the functions although
submodules of those names exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
