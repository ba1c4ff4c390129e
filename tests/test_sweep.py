"""End to end: `bsselect sweep` and `bsselect report` on tiny real tasks (tests/tasks/
sweep_tasks.py) trained on the CPU — in process through ``run_sweep``, and through the real
command in a subprocess for exit codes, signals and the journal on disk.

Nothing here asserts on a duration: step times decide the ranking's order, so the ranking is
checked as a set and against ``recommended_batch_size``, never as a fixed order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error, run_cli  # tests/ is on sys.path (rootdir-relative, no __init__.py)

import bsselect.selection.trials as trials_mod
from bsselect.selection import sweep as sweep_mod  # noqa: E402
from bsselect.selection import sweep_settings as sweep_settings_mod  # noqa: E402
from bsselect.selection.choice import NoiseInterval, contenders
from bsselect.selection.lr_scaling import LrScaling
from bsselect.selection.rank import steps_fit_of
from bsselect.selection.sweep import (SweepSettings, default_budget, make_setup, parse_budget,
                                      run_sweep)
from bsselect.selection.timing import usable_cpus
from bsselect.selection.trial_types import TrialResult, TrialStatus
from bsselect.selection.trials import BudgetKind, evaluate
from bsselect.task import load_task

TASKS = Path(__file__).parent / "tasks" / "sweep_tasks.py"
sys.path.insert(0, str(TASKS.parent))
import sweep_tasks  # noqa: E402  (the same file the CLI loads by path)

# One intra-op thread: less CPU, and no stalls while the 2-core machine is busy elsewhere.
CLI_ENV = {"OMP_NUM_THREADS": "1"}
DESIGN_TRIAL_FIELDS = ["batch_size", "status", "lr", "steps", "samples", "wall_s", "step_time_s",
                       "samples_per_s", "train_loss_start", "train_loss_end", "loss_drop_per_s",
                       "val_loss", "val_metric"]
DESIGN_FIT_FIELDS = ["tau_f_s", "tau_d_s", "b_simple", "b_noise", "b_opt"]
# The settings of the shared CLI sweep; --resume must repeat them to continue its journal.
TINY_ARGS = ("--batch-sizes", "8,16,32,64", "--budget", "256", "--noise-measurements", "2",
             "--lr-scaling", "linear")
SLOW_ARGS = ("--batch-sizes", "8,16,32,64", "--budget", "256", "--noise-measurements", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    """In process too: on a busy 2-core machine two intra-op threads wait on each other for a
    scheduler slice (~70 ms) inside steps that take 0.5 ms alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec(name: str) -> str:
    return f"{TASKS}:{name}"


def sweep_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("sweep", *args, timeout=180, env={**CLI_ENV, **(env or {})})


def json_out(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def journal_lines(path: Path) -> list[dict]:
    """Every line of a journal, parsed (fails on any unreadable line)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def journal_trials(path: Path) -> list[dict]:
    lines = journal_lines(path)
    assert "bsselect_journal" in lines[0]
    return [line["trial"] for line in lines[1:] if "trial" in line]


TIMED = ("step_time_s", "samples_per_s", "loss_drop_per_s")  # from the interleaved timing


def untimed(trials: list[dict]) -> list[dict]:
    """Trials without the fields the interleaved timing rounds set (re-measured per run)."""
    return [{k: v for k, v in t.items() if k not in TIMED} for t in trials]


def settings(rule: LrScaling, budget: str = "256", noise: int = 0) -> SweepSettings:
    return SweepSettings(budget=parse_budget(budget), lr_scaling=rule, noise_measurements=noise)


# --------------------------------------------------------------------------- core, in process


class _PeakLrSGD(torch.optim.SGD):
    """SGD that remembers the largest lr it stepped with (a trial's lr, after its ramp) and,
    at its first step, the weights it started from."""

    peak_lr = 0.0
    stepped = False
    owner: "RecordingSGD | None" = None

    def step(self, closure=None):
        if not self.stepped and self.owner is not None:
            self.owner.started.append(self)
            self.owner.weights.append([p.detach().clone() for g in self.param_groups
                                       for p in g["params"]])
        self.stepped = True
        self.peak_lr = max(self.peak_lr, *(g["lr"] for g in self.param_groups))
        return super().step(closure)


class RecordingSGD:
    """The task's optimizer factory, recording the lr each optimizer stepped with (at most;
    optimizers built and never stepped, such as the one that reads the groups' ratios at the
    task's lr, are not trials) and the weights each started from, in the order they started."""

    def __init__(self) -> None:
        self.started: list[_PeakLrSGD] = []
        self.weights: list[list[torch.Tensor]] = []

    @property
    def lrs(self) -> list[float]:
        return [opt.peak_lr for opt in self.started]

    def clear(self) -> None:
        self.started.clear()
        self.weights.clear()

    def __call__(self, params, lr: float) -> torch.optim.Optimizer:
        opt = _PeakLrSGD(list(params), lr=lr, momentum=0.9)
        opt.owner = self
        return opt


@pytest.mark.parametrize("rule, lrs", [
    (LrScaling.linear, [0.025, 0.1, 0.4]),   # lr 0.1 at batch 16, times b/16
    (LrScaling.sqrt, [0.05, 0.1, 0.2]),      # times sqrt(b/16)
    (LrScaling.none, [0.1, 0.1, 0.1]),
])
def test_run_sweep_scales_lr_and_starts_every_trial_from_the_same_weights(tmp_path, rule, lrs):
    task, name = load_task(spec("tiny"))
    optimizer = RecordingSGD()
    task.optimizer = optimizer
    result = run_sweep(task, task_name=name, batch_sizes=[4, 16, 64], settings=settings(rule),
                       device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl",
                       resume=False, max_batch=64, max_batch_source="test")

    assert [t.lr for t in result.trials] == lrs
    # The optimizer really stepped at the scaled lr, not just the report; the last one is the
    # interleaved timing's, run at lr 0 so the weights never move.
    assert optimizer.lrs == lrs + [0.0]
    first = optimizer.weights[0]
    for weights in optimizer.weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, weights))
    assert [t.status for t in result.trials] == [TrialStatus.ok] * 3
    assert [t.steps for t in result.trials] == [64, 16, 4]  # 256 samples each
    assert [t.samples for t in result.trials] == [256, 256, 256]
    assert len({t.train_loss_start for t in result.trials}) == 1
    assert result.made_val_split and result.to_json()["validation"] == "held-out 10% of train_data"
    assert sorted(result.ranking.ranking) == [4, 16, 64]
    assert result.ranking.verdict.startswith(f"recommended b={result.recommended_batch_size}:")
    assert [t["batch_size"] for t in journal_trials(tmp_path / "j.jsonl")] == [4, 16, 64]


