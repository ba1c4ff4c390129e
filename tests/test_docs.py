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
    for cmd in ("probe", "sweep", "noise", "schedule", "check", "report", "examples",
                "presets"):
        assert f"bsselect {cmd}" in readme, cmd


def test_the_readme_task_runs_as_written(tmp_path):
    import re

    from bsselect.task import load_task, validate_task

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# train\.py.*?)```", readme, re.S).group(1)
    path = tmp_path / "train.py"
    path.write_text(code)
    task, _ = load_task(f"{path}:make_task")
    validate_task(task)
    assert len(task.train_data) == 3584 and len(task.val_data) == 512


def test_guide_samples_are_what_the_commands_print():
    """Every ```text block in docs/guide.md that starts with `$ bsselect` is the command's
    real output (numbers masked: timings move, wording and rows may not). Regenerate with
    `python docs/gen_samples.py`."""
    spec = importlib.util.spec_from_file_location("gen_samples", ROOT / "docs" / "gen_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.GUIDE.read_text()
    found = module.blocks(text)
    assert len(found) >= 4
    for command, body in found:
        assert module.masked(body, command) == module.masked(module.run(command), command), (
            f"docs/guide.md sample `{command}` is stale: run `python docs/gen_samples.py`")
