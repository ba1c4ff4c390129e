import math

import pytest
import torch

from bsselect.errors import DoesNotFitError, UsageError
from bsselect.memory.capacity import (MemoryFit, SearchStep, fit_memory, largest_pow2_at_most,
                                      refine_max_batch, solve_max_batch)
from bsselect.oom import is_oom_error
from bsselect.units import format_bytes, parse_size


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20),
    ("1048576", 2**20), ("8e9", 8 * 10**9), (17179869184, 16 * 2**30), ("1000B", 1000),
    ("1.5G", int(1.5 * 2**30)), ("80 gib", 80 * 2**30), ("2tb", 2 * 10**12), ("100B", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-3GB", "0", "1e", "8", 12, "1000",
                                  "1e30", "2048TiB", None, True, [8]])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_size_says_what_a_bare_number_would_mean():
    with pytest.raises(UsageError, match=r"memory size '8' has no unit, which would mean 8 "
                                         r"bytes; write 8GiB or 8GB \(or 8B if you mean bytes\)"):
        parse_size("8")
    with pytest.raises(UsageError, match=r"'1e30' is .* more than any device"):
        parse_size("1e30")


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3 GiB"


def test_fit_ignores_tiny_batches_and_recovers_line():
    pts = [(1, 5000), (2, 5200)] + [(b, 1000 + 37 * b) for b in (8, 16, 32, 64)]
    fit = fit_memory(pts)
    assert fit.fit_batch_sizes == (8, 16, 32, 64)
    assert math.isclose(fit.fixed_bytes, 1000, abs_tol=1e-6)
    assert math.isclose(fit.per_sample_bytes, 37, abs_tol=1e-9)
    assert fit.residual_bytes < 1e-6


def test_solve_max_batch_exact_arithmetic():
    fit = MemoryFit(1000.0, 10.0, 0.0, (8, 16))
    # usable = 10_000 * 0.8 = 8000; (8000 - 1000) / 10 = 700
    assert solve_max_batch(10_000, 0.2, fit) == 700
    assert solve_max_batch(10_000, 0.0, fit) == 900
    assert largest_pow2_at_most(700) == 512
    assert largest_pow2_at_most(512) == 512
    assert largest_pow2_at_most(1) == 1


def test_solve_max_batch_model_alone_too_big():
    fit = MemoryFit(9000.0, 10.0, 0.0, (8, 16))
    with pytest.raises(DoesNotFitError, match="the fixed memory alone needs"):
        solve_max_batch(10_000, 0.2, fit)


def piecewise_peak(b):
    """1000 B + 10 B/sample up to b=300, then 30 B/sample: a line fitted on small batches
    overshoots, as when the peak moves from the optimizer step to the backward."""
    return 1000 + 10 * b if b <= 300 else 4000 + 30 * (b - 300)


PROBED = [(b, piecewise_peak(b)) for b in (8, 16, 32, 64, 128)]


def test_refine_exact_path_when_the_line_overshoots():
    # over at 900: the next guess is read off the line between 128 (fits) and 900 (its
    # measured peak), not the bracket's midpoint; five measurements where bisection took six
    result = refine_max_batch(piecewise_peak, 10_000, PROBED, first_guess=900)
    assert [(s.batch_size, s.outcome) for s in result.path] == [
        (900, "over"), (430, "ok"), (542, "over"), (500, "ok"), (501, "over")]
    assert result.batch_size == 500 == max(b for b in range(1, 2000) if piecewise_peak(b) <= 10_000)
    assert result.path[1] == SearchStep(430, "ok", piecewise_peak(430)) and result.exact


def test_refine_closes_a_small_bracket_by_interpolation():
    """A 70B model over 512 ranks: batch 1 fits, 16 does not, the line's 8 does not; the
    line between 1 and 8 says 2 is over, so 2 is measured and the bracket closes (bisection
    measured 8, 4, 2)."""
    peak = lambda b: 37e9 + 3.5e9 * b**1.3  # noqa: E731
    known = [(1, peak(1)), (16, peak(16))]
    result = refine_max_batch(peak, 41e9, known, first_guess=8, max_jump=2**40)
    assert [(s.batch_size, s.outcome) for s in result.path] == [(8, "over"), (2, "over")]
    assert result.batch_size == 1 and result.exact
    result = refine_max_batch(peak, 70e9, known, first_guess=8, max_jump=2**40)
    assert result.batch_size == max(b for b in range(1, 100) if peak(b) <= 70e9) == 5
    assert len(result.path) == 3 and result.exact


def test_refine_treats_oom_like_over_and_reraises_other_errors():
    def step(b):
        if piecewise_peak(b) > 10_000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return piecewise_peak(b)

    result = refine_max_batch(step, 10_000, PROBED, first_guess=900)
    assert [s.outcome for s in result.path][:2] == ["oom", "oom"] and result.batch_size == 500

    def broken(b):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        refine_max_batch(broken, 10_000, PROBED, first_guess=900)


def test_refine_grows_when_the_line_undershoots():
    # a first guess far too low (the line was fitted where the optimizer step dominated):
    # grow along the measured line, never more than 8x past a batch that fitted
    result = refine_max_batch(lambda b: 1000 + 10 * b, 10_000, PROBED[:2], first_guess=20)
    assert [(s.batch_size, s.outcome) for s in result.path] == [
        (20, "ok"), (160, "ok"), (900, "ok"), (901, "over")]
    assert result.batch_size == 900 and result.exact


