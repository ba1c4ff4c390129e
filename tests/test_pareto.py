"""The noise scale from steps to common loss levels (bsselect.selection.pareto): pure, so
tested on curves whose true B is known."""

from __future__ import annotations

import math
import random

import pytest

from bsselect.selection.pareto import LEVEL_FRACTIONS, MIN_TRIALS, SMOOTHING, steps_to_loss_fit


def model_curves(b_noise: float, s_min: float, samples: int, sizes, floor: float = 0.0,
                 start: float = 2.0) -> dict[int, list[tuple[int, float]]]:
    """Equal-sample trials on the McCandlish model: batch b needs ``S_min (1 + B/b)`` steps
    for what ``S_min`` steps do at an infinite batch, so its loss at step s is the same
    function of ``s / (1 + B/b)`` for every b."""
    out = {}
    for b in sizes:
        scale = s_min * (1 + b_noise / b)
        out[b] = [(s, floor + (start - floor) * math.exp(-s / scale))
                  for s in range(1, samples // b + 1)]
    return out


@pytest.mark.parametrize("b_noise", [4.0, 30.0, 200.0, 1500.0])
def test_recovers_the_noise_scale_of_the_model(b_noise):
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    fit = steps_to_loss_fit(model_curves(b_noise, 20.0, 16384, sizes), start_loss=2.0)
    assert fit.b_noise == pytest.approx(b_noise, rel=0.1)
    assert fit.lo <= fit.b_noise <= fit.hi
    assert len(fit.levels) == len(LEVEL_FRACTIONS)


def test_random_models_within_tolerance():
    """300 random (B, S_min) on the model, B from 3 to 1,600: every estimate within 15% of
    the truth (the smoothing window's bias on the curves' curvature is what is left; whole
    steps are interpolated, and crossings inside the first half-window are not used)."""
    rng = random.Random(0)
    sizes = [8, 16, 32, 64, 128, 256, 512]
    for _ in range(300):
        b_noise = 10 ** rng.uniform(0.5, 3.2)
        s_min = rng.uniform(5, 60)
        fit = steps_to_loss_fit(model_curves(b_noise, s_min, 8192, sizes), start_loss=2.0)
        assert fit.b_noise == pytest.approx(b_noise, rel=0.15), (b_noise, s_min)


def test_crossings_in_the_first_half_window_are_not_used():
    """A level reached at once is not resolved: the truncated moving average at the start
    of a curve reaches ahead only."""
    curves = model_curves(40.0, 0.5, 2048, [8, 16, 32, 64])
    fit = steps_to_loss_fit(curves, start_loss=2.0)
    first = {b: c[0][0] for b, c in curves.items()}
    for level in fit.levels:
        assert all(s > first[b] + SMOOTHING // 2 - 1 for b, s in level.steps)


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


def test_a_level_every_trial_reaches_at_once_measures_nothing():
    """Steps that do not depend on b (slope 0) say nothing about B: no estimate, not B = 0."""
    curves = {b: [(1, 0.1)] + [(s, 0.05) for s in range(2, 40)] for b in (8, 16, 32, 64)}
    fit = steps_to_loss_fit(curves, start_loss=2.0)
    assert fit.b_noise is None
    assert all(level.b_noise is None for level in fit.levels)
