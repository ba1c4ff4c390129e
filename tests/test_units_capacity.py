import math

import pytest
import torch

from bsselect.capacity import (
    MemoryFit, SearchStep, backoff_search, fit_memory, largest_pow2_at_most, solve_max_batch,
)
from bsselect.errors import DoesNotFitError, UsageError
from bsselect.oom import is_oom_error
from bsselect.units import format_bytes, parse_size


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20), ("1000", 1000),
    ("1.5G", int(1.5 * 2**30)), ("80 gib", 80 * 2**30), ("2tb", 2 * 10**12), ("100B", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-3GB", "0", "1e"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


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
    with pytest.raises(DoesNotFitError, match="the model alone needs"):
        solve_max_batch(10_000, 0.2, fit)


def test_backoff_search_exact_path():
    cap = 500
    tried = []

    def step(b):
        tried.append(b)
        if b > cap:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = backoff_search(step, 700)
    # 700 -> floor(630) -> 567 -> 510 -> 459 fits
    assert tried == [700, 630, 567, 510, 459]
    assert result.batch_size == 459
    assert result.path == (SearchStep(700, "oom"), SearchStep(630, "oom"), SearchStep(567, "oom"),
                           SearchStep(510, "oom"), SearchStep(459, "ok"))


def test_backoff_search_first_try_fits():
    assert backoff_search(lambda b: None, 64).path == (SearchStep(64, "ok"),)


def test_backoff_search_reraises_other_errors():
    def step(b):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        backoff_search(step, 64)


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
