"""Real values in the simulated step (``bsselect.memory.values``): which ops on real tensors
run for real, and what that costs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorConverter
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.errors import CannotSimulate
from bsselect.memory import simulate_step_peak, values
from bsselect.memory.fake import new_fake_mode
from bsselect.memory.values import DataDependentOp, RealWhereKnown, is_fake


def _classification(model, features: int = 16, **kwargs) -> Task:
    """A 4-class task on 64 random items of ``features`` floats."""
    gen = torch.Generator().manual_seed(0)
    return Task(model=model, loss_fn=F.cross_entropy, **kwargs,
                train_data=TensorDataset(torch.randn(64, features, generator=gen),
                                         torch.randint(0, 4, (64,), generator=gen)))


def _ops_on_real_inputs():
    ids = torch.arange(64)  # real, as the batch's integer tensors are
    with new_fake_mode(), RealWhereKnown():
        small = (ids + 1).view(8, 8).t()
        large = ids.repeat(2**16)  # 32 MiB of int64: over the 16 MiB computed for real
        count = int(small.sum())
    return small, large, count


def test_small_results_of_real_inputs_are_real_and_large_ones_fake() -> None:
    small, large, count = _ops_on_real_inputs()
    assert not is_fake(small) and torch.equal(small, torch.arange(1, 65).view(8, 8).t())
    assert count == 65 * 32
    assert is_fake(large) and large.shape == (64 * 2**16,)


def test_a_meta_kernel_that_undersizes_a_result_does_not_make_it_real(monkeypatch) -> None:
    """The meta kernel's size decides only where the real result agrees: one that said
    "small" for a result over the limit would have kept 32 MiB real."""
    monkeypatch.setattr(values, "_meta_nbytes", lambda *args: 0)
    small, large, _ = _ops_on_real_inputs()
    assert not is_fake(small) and is_fake(large) and large.shape == (64 * 2**16,)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Linear(32, 32) for _ in range(6)))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_the_optimizers_step_counters_are_not_copied_to_fake_tensors(monkeypatch) -> None:
    """AdamW keeps a real step counter per parameter and reads it (``.item()``) every step.
    Each read and each small op on real tensors used to be sized by running it on fake
    copies of its inputs, about a millisecond an op: a fifth of a 70B check over 512 ranks.
    Now the batch's tensors are copied once and the targets where they meet the logits: 3
    copies, where there were 45 (3 more a parameter)."""
    copies = []
    convert = FakeTensorConverter.from_real_tensor

    def counted(self, fake_mode, t, *args, **kwargs):
        copies.append(tuple(t.shape))
        return convert(self, fake_mode, t, *args, **kwargs)

    monkeypatch.setattr(FakeTensorConverter, "from_real_tensor", counted)
    task = _classification(_Classifier, features=32,
                           optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr))
    simulate_step_peak(task, 8)
    assert sorted(copies) == [(8,), (8,), (8, 32)], copies


def test_a_real_tensor_written_from_fake_ones_has_no_values() -> None:
    """``buf.copy_(logits.argmax(-1))`` wrote into a real tensor from a fake one, which left
    the real tensor's old values in place, and ``int(buf.max())`` read them as the step's:
    0 (review). Its values are unknown now, and so are those of views taken before the
    write and of what is computed from it."""
    fake_mode = new_fake_mode()
    logits = fake_mode.from_tensor(torch.randn(4, 3))
    with fake_mode, RealWhereKnown():
        buf = torch.zeros(4, dtype=torch.long)
        head = buf[:2]
        clean = torch.arange(4)
        buf.copy_(logits.argmax(-1))
        for read in (lambda: int(buf.max()), lambda: int(head[0]), lambda: int((buf + 1)[0]),
                     lambda: buf.nonzero()):
            with pytest.raises(DataDependentOp, match="written in place from tensors"):
                read()
        scores = torch.empty(4)
        torch.mul(logits[:, 0], 2, out=scores)
        with pytest.raises(DataDependentOp):
            float(scores.sum())
        assert int(clean.sum()) == 6 and not is_fake(buf + clean)  # shapes still known


class _CountingRouter(nn.Module):
    """Routes each sample to one of 4 experts and splits the batch by the counts, kept in a
    buffer filled in place: the split sizes come from the weights' argmax."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = nn.Linear(16, 4), nn.ModuleList(
            nn.Linear(16, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        counts = torch.zeros(4, dtype=torch.long)
        counts.index_add_(0, choice, torch.ones_like(choice))
        order = choice.argsort()
        parts = torch.split(x[order], [int(c) for c in counts])
        return torch.cat([e(p) for e, p in zip(self.experts, parts)])[order.argsort()]


def test_a_step_that_reads_counts_written_from_activations_is_not_simulated() -> None:
    """Before, the counts read as zeros, every expert got an empty part and the simulated
    step failed on a mismatched shape, or, for a model that tolerated it, answered with
    the memory of a step that never runs. Now it says the values are not known."""
    task = _classification(_CountingRouter)
    with pytest.raises(CannotSimulate, match="written in place from tensors whose values"):
        simulate_step_peak(task, 8)


class _ListCountingRouter(_CountingRouter):
    """The same router, its split sizes read with ``.tolist()`` (no op a dispatch mode sees)
    or ``.numpy()``."""

    def __init__(self, read: str = "tolist") -> None:
        super().__init__()
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        counts = torch.zeros(4, dtype=torch.long)
        counts.index_add_(0, choice, torch.ones_like(choice))
        sizes = {"tolist": lambda: counts.tolist(),
                 "numpy": lambda: [int(n) for n in counts.numpy()],
                 "asarray": lambda: [int(n) for n in np.asarray(counts)],
                 "tensor": lambda: torch.tensor(list(counts)).tolist(),
                 "map_": lambda: torch.zeros(4, dtype=torch.long).map_(
                     counts, lambda _, n: n).tolist(),
                 "apply_": lambda: _seen(counts.apply_)}[self.read]()
        order = choice.argsort()
        parts = torch.split(x[order], sizes)
        return torch.cat([e(p) for e, p in zip(self.experts, parts)])[order.argsort()]


def _seen(apply_) -> list[int]:
    """The values ``apply_`` hands its function, in order."""
    seen: list[int] = []
    apply_(lambda n: seen.append(int(n)) or n)
    return seen


@pytest.mark.parametrize("read, words", [
    ("tolist", r"into Python \(\.tolist\(\)\)"), ("numpy", r"into Python \(\.numpy\(\)\)"),
    ("map_", r"into Python \(\.map_\(\)\)"), ("apply_", r"into Python \(\.apply_\(\)\)"),
    ("asarray", r"into Python \(\.__array__\(\)\)"),
    ("tensor", r"copies a tensor's values \(torch\.tensor\(\.\.\.\)\)")])
def test_values_read_into_python_from_a_tensor_written_from_activations(read, words) -> None:
    """``.tolist()``, ``.numpy()``, ``np.asarray`` and ``torch.tensor(list(t))`` read a real
    tensor's data with no op: the stale zeros made every expert's part empty (review;
    ``np.asarray`` and ``torch.tensor``: 23% low on a router that sized its experts' buffers
    by the largest count). ``map_`` copied them into a tensor nobody had marked, and
    ``apply_`` handed them to a Python function."""
    task = _classification(lambda: _ListCountingRouter(read))
    with pytest.raises(CannotSimulate, match=words + ", and that tensor was written"):
        simulate_step_peak(task, 8)


class _ReadsActivation(nn.Module):
    """Reads, with ``read``, its router's choices: a fake tensor in the simulation, or with
    ``unknown`` a real one counted from them in place (stale values)."""

    def __init__(self, read, unknown: bool = False) -> None:
        super().__init__()
        self.router, self.read, self.unknown = nn.Linear(16, 4), read, unknown

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.router(x)
        choice = h.detach().argmax(-1).clone()
        if self.unknown:
            counts = torch.zeros(4, dtype=torch.long)
            counts.index_add_(0, choice, torch.ones_like(choice))
            choice = counts
        self.read(choice)
        return h


def _total(t: torch.Tensor) -> int:
    values: list[int] = t.tolist()
    return sum(values)


def _as_int(t: torch.Tensor) -> int:
    return int(t.sum())


with warnings.catch_warnings():  # TorchScript is deprecated, and still in models
    warnings.simplefilter("ignore", DeprecationWarning)
    _scripted_total, _scripted_int = torch.jit.script(_total), torch.jit.script(_as_int)


_READS = {  # what the step does -> the words the refusal names it by
    "apply_": (lambda c: c.apply_(lambda v: v), r"\.apply_\(\)"),
    "__dlpack__": (lambda c: torch.utils.dlpack.from_dlpack(c.__dlpack__()),
                   r"\.__dlpack__\(\)"),
    "to_dlpack": (lambda c: torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(c)),
                  r"\.to_dlpack\(\)"),
    "numpy": (lambda c: c.numpy(), r"\.numpy\(\)"),
    "__array__": (np.asarray, r"\.__array__\(\)"),
    "map_": (lambda c: torch.zeros_like(c).map_(c, lambda a, b: b), r"\.map_\(\)"),
    "tensor": (lambda c: torch.tensor(list(c)), r"torch\.tensor\(\.\.\.\)"),
    "new_tensor": (lambda c: c.new_tensor(list(c)), r"tensor\.new_tensor\(\.\.\.\)"),
    "format": (lambda c: f"{c.sum():.3f}", r"formats a tensor's value \(f\"\{t:\.3f\}\"\)"),
    "script_tolist": (_scripted_total, r"TorchScript function \S+ reads a tensor's values"),
    "script_int": (_scripted_int, r"reads a tensor's value \(\.item\(\)"),
}
_BY = {False: "is computed from", True: "was written in place from"}


