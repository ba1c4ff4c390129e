"""bsselect: choose the batch size for training a PyTorch model.

    from bsselect import Task, probe, check, noise_scale, sweep

The functions are ``bsselect.api``'s (docs/api.md); each does what its command does and
returns the result the command renders.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_API = ("probe", "check", "noise_scale", "sweep", "plan_sweep", "SweepPlan", "schedule",
        "resolve_task", "find_batch_size", "fits_batch_size")
__all__ = ["Task", "__version__", *_API]

if TYPE_CHECKING:
    from .api import (SweepPlan, check, find_batch_size, fits_batch_size, noise_scale,
                      plan_sweep, probe, resolve_task, schedule, sweep)
    from .task import Task


def __getattr__(name: str) -> Any:
    # Task and the API pull in torch (~2 s); `bsselect --version` and `--help` should not
    # wait for it.
    if name == "Task":
        from .task import Task

        return Task
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bsselect' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``bsselect.probe``, ``.check``, ``.sweep`` and ``.schedule`` are the API's functions, although
    submodules of the same names exist (``bsselect.probe`` the module holds the method):
    importing a submodule binds it on its package, which would replace the function. The
    submodules stay importable by their full names (``from bsselect.probe import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
