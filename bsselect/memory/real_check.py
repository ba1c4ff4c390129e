"""The real step a simulation does not run: fake tensors have shapes and dtypes but check
neither (a float64 batch into a float32 model, bf16 weights fed float32 inputs without
autocast) nor a loss's class indices (a label past the last class), so a simulated ``probe``
or ``check`` answered "fits" for tasks whose first real step fails (review). Where the model
is small enough to build here, one forward, loss and backward on two items, on the CPU and
under the run's precision, says so first.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import TaskError, one_line
from ..precision import Precision
from ..step import collate, forward_loss, to_device
from ..task import GRADIENTS_OFF, Task, check_trainable, on_meta

REAL_CHECK_MAX_BYTES = 256 * 2**20  # a model with more parameter bytes is not built for real
REAL_STEP_MAX_BYTES = 2 * 2**30  # nor one whose step on two items takes more (simulated)


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


def _simulated_peak(task: Task, n: int, precision: Precision) -> int | None:
    """The step's peak at ``n`` items by the simulation (framework tensors), or None when it
    cannot run: what the real check would allocate, known before it does (a long context's
    activations: a 78 MiB Llama at 8,192 tokens took 8 GB and 38 s for real; review)."""
    from ..step import StepSettings
    from .simulated import simulate_step_peak

    try:
        return simulate_step_peak(task, n, kernel_workspace=False,
                                  settings=StepSettings(precision)).peak_bytes
    except Exception:  # noqa: BLE001 - the caller's own validation says what is wrong
        return None


def check_real_step(task: Task, precision: Precision | None = None,
                    max_bytes: int = REAL_CHECK_MAX_BYTES,
                    max_step_bytes: int = REAL_STEP_MAX_BYTES) -> bool:
    """One real forward, loss and backward on two items on the CPU, under ``precision``'s
    autocast, when the model's parameters and buffers take at most ``max_bytes`` and the
    step's simulated peak at most ``max_step_bytes`` (where it simulates); TaskError in one
    line when it fails. Returns whether it ran. The caller's RNG is left as it was. A step
    that fails only under the CPU's autocast and runs in fp32 passes: the CPU lacks some
    kernels at half precision (oneDNN's LSTM in fp16) that the run's device has. ``precision``
    None: fp32."""
    precision = precision or Precision.fp32
    nbytes = model_bytes_on_meta(task)
    if nbytes is None or nbytes > max_bytes:
        return False
    # A dataset may give shorter items of the same kind for this check (--hf-config's
    # random tokens at a long --seq-len: ``RandomTokens.real_check_data``).
    shorter = getattr(task.train_data, "real_check_data", None)
    if callable(shorter):
        task = dataclasses.replace(task, train_data=shorter())
    items = _two_items(task.train_data)
    n = len(items)
    peak = _simulated_peak(task, n, precision)
    if peak is not None and peak > max_step_bytes:
        return False
    with torch.random.fork_rng(devices=[]):
        x, y = to_device(collate(task, [task.train_data[i] for i in items]), "cpu")
        try:
            # on the CPU: a copy of a user's instance keeps its device (the Trainer moves
            # its model to the GPU), and the batch is collated here
            model = task.model()
        except Exception as exc:
            raise TaskError(f"building the model failed: {one_line(exc)}") from exc
        if on_meta(model):
            # built without weights on purpose (a large model's config, say): no real step
            # can run, and the simulation answers as it does for a model too large to build
            return False
        model = model.to("cpu")
        model.train()
        check_trainable(model)
        error = _step_error(model, task, x, y, precision)
        if error is not None and precision is not Precision.fp32 and _cpu_lacks_kernel(
                error) and _step_error(model, task, x, y, Precision.fp32) is None:
            # It runs without the CPU's autocast: a kernel the CPU lacks at that precision
            # (oneDNN's LSTM in fp16), not the task's error; the run's device has its own.
            # Only such errors: a dtype mismatch (a custom backward that multiplies a bf16
            # gradient by an fp32 weight) fails on every device, and passed as "fits"
            # because the step ran in fp32 (review).
            error = None
    if error is not None and not torch.is_grad_enabled():
        raise TaskError(GRADIENTS_OFF) from error
    if error is not None:
        raise TaskError(f"a real training step on {n} items fails on the CPU, so the step "
                        f"cannot run at any batch size (a simulation does not check dtypes or "
                        f"class indices): {one_line(error)}") from error
    return True


# What the CPU's kernels say where they lack a reduced precision that a GPU has: ATen's
# dispatch ("... not implemented for 'Half'"), oneDNN ("could not create a primitive
# descriptor for the LSTM forward propagation primitive" in fp16).
_MISSING_KERNEL = ("not implemented for 'half'", "not implemented for 'bfloat16'",
                   "primitive descriptor", "onednn", "mkldnn")


def _cpu_lacks_kernel(error: BaseException) -> bool:
    text = str(error).lower()
    return any(fragment in text for fragment in _MISSING_KERNEL)


PAIR_SCAN_ITEMS = 64  # items read to pick the real check's pair


def _two_items(data: object) -> list[int]:
    """The real check's items: of the first ``PAIR_SCAN_ITEMS``, the smallest then the
    largest (by elements), where sizes differ; else the first two. A random batch of the run
    holds items of different lengths in any order, and a step that needs them sorted
    (``pack_padded_sequence(enforce_sorted=True)`` after a collate that does not sort)
    passed a check of two equal or sorted items and the simulation's largest-first batches
    alike (review)."""
    from .items import item_elements

    n = min(PAIR_SCAN_ITEMS, len(data))  # type: ignore[arg-type]
    if n < 2:
        return list(range(n))
    try:
        sizes = [item_elements(data[i]) for i in range(n)]  # type: ignore[index]
    except Exception:  # noqa: BLE001 - the step's own reading says what is wrong
        return [0, 1]
    small = min(range(n), key=lambda i: (sizes[i], i))
    large = max(range(n), key=lambda i: (sizes[i], -i))
    return [small, large] if sizes[small] < sizes[large] else [0, 1]


def _step_error(model: torch.nn.Module, task: Task, x: object, y: object,
                precision: Precision) -> Exception | None:
    model.zero_grad(set_to_none=True)
    try:
        forward_loss(model, task, x, y, precision).backward()
    except Exception as exc:  # noqa: BLE001 - returned to the caller, which says it
        return exc
    return None
