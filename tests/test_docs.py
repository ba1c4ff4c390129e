"""The docs cannot drift from the code: the CLI reference is regenerated and compared, and
the README names every command."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    expected = _gen().render()
    actual = (ROOT / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run `python docs/gen_cli.py`"


def test_readme_mentions_every_command():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("probe", "sweep", "noise", "check", "report", "examples", "presets"):
        assert f"bsselect {cmd}" in readme, cmd
