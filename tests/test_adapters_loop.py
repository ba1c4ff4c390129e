"""find_batch_size / fits_batch_size on a user's own training loop: the answer is the largest
batch whose step fits, by the CPU allocator's own events, or by an allocator that raises
out-of-memory above a cap (the one fake, at the allocator seam)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsselect import find_batch_size, fits_batch_size
from bsselect.adapters.loop import _cpu_peak
from bsselect.errors import DoesNotFitError, TaskError, UsageError
from bsselect.memory.capped import CappedCpuAllocator


def _loop():
    """A plain loop's pieces: model and optimizer made once, one step per call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(batch_size: int) -> None:
        x, y = torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def test_the_answer_is_the_largest_batch_whose_step_fits_by_the_cpu_allocator():
    step = _loop()
    fit = find_batch_size(step, memory="8MiB", margin=0.0, device="cpu")
    assert fit.what == "step's own allocations" and fit.checked
    b = fit.max_batch
    step(b)  # the optimizer state exists, as in measure_step
    assert _cpu_peak(lambda: step(b)) <= 8 * 2**20 < _cpu_peak(lambda: step(b + 1))


def _runs(step, cap: int, b: int) -> bool:
    """Whether two steps at ``b`` run under an allocator capped at ``cap`` bytes."""
    try:
        with CappedCpuAllocator(cap).session():
            step(b)
            step(b)
        return True
    except torch.OutOfMemoryError:
        return False


def test_out_of_memory_in_the_search_is_a_bracket_not_a_failure():
    cap = 6 * 2**20
    step = _loop()
    backend = CappedCpuAllocator(cap)
    fit = find_batch_size(step, memory=cap, margin=0.0, backend=backend)
    assert fit.what == "allocator peak"

    assert _runs(step, cap, fit.max_batch) and not _runs(step, cap, fit.max_batch + 1)
    assert fit.max_batch > 64  # found past the measured points, not a halving of them


def test_the_decorator_calls_training_with_the_answer():
    step = _loop()
    seen = []

    @fits_batch_size(step=step, memory="8MiB", device="cpu", max_batch=500)
    def train(batch_size: int, epochs: int) -> int:
        seen.append((batch_size, epochs))
        return batch_size

    assert train(epochs=3) == seen[0][0] == train.bsselect_fit.max_batch <= 500


def test_the_decorator_on_a_method_passes_the_batch_after_self_and_refuses_it_as_a_keyword():
    """On ``def train(self, batch_size)`` the answer went in as self; ``train(batch_size=64)``
    raised "got multiple values" after the whole search (review)."""
    step = _loop()

    class Runner:
        @fits_batch_size(step=step, memory="8MiB", device="cpu", max_batch=300)
        def train(self, batch_size: int, epochs: int = 1) -> tuple:
            return self, batch_size, epochs

    runner = Runner()
    me, batch, epochs = runner.train(epochs=2)
    assert me is runner and batch == Runner.train.bsselect_fit.max_batch <= 300 and epochs == 2
    searched = []

    @fits_batch_size(step=lambda b: searched.append(b) or step(b), memory="8MiB", device="cpu")
    def plain(batch_size: int) -> int:
        return batch_size

    with pytest.raises(UsageError, match="call it without batch_size="):
        plain(batch_size=64)
    assert searched == []   # refused before any search
    # by position too: plain(64) was answered at the searched batch, the 64 dropped (review)
    with pytest.raises(UsageError, match="takes 1 positional argument.*without the batch size"):
        plain(64)
    with pytest.raises(UsageError, match="takes 2 positional argument"):
        runner.train(2, 3)
    assert searched == []


def test_a_misspelt_decorator_option_is_refused_at_decoration():
    with pytest.raises(UsageError, match="unknown option.*mem; it takes"):
        fits_batch_size(step=_loop(), mem="1GiB")


def test_a_failing_step_is_one_task_error():
    def step(batch_size: int) -> None:
        raise KeyError("features")

    with pytest.raises(TaskError, match=r"step\(8\) failed: KeyError"):
        find_batch_size(step, memory="1GiB", device="cpu")


def test_a_step_whose_memory_does_not_grow_says_so_in_api_terms():
    """A step that ignores its batch size (or allocates nothing the allocator sees): a
    usage error naming the measurements and the API's own option, not a CLI flag."""
    with pytest.raises(UsageError, match=r"does not grow with the batch size \(b=8: 0 bytes.*"
                                         r"pass larger batch_sizes="):
        find_batch_size(lambda batch_size: None, memory="1GiB", device="cpu")


def test_a_constant_allocation_is_flat_too_and_over_budget_still_does_not_fit():
    """A step that always allocates the same 1 MiB fits a slope of rounding error, not a
    million-sample batch; one whose constant allocation is over the budget does not fit."""
    def step(batch_size: int) -> None:
        torch.ones(1 << 18)  # 1 MiB whatever the batch

    with pytest.raises(UsageError, match="does not grow with the batch size"):
        find_batch_size(step, memory="64MiB", device="cpu")
    with pytest.raises(DoesNotFitError, match="fixed memory alone"):
        find_batch_size(step, memory="1MiB", device="cpu")


def test_max_batch_caps_the_answer_and_is_checked():
    import torch
    from torch import nn

    from bsselect import find_batch_size
    from bsselect.errors import UsageError

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b):
        x, y = torch.randn(b, 64), torch.randint(0, 10, (b,))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for cap in (1, 10, 100):
        fit = find_batch_size(step, memory="16MiB", device="cpu", max_batch=cap)
        assert 1 <= fit.max_batch <= cap
        assert fit.exact is False  # it stopped at the cap, not at a batch that did not fit
    for bad in (0, -5, 100.5, True):
        with pytest.raises(UsageError, match="max_batch must be an integer >= 1"):
            find_batch_size(step, memory="16MiB", device="cpu", max_batch=bad)
    with pytest.raises(UsageError, match="meta device has shapes but no values"):
        find_batch_size(step, memory="16MiB", device="meta")


