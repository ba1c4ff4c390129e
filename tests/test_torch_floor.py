"""pyproject.toml's torch floor is the first release with every ``torch.accelerator`` API that
bsselect calls. This test reads the package's source for those names and resolves each one in
the installed torch, so a call to an API the floor does not cover fails here, on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "bsselect"
FLOOR = (2, 10)
# First release of each API (read from the torch wheels on PyPI: torch/accelerator/*.py).
SINCE = {"memory": (2, 9), "empty_cache": (2, 9), "get_memory_info": (2, 10)}


def _used() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        names |= set(re.findall(r"torch\.accelerator\.([A-Za-z_][\w.]*[A-Za-z_])",
                                path.read_text()))
    return names


def test_every_accelerator_api_the_code_calls_exists():
    used = _used()
    assert {"is_available", "synchronize", "get_memory_info",
            "memory.max_memory_allocated"} <= used  # the scan finds the calls
    for dotted in sorted(used):
        obj = torch.accelerator
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"torch {torch.__version__} has no torch.accelerator.{dotted}"


def test_the_declared_floor_covers_the_newest_api_used():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    floor = tuple(int(v) for v in re.search(r'"torch>=(\d+)\.(\d+)"', pyproject).groups())
    assert floor == FLOOR
    # torch.accelerator itself (is_available, synchronize, ...): 2.6.
    newest = max(SINCE.get(part, (2, 6)) for dotted in _used() for part in dotted.split("."))
    assert newest == floor