def test_refine_first_guess_exact_is_confirmed_by_the_next_batch():
    """The line says 900 is the last batch that fits; 901 is measured all the same, so that
    "exact" means the bracket closed, not that the line said so."""
    line = lambda b: 1000 + 10 * b  # noqa: E731
    result = refine_max_batch(line, 10_000, PROBED, first_guess=900)
    assert [(s.batch_size, s.outcome) for s in result.path] == [(900, "ok"), (901, "over")]
    assert result.exact
    # a peak that bends down after the line's answer: the next batch fits and the search goes on
    bent = lambda b: line(b) if b <= 900 else 10_000 - (b - 900)  # noqa: E731
    result = refine_max_batch(bent, 10_000, PROBED, first_guess=900, max_tries=3)
    assert [s.outcome for s in result.path][:2] == ["ok", "ok"] and result.batch_size > 900


def test_refine_tries_the_data_limit_instead_of_creeping_towards_it():
    """Memory for far more than the training set (a small model on a big GPU): the line's
    answer is past the ceiling, so the refinement climbs at most 8x per step and then tries
    the ceiling itself. The CUDA run that found this crept 12 real steps (4025, 5526, ...,
    7024) towards 7,026 items and stopped short."""
    line = lambda b: 70_000_000 + 760 * b  # noqa: E731
    probed = [(b, line(b)) for b in (8, 16, 32, 64, 128)]
    result = refine_max_batch(line, 7.4e9, probed, first_guess=9_000_000, ceiling=7026)
    assert [(s.batch_size, s.outcome) for s in result.path] == [(1024, "ok"), (7026, "ok")]
    assert result.batch_size == 7026 and result.exact
    # once a real failure (not the ceiling) closes the bracket, it bisects as before
    step = lambda b: line(b) if b <= 3000 else 10**10  # noqa: E731
    result = refine_max_batch(step, 7.4e9, probed, first_guess=9_000_000, ceiling=7026)
    # a cliff: the interpolated guess (5454) is over too, and from the second over in a row
    # it bisects
    assert [s.batch_size for s in result.path][:4] == [1024, 7026, 5454, 3239]
    assert 2900 <= result.batch_size <= 3000


def test_refine_nothing_fits():
    result = refine_max_batch(lambda b: 10**9, 10_000, [], first_guess=64)
    assert result.batch_size == 0
    assert [s.batch_size for s in result.path] == [64, 32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("exc,expected", [
    (torch.OutOfMemoryError("CUDA out of memory."), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("HIP out of memory. Tried to allocate"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("XPU out of memory."), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if ..."), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_is_oom_error(exc, expected):
    assert is_oom_error(exc) is expected


def test_a_line_through_curved_peaks_is_raised_never_to_read_low():
    # Worst-case batches of variable-length items (longest first) make the peak concave in b.
    pts = [(8, 1_920_000), (16, 2_390_000), (32, 4_500_000), (64, 8_590_000), (128, 15_700_000)]
    fit = fit_memory(pts)
    assert fit.curved and fit.max_error_batch == 16 and fit.max_error_frac > 0.10
    assert all(fit.predict(b) >= p for b, p in pts)
    assert min(fit.predict(b) - p for b, p in pts) == pytest.approx(0, abs=1)  # touches one
    linear = fit_memory([(b, 1000 + 37 * b) for b in (8, 16, 32, 64)])
    assert not linear.curved and linear.raised_bytes == 0 and linear.max_error_frac < 1e-9


def test_format_percent_never_rounds_a_margin_up_to_a_whole():
    from bsselect.units import format_percent

    assert [format_percent(x) for x in (0.2, 0.0, 0.125, 0.99999)] == [
        "20%", "0%", "12.5%", "99.999%"]


class _CannotRun(Exception):
    pass


def test_refine_stops_below_a_batch_the_measure_cannot_run():
    """check's search for the largest batch met a batch the simulation cannot run (a packed
    GRU's lengths over the size it computes for real) and failed the whole check, exit 1,
    though the batch asked about simulated (review). A ``stops`` error now ends the bracket
    from above: the answer is a lower bound within 2x of the first batch that did not run,
    and says why."""
    def peak(b: int) -> int:
        if b > 3000:
            raise _CannotRun(f"batch {b} has no values")
        return 1000 + 10 * b

    result = refine_max_batch(peak, 10**9, [(8, peak(8)), (16, peak(16))], first_guess=10**8,
                              max_jump=2**40, max_tries=96, stops=(_CannotRun,))
    assert not result.exact and result.stop.startswith("batch ")
    unrun = [s.batch_size for s in result.path if s.outcome == "unsimulated"]
    assert unrun and result.batch_size <= 3000 < min(unrun) <= 2 * result.batch_size
    assert all(s.outcome in ("ok", "unsimulated") for s in result.path)
    with pytest.raises(_CannotRun):  # not a stop: raised as before
        refine_max_batch(peak, 10**9, [(8, peak(8)), (16, peak(16))], first_guess=10**8,
                         max_jump=2**40, max_tries=96)


def test_a_search_that_closes_below_an_unsimulated_batch_is_exact():
    """5000 could not run, 700 fits and 701 is over: the bracket closed on a batch that ran,
    so 700 is the answer, not a lower bound (review)."""
    def peak(b: int) -> int:
        if b > 3000:
            raise _CannotRun("no values")
        return 10 * b

    result = refine_max_batch(peak, 7005, [(8, 80), (16, 160)], first_guess=5000,
                              max_jump=2**40, max_tries=96, stops=(_CannotRun,))
    assert result.batch_size == 700 and result.exact and result.stop is None
    assert result.path[0].outcome == "unsimulated"
