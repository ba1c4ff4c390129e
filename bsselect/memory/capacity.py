"""Budget, margin and batch-size arithmetic (pure), and the OOM back-off search.

Peak memory of a training step is close to affine in the batch size:
``peak(b) = fixed + per_sample * b`` (parameters, gradients and optimizer state are fixed;
activations scale with b). With a safety ``margin`` the largest batch that fits is
``max_batch = floor((budget * (1 - margin) - fixed) / per_sample)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import DoesNotFitError, UsageError, first_line
from ..oom import is_oom_error, release_memory
from ..units import format_bytes, format_percent

MIN_FIT_BATCH = 8  # tiny batches are dominated by the optimizer-step peak and bias the slope


@dataclass(frozen=True)
class MemoryFit:
    """Line ``peak = fixed_bytes + per_sample_bytes * b``: least squares, raised to lie on or
    above every point when the peaks are not linear in b (``CURVED``)."""

    fixed_bytes: float
    per_sample_bytes: float
    residual_bytes: float  # max |peak - fit| over the points used
    fit_batch_sizes: tuple[int, ...]
    # The least-squares line's largest error relative to a point's peak, and where
    max_error_frac: float = 0.0
    max_error_batch: int | None = None
    raised_bytes: float = 0.0  # how far the line was raised (0: linear peaks)

    @property
    def curved(self) -> bool:
        return self.max_error_frac > CURVED

    def predict(self, batch_size: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * batch_size


CURVED = 0.01  # a line more than 1% off a measured peak does not describe the peaks


def check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) \
            or not 0.0 <= margin < 1.0:
        raise UsageError(f"--margin must be in [0, 1), got {margin!r}")
    return float(margin)


# No batch holds more samples than this (2**31 - 1): larger is a typo, and would overflow
# the indexing of the batch itself.
MAX_BATCH_SIZE = 2**31 - 1


def check_batch_sizes(batch_sizes: Sequence[int], option: str = "batch sizes") -> list[int]:
    """``batch_sizes`` sorted without repeats; UsageError unless each is an int in
    [1, MAX_BATCH_SIZE] (``option`` names them in the message)."""
    if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__"):
        raise UsageError(f"{option} must be a list of integers, got {batch_sizes!r}")
    batch_sizes = list(batch_sizes)  # read once: a generator is used up by a second pass
    if any(isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in batch_sizes):
        raise UsageError(f"{option} must be a list of integers, got {batch_sizes!r}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_BATCH_SIZE:
        raise UsageError(f"{option} must be integers from 1 to {MAX_BATCH_SIZE:,}, got "
                         f"{list(batch_sizes)}")
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
    errors = np.abs(p - (intercept + slope * b)) / np.maximum(p, 1.0)
    worst = int(np.argmax(errors))
    raised = 0.0
    if errors[worst] > CURVED:
        # Variable-length items (the worst-case batch takes the longest first) or a peak
        # that changes phase: a line cannot follow them. Never let it read low at a point.
        raised = float(np.max(p - (intercept + slope * b)))
        intercept += raised
    residual = float(np.max(np.abs(p - (intercept + slope * b))))
    return MemoryFit(float(intercept), float(slope), residual, tuple(int(x) for x in b),
                     float(errors[worst]), int(b[worst]), raised)


def usable_bytes(budget_bytes: int, margin: float) -> float:
    return budget_bytes * (1.0 - margin)


def solve_max_batch(budget_bytes: int, margin: float, fit: MemoryFit) -> int:
    """``floor((budget*(1-margin) - fixed) / per_sample)``; raises DoesNotFitError if < 1."""
    usable = usable_bytes(budget_bytes, margin)
    if usable < 1:  # not a batch that does not fit: a margin that leaves no budget at all
        raise UsageError(f"--margin {margin!r} leaves {usable:.3g} bytes of the "
                         f"{format_bytes(budget_bytes)} budget, less than one byte: nothing "
                         "can fit; give a margin well below 1 (the default is 0.2)")
    if fit.fixed_bytes >= usable:
        raise DoesNotFitError(
            f"the fixed memory alone needs {format_bytes(fit.fixed_bytes)} (what every batch "
            "size needs: the model, its gradients and optimizer state, and on a CUDA target the "
            f"context and workspaces), budget is {format_bytes(budget_bytes)} "
            f"({format_bytes(usable)} after the {format_percent(margin)} margin)"
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
            f"budget is {format_bytes(usable)} after the {format_percent(margin)} margin"
        )
    return best


def largest_pow2_at_most(n: int) -> int:
    if n < 1:
        raise ValueError("n must be >= 1")
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class SearchStep:
    batch_size: int
    outcome: str  # "ok" | "oom" (the device refused) | "over" (ran, but above the budget)
    #               | "unsimulated" (the simulation cannot run this batch: RefineResult.stop)
    peak_bytes: int | None = None


@dataclass(frozen=True)
class RefineResult:
    batch_size: int  # largest batch measured to fit, 0 if none did
    path: tuple[SearchStep, ...]
    # The bracket closed (the next batch did not fit, or less than one sample's memory was
    # left); False: ``max_tries`` ran out first and ``batch_size`` is a checked lower bound.
    exact: bool = True
    # Why a batch above ``batch_size`` could not be simulated (``stops``), in one line; the
    # answer is then a lower bound.
    stop: str | None = None

SIMULATED_TRIES = 96  # simulations per search: enough to close any bracket below 2**40


def refine_max_batch(
    measure: Callable[[int], int], usable_bytes: float, known: Sequence[tuple[int, int]],
    first_guess: int, max_tries: int = 12, max_jump: int = 8, ceiling: int | None = None,
    stops: tuple[type[BaseException], ...] = (),
) -> RefineResult:
    """The largest batch whose measured peak fits ``usable_bytes``, starting from the line's
    answer ``first_guess``.

    Peak memory is only piecewise linear in b (which moment of the step is the peak changes
    as b grows, e.g. from the optimizer step to the backward), so the fitted line can be off
    either way. Keep a bracket (largest batch known to fit, smallest known not to), guess
    from the line through the two largest batches that fit, bisect when the guess leaves the
    bracket, never jump more than ``max_jump`` x past a fitting batch, and stop when less
    than one more sample's memory is left. ``measure(b)`` returns peak bytes or raises an
    out-of-memory error (any backend); ``known`` are the probe's already measured points.
    ``ceiling``: no batch above it is tried (real steps past the training set's size answer
    nobody's question and can take minutes to collate). ``stops``: errors of ``measure``
    that end the bracket from above like a batch that does not fit, and make the answer a
    lower bound (a simulation that cannot run a batch far larger than the one asked about).
    """
    fits = sorted((b, p) for b, p in known if p <= usable_bytes)
    fail = min((b for b, p in known if p > usable_bytes), default=None)
    if ceiling is not None and (fail is None or fail > ceiling + 1):
        fail = ceiling + 1  # as if it did not fit
    best = fits[-1][0] if fits else 0
    path: list[SearchStep] = []
    guess = _clamp(first_guess, best, fail, max_jump)
    if ceiling is not None and first_guess >= ceiling and best < ceiling:
        guess = _clamp(ceiling, best, fail, max_jump)  # the line says the data limits it
    if guess is None:  # the line undershoots a probed batch that fitted: search from there
        guess = _next_guess(fits, usable_bytes, best, fail, max_jump)
    overs_in_a_row = 0
    stop, unsimulated = None, False  # unsimulated: the bracket's upper end could not run
    for _ in range(max_tries):
        if guess is None:
            break
        peak = None
        try:
            peak = measure(guess)
        except stops as exc:
            stop = first_line(exc) or type(exc).__name__
            path.append(SearchStep(guess, "unsimulated"))
            fail, unsimulated = guess, True  # the bracket's upper end, as if over
            # A lower bound within 2x of where the simulation stops is answer enough: each
            # try at the edge costs a whole simulation.
            guess = (None if best and fail <= 2 * best else
                     _next_guess(sorted(fits), usable_bytes, best, fail, max_jump))
            continue
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom_error(exc):
                raise
        if peak is None:
            # Released here, not in the except block: there the exception's frames still
            # hold the failed step's tensors.
            release_memory()
            path.append(SearchStep(guess, "oom"))
            fail, unsimulated = guess, False
            overs_in_a_row += 1
        else:
            fitted = peak <= usable_bytes
            path.append(SearchStep(guess, "ok" if fitted else "over", peak))
            if fitted:
                fits.append((guess, peak))
                best = guess
                overs_in_a_row = 0
            else:
                fail, unsimulated = guess, False
                overs_in_a_row += 1
        # Just over the budget with a measured peak: interpolate inside the bracket (the
        # peak between the largest fitting batch and this one is nearly a line); twice over
        # in a row, the peak is not a line there (a cliff): bisect.
        last = path[-1]
        between = last.peak_bytes if overs_in_a_row == 1 and last.outcome == "over" else None
        guess = _next_guess(sorted(fits), usable_bytes, best, fail, max_jump,
                            ceiling if ceiling is not None and fail == ceiling + 1 else None,
                            between)
    # Closed next to a batch that ran and did not fit: exact, whatever stopped above it.
    return RefineResult(best, tuple(path), exact=guess is None and not unsimulated,
                        stop=stop if unsimulated else None)


def _clamp(guess: int, best: int, fail: int | None, max_jump: int) -> int | None:
    """``guess`` kept strictly inside the bracket (best, fail); None when it is closed."""
    if best > 0:
        guess = min(guess, best * max_jump)
    if fail is not None and guess >= fail:
        guess = (best + fail) // 2
    return guess if guess > best and guess >= 1 and (fail is None or guess < fail) else None


def _next_guess(fits: list[tuple[int, int]], usable: float, best: int, fail: int | None,
                max_jump: int, ceiling: int | None = None,
                fail_peak: int | None = None) -> int | None:
    """The next batch to measure. ``ceiling``: the bracket's upper end is the data limit,
    not a failure; when the line reaches it, try the limit itself rather than bisect
    towards it (a GPU run crept 12 real steps towards 7,026 training items). ``fail_peak``:
    the peak measured at ``fail``, just over the budget: the guess is read off the line
    between the largest fitting batch and it (at least one past the fitting batch, so the
    bracket closes when the line says nothing larger fits)."""
    if fail_peak is not None and fail is not None and fits and fits[-1][0] == best:
        slope = (fail_peak - fits[-1][1]) / (fail - best)
        if slope > 0:
            room = math.floor((usable - fits[-1][1]) / slope)
            return _clamp(best + max(room, 1), best, fail, max_jump)
    if len(fits) >= 2 and fits[-1][0] > fits[-2][0]:
        (b1, p1), (b2, p2) = fits[-2], fits[-1]
        slope = (p2 - p1) / (b2 - b1)
        if slope > 0:
            room = math.floor((usable - p2) / slope)
            # Less than one more sample's memory left by the line: the next batch is still
            # measured, so the answer is the bracket's, not the line's (the peak is only
            # piecewise linear in b).
            guess = b2 + max(room, 1)
            if ceiling is not None and guess >= ceiling:
                guess = ceiling
            return _clamp(guess, best, fail, max_jump)
    if best == 0:  # nothing fits yet: halve towards 1
        return _clamp(fail // 2, 0, fail, max_jump) if fail and fail > 1 else None
    return _clamp(best * 2 if fail is None else (best + fail) // 2, best, fail, max_jump)
