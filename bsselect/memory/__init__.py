"""What fits: the peak memory of one training step and the largest batch under a budget.

``probe`` (measure or simulate the peak at a few batch sizes, fit, solve), ``capacity`` (the
budget/margin arithmetic and the OOM back-off search), ``simulated`` (fake tensors, no
allocation), ``cpu_truth`` (the real CPU allocator), ``measured`` (accelerator statistics),
``targets`` (CUDA terms a CPU simulation cannot see), ``sharded`` (FSDP2 on a fake process
group), ``inputs`` (which items make the worst-case batch), ``items`` (reading a dataset's
items), ``orderings`` (orderings by the items' integer values, where memory follows them).

The step's simulators are re-exported lazily: ``targets`` and ``capacity`` are pure and are
imported by ``bsselect presets`` and ``--help``, which should not wait for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Phase", "StepPeak", "cpu_step_peak", "simulate_step_peak"]


def __getattr__(name: str) -> Any:
    if name == "cpu_step_peak":
        from .cpu_truth import cpu_step_peak

        return cpu_step_peak
    if name in ("Phase", "StepPeak", "simulate_step_peak"):
        from . import simulated

        return getattr(simulated, name)
    raise AttributeError(f"module 'bsselect.memory' has no attribute {name!r}")
