"""The real step a simulation does not run: fake tensors have shapes and dtypes but check
neither (a float64 batch into a float32 model, bf16 weights fed float32 inputs without
autocast) nor a loss's class indices (a label past the last class), so a simulated ``probe``
or ``check`` answered "fits" for tasks whose first real step fails (review). Where the model
is small enough to build here, one forward, loss and backward on two items, on the CPU and
under the run's precision, says so first.
"""

from __future__ import annotations

import torch

from ..errors import TaskError, one_line
from ..precision import Precision
from ..step import collate, forward_loss
from ..task import Task

REAL_CHECK_MAX_BYTES = 256 * 2**20  # a model with more parameter bytes is not built for real


def model_bytes_on_meta(task: Task) -> int | None:
    """Bytes of the model's parameters and buffers, built on the ``meta`` device (nothing
    allocated); None when it cannot be built there (validation on fake tensors says why)."""
    try:
        with torch.device("meta"):
            model = task.model()
        tensors = [*model.parameters(), *model.buffers()]
    except Exception:  # noqa: BLE001 - reported by the validation on fake tensors
        return None
    return sum(t.numel() * t.element_size() for t in tensors)


def check_real_step(task: Task, precision: Precision = Precision.fp32,
                    max_bytes: int = REAL_CHECK_MAX_BYTES) -> bool:
    """One real forward, loss and backward on two items on the CPU, under ``precision``'s
    autocast, when the model's parameters and buffers take at most ``max_bytes``; TaskError
    in one line when it fails. Returns whether it ran. The caller's RNG is left as it was."""
    nbytes = model_bytes_on_meta(task)
    if nbytes is None or nbytes > max_bytes:
        return False
    n = min(2, len(task.train_data))  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        x, y = collate(task, [task.train_data[i] for i in range(n)])
        try:
            model = task.model()
        except Exception as exc:
            raise TaskError(f"building the model failed: {one_line(exc)}") from exc
        model.train()
        try:
            loss = forward_loss(model, task, x, y, precision)
            loss.backward()
        except Exception as exc:
            raise TaskError(f"a real training step on {n} items fails on the CPU, so the step "
                            f"cannot run at any batch size (a simulation does not check dtypes "
                            f"or class indices): {one_line(exc)}") from exc
    return True
