"""The noise measurement on a loss that is a mean over units of varying number per item
(``Task.loss_weight``: a padded LM's label tokens), against exact per-sequence gradients."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from bsselect.errors import TaskError
from bsselect.selection.noise import estimate_noise, weighted_pair
from bsselect.selection.trials import evaluate

sys.path.insert(0, str(Path(__file__).parent / "tasks"))
from token_tasks import _collate, _Linear, _sequences, _task  # noqa: E402


def _pair_inputs(g: torch.Tensor, shares: torch.Tensor) -> tuple[float, float, float, float]:
    big = (shares[:, None] * g).sum(0)
    return (float(big @ big), float((shares ** 2 * g.pow(2).sum(1)).sum()),
            float(big @ (shares[:, None] ** 2 * g).sum(0)), float(shares.pow(2).sum()))


def test_weighted_pair_is_the_plain_pair_with_equal_shares() -> None:
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small, big = weighted_pair(*_pair_inputs(g, torch.full((5,), 0.2, dtype=torch.float64)), 5)
    assert small == pytest.approx(float(g.pow(2).sum(1).mean()), rel=1e-12)
    assert big == pytest.approx(float(g.mean(0).pow(2).sum()), rel=1e-12)


def test_weighted_pair_reads_the_weighted_statistics() -> None:
    """Unequal shares: the pair inverts (two-batch estimator, k = 4) to the weighted
    U-statistic for |G|^2 and b_big k/(k-1) sum s_i^2 |g_i - ĝ|^2 for tr(Sigma)."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    shares = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    small, big = weighted_pair(*_pair_inputs(g, shares), 4)
    b_small, b_big = 2, 8
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    hat = (shares[:, None] * g).sum(0)
    pairs = sum(float(shares[i] * shares[j] * (g[i] @ g[j]))
                for i in range(4) for j in range(4) if i != j)
    assert grad_sq == pytest.approx(pairs / (1 - float(shares.pow(2).sum())), rel=1e-12)
    spread = float((shares ** 2 * (g - hat).pow(2).sum(1)).sum())
    assert trace == pytest.approx(b_big * 4 / 3 * spread, rel=1e-12)


def test_one_sub_batch_holding_all_the_weight_is_a_task_error() -> None:
    with pytest.raises(TaskError, match="whole measurement's weight on one sub-batch"):
        weighted_pair(1.0, 1.0, 1.0, 1.0, 4)


def test_token_weighted_estimate_matches_exact_per_sequence_gradients() -> None:
    """|G|^2 and tr(Sigma) within their errors, B_simple within 3% of the exact values
    (measured: -1.1%, its 90% interval covering the truth). Reading tr(Sigma) as |g_big|^2 -
    |G|^2 (the first version with loss_weight) gave +6% here at any batch size; the
    equal-weight average of the sub-batches' token means (before loss_weight), 2.1x."""
    task, grad_sq, trace = _task()
    est, _ = estimate_noise(task.model(), task, b_small=2, b_big=64, measurements=400, seed=0)
    assert est.grad_sq_norm == pytest.approx(grad_sq, abs=3 * est.grad_sq_norm_se)
    assert est.trace_sigma == pytest.approx(trace, abs=3 * est.trace_sigma_se)
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=0.03)
    lo, hi = est.b_simple_ci
    assert lo <= trace / grad_sq <= hi
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


class _DroppedLinear(_Linear):
    """Functional dropout on the input features (no dropout module: found by its effect)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.3, self.training) @ self.w


def test_dropout_noise_of_a_token_mean_is_read_per_unit() -> None:
    """With functional dropout p on the token-mean task: the mask noise D against the exact
    value (per-sequence mask variance V_j by Monte Carlo over masks, D = mean V_j / mean(n)^2),
    and B_simple against (tr_data + D) / |G|^2. Reading the repeated sub-batch's mask noise as
    b_small items' (the first version with loss_weight) gave D 2.1x the truth."""
    p = 0.3
    lengths, xs, ys, w0 = _sequences()
    n = lengths.double()
    q = p / (1 - p)
    # E over masks of each sequence's summed gradient (closed form), then its mask variance
    s = torch.stack([2 * ((x.T @ x + q * torch.diag((x ** 2).sum(0))) @ w0 - x.T @ y)
                     for x, y in zip(xs, ys)])
    gen = torch.Generator().manual_seed(5)
    var = []
    for j, (x, y) in enumerate(zip(xs, ys)):
        xt = x * (torch.rand(2000, *x.shape, generator=gen, dtype=torch.float64) > p) / (1 - p)
        grads = 2 * ((xt @ w0 - y)[..., None] * xt).sum(1)
        var.append(float((grads - s[j]).pow(2).sum(1).mean()))
    G = s.sum(0) / n.sum()
    tr_data = float(((s - n[:, None] * G) ** 2).sum(1).mean() / n.mean() ** 2)
    d_true = sum(var) / len(var) / float(n.mean()) ** 2
    task, _, _ = _task(model=lambda: _DroppedLinear(w0))
    torch.manual_seed(0)
    est, _ = estimate_noise(task.model(), task, b_small=2, b_big=16, measurements=1000, seed=1)
    assert est.trace_sigma_dropout == pytest.approx(d_true, rel=0.15)
    assert est.b_simple == pytest.approx((tr_data + d_true) / float(G @ G), rel=0.05)


