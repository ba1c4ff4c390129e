"""bsselect: choose the batch size for training a PyTorch model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Task", "__version__"]

if TYPE_CHECKING:
    from .task import Task


def __getattr__(name: str) -> Any:
    # Task pulls in torch (~2 s); `bsselect --version` and `--help` should not wait for it.
    if name == "Task":
        from .task import Task

        return Task
    raise AttributeError(f"module 'bsselect' has no attribute {name!r}")
