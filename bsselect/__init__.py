"""bsselect: choose the batch size for training a PyTorch model."""

from .task import Task

__version__ = "0.1.0"
__all__ = ["Task", "__version__"]
