"""Budget, margin and batch-size arithmetic (pure), and the OOM back-off search.

Peak memory of a training step is close to affine in the batch size:
``peak(b) = fixed + per_sample * b`` (parameters, gradients and optimizer state are fixed;
activations scale with b). With a safety ``margin`` the largest batch that fits is
``max_batch = floor((budget * (1 - margin) - fixed) / per_sample)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import DoesNotFitError, UsageError
from .oom import is_oom_error, release_memory
from .units import format_bytes

MIN_FIT_BATCH = 8  # tiny batches are dominated by the optimizer-step peak and bias the slope


@dataclass(frozen=True)
class MemoryFit:
    """Least-squares line ``peak = fixed_bytes + per_sample_bytes * b``."""

    fixed_bytes: float
    per_sample_bytes: float
    residual_bytes: float  # max |peak - fit| over the points used
    fit_batch_sizes: tuple[int, ...]

    def predict(self, batch_size: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * batch_size


def check_margin(margin: float) -> float:
    if not 0.0 <= margin < 1.0:
        raise UsageError(f"--margin must be in [0, 1), got {margin}")
    return margin


def check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise UsageError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    return sizes


def fit_memory(points: Sequence[tuple[int, int]], min_batch: int = MIN_FIT_BATCH) -> MemoryFit:
    """Fit on points with ``b >= min_batch`` (all points if fewer than two qualify)."""
    if len(points) < 2:
        raise UsageError("a memory fit needs peaks at two or more batch sizes")
    used = [(b, p) for b, p in points if b >= min_batch]
    if len({b for b, _ in used}) < 2:
        used = list(points)
    b = np.array([float(b) for b, _ in used])
    p = np.array([float(p) for _, p in used])
    slope, intercept = np.polyfit(b, p, 1)
    residual = float(np.max(np.abs(p - (intercept + slope * b))))
    return MemoryFit(float(intercept), float(slope), residual, tuple(int(x) for x in b))


def usable_bytes(budget_bytes: int, margin: float) -> float:
    return budget_bytes * (1.0 - margin)


def solve_max_batch(budget_bytes: int, margin: float, fit: MemoryFit) -> int:
    """``floor((budget*(1-margin) - fixed) / per_sample)``; raises DoesNotFitError if < 1."""
    usable = usable_bytes(budget_bytes, margin)
    if fit.fixed_bytes >= usable:
        raise DoesNotFitError(
            f"the model alone needs {format_bytes(fit.fixed_bytes)}, budget is "
            f"{format_bytes(budget_bytes)} ({format_bytes(usable)} after the {margin:.0%} margin)"
        )
    if fit.per_sample_bytes <= 0:
        raise DoesNotFitError(
            "measured memory does not grow with the batch size; cannot extrapolate a maximum "
            "(probe larger batch sizes with --batch-sizes)"
        )
    best = math.floor((usable - fit.fixed_bytes) / fit.per_sample_bytes)
    if best < 1:
        raise DoesNotFitError(
            f"not even a batch of 1 fits: it needs {format_bytes(fit.predict(1))}, "
            f"budget is {format_bytes(usable)} after the {margin:.0%} margin"
        )
    return best


def largest_pow2_at_most(n: int) -> int:
    if n < 1:
        raise ValueError("n must be >= 1")
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class SearchStep:
    batch_size: int
    outcome: str  # "ok" | "oom"


@dataclass(frozen=True)
class BackoffResult:
    batch_size: int  # largest batch confirmed to run, 0 if none did
    path: tuple[SearchStep, ...]


def backoff_search(
    run_step: Callable[[int], None], start: int, factor: float = 0.9, max_tries: int = 20
) -> BackoffResult:
    """Run a real step at ``start``; on out-of-memory retry at ``floor(b * factor)``.

    The fit is usually right, so the first try normally succeeds; the geometric back-off
    bounds the extra work when the device holds memory the model did not predict
    (fragmentation, other processes). Non-OOM errors propagate.
    """
    path: list[SearchStep] = []
    b = start
    for _ in range(max_tries):
        if b < 1:
            break
        try:
            run_step(b)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom_error(exc):
                raise
            del exc
            release_memory()
            path.append(SearchStep(b, "oom"))
            b = min(b - 1, math.floor(b * factor))
            continue
        path.append(SearchStep(b, "ok"))
        return BackoffResult(b, tuple(path))
    return BackoffResult(0, tuple(path))