@pytest.mark.parametrize("unknown", [False, True], ids=["fake", "unknown"])
@pytest.mark.parametrize("name", list(_READS))
def test_a_value_read_that_bypasses_dispatch_cannot_simulate(name, unknown) -> None:
    """Reads of a tensor's data with no op a dispatch mode sees. On a fake tensor (no data)
    ``apply_``, ``__dlpack__``, ``to_dlpack`` and a TorchScript ``tolist`` crashed the
    process (a segmentation fault: no message, the work before it lost), and ``.numpy()``,
    ``np.asarray``, ``map_``, ``torch.tensor(list(t))``, ``new_tensor``, ``f"{t:.3f}"`` and
    TorchScript's ``int(t)`` failed as errors in the task; on a stale real tensor
    ``to_dlpack``, ``new_tensor`` and TorchScript's ``tolist`` read zeros and answered
    (review: 1,528 B against 3.2 MB). Now each is a step the simulation cannot run, as
    ``.item()`` is: ``probe`` measures instead, ``check`` says why."""
    read, words = _READS[name]
    task = _classification(lambda: _ReadsActivation(read, unknown))
    with pytest.raises(CannotSimulate, match=words + r".*, and that tensor " + _BY[unknown]):
        simulate_step_peak(task, 8)


def test_equal_of_two_different_activations_is_not_taken_as_true() -> None:
    """``torch.equal(a, b)`` of two fake tensors ran on stand-ins drawn with one seed, so
    it was True for any two of a shape, and the step branched on it (review). Each fake now
    has its own stand-in values; ``torch.equal(a, a)`` still simulates: True either way."""
    same = _classification(lambda: _ReadsActivation(lambda c: torch.equal(c, c) or 1 / 0))
    assert simulate_step_peak(same, 8).peak_bytes > 0
    other = _classification(lambda: _ReadsActivation(lambda c: torch.equal(c, (c + 1) % 4)))
    with pytest.raises(CannotSimulate, match=r"reads aten\.equal's result"):
        simulate_step_peak(other, 8)


