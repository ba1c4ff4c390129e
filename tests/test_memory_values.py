"""Real values in the simulated step (``bsselect.memory.values``): which ops on real tensors
run for real, and what that costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorConverter
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.memory import simulate_step_peak, values
from bsselect.memory.fake import new_fake_mode
from bsselect.memory.values import RealWhereKnown, is_fake


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
    gen = torch.Generator().manual_seed(0)
    task = Task(model=_Classifier, loss_fn=F.cross_entropy,
                train_data=TensorDataset(torch.randn(64, 32, generator=gen),
                                         torch.randint(0, 4, (64,), generator=gen)),
                optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr))
    simulate_step_peak(task, 8)
    assert sorted(copies) == [(8,), (8,), (8, 32)], copies
