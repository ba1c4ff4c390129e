"""Regenerate the sample outputs in docs/guide.md by running their commands.

    python docs/gen_samples.py            # rewrite every ```text block that starts with "$ bsselect"
    python docs/gen_samples.py --check    # exit 1 if a block no longer matches its command

Each block's first line is the command; the rest is what it prints at 100 columns (stderr's
lines first, as a terminal shows them before the results; progress bars are transient and not
shown). ``--check`` (and tests/test_docs.py) compares the blocks with every number masked, so
that timings and measured values may move but the wording, the layout and the rows may not.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

GUIDE = Path(__file__).resolve().parent / "guide.md"
BLOCK = re.compile(r"```text\n(\$ bsselect [^\n]*)\n(.*?)```", re.S)
NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e[+-]?\d+)?")
# Commands whose output depends on timing (the sweep's ranking and tied set, the schedule's
# fastest batches and stages): only the lines up to the table's header are compared.
# Where a command's timing-dependent part begins: the first line of its table's header (as it
# prints at 100 columns, where the schedule's header wraps, or wider). Rows and plans below it
# follow the machine's step times (the schedule's "fastest b"), so they are not compared.
TIMED = {"bsselect sweep": ("# batch",),
         "bsselect schedule": ("samples train loss", "train critical fastest")}


def run(command: str) -> str:
    """What ``command`` prints, stderr first, in a fresh folder (no journals left behind)."""
    args = shlex.split(command.removeprefix("$ "))
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "bsselect", *args[1:]], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=600)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    text = "\n".join(err + proc.stdout.rstrip("\n").splitlines())
    if proc.returncode:
        text += f"\nexit {proc.returncode}"
    return text + "\n"


def masked(text: str, command: str) -> list[str]:
    lines = [" ".join(NUMBER.sub("#", line).split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    for prefix, header in TIMED.items():
        if command.removeprefix("$ ").startswith(prefix):
            end = next((i for i, line in enumerate(lines) if line.startswith(header)),
                       len(lines))
            lines = lines[: end + 1]
    return lines


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def main() -> int:
    text = GUIDE.read_text()
    if "--check" in sys.argv[1:]:
        stale = [cmd for cmd, body in blocks(text) if masked(body, cmd) != masked(run(cmd), cmd)]
        for cmd in stale:
            print(f"stale sample: {cmd}")
        return 1 if stale else 0
    new = BLOCK.sub(lambda m: f"```text\n{m.group(1)}\n{run(m.group(1))}```", text)
    GUIDE.write_text(new)
    print(f"wrote {GUIDE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
