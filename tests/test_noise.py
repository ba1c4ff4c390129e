"""Gradient noise scale: the estimator's math, one measurement, and the driver, checked against
closed forms (linear regression) and exact population statistics (per-example gradients)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.errors import TaskError, UsageError
from bsselect.examples.linreg import closed_form_b_simple, make_linreg_task
from bsselect.selection.noise import (NoiseEstimate, default_batch_sizes, estimate_from_norms,
                                      estimate_noise, measure_grad_norms, split_batch,
                                      training_batchnorm)
from bsselect.selection.noise_math import (expanded_tail, per_measurement, sampling_factor,
                                           t_quantile)
from bsselect.selection.noise_run import measure_noise


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation, which on a loaded
    2-core CI machine made the file 5x slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the finite-population algebra -------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7])
def test_sampling_factor_is_exact_over_all_subsets(b: int) -> None:
    """E|g_b|^2 = |G|^2 + c(b) tr(Sigma), averaged over every subset of size b of 7 items."""
    g = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = g.mean(0)
    trace = float(((g - G) ** 2).sum(1).mean())  # population covariance (1/N)
    subsets = list(itertools.combinations(range(7), b))
    mean_sq = np.mean([float(g[list(s)].mean(0).pow(2).sum()) for s in subsets])
    assert mean_sq == pytest.approx(float(G.pow(2).sum()) + sampling_factor(b, 7) * trace,
                                    rel=1e-12)


def test_estimator_inverts_the_expectations_with_and_without_correction() -> None:
    g2, tr = 0.7, 9.0
    for n_data in (None, 50):
        e_s = g2 + sampling_factor(4, n_data) * tr
        e_b = g2 + sampling_factor(32, n_data) * tr
        jitter = [1e-9, -1e-9, 0.0]
        est = estimate_from_norms([e_s + j for j in jitter], [e_b + j for j in jitter], 4, 32,
                                  n_data)
        assert est.grad_sq_norm == pytest.approx(g2, rel=1e-6)
        assert est.trace_sigma == pytest.approx(tr, rel=1e-6)
        assert est.b_simple == pytest.approx(tr / g2, rel=1e-6)
        assert est.resolved and est.samples == 3 * 32 and est.n_data == n_data


def test_corrected_estimator_is_the_documented_shift_of_the_uncorrected_one() -> None:
    """docs/noise.md: |G|^2_N = |G|^2_inf + tr_inf/N, tr_N = tr_inf (N-1)/N."""
    small, big, n = [3.0, 2.5, 4.0], [1.0, 1.2, 0.9], 40
    g_inf, t_inf = per_measurement(small, big, 2, 16)
    g_n, t_n = per_measurement(small, big, 2, 16, n)
    np.testing.assert_allclose(g_n, g_inf + t_inf / n)
    np.testing.assert_allclose(t_n, t_inf * (n - 1) / n)


def test_pure_noise_is_reported_unresolved_not_as_a_number() -> None:
    """Zero true gradient: |G|^2 straddles zero, so no B_simple, and the JSON stays finite."""
    rng = np.random.default_rng(0)
    g_small = rng.normal(size=(64, 8, 50))  # 64 measurements, 8 sub-batch grads, 50 params
    small = (g_small**2).sum(-1).mean(-1)
    big = (g_small.mean(1) ** 2).sum(-1)
    est = estimate_from_norms(small, big, 1, 8)
    assert not est.resolved and est.b_simple is None and est.b_simple_ci is None
    assert est.grad_sq_norm_ci[0] < 0 < est.grad_sq_norm_ci[1]
    assert est.trace_sigma == pytest.approx(50, rel=0.1)
    json.dumps(est.__dict__, allow_nan=False)


@pytest.mark.parametrize("df, table", [(1, 6.313752), (2, 2.919986), (3, 2.353363),
                                       (5, 2.015048), (10, 1.812461), (31, 1.695519)])
def test_t_quantile_matches_the_table(df: int, table: float) -> None:
    assert t_quantile(0.95, df) == pytest.approx(table, abs=1.1e-3 if df == 3 else 1e-4)


def test_expanded_interval_widens_with_few_measurements() -> None:
    tails = [expanded_tail(m, 0.90) for m in (2, 4, 8, 32, 1000)]
    assert tails == sorted(tails) and tails[-1] == pytest.approx(0.05, abs=5e-4)


@pytest.mark.parametrize("sizes, match", [
    ((0, 8, None), "at least 1"),
    ((8, 8, None), "larger than b_small"),
    ((8, 64, 32), "larger than the dataset"),
])
def test_bad_sizes_are_usage_errors(sizes: tuple, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        estimate_from_norms([1.0, 1.0], [0.5, 0.5], *sizes)


def test_nonfinite_norms_are_task_errors() -> None:
    with pytest.raises(TaskError, match="not finite"):
        estimate_from_norms([1.0, float("nan")], [0.5, 0.5], 1, 8)


# --- one measurement ------------------------------------------------------------------------


def _logreg_task(n: int = 96, d: int = 5, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, generator=gen)
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w)).float()

    def model() -> nn.Module:
        return nn.Linear(d, 1)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), target)

    return Task(model=model, train_data=TensorDataset(x, y), loss_fn=loss_fn, lr=0.5,
                base_batch_size=8)


def _per_example_grads(model: nn.Module, task: Task) -> torch.Tensor:
    """(N, P) gradients of the loss of each example alone, float64, via vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = task.train_data.tensors  # type: ignore[attr-defined]

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return task.loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1).double()


