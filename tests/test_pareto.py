"""The noise scale from steps to common loss levels (bsselect.selection.pareto): pure, so
tested on curves whose true B is known, recorded the way trials record them."""

from __future__ import annotations

import math
import random

import pytest
from conftest import model_loss_curve

from bsselect.selection.pareto import LEVEL_FRACTIONS, MIN_TRIALS, SMOOTHING, steps_to_loss_fit
from bsselect.selection.trial_types import LossPoint, thin_curve


def model_curves(b_noise: float, s_min: float, samples: int, sizes, floor: float = 0.0,
                 start: float = 2.0, thin: bool = True) -> dict[int, list[tuple[int, float]]]:
    """Equal-sample trials on the McCandlish model (``conftest.model_loss_curve``), as the
    (step, loss) pairs ``steps_to_loss_fit`` reads."""
    return {b: [(p.step, p.loss) for p in model_loss_curve(b, b_noise, s_min, samples,
                                                           start=start, floor=floor, thin=thin)]
            for b in sizes}


@pytest.mark.parametrize("b_noise", [4.0, 30.0, 200.0, 1500.0])
def test_recovers_the_noise_scale_of_the_model(b_noise):
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    fit = steps_to_loss_fit(model_curves(b_noise, 20.0, 16384, sizes), start_loss=2.0)
    assert fit.b_noise == pytest.approx(b_noise, rel=0.1)
    assert fit.lo <= fit.b_noise <= fit.hi
    assert len(fit.levels) == len(LEVEL_FRACTIONS)


@pytest.mark.parametrize("samples", [8192, 65536])
def test_random_models_within_tolerance(samples):
    """300 random (B, S_min) on the model, B from 3 to 1,600, at the default budget's size
    and at the largest (65,536 samples: the small batches' curves are thinned 40x): every
    estimate within 15% of the truth. What is left is the smoothing window's bias on the
    curves' curvature; whole steps are interpolated, the update count is the one before
    each step's forward pass, and windows cut short at the ends are not used. (Below S_min
    = 6, where the fastest curve's time scale is within the 9-step window, it reads up to
    25% low.)"""
    rng = random.Random(0)
    sizes = [8, 16, 32, 64, 128, 256, 512]
    for _ in range(300):
        b_noise = 10 ** rng.uniform(0.5, 3.2)
        s_min = rng.uniform(6, 60) * samples / 8192
        fit = steps_to_loss_fit(model_curves(b_noise, s_min, samples, sizes), start_loss=2.0)
        assert fit.b_noise == pytest.approx(b_noise, rel=0.15), (b_noise, s_min)


def test_thinning_does_not_move_the_estimate():
    """The same trials kept whole and thinned to MAX_CURVE_POINTS block means agree."""
    sizes = [8, 16, 32, 64, 128, 256]
    whole = steps_to_loss_fit(model_curves(60.0, 300.0, 65536, sizes, thin=False), 2.0)
    thinned = steps_to_loss_fit(model_curves(60.0, 300.0, 65536, sizes), 2.0)
    assert thinned.b_noise == pytest.approx(whole.b_noise, rel=0.05)
    assert whole.b_noise == pytest.approx(60.0, rel=0.1)


def test_thin_curve_keeps_every_steps_loss_in_a_block_mean():
    curve = [LossPoint(s, 4 * s, 0.1 * s, float(s)) for s in range(1, 1001)]
    thinned = thin_curve(curve, 200)
    assert len(thinned) == 200 and thinned[-1].step == 1000
    assert thinned[0] == LossPoint(5, 20, 0.5, 3.0)  # steps 1..5: mean 3
    assert sum(p.loss for p in thinned) * 5 == sum(p.loss for p in curve)
    with_gap = [p._replace(loss=None) if p.step in (3, 4, 5) else p for p in curve[:400]]
    assert thin_curve(with_gap, 200)[1].loss is None  # steps 3-4: nothing finite
    assert thin_curve(curve[:10], 200) == tuple(curve[:10])


def test_noise_in_the_curves_does_not_break_the_median():
    rng = random.Random(1)
    curves = model_curves(60.0, 15.0, 8192, [8, 16, 32, 64, 128, 256])
    noisy = {b: [(s, loss * (1 + rng.gauss(0, 0.05))) for s, loss in c]
             for b, c in curves.items()}
    fit = steps_to_loss_fit(noisy, start_loss=2.0)
    assert fit.b_noise == pytest.approx(60.0, rel=0.35)


def test_too_few_trials_or_no_progress_gives_no_estimate():
    curves = model_curves(50.0, 10.0, 4096, [8, 16, 32])
    assert steps_to_loss_fit(dict(list(curves.items())[:MIN_TRIALS - 1]), 2.0).b_noise is None
    flat = {b: [(s, 2.0) for s in range(1, 50)] for b in (8, 16, 32, 64)}
    assert steps_to_loss_fit(flat, 2.0) == steps_to_loss_fit({}, 2.0)
    assert steps_to_loss_fit(flat, 2.0).b_noise is None
    assert steps_to_loss_fit(curves, math.nan).b_noise is not None  # the curves' own start