def test_a_sub_batch_with_no_unit_of_the_loss_is_skipped_not_nan() -> None:
    """Items whose every target is masked out (an SFT item without a response): the token
    mean of a sub-batch of them is 0/0. It has share 0 and is not run; the measurement and
    its mean loss stay finite, and evaluation skips such a batch."""
    lengths, xs, ys, w0 = _sequences()

    def collate(items):
        x, (y, mask) = _collate([(xi, yi) for xi, yi, _ in items])
        return x, (y, mask * torch.tensor([[keep] for _, _, keep in items], dtype=mask.dtype))

    data = [(x, y, float(i % 4 != 0)) for i, (x, y) in enumerate(zip(xs, ys))]
    task, _, _ = _task(train_data=data, collate_fn=collate)
    est, loss = estimate_noise(task.model(), task, b_small=1, b_big=16, measurements=20, seed=0)
    assert math.isfinite(loss) and math.isfinite(est.grad_sq_norm)
    val, _ = evaluate(task.model(), task, data, torch.device("cpu"), batch_size=1)
    assert math.isfinite(val)


def test_accumulated_micro_batches_train_on_the_whole_batchs_token_mean() -> None:
    """--accumulate with loss_weight: one step over two micro-batches moves the weights as one
    step over the whole batch (each micro-batch's mean weighted by its tokens); the
    equal-weight mean of the two means (before) moves them elsewhere."""
    from bsselect.step import train_step

    task, _, _ = _task()
    items = [task.train_data[i] for i in (0, 1, 2, 5)]   # lengths differ a lot
    whole = task.collate_fn(items)
    halves = [task.collate_fn(items[:2]), task.collate_fn(items[2:])]
    assert halves[0][1][1].sum() != halves[1][1][1].sum()

    def stepped(accumulate: int, weighted: bool = True):
        model = task.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        t = task if weighted else _task(weighted=False)[0]
        if accumulate == 1:
            loss = train_step(model, opt, t, *whole)
        else:
            rest = iter(halves[1:])
            loss = train_step(model, opt, t, *halves[0], accumulate=2,
                              next_micro_batch=lambda: next(rest))
        return model.w.detach().clone(), float(loss)

    one_w, one_loss = stepped(1)
    two_w, two_loss = stepped(2)
    assert torch.allclose(two_w, one_w, rtol=1e-12, atol=1e-12)
    assert two_loss == pytest.approx(one_loss, rel=1e-12)
    equal_w, _ = stepped(2, weighted=False)
    assert not torch.allclose(equal_w, one_w, rtol=1e-6, atol=1e-9)


def test_a_journal_of_a_token_weighted_task_does_not_resume_equal_weight_trials() -> None:
    """The sweep's and the schedule's resume keys say loss_weight, so a journal written before
    the trials were weighted (or by the same task without loss_weight) is not resumed."""
    from bsselect.selection.journal import settings_key
    from bsselect.selection.lr_scaling import LrScaling
    from bsselect.selection.schedule import ScheduleSettings
    from bsselect.selection.sweep import SweepSettings, parse_budget

    weighted, _, _ = _task()
    plain, _, _ = _task(weighted=False)
    sweep = SweepSettings(budget=parse_budget("64"), lr_scaling=LrScaling.linear)
    assert sweep.journal_settings(weighted)["loss_weight"] is True
    assert "loss_weight" not in sweep.journal_settings(plain)
    assert settings_key(sweep.journal_settings(weighted)) != settings_key(
        sweep.journal_settings(plain))
    schedule = ScheduleSettings(horizon=4096)
    assert schedule.journal_settings(weighted, [2, 4])["loss_weight"] is True
    assert "loss_weight" not in schedule.journal_settings(plain, [2, 4])
