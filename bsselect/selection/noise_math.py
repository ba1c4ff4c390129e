"""Gradient noise scale from squared gradient norms at two batch sizes: pure math, no model.

Notation (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1):
per-example gradients ``g_i`` of a MEAN-reduced loss over a dataset of ``N`` items, the true
gradient ``G = mean_i g_i``, the per-example covariance
``Sigma = (1/N) sum_i (g_i - G)(g_i - G)^T`` and the simple noise scale
``B_simple = tr(Sigma) / |G|^2`` (a batch size, in examples).

The mean gradient ``g_b`` of ``b`` items drawn without replacement has covariance
``Sigma * c(b)`` with ``c(b) = (N - b) / (b (N - 1))`` (finite population correction;
``c(b) = 1/b`` for ``N -> inf``), so

    E|g_b|^2 = |G|^2 + c(b) tr(Sigma).

Two batch sizes ``s < B`` give two linear equations; their solution is unbiased:

    tr(Sigma) = (E|g_s|^2 - E|g_B|^2) / (c(s) - c(B))
    |G|^2     = (c(s) E|g_B|^2 - c(B) E|g_s|^2) / (c(s) - c(B))

With ``c(b) = 1/b`` these are McCandlish's formulas. The finite-``N`` versions simplify to
``tr_N = tr_inf * (N - 1) / N`` and ``|G|^2_N = |G|^2_inf + tr_inf / N`` (docs/noise.md).

Noise drawn inside the model (dropout masks, independent per example) does not vanish when the
batch is the whole dataset: with ``D`` its per-example trace, ``E|g_b|^2 = |G|^2 + c(b) tr_data
+ D/b``, and the estimators above return ``|G|^2 + D/N`` and ``tr - D/N``. Given unbiased
measurements of ``D`` (``mask_sq``: half the squared difference of two gradients of the same
sub-batch under independent masks, times ``b_small``), ``D/N`` is taken back out of each
measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from ..errors import TaskError, UsageError

CONFIDENCE = 0.90  # two-sided level of every interval reported
BOOTSTRAP_RESAMPLES = 2000
_BOOTSTRAP_CELLS = 2_000_000  # resample indices held in memory at once


@dataclass(frozen=True)
class NoiseEstimate:
    """The simple noise scale at one point in training, with its uncertainty.

    ``grad_sq_norm`` (|G|^2) and ``trace_sigma`` (tr Sigma, per-example covariance) are the
    unbiased estimates, in squared loss-gradient units; either can come out negative when the
    signal is below the noise, which is why ``b_simple`` (examples) is ``None`` unless
    ``resolved``: the lower ``CONFIDENCE`` bound of |G|^2 is above zero. Intervals are
    expanded percentile bootstrap intervals over measurements.
    """

    b_simple: float | None
    grad_sq_norm: float
    trace_sigma: float
    b_small: int
    b_big: int
    measurements: int
    b_simple_ci: tuple[float, float] | None
    resolved: bool
    # Siblings.
    b_simple_lower: float | None  # lower CI bound ("at least"); set even when unresolved
    grad_sq_norm_ci: tuple[float, float]
    trace_sigma_ci: tuple[float, float]
    grad_sq_norm_se: float  # standard error over measurements
    trace_sigma_se: float
    samples: int  # examples whose gradients were used: measurements * b_big
    n_data: int | None  # population size used for the finite-population correction
    confidence: float = CONFIDENCE
    # Active dropout modules found in the model (names), and the per-example trace of the
    # noise their masks add (part of ``trace_sigma``; None when not measured): the estimates
    # above are then corrected for it (docs/noise.md, "Dropout").
    dropout: tuple[str, ...] = ()
    trace_sigma_dropout: float | None = None
    notes: tuple[str, ...] = ()  # what the numbers are, where that is not the plain estimator


def sampling_factor(b: int, n_data: int | None) -> float:
    """``c(b)``: ``E|g_b - G|^2 = c(b) tr(Sigma)`` for ``b`` items drawn without replacement
    from ``n_data`` (``1/b`` for an unlimited stream)."""
    if n_data is None:
        return 1.0 / b
    return (n_data - b) / (b * (n_data - 1))


def check_batch_sizes(b_small: int, b_big: int, n_data: int | None) -> None:
    """Raise UsageError unless ``1 <= b_small < b_big <= n_data``."""
    if b_small < 1:
        raise UsageError(f"b_small must be at least 1, got {b_small}")
    if b_big <= b_small:
        raise UsageError(f"b_big ({b_big}) must be larger than b_small ({b_small})")
    if n_data is not None and n_data < 2:
        raise UsageError(f"the dataset has {n_data} item(s); the noise scale needs at least 2")
    if n_data is not None and b_big > n_data:
        raise UsageError(
            f"b_big ({b_big}) is larger than the dataset ({n_data} items); lower b_big"
        )


def per_measurement(
    small_sq: Sequence[float], big_sq: Sequence[float], b_small: int, b_big: int,
    n_data: int | None = None, mask_trace: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased (|G|^2, tr Sigma) from each measurement's (E|g_small|^2, |g_big|^2) pair.

    The estimators are linear in the norms, so the mean of these arrays equals the estimator
    applied to the averaged norms (docs/method.md, "Fits"), and the arrays can be resampled.
    ``mask_trace``: each measurement's unbiased per-example trace ``D`` of the noise drawn
    inside the model (dropout masks), which the finite population correction must not
    shrink: ``D/N`` is moved from |G|^2 back to tr Sigma (no change without ``n_data``).
    """
    check_batch_sizes(b_small, b_big, n_data)
    e_small = np.asarray(small_sq, dtype=np.float64)
    e_big = np.asarray(big_sq, dtype=np.float64)
    if e_small.shape != e_big.shape or e_small.ndim != 1:
        raise UsageError("small_sq and big_sq must be flat sequences of the same length")
    if not (np.all(np.isfinite(e_small)) and np.all(np.isfinite(e_big))):
        raise TaskError("gradient norms are not finite; the loss or the model output has NaN/inf")
    c_small, c_big = sampling_factor(b_small, n_data), sampling_factor(b_big, n_data)
    gap = c_small - c_big  # > 0 because b_small < b_big
    grad_sq = (c_small * e_big - c_big * e_small) / gap
    trace = (e_small - e_big) / gap
    if mask_trace is not None and n_data is not None:
        d = np.asarray(mask_trace, dtype=np.float64)
        if d.shape != e_small.shape:
            raise UsageError("mask_trace must have one value per measurement")
        if not np.all(np.isfinite(d)):
            raise TaskError("gradient norms are not finite; the loss or the model output has "
                            "NaN/inf")
        grad_sq, trace = grad_sq - d / n_data, trace + d / n_data
    return grad_sq, trace