def test_measure_grad_norms_matches_per_example_gradients_and_leaves_grad_alone() -> None:
    task = _logreg_task()
    torch.manual_seed(0)
    model = task.model().eval()
    g = _per_example_grads(model, task)[:24]
    x, y = task.train_data.tensors[0][:24], task.train_data.tensors[1][:24]
    sentinel = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    small_sq, big_sq = measure_grad_norms(model, task, x, y, n_sub=4)
    subs = g.reshape(4, 6, -1).mean(1)
    assert small_sq == pytest.approx(float(subs.pow(2).sum(1).mean()), rel=1e-5)
    assert big_sq == pytest.approx(float(g.mean(0).pow(2).sum()), rel=1e-5)
    assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinel))
    assert not model.training


def test_measurement_restores_batchnorm_statistics_and_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    task = Task(model=lambda: model, train_data=TensorDataset(torch.randn(8, 4), torch.randn(8)),
                loss_fn=lambda out, t: F.mse_loss(out.squeeze(-1), t))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_grad_norms(model, task, torch.randn(16, 4), torch.randn(16), n_sub=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())



def test_batchnorm_in_training_mode_is_said_in_the_estimate_notes() -> None:
    """With BatchNorm normalising by batch statistics the number is the noise at b_small's
    statistics (review F7): the estimate says so; without BatchNorm, or with it in eval mode,
    nothing is said."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=g), torch.randn(256, generator=g)
    loss = lambda out, t: F.mse_loss(out.squeeze(-1), t)  # noqa: E731

    def notes(model: nn.Module) -> tuple[str, ...]:
        task = Task(model=lambda: model, train_data=TensorDataset(x, y), loss_fn=loss)
        est, _ = estimate_noise(model, task, b_small=8, b_big=32, measurements=4, seed=1)
        return est.notes

    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    assert training_batchnorm(bn) == ("1",)
    said = notes(bn)
    assert len(said) == 1 and said[0].startswith("BatchNorm normalises with batch statistics (1)")
    assert "b_small's batch statistics" in said[0]
    assert notes(bn.eval()) == () and training_batchnorm(bn) == ()
    assert notes(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))) == ()

def test_split_batch_handles_nested_inputs() -> None:
    batch = ({"a": torch.arange(8), "b": torch.arange(16).reshape(8, 2)}, torch.arange(8), 1.5)
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    assert parts[1][0]["a"].tolist() == [2, 3] and parts[1][0]["b"].tolist() == [[4, 5], [6, 7]]
    assert parts[3][1].tolist() == [6, 7] and parts[3][2] == 1.5
    with pytest.raises(UsageError, match="does not split"):
        split_batch(batch, 3)
    with pytest.raises(TaskError, match="dim 0"):
        split_batch((torch.zeros(4), torch.zeros(6)), 2)


class _DictDataset(torch.utils.data.Dataset):
    """Items ({"pixels": x, "scale": s}, y): nested inputs, as a user's task may have."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[dict, torch.Tensor]:
        return {"pixels": self.x[i], "scale": torch.tensor(2.0)}, self.y[i]


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["pixels"] * batch["scale"][:, None])


