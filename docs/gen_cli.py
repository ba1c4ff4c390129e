"""Regenerate docs/cli.md from the CLI's own --help (tests/test_docs.py fails when stale).

    python docs/gen_cli.py
"""

from __future__ import annotations

import os
from pathlib import Path

COMMANDS = ["", "probe", "sweep", "noise", "schedule", "check", "report", "examples", "presets"]
OUT = Path(__file__).with_name("cli.md")


def render() -> str:
    os.environ.update(COLUMNS="100", NO_COLOR="1", TERM="dumb")
    from typer.testing import CliRunner

    from bsselect.cli import app

    runner = CliRunner()
    parts = ["# CLI reference\n",
             "Generated from `--help` by `python docs/gen_cli.py`; a test keeps it current.\n",
             "Exit codes: 0 success (check: fits) · 1 the task or run failed · 2 usage error · "
             "3 does not fit / nothing fits · 130 interrupted (sweep and schedule keep their "
             "finished trials in the journal).\n"]
    for cmd in COMMANDS:
        args = [cmd, "--help"] if cmd else ["--help"]
        result = runner.invoke(app, args, env={"COLUMNS": "100", "NO_COLOR": "1"},
                               prog_name="bsselect")
        text = "\n".join(line.rstrip() for line in result.output.splitlines()).strip("\n")
        parts.append(f"## `bsselect {cmd}`\n\n```text\n{text}\n```\n" if cmd else
                     f"## `bsselect`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