def weighted_pair(big_sq: float, pieces_sq: float, cross: float, share_sq: float,
                  n_sub: int) -> tuple[float, float]:
    """The equal-weight pair (``|g_small|^2``, ``|g_big|^2``) that gives the same ``|G|^2``
    and ``tr(Sigma)`` as ``n_sub`` sub-batch gradients ``g_i`` with shares ``s_i`` (summing
    to 1), for ``estimate_from_norms``.

    ``big_sq = |ĝ|^2`` with ``ĝ = sum s_i g_i`` (the big batch's gradient), ``pieces_sq =
    sum s_i^2 |g_i|^2``, ``cross = ĝ · sum s_i^2 g_i``, ``share_sq = sum s_i^2``. ``|G|^2``:
    the weighted U-statistic ``(big_sq - pieces_sq) / (1 - share_sq)``, unbiased whatever
    the shares; ``tr(Sigma) / b_big``: the shares' residual spread ``k/(k-1) sum s_i^2 |g_i -
    ĝ|^2``, ``k = n_sub``. With equal shares both are the usual two-batch estimator's, and
    the pair is exactly (mean of ``|g_i|^2``, ``|ĝ|^2``). Reading ``tr`` as ``big_sq -
    |G|^2`` instead (the first version) kept a covariance between a sub-batch's units and its
    gradient along ``G``: +6% on a task of very uneven lengths at any batch size (review).
    Averaging token-mean sub-batches with equal weight (before ``Task.loss_weight``) read
    ``B_simple`` 8% high at ``b_small`` 4 on a padded GPT-2."""
    if not share_sq < 1.0:
        raise TaskError("Task.loss_weight put the whole measurement's weight on one sub-batch: "
                        "nothing to compare it with")
    grad_sq = (big_sq - pieces_sq) / (1.0 - share_sq)
    spread = (pieces_sq - 2.0 * cross + share_sq * big_sq) * n_sub / (n_sub - 1)  # tr / b_big
    return grad_sq + n_sub * spread, grad_sq + spread


def ratio(trace: np.ndarray | float, grad_sq: np.ndarray | float) -> np.ndarray:
    """``B = tr/|G|^2`` with the limits made explicit: +inf when |G|^2 <= 0 (no detectable
    signal: any batch is "small"), 0 when tr <= 0 (no detectable noise)."""
    trace, grad_sq = np.asarray(trace, dtype=np.float64), np.asarray(grad_sq, dtype=np.float64)
    safe = np.where(grad_sq > 0, grad_sq, 1.0)
    return np.where(grad_sq > 0, np.maximum(trace, 0.0) / safe, np.inf)


