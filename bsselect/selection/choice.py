"""The pick: predicted time to the target with its uncertainty, the batch sizes tied with the
best, and one stated rule among them. Pure: no torch.

Time to a target is ``T(b) = S_min (1 + B/b) t(b)`` (McCandlish et al. 2018), so in units of
``S_min`` steps the cost of batch size ``b`` is ``(1 + B/b) t(b)``. Both inputs are uncertain:
``t(b)`` has the spread of its timing rounds (``steptime.summarize_rounds``) and ``B`` the
interval of the noise-scale estimate (``noise_interval``). ``B`` is one number shared by every
batch size, so batch sizes are compared within one value of ``B`` at a time; since the cost
ratio of two batch sizes is monotone in ``B``, the interval's two ends suffice.

- **best**: the lowest cost at the point estimates.
- **tied**: ``b`` is tied with the best when, at some ``B`` in the interval, ``b``'s cost at its
  fastest plausible step time is no higher than the best's at its slowest:
  ``(1 + B/b) t_lo(b) <= (1 + B/best) t_hi(best)``. A step time's plausible range is its
  timing rounds' spread widened, where that is narrower, to the run-to-run spread
  (``run_to_run``): the rounds of one process cannot see how much the next run's step times
  differ, and the user's training run is a next run.
- **pick** (the rule): among the tied batch sizes, the one whose worst-case slowdown is
  smallest, the worst case taken over ``B`` in {lo, estimate, hi} against whichever batch
  size is fastest at that ``B`` (minimax regret). With no uncertainty it is the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterable, Mapping

from .noise_math import CONFIDENCE
from .steptime import TimeInterval

Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)

# The sweep times a batch size again in interleaved rounds when its predicted time to the
# target, from its own trial's step time, is within this factor of the fastest's at some B in
# the noise scale's interval (``contenders``). A busy minute during one trial inflates that
# trial's step time; this is how far it may inflate it, relative to the fastest's, before a
# batch size that is really the fastest goes untimed. One busy process on a 2-core machine
# moved trial step times by up to 1.5x (docs/benchmarks-sweep.md).
CONTENDER_FACTOR = 3.0

# How much one batch size's step time, relative to the others', moves between two runs of the
# same sweep on the same machine: the standard deviation of its log. Measured on the
# selection benchmark's tune split (4 tasks, 6 sweeps each, 3 quiet and 3 with a busy process,
# 20 batch sizes): 3.0% (docs/benchmarks-sweep.md, "Ties that hold from run to run"). Five
# interleaved rounds of one process can agree to 0.5% and still miss that by 10x.
RUN_TO_RUN_SD = 0.03


@dataclass(frozen=True)
class NoiseInterval:
    """The noise scale used for ranking: ``value`` with a ``lo``-``hi`` interval (``hi`` may
    be infinite: |G|^2 not distinguishable from zero at its lower bound)."""

    lo: float
    value: float
    hi: float

    def __post_init__(self) -> None:
        if not (0 <= self.lo <= self.value <= self.hi):
            raise ValueError(f"need 0 <= lo <= value <= hi, got {self.lo}, {self.value}, "
                             f"{self.hi}")
        if not (math.isfinite(self.lo) and math.isfinite(self.value)):
            raise ValueError("lo and value must be finite")

    @classmethod
    def exact(cls, value: float) -> "NoiseInterval":
        return cls(value, value, value)


def noise_interval(grad_sq_norm: float, grad_se: float, trace_sigma: float, trace_se: float,
                   z: float = Z) -> NoiseInterval | None:
    """``B = tr(Sigma)/|G|^2`` from the two (pooled) unbiased estimates and their standard
    errors: both ends at once, ``lo = (tr - z se_tr)+ / (|G|^2 + z se_G)`` and
    ``hi = (tr + z se_tr) / (|G|^2 - z se_G)`` (infinite when that denominator is <= 0).
    None when the estimate itself is not positive."""
    if grad_sq_norm <= 0 or trace_sigma <= 0:
        return None
    if grad_se < 0 or trace_se < 0:
        raise ValueError("standard errors must be >= 0")
    value = trace_sigma / grad_sq_norm
    lo = max(trace_sigma - z * trace_se, 0.0) / (grad_sq_norm + z * grad_se)
    denom = grad_sq_norm - z * grad_se
    hi = (trace_sigma + z * trace_se) / denom if denom > 0 else math.inf
    return NoiseInterval(min(lo, value), value, max(hi, value))


def cost(batch_size: int, step_time_s: float, b_noise: float) -> float:
    """``(1 + B/b) t``; at ``B = inf`` the common factor ``B`` is divided out (``t/b``), which
    keeps every comparison and ratio between batch sizes at that ``B`` exact."""
    if math.isinf(b_noise):
        return step_time_s / batch_size
    return (1.0 + b_noise / batch_size) * step_time_s


def predicted(batch_size: int, t: TimeInterval, b_noise: NoiseInterval) -> TimeInterval:
    """``(1 + B/b) t(b)`` with its interval (seconds per S_min steps; hi may be inf)."""
    hi = math.inf if math.isinf(b_noise.hi) else cost(batch_size, t.hi, b_noise.hi)
    return TimeInterval(cost(batch_size, t.lo, b_noise.lo), cost(batch_size, t.mid, b_noise.value),
                        hi)


@dataclass(frozen=True)
class Choice:
    """``best`` (lowest predicted time), ``tied`` (ascending; includes ``best``), ``pick``
    (the rule's choice among ``tied``), each tied size's ``worst_regret`` (its largest
    slowdown against the fastest size over the B scenarios) and every size's ``predicted``
    interval."""

    best: int
    tied: tuple[int, ...]
    pick: int
    worst_regret: dict[int, float]
    predicted: dict[int, TimeInterval]

    RULE = ("among the batch sizes tied with the best, the one with the smallest worst-case "
            "slowdown over the noise scale's interval")


def run_to_run(t: TimeInterval, sd: float = RUN_TO_RUN_SD, z: float = Z) -> TimeInterval:
    """``t`` as a prediction of another run's step time: its interval widened, where it is
    narrower, to ``mid`` times ``exp(-z sd)``-``exp(z sd)`` (the run-to-run spread at the
    reported confidence). ``sd = 0`` leaves ``t`` as it is."""
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite number >= 0, got {sd!r}")
    f = math.exp(z * sd)
    return TimeInterval(min(t.lo, t.mid / f), t.mid, max(t.hi, t.mid * f))


def is_tied(b: int, t_b: TimeInterval, best: int, t_best: TimeInterval,
            b_noise: NoiseInterval) -> bool:
    """Whether ``b`` can be as fast as ``best`` at some ``B`` in the interval."""
    return any(cost(b, t_b.lo, B) <= cost(best, t_best.hi, B)
               for B in (b_noise.lo, b_noise.value, b_noise.hi))


def regret_scenarios(b_noise: NoiseInterval) -> tuple[float, ...]:
    """The values of ``B`` over which the pick's worst-case slowdown is taken."""
    return (b_noise.lo, b_noise.value, b_noise.hi)


def choose(times: Mapping[int, TimeInterval], b_noise: NoiseInterval,
           scenarios: Callable[[NoiseInterval], tuple[float, ...]] = regret_scenarios,
           run_sd: float = RUN_TO_RUN_SD) -> Choice:
    """Best, tied set and pick for step times ``times`` (batch size -> interval, seconds,
    as measured: each is widened by ``run_to_run(t, run_sd)`` here). ``scenarios``: the
    values of ``B`` the pick's worst case is taken over (the default is the rule;
    ``benchmarks/replay_pick_rules.py`` replays others)."""
    if not times:
        raise ValueError("no batch sizes to choose from")
    for b in times:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be ints >= 1, got {b!r}")
    times = {b: run_to_run(t, run_sd) for b, t in times.items()}
    sizes = sorted(times)
    pred = {b: predicted(b, times[b], b_noise) for b in sizes}
    best = min(sizes, key=lambda b: (pred[b].mid, b))
    tied = tuple(b for b in sizes if b == best or is_tied(b, times[b], best, times[best],
                                                          b_noise))
    at = scenarios(b_noise)
    fastest = {B: min(cost(c, times[c].mid, B) for c in sizes) for B in at}
    regret = {b: max(cost(b, times[b].mid, B) / fastest[B] for B in at) for b in tied}
    # Ties in worst-case regret (to rounding): the point estimate's best, then the larger b.
    pick = min(tied, key=lambda b: (round(regret[b], 9), b != best, -b))
    return Choice(best, tied, pick, regret, pred)


def contenders(step_times: Mapping[int, float | None], b_noise: NoiseInterval | None,
               factor: float = CONTENDER_FACTOR) -> tuple[int, ...]:
    """The batch sizes worth timing again (ascending): those whose cost ``(1 + B/b) t(b)``,
    at their own trials' step times ``step_times``, is within ``factor`` of the lowest at
    some ``B`` in the interval (its ends and the estimate). Every size without a usable step
    time is kept (it cannot be judged), and so is every size when there is no ``B`` (the
    ranking then does not predict times) or only two sizes; at least the two cheapest at the
    estimate are kept, since interleaved rounds compare sizes with each other."""
    if not factor >= 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    sizes = sorted(step_times)
    usable = [b for b in sizes if _usable(step_times[b])]
    if b_noise is None or len(sizes) <= 2 or len(usable) < 2:
        return tuple(sizes)
    keep = {b for b in sizes if b not in usable}
    costs = {B: {b: cost(b, step_times[b], B) for b in usable}  # type: ignore[arg-type]
             for B in (b_noise.lo, b_noise.value, b_noise.hi)}
    for at_b in costs.values():
        low = min(at_b.values())
        keep |= {b for b in usable if at_b[b] <= factor * low}
    at_estimate = costs[b_noise.value]
    keep |= set(sorted(usable, key=lambda b: (at_estimate[b], b))[:2])
    return tuple(sorted(keep))


def warm_lower_bounds(step_times: Mapping[int, float | None], cold: Iterable[int]
                      ) -> dict[int, float | None]:
    """``step_times`` for the contender test where the ``cold`` sizes' own are cold (every
    step of a trial of a few steps paid for allocation and kernel selection: 3.4x the rounds'
    time at b=512, and b=2048 left out of the rounds on it, review). A step time does not
    fall as the batch grows, so the largest warm size's time below a cold size is a lower
    bound on its warm time: the cold size takes it where lower, and is left untimed only if
    it cannot be a contender even then."""
    cold = set(cold)
    out = dict(step_times)
    warm = sorted(b for b, t in step_times.items() if b not in cold and _usable(t))
    for b in cold:
        below = [w for w in warm if w < b]
        if below and _usable(out.get(b)):
            out[b] = min(out[b], step_times[below[-1]])  # type: ignore[type-var]
    return out


def _usable(t: float | None) -> bool:
    return t is not None and math.isfinite(t) and t > 0