def test_train_loss_start_is_the_initial_weights_loss_measured_once(tmp_path, monkeypatch):
    task, name = load_task(spec("tiny"))
    calls = []
    real = trials_mod.initial_loss
    monkeypatch.setattr(trials_mod, "initial_loss", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(sweep_mod, "initial_loss", trials_mod.initial_loss)
    result = run_sweep(task, task_name=name, batch_sizes=[4, 16, 64],
                       settings=settings(LrScaling.linear), device=torch.device("cpu"),
                       journal_path=tmp_path / "j.jsonl", resume=False, max_batch=64,
                       max_batch_source="test")
    assert len(calls) == 1  # once for the sweep, not once per trial
    setup, _ = make_setup(task, settings(LrScaling.linear), torch.device("cpu"),
                          eval_batch_size=4)  # the sweep's: no larger than its smallest batch
    model = task.model()
    model.load_state_dict(setup.initial_state)
    expected, _ = evaluate(model, task, setup.eval_train, torch.device("cpu"),
                           setup.eval_batch_size, metric=False)
    assert {t.train_loss_start for t in result.trials} == {expected}


@pytest.mark.parametrize("max_batch, base, expected", [
    (1024, 32, 1_024),          # 32 steps of the base batch size
    (512, 128, 4_096),
    (4_096, 32, 4_096),         # at least one step of the largest batch
    (1024, 4096, 65_536),       # at most 65,536 samples
    (131_072, 32, 65_536),
])
def test_default_budget(max_batch, base, expected):
    budget = default_budget(max_batch, base)
    assert (budget.kind, budget.amount) == (BudgetKind.samples, float(expected))


def test_validation_is_capped_to_a_fixed_subset(tmp_path, monkeypatch):
    task, name = load_task(spec("diverge"))  # 64 val_data items
    monkeypatch.setattr(sweep_mod, "VAL_ITEMS", 16)           # the subset make_setup takes
    monkeypatch.setattr(sweep_settings_mod, "VAL_ITEMS", 16)  # the cap the journal records
    result = run_sweep(task, task_name=name, batch_sizes=[8, 16], settings=settings(
                           LrScaling.linear, budget="64"), device=torch.device("cpu"),
                       journal_path=tmp_path / "j.jsonl", resume=False, max_batch=16,
                       max_batch_source="test")
    assert result.to_json()["validation"] == "val_data, a fixed subset of 16 items"
    assert journal_lines(tmp_path / "j.jsonl")[0]["settings"]["validation_items"] == 16
    # Every trial validates on the setup's fixed 16 items.
    setup, _ = make_setup(task, settings(LrScaling.linear, budget="64"), torch.device("cpu"))
    assert len(setup.val_data) == 16
    report = run_cli("report", str(tmp_path / "j.jsonl"), "--json")
    assert json.loads(report.stdout)["validation"] == "val_data, a fixed subset of 16 items"
    assert json.loads(report.stdout)["device"] == "cpu"   # the sweep's ("journal", before)


def test_noise_measurement_out_of_memory_falls_back_to_the_trial_batch(tmp_path):
    # Base batch 64 does not fit (cap 32): each trial's noise measurement retries on
    # sub-batches of its own batch size, and the trial's results stand.
    task, name = load_task(spec("oom_base"))
    result = run_sweep(task, task_name=name, batch_sizes=[8, 16], settings=settings(
                           LrScaling.linear, budget="128", noise=2), device=torch.device("cpu"),
                       journal_path=tmp_path / "j.jsonl", resume=False, max_batch=16,
                       max_batch_source="test")
    assert [t.status for t in result.trials] == [TrialStatus.ok, TrialStatus.ok]
    assert all(t.grad_sq_norm is not None and t.trace_sigma is not None for t in result.trials)
    assert result.ranking.b_hat_source is not None
    assert result.recommended_batch_size in (8, 16)


def test_held_out_split_is_a_disjoint_tenth_of_train_data():
    task, _ = load_task(spec("tiny"))
    setup, made = make_setup(task, settings(LrScaling.linear), torch.device("cpu"))
    assert made
    train, val = setup.train_data.indices, setup.val_data.indices
    assert (len(train), len(val)) == (346, 38)
    assert sorted(train + val) == list(range(sweep_tasks.N_ITEMS))


def test_a_diverged_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    task, name = load_task(spec("diverge"))
    # Run order 8, 256, 16, 32: trials after the diverged one must still run.
    result = run_sweep(task, task_name=name, batch_sizes=[8, 256, 16, 32],
                       settings=settings(LrScaling.linear, budget="20steps"),
                       device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl",
                       resume=False, max_batch=256, max_batch_source="test")

    by_b = {t.batch_size: t for t in result.trials}
    assert [t.status for t in result.trials] == [TrialStatus.ok, TrialStatus.diverged,
                                                 TrialStatus.ok, TrialStatus.ok]
    bad = by_b[256]
    assert bad.lr == 1.6
    assert 1 <= bad.steps < 20  # stopped as soon as the loss blew up
    assert bad.error.startswith("loss ") and bad.error.endswith(f" at step {bad.steps}")
    assert float(bad.error.split()[1]) > 10 * bad.train_loss_start
    assert bad.train_loss_start == by_b[8].train_loss_start
    assert (bad.train_loss_end, bad.step_time_s, bad.loss_drop_per_s) == (None, None, None)
    assert sorted(result.ranking.ranking) == [8, 16, 32]
    assert result.recommended_batch_size in (8, 16, 32)
    assert [(r.batch_size, r.status) for r in result.ranking.rows][-1] == (256,
                                                                            TrialStatus.diverged)
    journaled = journal_trials(tmp_path / "j.jsonl")
    assert [(t["batch_size"], t["status"]) for t in journaled] == [
        (8, "ok"), (256, "diverged"), (16, "ok"), (32, "ok")]


def test_a_blow_up_in_the_last_update_is_divergence_not_no_progress(tmp_path):
    """Two steps at lr 1.6: each step's loss is read before its update (7x the start at the
    second), the end evaluation after the last, 10x and more above the start. It was
    "no_progress ... a plateau" (review)."""
    task, name = load_task(spec("diverge"))
    result = run_sweep(task, task_name=name, batch_sizes=[8, 256],
                       settings=settings(LrScaling.linear, budget="2steps"),
                       device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl",
                       resume=False, max_batch=256, max_batch_source="test")
    bad = {t.batch_size: t for t in result.trials}[256]
    assert bad.steps == 2 and bad.train_loss_end > 10 * bad.train_loss_start
    assert bad.status is TrialStatus.diverged
    assert bad.error.startswith(f"loss {bad.train_loss_end:.4g} after the last step, over 10x")


def test_trials_that_end_inside_their_lr_ramp_are_said(tmp_path):
    """--warmup-steps 50 over trials of 64, 16 and 4 steps: b=16 and 64 never trained at the
    lr their rows show (review: b=512 peaked at 4% of it, without a word)."""
    from bsselect.selection.sweep import SweepHooks

    task, name = load_task(spec("tiny"))
    said: list[str] = []
    run_sweep(task, task_name=name, batch_sizes=[4, 16, 64],
              settings=dataclasses.replace(settings(LrScaling.linear), warmup_steps=50),
              device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl", resume=False,
              max_batch=64, max_batch_source="test", hooks=SweepHooks(warn=said.append))
    ramp = [w for w in said if "--warmup-steps 50 is longer" in w]
    assert len(ramp) == 1 and "b=16 at 32% of it, b=64 at 8% of it" in ramp[0]
    assert "b=4 " not in ramp[0]
    said.clear()
    run_sweep(task, task_name=name, batch_sizes=[4, 16, 64],
              settings=dataclasses.replace(settings(LrScaling.linear), warmup_steps=4),
              device=torch.device("cpu"), journal_path=tmp_path / "k.jsonl", resume=False,
              max_batch=64, max_batch_source="test", hooks=SweepHooks(warn=said.append))
    assert not [w for w in said if "is longer than the trials" in w]


def test_a_nan_in_the_data_is_named_when_the_initial_loss_is_not_finite(tmp_path):
    """The initial loss's error blamed only the model and the loss_fn (review)."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task
    from bsselect.errors import TaskError

    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    x[::2] = float("nan")  # half the items: the loss's evaluation subset holds some
    task = Task(model=lambda: nn.Linear(4, 2), train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=torch.nn.functional.cross_entropy, lr=0.1)
    with pytest.raises(TaskError, match="a NaN or inf in the training data, the model's output"):
        run_sweep(task, task_name="nan", batch_sizes=[8, 16], settings=settings(LrScaling.linear),
                  device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl", resume=False,
                  max_batch=16, max_batch_source="test")


def test_a_loss_that_is_negative_has_no_tenfold_divergence_rule():
    """With a floor of 1e-12 as the reference, a loss that starts below 0 (a Gaussian NLL, a
    negative ELBO) was "diverged" as soon as it rose past 1e-11 (review): it has no tenfold
    multiple; a non-finite loss still is divergence."""
    from bsselect.selection.trials import divergence_reference

    assert divergence_reference(-5.0, None) is None and divergence_reference(0.0, None) is None
    assert divergence_reference(-5.0, 2.0) == 2.0 and divergence_reference(0.5, 0.1) == 0.5


def test_a_sweep_in_which_no_trial_lowered_the_loss_says_so():
    from bsselect.selection.sweep import warn_no_trial_progressed

    def trial(b, end, status=TrialStatus.ok):
        return TrialResult(batch_size=b, status=status, lr=0.1, steps=4, samples=64,
                           wall_s=0.1, train_loss_start=0.255, train_loss_end=end)

    said: list[str] = []
    warn_no_trial_progressed({16: trial(16, 0.2558), 32: trial(32, 0.2634)}, said.append)
    assert said == ["no trial lowered the training loss (from 0.255: b=16 0.2558, b=32 "
                    "0.2634): the pick rests on the step times and the noise scale alone; a "
                    "lower lr, or a longer --budget, lets the trials show which size trains"]
    said.clear()
    warn_no_trial_progressed({16: trial(16, 0.2558), 32: trial(32, 0.25)}, said.append)
    warn_no_trial_progressed({16: trial(16, 0.2558, TrialStatus.no_progress)}, said.append)
    assert said == []


# --------------------------------------------------------------------------- CLI: a finished sweep


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """One real CLI sweep of `tiny` (journal path, its --json output), shared by the tests
    that only read it (or copy its journal)."""
    journal = tmp_path_factory.mktemp("finished") / "tiny.jsonl"
    proc = sweep_cli(spec("tiny"), *TINY_ARGS, "--journal", str(journal), "--json")
    return journal, json_out(proc)


def test_cli_sweep_json_has_the_design_fields(finished):
    journal, out = finished
    trials = out["trials"]
    assert [t["batch_size"] for t in trials] == [8, 16, 32, 64]
    for t in trials:
        assert list(t)[:len(DESIGN_TRIAL_FIELDS)] == DESIGN_TRIAL_FIELDS
        b = t["batch_size"]
        assert t["status"] == "ok"
        assert t["lr"] == 0.1 * (b / 16)  # linear from lr 0.1 at batch 16
        assert (t["steps"], t["samples"]) == (256 // b, 256)
        # Two independent clocks of one speed: the interleaved rounds (step_time_s) and the
        # trial's own steps (wall_s: all of them, the first slow ones included).
        assert b / t["samples_per_s"] <= t["wall_s"] / t["steps"] * 3
        assert t["train_loss_end"] < t["train_loss_start"] and t["loss_drop_per_s"] > 0
        assert t["val_loss"] > 0 and 0.0 <= t["val_metric"] <= 1.0
    assert [t["lr"] for t in trials] == [0.05, 0.1, 0.2, 0.4]
    assert len({t["train_loss_start"] for t in trials}) == 1  # same initial weights
    assert list(out["fit"])[:len(DESIGN_FIT_FIELDS)] == DESIGN_FIT_FIELDS
    # Every trial keeps the unbiased |G|^2 and tr(Sigma) behind its b_simple, and their
    # standard errors; the fit's b_simple pools them over the trials, with an interval.
    for t in trials:
        if t["b_simple"] is not None:
            assert t["b_simple"] == pytest.approx(t["trace_sigma"] / t["grad_sq_norm"])
        assert t["grad_sq_norm_se"] > 0 and t["trace_sigma_se"] > 0
    pooled = (sum(t["trace_sigma"] for t in trials)
              / sum(t["grad_sq_norm"] for t in trials))
    assert out["fit"]["b_simple"] == pytest.approx(pooled)
    # B_steps comes from the trials' own loss curves; B_hat is the larger of the two.
    steps = steps_fit_of([TrialResult.from_dict(t) for t in trials])
    assert out["fit"]["b_steps"] == steps.b_noise
    fit = out["fit"]
    assert fit["b_hat"] == max(v for v in (fit["b_simple"], fit["b_steps"]) if v is not None)
    lo, hi = fit["b_hat_interval"]
    if fit["b_hat_source"] == "b_simple":
        assert fit["b_hat_from_batch_sizes"] == [8, 16, 32, 64]
        assert lo < fit["b_hat"] and (hi is None or hi > fit["b_hat"])
    else:
        assert fit["b_hat_source"] == "b_steps"
        assert (lo, hi) == (steps.lo, steps.hi) and lo <= fit["b_hat"] <= hi
    # Step times come from the interleaved rounds, journaled after the trials, for the
    # batch sizes that can still be the fastest at their trials' own step times; the rest
    # keep their own, and the note names them.
    rounds = {r["batch_size"]: r for r in out["timing"]["rounds"]}
    own = {t["batch_size"]: t["trial_step_time_s"] for t in trials}
    contending = contenders(own, NoiseInterval(lo, out["fit"]["b_hat"], hi or math.inf))
    assert tuple(sorted(rounds)) == contending and len(contending) >= 2
    for t in trials:
        if t["batch_size"] not in rounds:
            assert t["step_time_s"] == t["trial_step_time_s"] > 0
            assert f"{t['batch_size']}" in out["timing"]["note"]
            continue
        r = rounds[t["batch_size"]]
        assert len(r["round_medians_s"]) == 5
        assert r["step_time_lo_s"] <= t["step_time_s"] == r["step_time_s"] <= r["step_time_hi_s"]
        assert 0 < r["data_s"] < r["step_time_hi_s"]  # fetching the batch, timed apart
        assert t["trial_step_time_s"] > 0
    assert (out["timing"]["note"] is None) == (len(rounds) == len(trials))
    assert out["timing"]["not_timed"] == [b for b in own if b not in rounds]
    assert set(out["tied_with_best"]) <= {8, 16, 32, 64}
    assert out["recommended_batch_size"] in out["tied_with_best"]
    assert out["threads"] == max(1, usable_cpus() // 2)  # the default: half the cores
    assert sorted(out["ranking"]) == [8, 16, 32, 64]
    # One story: the verdict names the recommended batch size and its lr.
    assert out["verdict"].startswith(f"recommended b={out['recommended_batch_size']}:")
    assert out["recommended_lr"] == 0.1 * (out["recommended_batch_size"] / 16)
    assert out["validation"] == "held-out 10% of train_data"
    assert (out["lr_scaling"], out["budget"]) == ("linear", {"kind": "samples", "amount": 256.0})
    assert (out["resumed"], out["journal"]) == ([], str(journal))
    # The journal holds exactly what was reported, and the timing rounds as its last line.
    assert untimed(journal_trials(journal)) == untimed(trials)
    assert journal_lines(journal)[-1]["timing"] == out["timing"]["rounds"]


def test_cli_oom_trials_are_recorded_and_the_rest_still_run(tmp_path):
    proc = sweep_cli(spec("oom"), "--batch-sizes", "8,16,32,64,128", "--budget", "256",
                     "--noise-measurements", "0", "--journal", "j.jsonl", "--json")
    out = json_out(proc)

    cap = sweep_tasks.OOM_CAP
    statuses = [(t["batch_size"], t["status"]) for t in out["trials"]]
    assert statuses == [(8, "ok"), (16, "ok"), (32, "ok"), (64, "oom"), (128, "oom")]
    for t in out["trials"][3:]:
        assert t["error"] == (f"OutOfMemoryError: CUDA out of memory. Tried to allocate "
                              f"{t['batch_size'] * 2} MiB (GPU 0; {cap * 2} MiB total capacity)")
        assert (t["steps"], t["samples"], t["step_time_s"], t["val_loss"]) == (0, 0, None, None)
    assert sorted(out["ranking"]) == [8, 16, 32]
    assert out["recommended_batch_size"] in (8, 16, 32)
    assert [(r["batch_size"], r["status"]) for r in out["rows"]][3:] == [(64, "oom"),
                                                                        (128, "oom")]
    assert f"batch 128: oom in 0.0 s ({out['trials'][4]['error']})" in proc.stderr
    assert [t["status"] for t in journal_trials(tmp_path / "j.jsonl")] == ["ok"] * 3 + ["oom"] * 2


# --------------------------------------------------------------------------- interrupt and resume


def _default_sigint() -> None:
    # A background shell starts children with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the disposition a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_blocked_sweep(journal: Path, slow_batch: int) -> subprocess.Popen:
    """A CLI sweep of `slow` that blocks in the trial at ``slow_batch``; returns once the
    trial has started blocking (every smaller batch's trial is journaled by then)."""
    marker = journal.with_suffix(".blocked")
    env = {**os.environ, "COLUMNS": "200", **CLI_ENV,
           sweep_tasks.SLOW_BATCH_ENV: str(slow_batch), sweep_tasks.MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "bsselect", "sweep", spec("slow"), *SLOW_ARGS,
                             "--journal", str(journal), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the sweep never reached batch {slow_batch}: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def resume_slow(journal: Path) -> dict:
    return json_out(sweep_cli(spec("slow"), *SLOW_ARGS, "--journal", str(journal), "--resume",
                              "--json"))


def test_sigterm_is_taken_as_an_interrupt_with_the_resume_hint(tmp_path):
    """Slurm and Kubernetes send SIGTERM before SIGKILL: the sweep died in silence (review)."""
    journal = tmp_path / "j.jsonl"
    proc = start_blocked_sweep(journal, slow_batch=16)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert (f"error: interrupted; 1 finished trial(s) are in {journal} — rerun with --resume "
            "to continue") in stderr.splitlines()


def test_sigint_exits_130_keeps_finished_trials_and_resume_completes_the_rest(tmp_path):
    journal = tmp_path / "j.jsonl"
    proc = start_blocked_sweep(journal, slow_batch=32)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130
    assert stdout == ""
    assert (f"error: interrupted; 2 finished trial(s) are in {journal} — rerun with --resume "
            "to continue") in stderr.splitlines()
    assert "Traceback" not in stderr
    before = journal_trials(journal)
    assert [(t["batch_size"], t["status"]) for t in before] == [(8, "ok"), (16, "ok")]
    # report of the interrupted journal says what the sweep never ran (it gave a full
    # verdict on two of four batch sizes without a word: review)
    shown = run_cli("report", str(journal), "--json", env=CLI_ENV)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["not_run_batch_sizes"] == [32, 64]
    assert "stopped before b=32, 64" in " ".join(shown.stderr.split())
    table = run_cli("report", str(journal), env=CLI_ENV)  # and in the result, on stdout
    assert ("among the 2 batch sizes an interrupted sweep finished (not run: 32, 64)"
            in " ".join(table.stdout.split()))

    out = resume_slow(journal)
    assert out["resumed"] == [8, 16]
    assert out["not_run_batch_sizes"] == []
    assert json.loads(run_cli("report", str(journal), "--json", env=CLI_ENV).stdout)[
        "not_run_batch_sizes"] == []
    assert [(t["batch_size"], t["status"]) for t in out["trials"]] == [
        (8, "ok"), (16, "ok"), (32, "ok"), (64, "ok")]
    assert untimed(out["trials"][:2]) == untimed(before)  # taken from the journal, not re-run
    after = journal_trials(journal)
    assert [t["batch_size"] for t in after] == [8, 16, 32, 64]  # each batch size once
    assert untimed(after) == untimed(out["trials"])


def test_sigkill_loses_no_finished_trial_and_resume_completes_the_rest(tmp_path):
    journal = tmp_path / "j.jsonl"
    proc = start_blocked_sweep(journal, slow_batch=16)
    proc.kill()
    proc.communicate(timeout=60)

    assert proc.returncode == -signal.SIGKILL
    before = journal_trials(journal)
    assert [(t["batch_size"], t["status"]) for t in before] == [(8, "ok")]

    out = resume_slow(journal)
    assert out["resumed"] == [8]
    assert untimed(out["trials"][:1]) == untimed(before[:1])
    assert [t["batch_size"] for t in journal_trials(journal)] == [8, 16, 32, 64]
    assert [t["status"] for t in out["trials"]] == ["ok"] * 4


# --------------------------------------------------------------------------- a corrupted journal


@pytest.fixture
def cut_journal(finished, tmp_path) -> Path:
    """A copy of the finished sweep's journal whose last line (batch 64) is cut mid-line, as a
    writer killed mid-write leaves it."""
    data = b"".join(line for line in finished[0].read_bytes().splitlines(keepends=True)
                    if not line.startswith(b'{"timing"'))
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    path = tmp_path / "cut.jsonl"
    path.write_bytes(data[:last + (len(data) - last) // 2])
    return path


# header, plan, 8, 16, 32, then the cut line of 64
CUT_WARNING = "line 6 skipped: incomplete (the run was probably killed while writing it)"


def test_report_skips_a_cut_last_line_with_a_warning(cut_journal, finished):
    proc = run_cli("report", str(cut_journal), "--json", env=CLI_ENV)
    out = json_out(proc)

    assert f"warning: {cut_journal}: {CUT_WARNING}" in proc.stderr.splitlines()
    assert untimed(out["trials"]) == untimed(finished[1]["trials"][:3])
    assert out["not_run_batch_sizes"] == [64]  # the plan says it was to run
    # A resume with fewer batch sizes, all in the journal already, finishes that sweep: no
    # stale plan says otherwise (review).
    fewer = sweep_cli(spec("tiny"), *TINY_ARGS[2:], "--batch-sizes", "8,16,32", "--journal",
                      str(cut_journal), "--resume", "--json")
    assert json_out(fewer)["resumed"] == [8, 16, 32]
    again = json_out(run_cli("report", str(cut_journal), "--json", env=CLI_ENV))
    assert again["not_run_batch_sizes"] == [] and again["batch_sizes"] == [8, 16, 32]


def test_resume_skips_a_cut_last_line_reruns_only_that_trial(cut_journal, finished):
    proc = sweep_cli(spec("tiny"), *TINY_ARGS, "--journal", str(cut_journal), "--resume",
                     "--json")
    out = json_out(proc)

    assert f"warning: {cut_journal}: {CUT_WARNING}" in proc.stderr.splitlines()
    assert out["resumed"] == [8, 16, 32]
    assert untimed(out["trials"][:3]) == untimed(finished[1]["trials"][:3])
    assert out["trials"][3]["status"] == "ok"
    assert [t["batch_size"] for t in journal_trials(cut_journal)] == [8, 16, 32, 64]


def test_resume_with_other_settings_exits_2_and_leaves_the_journal_alone(cut_journal):
    before = cut_journal.read_bytes()
    proc = sweep_cli(spec("tiny"), "--batch-sizes", "8,16,32,64", "--budget", "256",
                     "--noise-measurements", "2", "--lr-scaling", "sqrt",
                     "--journal", str(cut_journal), "--resume")

    assert proc.returncode == 2
    error = one_error(proc)
    assert error.startswith(f"error: journal '{cut_journal}' was written for a different task "
                            "or settings (key ")
    assert error.endswith(": lr_scaling 'linear' -> 'sqrt'; use a new --journal path or drop "
                          "--resume")
    assert cut_journal.read_bytes() == before


# --------------------------------------------------------------------------- report


def test_report_renders_the_table_without_running_anything(finished):
    journal, out = finished
    before = journal.read_bytes()
    proc = run_cli("report", str(journal), env=CLI_ENV)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Sweep — {spec('tiny')} (256 samples per trial)")
    rec = out["recommended_batch_size"]
    assert (f"recommended batch size {rec} at lr {0.1 * rec / 16:.3g} (linear scaling from "
            "lr 0.1 at batch 16)") in proc.stdout
    assert f"journal: {journal}\n" in proc.stdout
    # Table rows: rank, then batch size (a compact table without vertical rules).
    rows = [line.split() for line in proc.stdout.splitlines()
            if len(line.split()) >= 9 and line.split()[0].isdigit() and line.split()[1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert [int(r[1]) for r in rows] == out["ranking"]  # ranked, best first
    assert proc.stderr == ""  # no progress: nothing trained
    assert journal.read_bytes() == before


def test_report_json_and_plot_match_the_sweep(finished, tmp_path):
    journal, sweep_out = finished
    # a missing folder is created, as --journal's is
    proc = run_cli("report", str(journal), "--json", "--plot", "plots/new/out.png", env=CLI_ENV)
    out = json_out(proc)

    for key in ("task", "batch_sizes", "budget", "lr_scaling", "base_lr", "base_batch_size",
                "trials", "fit", "ranking", "rows", "recommended_batch_size", "recommended_lr",
                "verdict", "validation", "journal"):
        assert out[key] == sweep_out[key], key
    assert proc.stderr.splitlines() == ["plot written to plots/new/out.png"]
    png = (tmp_path / "plots" / "new" / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_re_renders_the_last_sweep_not_every_trial_of_the_journal(finished, tmp_path):
    """A sweep resumed with fewer batch sizes ranks only those, timed together; `report`
    re-renders that sweep (its sizes, rounds and note), and says which journaled trials it
    left out, instead of ranking them by step times from another window of the machine."""
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(finished[0].read_bytes())
    args = [a if a != "8,16,32,64" else "8,16" for a in TINY_ARGS]
    resumed = json_out(sweep_cli(spec("tiny"), *args, "--journal", str(journal), "--resume",
                                 "--json"))
    assert resumed["resumed"] == [8, 16] and resumed["batch_sizes"] == [8, 16]
    last = journal_lines(journal)[-1]
    assert last["batch_sizes"] == [8, 16] and [r["batch_size"] for r in last["timing"]] == [8, 16]
    proc = run_cli("report", str(journal), "--json", env=CLI_ENV)
    out = json_out(proc)
    for key in ("batch_sizes", "trials", "fit", "ranking", "rows", "recommended_batch_size",
                "tied_with_best", "timing", "verdict"):
        assert out[key] == resumed[key], key
    assert ("warning: b=32, 64: in the journal but not in its last sweep (which ranked 8, 16), "
            "so left out") in " ".join(proc.stderr.split())


def test_report_after_a_resume_interrupted_before_its_timing_says_what_happened(finished,
                                                                                   tmp_path):
    """A sweep of 8, 16 resumed with 32, 64 added, stopped after their trials and before its
    timing rounds: report said they were "not in its last sweep", and its JSON nothing at all
    (review). Built from the finished 8..64 journal: its timing line moved before the 32 and
    64 trials, under a plan of all four."""
    lines = journal_lines(finished[0])
    header, trials, timing = lines[0], [ln for ln in lines if "trial" in ln], lines[-1]
    early = [t for t in trials if t["trial"]["batch_size"] in (8, 16)]
    late = [t for t in trials if t["trial"]["batch_size"] in (32, 64)]
    timing = dict(timing, batch_sizes=[8, 16],
                  timing=[r for r in timing["timing"] if r["batch_size"] in (8, 16)])
    journal = tmp_path / "j.jsonl"
    journal.write_text("".join(json.dumps(line) + "\n" for line in [
        header, *early, timing, {"plan": {"batch_sizes": [8, 16, 32, 64]}}, *late]))
    proc = run_cli("report", str(journal), "--json", env=CLI_ENV)
    out = json_out(proc)
    assert out["batch_sizes"] == [8, 16] and out["unranked_batch_sizes"] == [32, 64]
    said = " ".join(proc.stderr.split())
    assert ("warning: b=32, 64: trained by a later run on this journal that stopped before its "
            "timing rounds, so not ranked here; this ranks the sweep before it (8, 16)") in said
    assert "not in its last sweep" not in said


def test_report_says_when_the_same_trials_now_rank_differently(finished, tmp_path):
    """The journal keeps what its sweep recommended; when `report` ranks the same trials to
    another answer (the rules changed since), it says so instead of showing it silently."""
    lines = journal_lines(finished[0])
    assert lines[-1]["recommended_batch_size"] == finished[1]["recommended_batch_size"]
    other = next(b for b in (8, 16, 32, 64) if b != finished[1]["recommended_batch_size"])
    journal = tmp_path / "j.jsonl"
    journal.write_text("".join(json.dumps(line) + "\n" for line in
                               lines[:-1] + [dict(lines[-1], recommended_batch_size=other)]))
    proc = run_cli("report", str(journal), "--json", env=CLI_ENV)
    assert json_out(proc)["recommended_batch_size"] == finished[1]["recommended_batch_size"]
    assert (f"warning: the sweep that wrote {journal} recommended b={other}; the same trials "
            f"ranked by this bsselect give b={finished[1]['recommended_batch_size']}") in \
        " ".join(proc.stderr.split())
    same = run_cli("report", str(finished[0]), "--json", env=CLI_ENV)
    assert "warning" not in same.stderr
    # A path rich would read as markup is printed as it is; a recommendation that is not one
    # of that sweep's batch sizes, or not an integer, is not compared (the rounds stay).
    odd = tmp_path / "[bs]a[" / "]j.jsonl"  # ".../[bs]a[/]j.jsonl"
    odd.parent.mkdir()
    odd.write_bytes(journal.read_bytes())
    proc = run_cli("report", str(odd), env=CLI_ENV)
    assert proc.returncode == 0 and str(odd) in " ".join(proc.stderr.split()).replace(" ", "")
    for bad in (1024, "16", True):
        journal.write_text("".join(json.dumps(line) + "\n" for line in
                                   lines[:-1] + [dict(lines[-1], recommended_batch_size=bad)]))
        proc = run_cli("report", str(journal), "--json", env=CLI_ENV)
        assert proc.stderr == "" and json_out(proc)["timing"] == finished[1]["timing"]


def test_report_compares_only_when_that_sweeps_trials_are_all_there(finished, tmp_path):
    """A trial line lost (cut, hand-edited) means other trials are ranked: not a rules change."""
    lines = journal_lines(finished[0])
    other = next(b for b in (8, 16, 32, 64) if b != finished[1]["recommended_batch_size"])
    kept = [line for line in lines[:-1] if line.get("trial", {}).get("batch_size") != 64]
    journal = tmp_path / "j.jsonl"
    journal.write_text("".join(json.dumps(line) + "\n" for line in
                               kept + [dict(lines[-1], recommended_batch_size=other)]))
    proc = run_cli("report", str(journal), "--json", env=CLI_ENV)
    assert "recommended b=" not in proc.stderr


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, message", [
    (("--budget", "12parsecs"),
     "error: cannot read --budget '12parsecs'; use e.g. 4096 (samples), 200steps, 30s"),
    (("--budget", "0steps"),
     "error: cannot read --budget '0steps'; use e.g. 4096 (samples), 200steps, 30s"),
    (("--lr-scaling", "cubic"),
     "error: --lr-scaling must be auto, linear, sqrt or none; got 'cubic'"),
    (("--resume", "--overwrite"), "error: --resume and --overwrite exclude each other"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    proc = sweep_cli(spec("tiny"), "--batch-sizes", "8,16", *args)
    assert proc.returncode == 2
    assert one_error(proc) == message
    assert list(Path.cwd().glob("*.jsonl")) == []


def test_an_existing_journal_without_resume_exits_2(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"bsselect_journal":1}\n')
    proc = sweep_cli(spec("tiny"), "--batch-sizes", "8,16", "--journal", str(journal))

    assert proc.returncode == 2
    assert one_error(proc) == (f"error: journal '{journal}' already exists; pass --resume to "
                               "continue it, --overwrite to replace it, or choose a new "
                               "--journal path")
    assert journal.read_text() == '{"bsselect_journal":1}\n'


# --------------------------------------------------------------------------- no silent wrong answers


def test_batch_sizes_larger_than_the_training_set_are_skipped_never_recommended(tmp_path):
    # tiny: 384 items, 10% held out -> the trials train on 346.
    proc = sweep_cli(spec("tiny"), "--batch-sizes", "8,16,512,1024", "--budget", "256",
                     "--journal", str(tmp_path / "j.jsonl"), "--json")
    out = json_out(proc)
    assert out["skipped_batch_sizes"] == [512, 1024]
    assert [t["batch_size"] for t in out["trials"]] == [8, 16]
    assert out["recommended_batch_size"] in (8, 16)
    assert ("warning: batch sizes 512, 1024 are larger than the 346 training items (after "
            "holding out 10% for validation): skipped") in proc.stderr


def test_only_oversized_batch_sizes_is_a_usage_error(tmp_path):
    proc = sweep_cli(spec("tiny"), "--batch-sizes", "2048,4096", "--budget", "256",
                     "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 2
    assert one_error(proc) == ("error: every batch size (2048, 4096) is larger than the 346 "
                               "items the sweep trains on (after holding out 10% for "
                               "validation); choose batch sizes <= 346")


def test_a_sweep_where_every_trial_diverged_exits_1_and_says_what_to_try(tmp_path):
    # diverge: lr 0.05 at batch 8, linear scaling -> 0.8 at 128 and 1.6 at 256: both blow up.
    proc = sweep_cli(spec("diverge"), "--batch-sizes", "128,256", "--budget", "2048",
                     "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 1
    assert "Sweep — " in proc.stdout  # the table is still printed, the journal kept
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error == [("error: no trial trained (128: diverged, 256: diverged); the learning "
                      "rates tried were 0.8, 1.6 (linear scaling from lr 0.05 at batch 8): try "
                      "a lower lr (--lr, or the task's), --lr-scaling sqrt or none, or "
                      "--warmup-steps")]
    assert len(journal_trials(tmp_path / "j.jsonl")) == 2


def test_a_failing_metric_is_named_before_any_trial_trains(tmp_path):
    """It was found in every trial after each had trained; now the task's validation calls
    the metric on two items first."""
    proc = sweep_cli(spec("bad_metric"), "--batch-sizes", "8,16", "--budget", "64",
                     "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"),
                     "--json")
    assert proc.returncode == 1
    assert one_error(proc) == ("error: Task.metric fails on 2 items of Task.train_data: "
                               "KeyError: 'accuracy'")
    assert not (tmp_path / "j.jsonl").exists()


def test_warm_start_branches_every_trial_from_the_trained_base_configuration(tmp_path):
    task, name = load_task(spec("tiny"))
    optimizer = RecordingSGD()
    task.optimizer = optimizer
    cold = run_sweep(task, task_name=name, batch_sizes=[8, 32], settings=settings(
                         LrScaling.linear), device=torch.device("cpu"),
                     journal_path=tmp_path / "cold.jsonl", resume=False, max_batch=32,
                     max_batch_source="test")
    optimizer.clear()
    warm_settings = dataclasses.replace(settings(LrScaling.linear), warm_start_steps=10)
    warm = run_sweep(task, task_name=name, batch_sizes=[8, 32], settings=warm_settings,
                     device=torch.device("cpu"), journal_path=tmp_path / "warm.jsonl",
                     resume=False, max_batch=32, max_batch_source="test")
    # Optimizers: the warm start's (base lr 0.1, from the initial weights), the two trials'
    # (their own lr, from the branch point), the timing's (at lr 0).
    assert optimizer.lrs == [0.1, 0.05, 0.2, 0.0]
    init, branch_8, branch_32 = optimizer.weights[:3]
    assert all(torch.equal(a, b) for a, b in zip(branch_8, branch_32))
    assert not all(torch.equal(a, b) for a, b in zip(init, branch_8))
    # Both trials start from the branch point's (lower) loss, measured once.
    starts = {t.train_loss_start for t in warm.trials}
    assert len(starts) == 1 and starts.pop() < cold.trials[0].train_loss_start
    assert warm.to_json()["warm_start_steps"] == 10
    assert warm.settings.warm_start_steps == 10
    header = journal_lines(tmp_path / "warm.jsonl")[0]
    assert header["settings"]["warm_start_steps"] == 10  # part of the resume key
    assert "warm_start_steps" not in journal_lines(tmp_path / "cold.jsonl")[0]["settings"]


def test_the_cli_default_warm_start_is_the_documented_one():
    import inspect

    from bsselect import cli

    default = inspect.signature(cli.sweep).parameters["warm_start_steps"].default
    assert default == sweep_mod.WARM_START_STEPS == 0


@pytest.mark.parametrize("start, init, end, diverged", [
    (1.0, None, 1.01, True),      # from initialisation: any rise over the trial
    (1.0, None, 0.99, False),
    (1.0, 3.0, 1.9, False),       # warm start from 3.0 to 1.0: a rise to 1.9 is the noise floor
    (1.0, 3.0, 2.01, True),       # ... beyond 2.0 it undid more than half of the progress
    (1.0, 0.5, 1.01, True),       # a "warm start" that made no progress: as from initialisation
])
def test_rise_limit(start, init, end, diverged):
    assert (end > trials_mod.rise_limit(start, init)) is diverged


def test_each_trial_has_its_own_rng_stream_so_a_resumed_trial_equals_a_fresh_one(tmp_path):
    """Dropout draws from the global RNG: trial b's stream comes from (seed, b), not from
    whatever ran before it (issue 17)."""
    task, name = load_task(spec("tiny"))
    base_model = task.model
    task.model = lambda: torch.nn.Sequential(base_model(), torch.nn.Dropout(0.3))
    run = lambda sizes, path: run_sweep(  # noqa: E731
        task, task_name=name, batch_sizes=sizes, settings=settings(LrScaling.linear),
        device=torch.device("cpu"), journal_path=tmp_path / path, resume=False, max_batch=32,
        max_batch_source="test")
    both = {t.batch_size: t for t in run([8, 32], "both.jsonl").trials}
    alone = run([32], "alone.jsonl").trials[0]
    # The per-step training losses (dropout masks included) are identical; the end-of-trial
    # loss is evaluated at another eval batch (the sweep's smallest batch), hence approx.
    assert [(p.step, p.loss) for p in alone.loss_curve] == [
        (p.step, p.loss) for p in both[32].loss_curve]
    assert alone.train_loss_end == pytest.approx(both[32].train_loss_end, rel=1e-6)


def test_an_optimizers_parameter_groups_keep_their_own_learning_rates(tmp_path):
    """A factory may freeze a part (lr 0) or give it its own lr: the trials scale every group
    by the same factor and ramp, never flatten them to one lr."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task, sweep

    made = []

    def frozen_first(params, lr):
        params = list(params)
        opt = torch.optim.SGD([{"params": params[:2], "lr": 0.0},
                               {"params": params[2:], "lr": lr / 2}], lr=lr, momentum=0.9)
        made.append((lr, opt))
        return opt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :2].sum(1) > 0).long()
    task = Task(model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                train_data=TensorDataset(x, y), loss_fn=nn.functional.cross_entropy,
                optimizer=frozen_first, lr=0.05, base_batch_size=16)
    result = sweep(task, batch_sizes=[16, 32], budget="128", noise_measurements=0,
                   journal=tmp_path / "j.jsonl", warmup_steps=0)
    assert result.recommended_batch_size in (16, 32)
    # The trials' and the timing's optimizers (not the one built on meta to read its type).
    used = [opt for _, opt in made if "bsselect_lr_scale" in opt.param_groups[0]]
    assert len(used) >= 3
    for opt in used:
        frozen, half = opt.param_groups
        assert frozen["lr"] == 0.0 and frozen["bsselect_lr_scale"] == 0.0
        assert half["bsselect_lr_scale"] == 0.5
    assert {opt.param_groups[1]["lr"] for opt in used} >= {0.05 / 2, 0.1 / 2}  # 16 and 32


def test_each_trial_measures_its_noise_on_its_own_batches(tmp_path, monkeypatch):
    # The ranking pools the trials' |G|^2 and tr(Sigma) as independent estimates. Every trial
    # measured on the same batches (one seed, seed + 1000), so their errors shared a sign
    # (review: all five in 18 of 30 sweeps) and the 90% interval covered the exact pooled
    # value in 16 of 30 sweeps; with a seed per trial, 27 of 30 (docs/method.md).
    from bsselect.selection import noise as noise_mod

    seeds = {}
    sizes = set()
    real = noise_mod.estimate_noise

    def spy(model, task, **kw):
        seeds.setdefault(kw["seed"], 0)
        seeds[kw["seed"]] += 1
        sizes.add(len(task.train_data))
        return real(model, task, **kw)

    monkeypatch.setattr(noise_mod, "estimate_noise", spy)
    task, name = load_task(spec("tiny"))
    result = run_sweep(task, task_name=name, batch_sizes=[8, 16, 32],
                       settings=settings(LrScaling.linear, budget="8steps", noise=2),
                       device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl",
                       resume=False, max_batch=32, max_batch_source="test")
    assert all(t.ok and t.grad_sq_norm is not None for t in result.trials)
    assert len(seeds) == 3 and set(seeds.values()) == {1}
    assert set(seeds) == {trials_mod.noise_seed(0, b) for b in (8, 16, 32)}
    # "tiny" has no val_data: the noise is measured on the items the trials train on, not
    # on the held-out tenth the sweep validates on (review)
    n = len(task.train_data)
    assert sizes == {n - n // 10}


def test_resume_times_every_ok_size_so_no_old_step_time_is_ranked(cut_journal, finished):
    """Resumed trials were timed in another session (another machine, thread count or load):
    the timing rounds then take every ok size. Before, a size the old step times ruled out of
    the rounds kept its old time against the new ones (review: an old 0.8 ms b=8 against
    24 ms now was picked). Here the journal says b=16 took 1,000x longer than it does."""
    lines = cut_journal.read_bytes().splitlines(keepends=True)
    slow = []
    for line in lines:
        record = json.loads(line) if line.strip().endswith(b"}") else None
        if record and record.get("trial", {}).get("batch_size") == 16:
            record["trial"]["step_time_s"] *= 1000
            record["trial"]["wall_s"] *= 1000
            line = (json.dumps(record) + "\n").encode()
        slow.append(line)
    cut_journal.write_bytes(b"".join(slow))
    out = json_out(sweep_cli(spec("tiny"), *TINY_ARGS, "--journal", str(cut_journal),
                             "--resume", "--json"))
    assert out["resumed"] == [8, 16, 32]
    assert out["timing"]["not_timed"] == []
    timed = {t["batch_size"]: t["step_time_s"] for t in out["trials"]}
    assert timed[16] < 10 * timed[8]  # its time now, not the journal's


def test_evaluation_weights_the_last_short_batch_by_its_items_whatever_the_targets():
    """70 validation items in batches of 16: the last holds 6. With targets in a tuple the
    last batch counted as 16 items (review: val_metric 0.6375 against 0.6571)."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 16, generator=g)
    y = (x[:, 0] > 0.3).long()
    model = nn.Sequential(nn.Linear(16, 2))

    def wrap(items):
        return torch.stack([i[0] for i in items]), (torch.stack([i[1] for i in items]),)

    plain = Task(model=lambda: model, train_data=TensorDataset(x, y), loss_fn=F.cross_entropy,
                 metric=sweep_tasks.accuracy)
    tupled = Task(model=lambda: model, train_data=TensorDataset(x, y), collate_fn=wrap,
                  loss_fn=lambda o, t: F.cross_entropy(o, t[0]),
                  metric=lambda o, t: sweep_tasks.accuracy(o, t[0]))
    with torch.no_grad():
        out = model(x)
        truth = (float(F.cross_entropy(out, y)), sweep_tasks.accuracy(out, y))
    for task in (plain, tupled):
        loss, metric = evaluate(model, task, TensorDataset(x, y), torch.device("cpu"),
                                batch_size=16)
        assert loss == pytest.approx(truth[0], rel=1e-6) and metric == pytest.approx(truth[1])


FLAKY_TASK = '''
import os
import re
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if len(x) == 16 and os.environ.get("BROKEN_AT_16"):
            raise RuntimeError("a bug in the user's forward at 16")
        return self.lin(x)


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    return Task(model=Net, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.1, base_batch_size=8)
'''


def test_resume_runs_a_failed_trial_again_and_keeps_the_others(tmp_path):
    """A trial that failed with an error (a bug since fixed; on a GPU, an OOM because another
    job held memory) is the moment's, not the batch size's: --resume runs it again, and
    says so (it was kept, so no resume could ever retry it)."""
    (tmp_path / "flaky.py").write_text(FLAKY_TASK)
    spec = f"{tmp_path / 'flaky.py'}:make"
    journal = tmp_path / "j.jsonl"
    args = ("sweep", spec, "--batch-sizes", "8,16", "--budget", "256", "--journal",
            str(journal), "--noise-measurements", "0", "--json")
    first = run_cli(*args, env={"BROKEN_AT_16": "1"})
    assert first.returncode == 0, first.stderr
    statuses = {t["batch_size"]: t["status"] for t in json.loads(first.stdout)["trials"]}
    assert statuses == {8: "ok", 16: "error"}
    again = run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "--resume runs again the trials the journal holds as failed: b=16 (error)" in \
        again.stderr
    data = json.loads(again.stdout)
    assert {t["batch_size"]: t["status"] for t in data["trials"]} == {8: "ok", 16: "ok"}
    assert data["resumed"] == [8]
    report = run_cli("report", str(journal), "--json")
    assert report.returncode == 0, report.stderr
    assert {t["batch_size"]: t["status"] for t in json.loads(report.stdout)["trials"]} == \
        {8: "ok", 16: "ok"}
    # A resume killed after the rerun, before its timing rounds: report says that b=16 was
    # not timed with the others, not that the ranking rules changed (review).
    lines = journal.read_text().splitlines()
    assert "timing" in json.loads(lines[-1])
    journal.write_text("\n".join(lines[:-1]) + "\n")
    report = run_cli("report", str(journal))
    assert report.returncode == 0, report.stderr
    assert "b=16: trained after the journal's last timing rounds" in report.stderr, \
        report.stderr
    assert "rules have changed" not in report.stderr


def test_a_trial_whose_last_step_made_the_weights_non_finite_is_diverged(tmp_path):
    """Each step's loss is read before its update: a trial whose last update turned the
    weights to NaN ended with a NaN evaluation, which every divergence comparison passes
    (False for NaN), so it counted as ok and was recommended (review)."""
    out = tmp_path / "j.jsonl"
    proc = run_cli("sweep", f"{TASKS}:nan_at_end", "--batch-sizes", "16,32,64", "--budget",
                   "1600samples", "--warmup-steps", "0", "--noise-measurements", "0",
                   "--journal", str(out), "--json")
    assert proc.returncode == 1  # no trial trained
    trials = json.loads(proc.stdout)["trials"]
    assert [t["status"] for t in trials] == ["diverged"] * 3
    assert all("the loss is not finite after training (training nan" in t["error"]
               for t in trials)


def test_an_optimizer_factory_that_ignores_its_lr_is_refused_before_training(tmp_path):
    """``lambda p, lr: Adam(p, lr=1e-3)``: every trial trained at 1e-3 while the table
    showed each batch size's scaled lr (review)."""
    proc = run_cli("sweep", f"{TASKS}:fixed_lr", "--batch-sizes", "8,16", "--budget", "64",
                   "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 1
    assert one_error(proc) == (
        "error: the task's optimizer fixed_lr.<locals>.<lambda> ignores its lr argument: "
        "called with lr 0.004 and 0.008 it built the same group lrs [0.001]; bsselect scales "
        "the lr per batch size through that argument, so build the optimizer with it "
        "(optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr))")
    assert not (tmp_path / "j.jsonl").exists()


def test_an_optimizer_group_without_a_number_for_its_lr_is_one_line(tmp_path):
    """Adafactor(lr=None): reading the groups' lr ratios for the fingerprint raised an
    internal error (before it, every trial failed on the same TypeError)."""
    pytest.importorskip("transformers")
    proc = run_cli("sweep", f"{TASKS}:no_group_lr", "--batch-sizes", "8,16", "--budget", "64",
                   "--journal", str(tmp_path / "j.jsonl"))
    assert proc.returncode == 1
    assert one_error(proc).startswith(
        "error: the task's optimizer no_group_lr.<locals>.<lambda> has a parameter group "
        "without a number for its lr (TypeError: ")


def test_resume_refuses_a_journal_written_at_other_group_lr_ratios(tmp_path):
    """A backbone group at 0.1x the lr, then at 1x: the ratio was left out of the task's
    fingerprint, and --resume ranked trials of two optimizer setups together (review)."""
    args = ("sweep", f"{TASKS}:group_ratio", "--batch-sizes", "8,16", "--budget", "64",
            "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"))
    env = sweep_tasks.GROUP_RATIO_ENV
    assert run_cli(*args, env={env: "0.1"}).returncode == 0
    assert run_cli(*args, "--resume", env={env: "0.1"}).returncode == 0
    proc = run_cli(*args, "--resume", env={env: "1.0"})
    assert proc.returncode == 2
    assert "was written for another version of the task (optimizer_settings" in one_error(proc)


def test_a_single_group_at_the_tasks_lr_keeps_its_fingerprint():
    """The ratio enters the hash only where it is not 1: journals written before it resume."""
    task = sweep_tasks.tiny()
    model = sweep_mod._meta_model(task)
    import hashlib
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
              for g in task.make_optimizer(model.parameters(), task.lr).param_groups]
    before = hashlib.sha256(json.dumps(["SGD", groups], default=repr,
                                       sort_keys=True).encode()).hexdigest()[:12]
    assert sweep_mod._optimizer_settings(task, model) == before


def test_a_failed_noise_measurement_keeps_the_trained_trials(tmp_path):
    """A batch with a tensor shared by its rows trains but cannot be cut into the noise
    measurement's sub-batches: every trial became an error and nothing was recommended,
    exit 1 (review). The trials stand without a B_simple, and a warning says why."""
    proc = run_cli("sweep", f"{TASKS}:shared_offset", "--batch-sizes", "8,16,32", "--budget",
                   "256", "--journal", str(tmp_path / "j.jsonl"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [t["status"] for t in out["trials"]] == ["ok"] * 3
    assert all(t["b_simple"] is None and "cannot split the batch" in t["noise_error"]
               for t in out["trials"])
    assert out["recommended_batch_size"] in (8, 16, 32)
    assert "the noise measurement failed at batch size(s) 8, 16, 32" in " ".join(
        proc.stderr.split())


def test_a_nan_in_the_data_is_not_reported_as_an_lr_too_high(tmp_path):
    """One NaN target: every trial's loss is NaN after the same samples, at its own step and
    lr; the message said "try a lower lr" (review). It now points at the data."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task, sweep
    from bsselect.errors import TaskError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    y = x.sum(1, keepdim=True)
    y[1000] = float("nan")
    xv = torch.randn(256, 8, generator=g)
    task = Task(model=lambda: nn.Linear(8, 1), train_data=TensorDataset(x, y),
                val_data=TensorDataset(xv, xv.sum(1, keepdim=True)),
                loss_fn=nn.functional.mse_loss, lr=0.01, base_batch_size=16)
    result = sweep(task, batch_sizes=[8, 16, 32, 64], budget="2200", seed=1,
                   noise_measurements=0, journal=tmp_path / "j.jsonl")
    failure = result.failure()
    assert isinstance(failure, TaskError)
    assert re.match(r"every trial's loss became nan on a batch holding samples [\d,]+-[\d,]+ "
                    r"of the same data order .* check train_data", str(failure)), failure
    assert "lower lr" not in str(failure)
    # Another NaN row: the trials stop at different sample counts (488, 496, 512, 512 with
    # this seed), whose last batches still overlap; the equal-count rule missed it (review).
    y2 = x.sum(1, keepdim=True)
    y2[100] = float("nan")
    other = dataclasses.replace(task, train_data=TensorDataset(x, y2), lr=0.01)
    stops = sweep(other, batch_sizes=[8, 16, 32, 64], budget="2200", seed=0,
                  noise_measurements=0, journal=tmp_path / "k.jsonl")
    assert len({t.samples for t in stops.trials}) > 1
    assert "of the same data order" in str(stops.failure())
    # A learning rate far too high blows up at about the same step: not the data.
    high = dataclasses.replace(task, train_data=TensorDataset(x * 30, x.sum(1, keepdim=True) * 30),
                               val_data=None, lr=0.5)
    blown = sweep(high, batch_sizes=[8, 16, 32, 64], budget="2200", seed=0,
                  noise_measurements=0, journal=tmp_path / "h.jsonl").failure()
    assert "lower lr" in str(blown) and "data order" not in str(blown)


def test_a_group_at_a_fixed_lr_scales_alike_in_fresh_and_warm_started_trials(tmp_path):
    """A backbone group at a constant lr (0.005, the task's lr 0.05): fresh trials built the
    optimizer at the trial's lr, so that group stayed at 0.005 at every batch size, while
    warm-started trials scaled it (review). Now both keep its ratio to the task's lr."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task, sweep

    class Logged(torch.optim.SGD):
        pass

    def factory(params, lr):
        params = list(params)
        return Logged([{"params": params[:2], "lr": 0.005}, {"params": params[2:]}], lr=lr,
                      momentum=0.9)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :2].sum(1) > 0).long()
    task = Task(model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                train_data=TensorDataset(x, y), loss_fn=nn.functional.cross_entropy,
                optimizer=factory, lr=0.05, base_batch_size=16)
    for warm in (0, 2):
        ratios = set()
        orig = Logged.step

        def step(self, closure=None, _ratios=ratios):
            body, head = (grp["lr"] for grp in self.param_groups)
            if head:
                _ratios.add(round(body / head, 9))
            return orig(self, closure)

        Logged.step = step
        try:
            sweep(task, batch_sizes=[16, 64], budget="256", noise_measurements=0,
                  journal=tmp_path / f"j{warm}.jsonl", warmup_steps=0, warm_start_steps=warm)
        finally:
            Logged.step = orig
        assert ratios == {0.1}, (warm, ratios)


def test_an_optimizer_factory_may_read_its_parameters_twice(tmp_path):
    """``model.parameters()`` is a generator: a factory splitting it into decayed matrices
    and undecayed biases found the second group empty, and the biases never trained."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task

    task = Task(model=lambda: nn.Linear(4, 2), loss_fn=nn.functional.cross_entropy,
                train_data=TensorDataset(torch.randn(8, 4), torch.zeros(8).long()),
                optimizer=lambda ps, lr: torch.optim.SGD(
                    [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 5e-4},
                     {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=lr))
    opt = task.make_optimizer(nn.Linear(4, 2).parameters(), 0.1)
    assert [len(grp["params"]) for grp in opt.param_groups] == [1, 1]


def test_an_optimizer_that_keeps_its_lr_outside_its_groups_trains_at_the_trials_lr(tmp_path):
    """A LARS-like optimizer steps with ``self.base_lr`` from its constructor: built at the
    task's lr and then set, every trial trained at the base lr while its row said the scaled
    one (review)."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from bsselect import Task, sweep

    used: dict[float, set] = {}

    class KeepsLr(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            self.base_lr = lr

        def step(self, closure=None):
            used.setdefault(self.param_groups[0]["lr"], set()).add(self.base_lr)
            return super().step(closure)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    task = Task(model=lambda: nn.Linear(8, 2), train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=nn.functional.cross_entropy, optimizer=KeepsLr, lr=0.05,
                base_batch_size=8)
    sweep(task, batch_sizes=[8, 32], budget="256", noise_measurements=0, warmup_steps=0,
          journal=tmp_path / "j.jsonl")
    assert used[0.2] == {0.2} and used[0.05] == {0.05}
