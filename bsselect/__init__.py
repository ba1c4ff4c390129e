"""bsselect: choose the batch size for training a PyTorch model.

    from bsselect import Task, probe, check, noise_scale, sweep

The functions are ``bsselect.api``'s (docs/api.md); each does what its command does and
returns the result the command renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_API = ("probe", "check", "noise_scale", "sweep", "plan_sweep", "SweepPlan", "schedule",
        "resolve_task", "find_batch_size", "fits_batch_size")
__all__ = ["GradientNoiseMonitor", "Task", "__version__", *_API, "BsselectError", "UsageError",
           "TaskError", "DoesNotFitError"]

# the error family (docs/api.md, "Errors"): light, so imported here
from .errors import BsselectError, DoesNotFitError, TaskError, UsageError  # noqa: E402

if TYPE_CHECKING:
    from .api import (SweepPlan, check, find_batch_size, fits_batch_size, noise_scale, plan_sweep,
                      probe, resolve_task, schedule, sweep)
    from .selection.noise_monitor import GradientNoiseMonitor
    from .task import Task


def __getattr__(name: str) -> Any:
    # Task and the API pull in torch (~2 s); `bsselect --version` and `--help` should not
    # wait for it.
    if name == "Task":
        from .task import Task

        return Task
    if name == "GradientNoiseMonitor":
        from .selection.noise_monitor import GradientNoiseMonitor

        return GradientNoiseMonitor
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bsselect' has no attribute {name!r}")
