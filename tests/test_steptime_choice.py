"""The constrained step-time fit, the predicted-time interval, the tie set and the pick: pure
functions checked exhaustively on small grids, against independent brute-force solvers."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from bsselect.selection.choice import (RUN_TO_RUN_SD, NoiseInterval, Z, choose, contenders, cost,
                                       is_tied, noise_interval, predicted, run_to_run)
from bsselect.selection.steptime import (CLIFF_TOLERANCE, TimeInterval, pava, physical_fit,
                                         quantile, summarize_rounds)

POW2 = [8, 16, 32, 64, 128, 256, 512]


# --------------------------------------------------------------------------- robust rounds


def test_quantile_matches_numpy():
    rng = random.Random(0)
    for n in range(1, 9):
        values = [rng.uniform(0.1, 2.0) for _ in range(n)]
        for q in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_rounds_slowed_by_load_do_not_move_the_step_time():
    quiet = summarize_rounds([1.0, 1.01, 0.99, 1.0, 1.02])
    loaded = summarize_rounds([1.0, 3.0, 0.99, 2.5, 1.02])  # two rounds hit by another job
    assert loaded.mid == pytest.approx(quiet.mid, rel=0.02)
    assert loaded.lo == quiet.lo == 0.99 and loaded.hi > quiet.hi  # the spread shows it
    for bad in ([], [1.0, 0.0], [1.0, math.nan], [math.inf]):
        with pytest.raises(ValueError):
            summarize_rounds(bad)


def test_time_interval_orders_its_ends():
    with pytest.raises(ValueError):
        TimeInterval(2.0, 1.0, 3.0)
    assert TimeInterval(1.0, 2.0, 4.0).relative == (0.5, 2.0)


# --------------------------------------------------------------------------- PAVA


def _isotonic_reference(y, w):
    """Brute force: the best non-decreasing fit is piecewise constant on blocks of
    consecutive points, each at its weighted mean; try every partition."""
    n = len(y)
    best, best_cost = None, math.inf
    for cuts in itertools.product([0, 1], repeat=n - 1):
        blocks, start = [], 0
        for i, c in enumerate(cuts, start=1):
            if c:
                blocks.append((start, i))
                start = i
        blocks.append((start, n))
        fit = []
        for a, b in blocks:
            m = sum(y[i] * w[i] for i in range(a, b)) / sum(w[a:b])
            fit += [m] * (b - a)
        if all(fit[i] <= fit[i + 1] + 1e-12 for i in range(n - 1)):
            c = sum(w[i] * (fit[i] - y[i]) ** 2 for i in range(n))
            if c < best_cost:
                best, best_cost = fit, c
    return best


def test_pava_equals_the_brute_force_isotonic_fit():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 7)
        y = [rng.uniform(-1, 1) for _ in range(n)]
        w = [rng.uniform(0.2, 3.0) for _ in range(n)]
        assert pava(y, w) == pytest.approx(_isotonic_reference(y, w), abs=1e-9)
        down = pava(y, w, increasing=False)
        assert down == pytest.approx([-v for v in _isotonic_reference([-v for v in y], w)],
                                     abs=1e-9)


# --------------------------------------------------------------------------- physical fit


def _feasible(bs, ts, rel=1e-9):
    for i in range(len(bs) - 1):
        if ts[i + 1] < ts[i] * (1 - rel):
            return False
        if ts[i + 1] / bs[i + 1] > ts[i] / bs[i] * (1 + rel):
            return False
    return True


def _reference_fit(bs, ts, iters=20_000):
    """An independent solver of the same problem: log t = z_1 + sum of increments
    d_j in [0, log(b_{j+1}/b_j)], least squares by accelerated projected gradient (FISTA)."""
    y = np.log(ts)
    n = len(y)
    caps = np.diff(np.log(bs))
    L = np.tril(np.ones((n, n)))  # z = L @ [z1, d_1, ..., d_{n-1}]
    x = np.concatenate([[y.mean()], np.zeros(n - 1)])
    v, t = x.copy(), 1.0
    step = 1.0 / np.linalg.norm(L, 2) ** 2
    for _ in range(iters):
        nxt = v - step * (L.T @ (L @ v - y))
        nxt[1:] = np.clip(nxt[1:], 0.0, caps)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = nxt + (t - 1) / t_next * (nxt - x)
        x, t = nxt, t_next
    return np.exp(L @ x)


def test_physical_fit_matches_an_independent_solver():
    rng = random.Random(2)
    for _ in range(25):
        n = rng.randint(2, 6)
        bs = POW2[:n]
        # Noisy step times around an affine truth, with occasional wild points.
        ts = [(0.01 + 1e-4 * b) * math.exp(rng.gauss(0, 0.4)) for b in bs]
        fit = physical_fit(bs, ts, fastest_s=[t * 1e-3 for t in ts])  # no cliff: both constraints
        assert fit.per_sample_constrained
        assert list(fit.fitted_s) == pytest.approx(list(_reference_fit(bs, ts)), rel=1e-4)


def test_physical_fit_on_an_exhaustive_grid():
    # Every sequence of four step times from a small set: the fit is feasible, leaves a
    # feasible input unchanged, and fitting its own output changes nothing.
    bs = [8, 16, 32, 64]
    levels = [1.0, 1.5, 2.0, 3.0, 5.0]
    for ts in itertools.product(levels, repeat=4):
        fit = physical_fit(bs, list(ts), fastest_s=[t * 1e-3 for t in ts])
        assert _feasible(bs, fit.fitted_s, rel=1e-7), ts
        if _feasible(bs, ts):
            assert list(fit.fitted_s) == pytest.approx(list(ts), rel=1e-9)
        again = physical_fit(bs, list(fit.fitted_s), fastest_s=[t * 1e-3 for t in ts])
        assert list(again.fitted_s) == pytest.approx(list(fit.fitted_s), rel=1e-7)


def test_one_noisy_point_cannot_make_a_larger_batch_cheaper_per_step():
    # Measured under load in the issue: b=256 59 ms, b=512 40 ms; b=256's fastest round
    # (41 ms) shows the 59 ms is noise, not a per-sample cliff.
    bs = [64, 128, 256, 512]
    ts = [0.012, 0.022, 0.059, 0.040]
    fit = physical_fit(bs, ts, fastest_s=[0.012, 0.022, 0.041, 0.040])
    assert fit.at(512) >= fit.at(256) * (1 - 1e-9)
    assert fit.per_sample_constrained and fit.note is None


def test_a_real_per_sample_cliff_is_kept_and_said():
    # b=512: even its fastest round costs 40% more per sample than b=256's step.
    bs = [64, 128, 256, 512]
    ts = [0.010, 0.020, 0.040, 0.112]
    fit = physical_fit(bs, ts, fastest_s=[0.0099, 0.0198, 0.0396, 0.110])
    assert not fit.per_sample_constrained
    assert list(fit.fitted_s) == pytest.approx(ts)  # monotone already: kept as measured
    assert fit.note.startswith("time per sample grows with the batch (b=512")
    # Within the tolerance it is noise, and the per-sample constraint holds.
    small = physical_fit(bs, [0.010, 0.020, 0.040, 0.080 * (1 + CLIFF_TOLERANCE / 2)])
    assert small.per_sample_constrained


def test_physical_fit_rejects_malformed_input():
    for args in (([8, 8], [1.0, 1.0]), ([8, 16], [1.0]), ([0, 16], [1.0, 1.0]),
                 ([8, 16], [1.0, -1.0]), ([8, 16], [1.0, math.nan]), ([8.0, 16], [1.0, 1.0])):
        with pytest.raises(ValueError):
            physical_fit(*args)
    assert physical_fit([], []).fitted_s == ()


def test_physical_fit_accepts_unsorted_input():
    fit = physical_fit([32, 8, 16], [3.0, 1.0, 2.0])
    assert fit.batch_sizes == (8, 16, 32) and list(fit.fitted_s) == pytest.approx([1, 2, 3])


# --------------------------------------------------------------------------- noise interval


def test_noise_interval_both_ends_at_once():
    iv = noise_interval(2.0, 0.5, 100.0, 10.0)
    assert iv.value == pytest.approx(50.0)
    assert iv.lo == pytest.approx((100 - Z * 10) / (2 + Z * 0.5))
    assert iv.hi == pytest.approx((100 + Z * 10) / (2 - Z * 0.5))
    assert noise_interval(1.0, 1.0, 100.0, 0.0).hi == math.inf  # |G|^2 could be 0
    assert noise_interval(1.0, 0.0, 100.0, 1000.0).lo == 0.0
    assert noise_interval(-1.0, 0.1, 100.0, 1.0) is None
    assert noise_interval(1.0, 0.1, -5.0, 1.0) is None
    exact = noise_interval(1.0, 0.0, 30.0, 0.0)
    assert (exact.lo, exact.value, exact.hi) == (30.0, 30.0, 30.0)
    with pytest.raises(ValueError):
        NoiseInterval(5.0, 4.0, 6.0)


# --------------------------------------------------------------------------- choice


def _worlds(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(1, 7)
        sizes = POW2[:n]
        tau_f, tau_d = rng.uniform(1e-3, 0.05), rng.uniform(1e-6, 1e-3)
        times = {}
        for b in sizes:
            mid = (tau_f + tau_d * b) * math.exp(rng.gauss(0, 0.1))
            times[b] = TimeInterval(mid * rng.uniform(0.8, 1.0), mid, mid * rng.uniform(1.0, 1.3))
        value = rng.choice([0.0, rng.uniform(1, 2000)])
        spread = rng.choice([1.0, rng.uniform(1, 4)])
        hi = math.inf if rng.random() < 0.1 else value * spread
        yield times, NoiseInterval(value / spread, value, hi)


def test_without_uncertainty_the_pick_is_the_argmin_of_predicted_time():
    rng = random.Random(3)
    for _ in range(500):
        sizes = POW2[:rng.randint(1, 7)]
        times = {b: TimeInterval(t, t, t) for b in sizes
                 for t in [(0.01 + 1e-4 * b) * math.exp(rng.gauss(0, 0.3))]}
        B = rng.uniform(0, 3000)
        c = choose(times, NoiseInterval.exact(B), run_sd=0.0)
        expected = min(sizes, key=lambda b: ((1 + B / b) * times[b].mid, b))
        assert c.pick == c.best == expected
        assert c.tied == (expected,) or all(
            math.isclose(cost(b, times[b].mid, B), cost(expected, times[expected].mid, B))
            for b in c.tied)


def test_ties_by_brute_force_over_the_noise_interval():
    # The endpoint rule equals a dense scan of B over the interval (the cost ratio of two
    # batch sizes is monotone in B).
    for measured, iv in _worlds(4, 300):
        c = choose(measured, iv)
        times = {b: run_to_run(t) for b, t in measured.items()}  # what choose compares
        hi = iv.hi if math.isfinite(iv.hi) else iv.value * 1e6
        grid = [iv.lo + (hi - iv.lo) * k / 400 for k in range(401)] + [iv.hi]
        for b in times:
            scanned = any(cost(b, times[b].lo, B) <= cost(c.best, times[c.best].hi, B) * (1 + 1e-12)
                          for B in grid)
            assert (b in c.tied) == scanned or b == c.best, (b, c, iv)


def test_run_to_run_widens_only_what_is_narrower_than_the_run_to_run_spread():
    f = math.exp(Z * RUN_TO_RUN_SD)
    tight = run_to_run(TimeInterval(0.999, 1.0, 1.001))
    assert (tight.lo, tight.mid, tight.hi) == pytest.approx((1 / f, 1.0, f))
    assert 1.04 < f < 1.06  # 90% of a 3% log-sd
    wide = TimeInterval(0.5, 1.0, 3.0)
    assert run_to_run(wide) == wide
    assert run_to_run(TimeInterval(0.999, 1.0, 1.001), 0.0) == TimeInterval(0.999, 1.0, 1.001)
    lopsided = run_to_run(TimeInterval(0.7, 1.0, 1.001))
    assert lopsided.lo == 0.7 and lopsided.hi == pytest.approx(f)
    for bad in (-0.01, math.nan, math.inf):
        with pytest.raises(ValueError):
            run_to_run(tight, bad)


def test_rounds_that_agree_closely_do_not_untie_sizes_a_rerun_could_order_the_other_way():
    # Two sizes whose costs differ by 4%: within what moves between two runs of one sweep,
    # though each run's five rounds agreed to 0.2%. Measured tightly, they are tied; with
    # the run-to-run spread switched off they are not.
    times = {256: TimeInterval(0.999, 1.0, 1.001), 512: TimeInterval(1.928, 1.93, 1.932)}
    B = NoiseInterval.exact(3000.0)
    ratio = cost(512, 1.93, 3000.0) / cost(256, 1.0, 3000.0)
    assert 1.0 < ratio < 1.05
    assert choose(times, B).tied == (256, 512)
    assert choose(times, B, run_sd=0.0).tied == (256,)
    # ... and a real difference (15%) stays a difference.
    slower = {256: times[256], 512: TimeInterval(2.198, 2.2, 2.202)}
    assert choose(slower, B).tied == (256,)


def test_pick_is_in_the_tied_set_and_minimises_worst_case_regret():
    for times, iv in _worlds(5, 300):
        c = choose(times, iv)
        assert c.best in c.tied and c.pick in c.tied
        scenarios = (iv.lo, iv.value, iv.hi)
        fastest = {B: min(cost(x, times[x].mid, B) for x in times) for B in scenarios}
        regret = {b: max(cost(b, times[b].mid, B) / fastest[B] for B in scenarios)
                  for b in c.tied}
        assert regret[c.pick] == pytest.approx(min(regret.values()), rel=1e-9)
        assert c.worst_regret == pytest.approx(regret)
        for b, p in c.predicted.items():
            assert p.lo <= p.mid <= p.hi


def test_every_size_that_wins_somewhere_in_the_interval_is_tied():
    for times, iv in _worlds(6, 300):
        c = choose(times, iv)
        for B in (iv.lo, iv.value, iv.hi):
            winner = min(times, key=lambda b: (cost(b, times[b].mid, B), b))
            assert winner in c.tied


def test_wider_uncertainty_never_shrinks_the_tied_set():
    times = {b: TimeInterval(0.95 * (0.01 + 1e-4 * b), 0.01 + 1e-4 * b, 1.05 * (0.01 + 1e-4 * b))
             for b in POW2}
    previous: set[int] = set()
    for spread in (1.0, 1.5, 2.0, 4.0, 8.0, 16.0):
        c = choose(times, NoiseInterval(100 / spread, 100.0, 100 * spread))
        assert previous <= set(c.tied) and c.best == 128
        previous = set(c.tied)
    assert len(previous) >= 6  # at 16x either way, nearly everything is plausible


def test_an_unbounded_noise_scale_compares_per_sample_times():
    times = {8: TimeInterval(1.0, 1.0, 1.0), 16: TimeInterval(1.5, 1.5, 1.5)}
    iv = NoiseInterval(10.0, 20.0, math.inf)
    assert is_tied(16, times[16], 8, times[8], iv)  # per sample: 1.5/16 < 1/8
    p = predicted(16, times[16], iv)
    assert p.hi == math.inf and p.mid == pytest.approx((1 + 20 / 16) * 1.5)


def test_choose_rejects_bad_input():
    with pytest.raises(ValueError):
        choose({}, NoiseInterval.exact(1.0))
    with pytest.raises(ValueError):
        choose({0: TimeInterval(1, 1, 1)}, NoiseInterval.exact(1.0))


# --------------------------------------------------------------------------- contenders


def _contenders_by_brute_force(times: dict[int, float], b: NoiseInterval, factor: float
                               ) -> tuple[int, ...]:
    """The definition, written out: a size is kept if at some B of the interval's ends and
    estimate its cost is within ``factor`` of that B's lowest; then the two cheapest at the
    estimate."""
    keep = set()
    for B in (b.lo, b.value, b.hi):
        costs = {s: (t / s if math.isinf(B) else (1 + B / s) * t) for s, t in times.items()}
        keep |= {s for s, c in costs.items() if c <= factor * min(costs.values())}
    at_value = sorted(times, key=lambda s: ((1 + b.value / s) * times[s], s))
    return tuple(sorted(keep | set(at_value[:2])))


def test_contenders_match_their_definition_on_a_grid():
    sizes = [8, 16, 32, 64, 128]
    rng = random.Random(3)
    for _ in range(3000):
        # Per-sample times falling, flat or rising; noise scales from 0 to unbounded.
        per_sample = rng.choice([0.2, 0.5, 1.0, 1.5])
        times = {s: rng.uniform(0.5, 2.0) * (1e-3 + 1e-4 * s ** per_sample) for s in sizes}
        value = rng.choice([0.0, 1.0, 10.0, 100.0, 1e4])
        b = NoiseInterval(value * rng.choice([1.0, 0.5]), value,
                          rng.choice([value, 2 * value + 1, math.inf]))
        factor = rng.choice([1.0, 1.5, 3.0, 10.0])
        got = contenders(times, b, factor)
        assert got == _contenders_by_brute_force(times, b, factor)
        # The fastest size at every B of the interval is always timed again.
        for B in (b.lo, b.value, b.hi):
            assert min(sizes, key=lambda s: cost(s, times[s], B)) in got


def test_contenders_keep_what_cannot_be_judged():
    b = NoiseInterval.exact(10.0)
    times = {8: 1e-3, 16: 1.9e-3, 32: 4e-3, 64: 1.0}
    assert contenders(times, b) == (8, 16, 32)  # 64 costs ~200x the fastest's
    assert contenders(times, None) == (8, 16, 32, 64)  # no B: no prediction, time them all
    assert contenders({8: 1e-3, 64: 1.0}, b) == (8, 64)  # two sizes: nothing to leave out
    # A size without a usable step time of its own cannot be judged: it is timed.
    assert contenders({**times, 128: None}, b) == (8, 16, 32, 128)
    assert contenders({**times, 128: math.nan, 256: 0.0}, b) == (8, 16, 32, 128, 256)
    # Only one usable time: nothing to compare it with.
    assert contenders({8: 1e-3, 16: None, 32: None}, b) == (8, 16, 32)
    # A factor of 1 keeps exactly the fastest at each B and the two cheapest.
    assert contenders(times, b, factor=1.0) == (8, 16)
    with pytest.raises(ValueError):
        contenders(times, b, factor=0.5)


def test_a_cold_step_time_is_judged_at_its_warm_lower_bound():
    """A trial of a few steps times only cold steps (3.4x the rounds' time, review): its size
    takes the largest warm time below it where lower, so it is left out of the rounds only
    if it cannot be a contender even at that."""
    from bsselect.selection.choice import warm_lower_bounds

    times = {512: 2e-3, 1024: 3.8e-3, 2048: 16.9e-3}
    assert warm_lower_bounds(times, [2048]) == {512: 2e-3, 1024: 3.8e-3, 2048: 3.8e-3}
    assert warm_lower_bounds(times, [1024, 2048]) == {512: 2e-3, 1024: 2e-3, 2048: 2e-3}
    assert warm_lower_bounds(times, []) == times
    assert warm_lower_bounds({8: 1e-3, 16: 5e-4}, [16]) == {8: 1e-3, 16: 5e-4}  # lower kept
    assert warm_lower_bounds({8: 1e-3, 16: None}, [16]) == {8: 1e-3, 16: None}
    assert warm_lower_bounds({8: 1e-3}, [8]) == {8: 1e-3}  # nothing warm below
    b = NoiseInterval(30.0, 50.0, 80.0)
    assert 2048 not in contenders(times, b)  # at its cold time: 7.8x the best, out
    assert 2048 in contenders(warm_lower_bounds(times, [2048]), b)