def test_nested_inputs_and_dropout_leave_the_global_rng_alone() -> None:
    task = Task(model=_DictModel, train_data=_DictDataset(200), loss_fn=F.cross_entropy)
    model = task.model().train()
    state = torch.get_rng_state()
    est, loss = estimate_noise(model, task, b_small=4, b_big=32, measurements=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert est.n_data == 200 and math.isfinite(est.trace_sigma) and est.trace_sigma > 0
    assert 0.5 < loss < 2.0  # cross-entropy of 3 classes near log(3) at initialisation


# --- accuracy against exact answers ---------------------------------------------------------


@pytest.mark.parametrize("d, sigma", [(16, 1.0), (64, 3.0), (8, 4.0)])
def test_linreg_estimate_within_5_percent_of_closed_form(d: int, sigma: float) -> None:
    task = make_linreg_task(d=d, sigma=sigma, n=100_000, seed=0)
    report = measure_noise(task, b_small=32, b_big=512, measurements=128)
    expected = closed_form_b_simple(d, sigma, torch.zeros(d), task.train_data.w_star)
    est = report.final
    assert est.resolved and est.b_simple is not None and est.b_simple_ci is not None
    assert est.b_simple == pytest.approx(expected, rel=0.05)
    assert est.b_simple_ci[0] < est.b_simple < est.b_simple_ci[1]
    # one pass more: the first measurement's test for a random forward
    assert report.passes == 128 * 16 + 1 and est.samples == 128 * 512


def test_linreg_away_from_init_matches_closed_form_at_those_weights() -> None:
    """Nearer the optimum |G|^2 shrinks and B_simple grows; the estimate follows."""
    d, sigma = 16, 1.0
    task = make_linreg_task(d=d, sigma=sigma, n=100_000, seed=0)
    w_star = task.train_data.w_star
    model = task.model()
    w0 = w_star + 0.15 * torch.randn(d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.linear.weight.copy_(w0[None])
    est, _ = estimate_noise(model, task, b_small=32, b_big=512, measurements=128)
    expected = closed_form_b_simple(d, sigma, w0, w_star)
    assert expected > 50
    assert est.b_simple == pytest.approx(expected, rel=0.05)


def test_finite_dataset_matches_exact_population_noise_scale() -> None:
    """N = 96, b_big = N/2: without the correction |G|^2 would be off by tr/N (~10%)."""
    task = _logreg_task()
    torch.manual_seed(0)
    g = _per_example_grads(task.model(), task)
    G = g.mean(0)
    grad_sq, trace = float(G.pow(2).sum()), float(((g - G) ** 2).sum(1).mean())
    est = measure_noise(task, b_small=4, b_big=48, measurements=600, seed=0).initial
    assert trace / grad_sq > 5  # the noisy regime, where the correction matters
    assert est.grad_sq_norm == pytest.approx(grad_sq, abs=3 * est.grad_sq_norm_se)
    assert est.trace_sigma == pytest.approx(trace, abs=3 * est.trace_sigma_se)
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=0.05)
    assert est.grad_sq_norm_se < 0.3 * trace / 96  # precise enough to see a missing correction


def test_correction_removes_the_bias_of_sampling_without_replacement() -> None:
    """Monte Carlo on the exact per-example gradients: 20,000 draws of a 48-of-96 batch."""
    task = _logreg_task()
    torch.manual_seed(0)
    g = _per_example_grads(task.model(), task)
    G = g.mean(0)
    grad_sq, trace = float(G.pow(2).sum()), float(((g - G) ** 2).sum(1).mean())
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(96, generator=gen)[:48] for _ in range(20_000)])
    sub = g[idx].reshape(20_000, 12, 4, -1).mean(2)
    small = sub.pow(2).sum(-1).mean(-1).numpy()
    big = sub.mean(1).pow(2).sum(-1).numpy()
    fixed = estimate_from_norms(small, big, 4, 48, n_data=96)
    naive = estimate_from_norms(small, big, 4, 48)
    assert fixed.grad_sq_norm == pytest.approx(grad_sq, abs=3 * fixed.grad_sq_norm_se)
    assert fixed.trace_sigma == pytest.approx(trace, abs=3 * fixed.trace_sigma_se)
    assert naive.grad_sq_norm < grad_sq - 10 * naive.grad_sq_norm_se