def bootstrap_means(
    grad_sq: np.ndarray, trace: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``resamples`` bootstrap resamples of the paired measurements.

    Pairs stay together because |g_small|^2 and |g_big|^2 of one measurement share data.
    """
    rng = np.random.default_rng(seed)
    m = len(grad_sq)
    rows = max(1, _BOOTSTRAP_CELLS // m)
    g_out, t_out = [], []
    for start in range(0, resamples, rows):
        idx = rng.integers(0, m, size=(min(rows, resamples - start), m))
        g_out.append(grad_sq[idx].mean(axis=1))
        t_out.append(trace[idx].mean(axis=1))
    return np.concatenate(g_out), np.concatenate(t_out)


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile: exact for 1 and 2 degrees of freedom, else the Cornish-Fisher
    series of Abramowitz & Stegun 26.7.5 (at p = 0.95: error 1e-3 for df = 3, < 1e-4 from 5)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g = [(z**3 + z) / 4,
         (5 * z**5 + 16 * z**3 + 3 * z) / 96,
         (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def expanded_tail(m: int, confidence: float) -> float:
    """Lower-tail probability for an expanded percentile bootstrap interval (Hesterberg 2015):
    ``Phi(-sqrt(m/(m-1)) t_{m-1})`` instead of ``(1-confidence)/2``, which undoes the plain
    percentile interval's narrowness with few measurements (docs/noise.md: coverage)."""
    t = t_quantile(1 - (1 - confidence) / 2, m - 1)
    return NormalDist().cdf(-math.sqrt(m / (m - 1)) * t)


def _quantiles(values: np.ndarray, tail: float) -> tuple[float, float]:
    # inverted_cdf picks real order statistics, so an interval never interpolates into inf.
    lo, hi = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def estimate_from_norms(
    small_sq: Sequence[float], big_sq: Sequence[float], b_small: int, b_big: int,
    n_data: int | None = None, *, seed: int = 0, mask_trace: Sequence[float] | None = None,
    dropout: Sequence[str] = (), notes: Sequence[str] = (),
) -> NoiseEstimate:
    """B_simple from ``m`` paired measurements of squared gradient norms.

    ``small_sq[j]``: mean of |g|^2 over the sub-batches of size ``b_small`` in measurement j;
    ``big_sq[j]``: |g|^2 of a batch of ``b_big`` (in ``measure_grad_norms``, the union of those
    sub-batches). ``n_data``: dataset size when batches are drawn without replacement from it
    (finite population correction), ``None`` for an unlimited stream. |G|^2 and tr Sigma are
    averaged separately over the measurements, then divided; ``seed`` drives the bootstrap.
    ``mask_trace``: per measurement, the per-example trace of in-model (dropout) noise
    (``per_measurement``); ``dropout`` and ``notes`` are carried into the estimate.
    """
    grad_sq, trace = per_measurement(small_sq, big_sq, b_small, b_big, n_data, mask_trace)
    m = len(grad_sq)
    if m < 2:
        raise UsageError(f"need at least 2 measurements for an interval, got {m}")
    g_boot, t_boot = bootstrap_means(grad_sq, trace, seed)
    b_boot = ratio(t_boot, g_boot)
    grad_mean, trace_mean = float(grad_sq.mean()), float(trace.mean())
    tail = expanded_tail(m, CONFIDENCE)
    b_lo, b_hi = _quantiles(b_boot, tail)
    g_ci = _quantiles(g_boot, tail)
    resolved = grad_mean > 0 and g_ci[0] > 0
    return NoiseEstimate(
        b_simple=float(ratio(trace_mean, grad_mean)) if resolved else None,
        grad_sq_norm=grad_mean,
        trace_sigma=trace_mean,
        b_small=b_small,
        b_big=b_big,
        measurements=m,
        b_simple_ci=(b_lo, b_hi) if resolved else None,
        resolved=resolved,
        b_simple_lower=_finite_or_none(b_lo),
        grad_sq_norm_ci=g_ci,
        trace_sigma_ci=_quantiles(t_boot, tail),
        grad_sq_norm_se=float(grad_sq.std(ddof=1) / math.sqrt(m)),
        trace_sigma_se=float(trace.std(ddof=1) / math.sqrt(m)),
        samples=m * b_big,
        n_data=n_data,
        dropout=tuple(dropout),
        trace_sigma_dropout=(None if mask_trace is None
                             else float(np.mean(np.asarray(mask_trace, dtype=np.float64)))),
        notes=tuple(notes),
    )
