"""Dropout and the noise scale: mask noise does not vanish when the batch is the whole dataset,
so the finite population correction alone overstates |G|^2 by tr_dropout/N. Checked against
exact values from per-example gradients under many independent masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.selection.noise import active_dropout, estimate_noise
from bsselect.selection.noise_math import estimate_from_norms, sampling_factor
from bsselect.selection.noise_run import estimate_json, measure_noise


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = torch.multinomial(torch.softmax(1.5 * x @ w, 1), 1, generator=g).squeeze(1)
    return x, y


def _model(p: float = 0.5) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(p), nn.Linear(32, 3))


class _FunctionalDropout(nn.Module):
    """_model's network with its dropout called as a function: no dropout module to find."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.inp, self.out = nn.Linear(10, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(torch.tanh(self.inp(x)), self.p, self.training)
        return self.out(h)


def _trained_task(p: float = 0.5, n: int = 128, steps: int = 300, make=None
                  ) -> tuple[Task, nn.Module]:
    make = make or _model
    x, y = _data(n)
    torch.manual_seed(0)
    model = make(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:8]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    task = Task(model=lambda: make(p), train_data=TensorDataset(x, y),
                loss_fn=nn.CrossEntropyLoss(), lr=0.1, base_batch_size=8)
    return task, model


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: int = 300) -> dict:
    """|G|^2 (mask- and data-averaged gradient) and tr(Sigma) (per-example variance over data
    and masks) from per-example gradients under ``masks`` independent masks each."""
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(f), in_dims=(None, 0, 0), randomness="different")
    torch.manual_seed(1)
    n = len(x)
    total = torch.zeros(n, sum(v.numel() for v in params.values()), dtype=torch.float64)
    sq = 0.0
    for _ in range(masks):
        d = per_example(params, x, y)
        a = torch.cat([d[k].reshape(n, -1) for k in params], 1).double()
        total += a
        sq += float(a.pow(2).sum())
    mean_i = total / masks
    G = mean_i.mean(0)
    tr_total = sq / (n * masks) - float(G @ G)
    tr_data = float((mean_i - G).pow(2).sum(1).mean())
    g2 = float(G @ G) - (tr_total - tr_data) / (n * masks)  # |mean|^2 minus its MC variance
    return dict(g2=g2, trace=tr_total, dropout=tr_total - tr_data, b=tr_total / g2)


def test_active_dropout_names_modules_in_training_mode_with_p_above_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0), nn.Dropout2d(0.2),
                          nn.AlphaDropout(0.3), nn.MultiheadAttention(4, 2, dropout=0.1))
    assert active_dropout(model) == ("1", "3", "4", "5")
    model[3].eval()
    assert active_dropout(model) == ("1", "4", "5")
    model.eval()
    assert active_dropout(model) == ()
    assert active_dropout(nn.Linear(3, 3)) == ()


def test_mask_trace_is_taken_out_of_the_finite_population_correction() -> None:
    """E|g_b|^2 = |G|^2 + c(b) tr_data + D/b: with D given, the estimator inverts it exactly;
    without it, |G|^2 comes out D/N high."""
    g2, tr_data, d, n = 0.1, 8.0, 30.0, 128
    e = {b: g2 + sampling_factor(b, n) * tr_data + d / b for b in (8, 64)}
    jitter = [1e-9, -1e-9, 0.0]
    small, big = [e[8] + j for j in jitter], [e[64] + j for j in jitter]
    corrected = estimate_from_norms(small, big, 8, 64, n, mask_trace=[d] * 3)
    assert corrected.grad_sq_norm == pytest.approx(g2, rel=1e-6)
    assert corrected.trace_sigma == pytest.approx(tr_data + d, rel=1e-6)
    assert corrected.trace_sigma_dropout == pytest.approx(d)
    plain = estimate_from_norms(small, big, 8, 64, n)
    assert plain.grad_sq_norm == pytest.approx(g2 + d / n, rel=1e-6)
    assert plain.trace_sigma_dropout is None and plain.dropout == ()


def test_dropout_small_dataset_matches_the_exact_noise_scale() -> None:
    """The review's case (N=128, p=0.5, after 300 steps): exact B ~250 here; the finite population
    correction alone gave ~110 with an interval excluding it."""
    task, model = _trained_task()
    x, y = task.train_data.tensors
    exact = _exact(model, x, y)
    assert 150 < exact["b"] < 500 and exact["dropout"] > 2 * (exact["trace"] - exact["dropout"])
    model.train()
    torch.manual_seed(0)  # the masks come from the global RNG
    est, _ = estimate_noise(model, task, b_small=8, b_big=128, measurements=64, seed=3)
    assert est.dropout == ("2",)
    assert est.notes and "dropout" in est.notes[0]
    assert est.trace_sigma_dropout == pytest.approx(exact["dropout"], rel=0.3)
    assert est.resolved
    lo, hi = est.b_simple_ci
    assert lo <= exact["b"] <= hi
    assert est.b_simple == pytest.approx(exact["b"], rel=0.35)
    assert est.grad_sq_norm == pytest.approx(exact["g2"], abs=3 * est.grad_sq_norm_se)