def test_a_read_in_another_thread_cannot_simulate() -> None:
    """Dispatch modes are per thread: the fake mode's own refusal came through raw and was
    called an error in the task."""
    from concurrent.futures import ThreadPoolExecutor

    def elsewhere(c: torch.Tensor) -> int:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: int(c.sum())).result()

    task = _classification(lambda: _ReadsActivation(elsewhere))
    with pytest.raises(CannotSimulate, match=r"reads a tensor's value \(\.item\(\)"):
        simulate_step_peak(task, 8)


def test_a_sparse_tensor_made_from_stale_values_cannot_simulate() -> None:
    """A sparse tensor has no storage to mark: ``to_sparse()`` of a stale tensor failed as
    an error in the task."""
    task = _classification(lambda: _ReadsActivation(lambda c: c.to_sparse(), unknown=True))
    with pytest.raises(CannotSimulate, match="makes a sparse tensor from a tensor, and that"):
        simulate_step_peak(task, 8)


def test_one_tensor_given_to_torch_tensor_still_simulates() -> None:
    """``torch.as_tensor(t)`` and ``torch.asarray(t)`` of one tensor convert it with ops the
    simulation sees, so an activation passed to them is not a value read."""
    task = _classification(lambda: _ReadsActivation(
        lambda c: torch.as_tensor(c) + torch.asarray(c, dtype=torch.float)))
    assert simulate_step_peak(task, 8).peak_bytes > 0


def test_values_read_into_python_from_the_batch_still_simulate() -> None:
    """``lengths.tolist()`` of the batch's own integer tensors is known, and simulates."""

    class Lengths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            longest = max((ids != 0).sum(1).tolist())
            return self.out(self.emb(ids[:, :longest]).mean(1))

    ids = torch.randint(1, 20, (64, 12))
    ids[:, 9:] = 0
    task = Task(model=Lengths, loss_fn=F.cross_entropy,
                train_data=TensorDataset(ids, torch.randint(0, 2, (64,))))
    assert simulate_step_peak(task, 8).peak_bytes > 0


class _CountsInBackward(nn.Module):
    """Reads the router's counts in a gradient hook, where function modes are not active."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.head = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(4, dtype=torch.long)
        counts.index_add_(0, self.router(x).argmax(-1), torch.ones(len(x), dtype=torch.long))
        h = self.head(x)
        h.register_hook(lambda grad: grad * max(counts.tolist()))
        return h


def test_a_read_in_the_backward_is_caught_too() -> None:
    task = _classification(_CountsInBackward)
    with pytest.raises(CannotSimulate, match=r"\.tolist\(\)\), and that tensor was written"):
        simulate_step_peak(task, 8)


class _InPlaceLayerDrop(nn.Module):
    """LayerDrop with the draw made in place into a real tensor: the simulation's own draw
    (seeded alike at every call) skipped every layer, 40-57% under the real steps (review)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if torch.empty(()).uniform_() < 0.6:
                continue
            x = x + layer(x)
        return self.head(x)


def test_a_branch_on_a_draw_made_in_place_is_said_to_be_random() -> None:
    task = _classification(_InPlaceLayerDrop, features=32)
    with pytest.raises(CannotSimulate, match="that tensor is a random draw"):
        simulate_step_peak(task, 8)