# --- the driver -----------------------------------------------------------------------------


def test_trajectory_shows_noise_scale_growing_as_loss_falls() -> None:
    task = make_linreg_task(d=16, sigma=1.0, n=20_000, seed=0)
    calls: list[tuple[int, int]] = []
    report = measure_noise(task, b_small=16, b_big=256, measurements=32, warmup_steps=60,
                           every=20, progress=lambda done, total: calls.append((done, total)))
    steps = [p.step for p in report.trajectory]
    assert steps == [0, 20, 40, 60]
    losses = [p.train_loss for p in report.trajectory]
    b = [p.estimate.b_simple for p in report.trajectory]
    assert losses == sorted(losses, reverse=True) and b == sorted(b)
    assert report.initial is report.trajectory[0].estimate
    assert report.final is report.trajectory[-1].estimate
    assert report.passes == 4 * (32 * 16 + 1) + 60 == calls[-1][0] == calls[-1][1]
    doc = report.to_json()
    assert doc["b_simple"] == report.final.b_simple and len(doc["trajectory"]) == 4
    json.dumps(doc, allow_nan=False)


def test_measuring_along_the_run_does_not_change_the_run() -> None:
    task = make_linreg_task(d=8, sigma=1.0, n=5_000, seed=1)
    plain = measure_noise(task, b_small=8, b_big=64, measurements=4, warmup_steps=12)
    traced = measure_noise(task, b_small=8, b_big=64, measurements=4, warmup_steps=12, every=5)
    assert plain.trajectory == () and [p.step for p in traced.trajectory] == [0, 5, 10, 12]
    assert plain.final == traced.final and plain.final_loss == traced.final_loss


@pytest.mark.parametrize("n, base, given, expected", [
    (1500, 32, (None, None), (32, 256)),
    (100, 32, (None, None), (12, 96)),  # shrunk so that b_big <= N
    (10, 32, (None, None), (1, 8)),
    (1500, 32, (8, None), (8, 64)),
    (1500, 32, (None, 1024), (32, 1024)),
])
def test_default_batch_sizes(n: int, base: int, given: tuple, expected: tuple) -> None:
    task = make_linreg_task(d=2, sigma=1.0, n=n, seed=0)
    task.base_batch_size = base
    assert default_batch_sizes(task, *given) == expected


def test_defaults_run_on_a_tiny_dataset() -> None:
    report = measure_noise(make_linreg_task(d=2, sigma=1.0, n=10, seed=0), measurements=4)
    assert (report.final.b_small, report.final.b_big, report.final.n_data) == (1, 8, 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"b_small": 8, "b_big": 60}, "multiple of b_small"),
    ({"b_small": 8, "b_big": 64, "measurements": 1}, "at least 4"),
    ({"b_small": 64, "b_big": 8192}, "larger than the dataset"),
    ({"b_small": 8, "b_big": 64, "every": 5}, "--warmup-steps"),
    ({"b_small": 8, "b_big": 64, "warmup_steps": -1}, ">= 0"),
])
def test_bad_driver_settings_are_usage_errors(kwargs: dict, match: str) -> None:
    task = make_linreg_task(d=4, sigma=1.0, n=1000, seed=0)
    kwargs.setdefault("measurements", 4)
    with pytest.raises(UsageError, match=match):
        measure_noise(task, **kwargs)


def test_errors_in_the_users_model_are_one_line_task_errors() -> None:
    task = make_linreg_task(d=4, sigma=1.0, n=1000, seed=0)
    task.loss_fn = lambda out, target: out.sum() / 0 * torch.nan  # NaN loss
    with pytest.raises(TaskError, match="not finite"):
        measure_noise(task, b_small=4, b_big=16, measurements=4)
    task.loss_fn = lambda out, target: out[:, 5].mean()  # wrong shape
    with pytest.raises(TaskError, match="forward/backward pass failed: IndexError"):
        measure_noise(task, b_small=4, b_big=16, measurements=4)


