"""The noise measurement on a loss that is a mean over units of varying number per item
(``Task.loss_weight``: a padded LM's label tokens), against exact per-sequence gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsselect import Task
from bsselect.errors import TaskError
from bsselect.selection.noise import estimate_noise, weighted_small_sq
from bsselect.selection.trials import evaluate

N_SEQ, D = 256, 6


def _sequences(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # half very short, half long: where equal-weight sub-batch means go most wrong
    lengths = torch.where(torch.rand(N_SEQ, generator=g) < 0.5,
                          torch.randint(1, 4, (N_SEQ,), generator=g),
                          torch.randint(16, 25, (N_SEQ,), generator=g))
    xs = [torch.randn(int(n), D, generator=g, dtype=torch.float64) for n in lengths]
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    ys = [x @ w_true + 0.5 * torch.randn(len(x), generator=g, dtype=torch.float64) for x in xs]
    w0 = w_true + 0.4 * torch.randn(D, generator=g, dtype=torch.float64)
    return lengths, xs, ys, w0


class _Linear(nn.Module):
    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def _collate(items):
    """Pad to the longest sequence: x [b, L, D], targets (y [b, L], mask [b, L])."""
    longest = max(len(x) for x, _ in items)
    x = torch.zeros(len(items), longest, D, dtype=torch.float64)
    y = torch.zeros(len(items), longest, dtype=torch.float64)
    mask = torch.zeros(len(items), longest, dtype=torch.float64)
    for i, (xi, yi) in enumerate(items):
        x[i, :len(xi)], y[i, :len(yi)], mask[i, :len(yi)] = xi, yi, 1.0
    return x, (y, mask)


def _token_mean(out, target):
    y, mask = target
    return ((out - y) ** 2 * mask).sum() / mask.sum()


def _task(weighted: bool = True, **overrides) -> tuple[Task, float, float]:
    """The task and the exact (|G|^2, tr(Sigma)) at its weights: G = sum s_j / sum n_j over
    the per-sequence gradients s_j of their summed token losses, tr(Sigma) = mean |s_j - n_j
    G|^2 / mean(n)^2 (the covariance of a big batch's token-mean gradient, times its size)."""
    lengths, xs, ys, w0 = _sequences()
    s = torch.stack([2 * ((x @ w0 - y)[:, None] * x).sum(0) for x, y in zip(xs, ys)])
    n = lengths.double()
    G = s.sum(0) / n.sum()
    trace = float(((s - n[:, None] * G) ** 2).sum(1).mean() / n.mean() ** 2)
    options = dict(model=lambda: _Linear(w0), train_data=list(zip(xs, ys)),
                   loss_fn=_token_mean, collate_fn=_collate, base_batch_size=2,
                   loss_weight=(lambda target: target[1].sum()) if weighted else None)
    options.update(overrides)
    return Task(**options), float(G @ G), trace


def test_weighted_small_sq_is_the_plain_mean_with_equal_shares() -> None:
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    big = float(g.mean(0).pow(2).sum())
    pieces = float(g.pow(2).sum(1).sum()) / 25
    assert weighted_small_sq(big, pieces, 5 / 25, 5) == pytest.approx(
        float(g.pow(2).sum(1).mean()), rel=1e-12)


def test_one_sub_batch_holding_all_the_weight_is_a_task_error() -> None:
    with pytest.raises(TaskError, match="whole measurement's weight on one sub-batch"):
        weighted_small_sq(1.0, 1.0, 1.0, 4)


def test_token_weighted_estimate_matches_exact_per_sequence_gradients() -> None:
    """|G|^2 within its error and B_simple within 10% of the exact values (measured: +6%,
    the token mean's own finite-batch effect at b_small 2 with lengths 1-3 against 16-24); the
    equal-weight average of the sub-batches' token means (the code before Task.loss_weight)
    read B_simple 2.1x the exact value here."""
    task, grad_sq, trace = _task()
    est, _ = estimate_noise(task.model(), task, b_small=2, b_big=64, measurements=400, seed=0)
    assert est.grad_sq_norm == pytest.approx(grad_sq, abs=3 * est.grad_sq_norm_se)
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=0.1)
    plain, _, _ = _task(weighted=False)
    old, _ = estimate_noise(plain.model(), plain, b_small=2, b_big=64, measurements=400, seed=0)
    assert old.b_simple > 1.5 * trace / grad_sq


def test_evaluation_is_the_token_mean_over_the_whole_set() -> None:
    task, _, _ = _task()
    lengths, xs, ys, w0 = _sequences()
    exact = float(sum(((x @ w0 - y) ** 2).sum() for x, y in zip(xs, ys)) / lengths.sum())
    loss, _ = evaluate(task.model(), task, task.train_data, torch.device("cpu"), batch_size=10)
    assert loss == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("weight, match", [
    (lambda target: -1.0, "finite number >= 0"),
    (lambda target: float("nan"), "finite number >= 0"),
    (lambda target: target.missing, "Task.loss_weight failed on a batch's targets"),
])
def test_a_bad_loss_weight_is_a_one_line_task_error(weight, match) -> None:
    task, _, _ = _task(loss_weight=weight)
    with pytest.raises(TaskError, match=match):
        estimate_noise(task.model(), task, b_small=2, b_big=16, measurements=2, seed=0)


def test_a_measurement_with_no_unit_of_the_loss_is_a_task_error() -> None:
    task, _, _ = _task(loss_weight=lambda target: 0.0)
    with pytest.raises(TaskError, match="total weight of 0"):
        estimate_noise(task.model(), task, b_small=2, b_big=16, measurements=2, seed=0)


def test_loss_weight_must_be_callable() -> None:
    with pytest.raises(TypeError, match="Task.loss_weight must be callable or None"):
        _task(loss_weight=3)