def test_a_level_every_trial_reaches_at_once_measures_nothing():
    """Steps that do not depend on b (slope 0) say nothing about B: no estimate, not B = 0."""
    curves = {b: [(1, 0.1)] + [(s, 0.05) for s in range(2, 40)] for b in (8, 16, 32, 64)}
    fit = steps_to_loss_fit(curves, start_loss=2.0)
    assert fit.b_noise is None
    assert all(level.b_noise is None for level in fit.levels)


def test_crossings_where_the_window_is_cut_short_are_not_used():
    """A level reached within the first half-window is not resolved: the moving average
    there reaches ahead only."""
    curves = model_curves(40.0, 0.5, 2048, [8, 16, 32, 64])
    fit = steps_to_loss_fit(curves, start_loss=2.0)
    for level in fit.levels:
        assert all(s > SMOOTHING // 2 - 1 for _, s in level.steps)  # between 3 and 4 at least


def test_training_losses_above_an_evaluation_start_still_give_levels():
    """With dropout the training-mode curve starts above the evaluation-mode start loss:
    the levels reach up to the curves' own start, so they are still crossed."""
    curves = model_curves(80.0, 20.0, 8192, [8, 16, 32, 64, 128, 256], start=2.0)
    fit = steps_to_loss_fit(curves, start_loss=1.0)
    assert fit.b_noise == pytest.approx(80.0, rel=0.15)


def test_non_finite_losses_are_left_out():
    curves = model_curves(80.0, 20.0, 8192, [8, 16, 32, 64, 128, 256])
    clean = steps_to_loss_fit(curves, 2.0)
    dirty = {b: c[:3] + [(c[3][0], math.nan)] + c[4:] + [(c[-1][0] + 1, math.inf)]
             for b, c in curves.items()}
    fit = steps_to_loss_fit(dirty, 2.0)
    assert fit.b_noise == pytest.approx(clean.b_noise, rel=0.05)


def test_steps_falling_faster_than_one_over_b_give_a_lower_bound():
    """Past perfect scaling: updates to a level ``-2 + 4000/b`` (a negative S_min: a larger
    batch at its scaled lr is *more* sample efficient over the range, as when the base lr has
    headroom). No ``S_min`` to divide by, but ``B`` is beyond every batch measured: each level
    gives the largest batch that reached it, flagged as a bound."""
    sizes = [8, 16, 32, 64, 128, 256, 512]
    fit = steps_to_loss_fit(model_curves(-2000.0, -2.0, 8192, sizes), start_loss=2.0)
    assert fit.bound and all(lv.bound for lv in fit.levels if lv.b_noise is not None)
    for lv in fit.levels:
        assert lv.b_noise == max(b for b, _ in lv.steps)
    assert fit.b_noise == 512


def test_a_model_with_a_finite_noise_scale_is_not_a_bound():
    fit = steps_to_loss_fit(model_curves(30.0, 20.0, 8192, [8, 16, 32, 64, 128]), 2.0)
    assert not fit.bound and fit.b_noise == pytest.approx(30.0, rel=0.1)
    assert not any(lv.bound for lv in fit.levels)


def test_no_trade_off_measured_is_still_no_estimate():
    """Steps that grow with the batch (a negative slope: the larger batch needs more updates)
    say nothing about B: no value, no bound."""
    fit = steps_to_loss_fit(model_curves(-2000.0, 2.0, 8192, [8, 16, 32, 64]), 2.0)
    assert fit.b_noise is None and not fit.bound


def _level(b_noise, bound=False):
    from bsselect.selection.pareto import LevelFit

    return LevelFit(1.0, ((8, 10.0),), b_noise, bound)


@pytest.mark.parametrize("levels, value, bound", [
    ([(40.0, False), (60.0, False)], 50.0, False),            # no bounds: the plain median
    ([(512.0, True)] * 3 + [(1764.0, False)], 512.0, True),   # mostly bounds: "at least 512"
    ([(40.0, False), (60.0, False), (256.0, True), (256.0, True)], 60.0, False),  # no averaging
    ([(40.0, False), (256.0, True), (512.0, True)], 512.0, True),  # on a bound: the largest
    ([(40.0, False), (50.0, False), (256.0, True)], 50.0, False),
])
def test_bound_levels_rank_above_estimates_in_the_median(levels, value, bound):
    from bsselect.selection.pareto import _summary

    fit = _summary(tuple(_level(v, b) for v, b in levels))
    assert (fit.b_noise, fit.bound) == (value, bound)
    assert fit.lo == min(v for v, _ in levels) and fit.hi == max(v for v, _ in levels)
    assert fit.lo <= fit.b_noise <= fit.hi


def test_a_bound_is_the_batch_itself_not_a_float_round_trip():
    fit = steps_to_loss_fit(model_curves(-2000.0, -2.0, 8192, [7, 14, 49, 98]), 2.0)
    assert fit.bound and fit.b_noise in (49.0, 98.0) and float(fit.b_noise).is_integer()