def test_estimate_is_a_frozen_value() -> None:
    est = estimate_from_norms([2.0, 2.2], [1.0, 1.05], 1, 8)
    assert isinstance(est, NoiseEstimate) and math.isfinite(est.trace_sigma)
    with pytest.raises(AttributeError):
        est.b_simple = 1.0  # type: ignore[misc]


def test_a_part_frozen_by_an_lr_0_group_is_left_out_as_requires_grad_false() -> None:
    """A part the optimizer holds at lr 0 does not move: its gradients are not the run's
    noise. The estimate equals the one with that part frozen by requires_grad, and differs
    from one that counts it (a noisy first layer)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 6, generator=g) * 5, torch.randint(0, 3, (256,), generator=g))

    def groups(params, lr):
        params = list(params)  # a generator, as training passes model.parameters()
        first, rest = params[:2], params[2:]
        return torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest}], lr=lr)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))

    def frozen():
        m = model()
        m[0].requires_grad_(False)
        return m

    def run(task):
        return estimate_noise(task.model(), task, b_small=8, b_big=64, measurements=4,
                              seed=2)[0]

    def head_only(params, lr):
        return torch.optim.SGD(list(params)[2:], lr=lr)

    lr0 = run(Task(model=model, train_data=data, loss_fn=F.cross_entropy, optimizer=groups))
    out = run(Task(model=model, train_data=data, loss_fn=F.cross_entropy, optimizer=head_only))
    assert out.b_simple == pytest.approx(lr0.b_simple, rel=1e-5)
    off = run(Task(model=frozen, train_data=data, loss_fn=F.cross_entropy))
    every = run(Task(model=model, train_data=data, loss_fn=F.cross_entropy))
    assert lr0.b_simple == pytest.approx(off.b_simple, rel=1e-5)
    assert lr0.grad_sq_norm == pytest.approx(off.grad_sq_norm, rel=1e-5)
    assert abs(every.grad_sq_norm / lr0.grad_sq_norm - 1) > 0.05
    assert any("does not move (a group of lr 0, or not in it)" in n for n in lr0.notes + out.notes)
    assert not any("lr 0" in n for n in off.notes + every.notes)


def test_moved_by_reads_the_lr_before_a_scheduler() -> None:
    from bsselect.selection.noise_monitor import moved_by

    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.0}, {"params": [b]}], lr=0.1)
    assert moved_by(opt, [a, b]) == [b] and moved_by(None, [a, b]) == [a, b]
    assert moved_by(torch.optim.SGD([b], lr=0.1), [a, b]) == [b]  # a not in the optimizer
    # A warm-up from 0 (every group at lr 0 at step 0, initial_lr kept): nothing is frozen.
    warm = torch.optim.SGD([a, b], lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(warm, lambda step: step / 10)
    assert warm.param_groups[0]["lr"] == 0 and moved_by(warm, [a, b]) == [a, b]
    # Every group frozen: all of them (nothing else to measure).
    assert moved_by(torch.optim.SGD([a, b], lr=0.0), [a, b]) == [a, b]


def test_the_factory_gets_every_parameter_as_training_gives_them() -> None:
    """A factory groups by position (it only gets the parameters). With a layer frozen by
    requires_grad the noise measurement called it with the trainable ones only, so its groups
    shifted and a trained layer was left out (review)."""
    from bsselect.selection.noise import trained_parameters

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        m[0].requires_grad_(False)
        return m

    def by_position(params, lr):
        ps = list(params)
        return torch.optim.SGD([{"params": ps[:2], "lr": 0.0}, {"params": ps[2:]}], lr=lr)

    task = Task(model=model, train_data=TensorDataset(torch.randn(64, 8), torch.randn(64, 1)),
                loss_fn=F.mse_loss, optimizer=by_position)
    m = task.model()
    moved, left_out = trained_parameters(m, task)
    trained = [p for g in task.make_optimizer(m.parameters(), task.lr).param_groups if g["lr"]
               for p in g["params"]]
    assert [id(p) for p in moved] == [id(p) for p in trained] and len(moved) == 4
    assert left_out == 0  # the lr-0 group holds only the requires_grad=False layer