def test_functional_dropout_is_found_by_its_effect_and_corrected_too() -> None:
    """``F.dropout`` in ``forward`` has no module for ``active_dropout`` to see (the review's
    leftover): the first measurement's repeated sub-batch finds the gradients differ, and the
    estimate gets the same correction, against the same exact truth."""
    task, model = _trained_task(make=_FunctionalDropout)
    x, y = task.train_data.tensors
    exact = _exact(model, x, y)
    assert 150 < exact["b"] < 500
    model.train()
    assert active_dropout(model) == ()
    torch.manual_seed(0)
    passes: list[int] = []
    est, _ = estimate_noise(model, task, b_small=8, b_big=128, measurements=64, seed=3,
                            on_pass=passes.append)
    assert passes == [17] * 64  # the test's repeat, then every measurement's
    assert est.dropout == () and est.notes[0].startswith("the forward is random without")
    assert est.trace_sigma_dropout == pytest.approx(exact["dropout"], rel=0.3)
    lo, hi = est.b_simple_ci
    assert lo <= exact["b"] <= hi
    assert est.b_simple == pytest.approx(exact["b"], rel=0.35)
    # told it is not random, the estimate is the uncorrected one, far below the truth
    torch.manual_seed(0)
    plain, _ = estimate_noise(model, task, b_small=8, b_big=128, measurements=64, seed=3,
                              random=False)
    assert plain.trace_sigma_dropout is None and plain.b_simple < 0.6 * exact["b"]


class _ZeroHead(nn.Module):
    """Dropout before a zero-initialised head: at initialisation the loss does not depend on
    the masks, the head's gradient does."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(10, 32), nn.Linear(32, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.dropout(torch.tanh(self.inp(x)), 0.5, self.training))


def test_randomness_is_found_in_the_gradient_at_every_point_not_once() -> None:
    """The review's counter-example to testing the loss once at initialisation: found at
    initialisation (the head's gradient differs under two masks) and at a point after warm-up
    steps, each point deciding at its own weights."""
    x, y = _data(128)
    task = Task(model=_ZeroHead, train_data=TensorDataset(x, y),
                loss_fn=nn.CrossEntropyLoss(), lr=0.1, base_batch_size=8)
    seen = []
    report = measure_noise(task, b_small=8, b_big=32, measurements=4, warmup_steps=20, every=10,
                           progress=lambda done, total: seen.append((done, total)))
    for point in report.trajectory:
        assert point.estimate.trace_sigma_dropout is not None, point.step
        assert point.estimate.notes[0].startswith("the forward is random without")
    assert report.measure_passes == 3 * 4 * 5 and seen[-1] == (3 * 4 * 5 + 20,) * 2


class _SpectralMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.utils.spectral_norm(nn.Linear(10, 32))
        self.out = nn.utils.parametrizations.spectral_norm(nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


@pytest.mark.parametrize("make", [lambda: _model(0.0), _SpectralMLP, lambda: nn.Sequential(
    nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))], ids=["plain", "spectral", "bn"])
def test_a_deterministic_forward_is_not_taken_for_a_random_one(make) -> None:
    """State a forward updates (spectral norm's power iteration, BatchNorm's running
    statistics) is not randomness: the test's two passes start from the same buffers (the
    review found spectral norm flagged, +12.5% passes and a made-up correction)."""
    x, y = _data(64)
    task = Task(model=make, train_data=TensorDataset(x, y), loss_fn=nn.CrossEntropyLoss(),
                lr=0.1, base_batch_size=8)
    model = make().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passes: list[int] = []
    est, _ = estimate_noise(model, task, b_small=8, b_big=32, measurements=4, seed=0,
                            on_pass=passes.append)
    assert passes == [5, 4, 4, 4]  # one test pass in all
    assert est.trace_sigma_dropout is None and not any("random" in n for n in est.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_dropout_costs_one_test_pass_and_says_nothing() -> None:
    x, y = _data(64)
    task = Task(model=lambda: _model(0.0), train_data=TensorDataset(x, y),
                loss_fn=nn.CrossEntropyLoss(), lr=0.1, base_batch_size=8)
    report = measure_noise(task, b_small=8, b_big=32, measurements=4)
    assert report.measure_passes == 4 * 4 + 1  # the first measurement's sub-batch twice
    out = estimate_json(report.final)
    assert out["dropout"] == [] and out["trace_sigma_dropout"] is None and out["notes"] == []


def test_dropout_adds_one_pass_per_measurement_and_json_fields() -> None:
    x, y = _data(64)
    task = Task(model=lambda: _model(0.5), train_data=TensorDataset(x, y),
                loss_fn=nn.CrossEntropyLoss(), lr=0.1, base_batch_size=8)
    seen = []
    report = measure_noise(task, b_small=8, b_big=32, measurements=4,
                           progress=lambda done, total: seen.append((done, total)))
    assert report.measure_passes == 4 * 5 and seen[-1] == (20, 20)
    assert report.samples == 20 * 8
    out = report.to_json()
    assert out["dropout"] == ["2"] and out["trace_sigma_dropout"] > 0
    assert "dropout is active" in out["notes"][0]


DROPOUT_TASK = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task


def task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    return Task(model=lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5),
                                            nn.Linear(32, 2)),
                train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy, lr=0.05)
'''


def test_the_noise_command_prints_what_its_number_is_under_dropout(tmp_path) -> None:
    # The JSON and the API carried the dropout note; the table did not print it.
    from conftest import run_cli

    path = tmp_path / "drop.py"
    path.write_text(DROPOUT_TASK)
    done = run_cli("noise", f"{path}:task", "--measurements", "4")
    assert done.returncode == 0, done.stderr
    assert "note: dropout is active (module 2): its mask noise is part of tr(Sigma)" in (
        " ".join(done.stdout.split()))