def _sliced(n: int):
    """A step that takes its batch from ``n`` items: past ``n`` the batch is ``n`` items."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, labels = torch.randn(n, 64), torch.randint(0, 10, (n,))

    def step(batch_size: int) -> None:
        x, y = data[:batch_size], labels[:batch_size]
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, optimizer


def test_memory_that_stops_growing_is_refused_not_answered_far_above_the_data():
    """Past 1,000 items the batch stopped growing and the search went on to 16,777,216
    (review)."""
    step, _, _ = _sliced(1000)
    with pytest.raises(UsageError, match="stopped growing with the batch size.*max_batch="):
        find_batch_size(step, memory="64MiB", backend=CappedCpuAllocator(64 * 2**20))
    assert find_batch_size(step, memory="64MiB", backend=CappedCpuAllocator(64 * 2**20),
                           max_batch=1000).max_batch == 1000


def test_one_size_that_runs_is_bisected_to_the_next_that_does_not():
    """8 ran and 16 did not: the answer is between them, not 'pass smaller batch_sizes'."""
    step, _, _ = _sliced(4096)

    def capped(batch_size: int) -> None:
        if batch_size > 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB")
        step(batch_size)

    fit = find_batch_size(capped, memory="1GiB", device="cpu")
    assert fit.max_batch == 12 and fit.exact
    assert [c["outcome"] for c in fit.checked][-1] == "oom"


def test_a_size_that_ran_out_of_memory_in_the_series_bounds_the_search():
    """8, 16 and 32 ran, 64 did not: no later try is at 64 or above (they were tried again,
    the line's guess far past the failure, review)."""
    step, _, _ = _sliced(4096)
    tried: list[int] = []

    def capped(batch_size: int) -> None:
        tried.append(batch_size)
        if batch_size > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB")
        step(batch_size)

    fit = find_batch_size(capped, memory="1GiB", device="cpu")
    assert fit.max_batch == 40 and fit.exact
    after_series = tried[tried.index(64) + 1:]
    assert after_series and max(after_series) < 64


def test_the_search_leaves_the_callers_rng_as_it_was():
    step, _, _ = _sliced(4096)

    def random_step(batch_size: int) -> None:
        torch.rand(3)  # draws from the global RNG, as dropout does
        step(batch_size)

    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    find_batch_size(random_step, memory="8MiB", margin=0.0, device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_the_decorator_is_refused_without_parentheses_or_a_batch_parameter():
    with pytest.raises(UsageError, match=r"write @fits_batch_size\(step="):
        @fits_batch_size
        def train(batch_size):
            return batch_size
    with pytest.raises(UsageError, match="first positional parameter"):
        @fits_batch_size(step=_loop())
        def no_batch(*, epochs=1):
            return epochs


def test_a_step_that_is_a_generator_or_a_coroutine_is_said_to_have_not_run():
    """They return without running: "memory does not grow with the batch size" (review)."""
    def gen_step(b):
        yield torch.zeros(b)

    async def async_step(b):
        return torch.zeros(b)

    for step in (gen_step, async_step):
        with pytest.raises(TaskError, match="without running: give a plain function"):
            find_batch_size(step, device="cpu", memory="64MiB")


def test_on_the_cpu_the_host_guard_refuses_steps_that_would_crowd_the_ram(monkeypatch):
    """With 40 MiB of RAM available (the machine's report, faked at its seam), the default
    budget is half of it, and a step predicted above half of it is refused before it runs even
    where ``memory=`` says more, the answer then a lower bound: the search once budgeted all of
    MemAvailable for real steps, with nothing between it and the kernel's OOM killer."""
    import bsselect.device as device_mod

    monkeypatch.setattr(device_mod, "available_ram_bytes", lambda: 40 * 2**20)
    step = _loop()
    fit = find_batch_size(step, margin=0.0, device="cpu")
    assert fit.budget_bytes == 20 * 2**20 and fit.exact
    step(fit.max_batch)
    assert _cpu_peak(lambda: step(fit.max_batch)) <= 20 * 2**20

    ran = []

    def counted(b):
        ran.append(b)
        step(b)

    big = find_batch_size(counted, memory="1GiB", margin=0.0, device="cpu")
    assert not big.exact and big.budget_bytes == 2**30
    assert any(s["outcome"] == "oom" for s in big.checked)
    counted(max(ran))
    assert _cpu_peak(lambda: step(max(ran))) <= 20 * 2**20 * 1.2  # no real step near 1 GiB


def test_a_step_that_catches_its_own_out_of_memory_error_is_taken_as_out_of_memory():
    """A loop that skips a batch which ran out of memory (``except OutOfMemoryError: pass``)
    reported a tiny peak where it failed, and the search answered far above what trains
    (review); the allocator counted the error, so the step counts as out of memory."""
    cap = 6 * 2**20
    step = _loop()

    def forgiving(b: int) -> None:
        try:
            step(b)
        except torch.OutOfMemoryError:
            pass

    fit = find_batch_size(forgiving, memory=cap, margin=0.0, backend=CappedCpuAllocator(cap))

    assert _runs(step, cap, fit.max_batch) and not _runs(step, cap, fit.max_batch + 1)
    assert any(s["outcome"] == "oom" for s in fit.checked)
