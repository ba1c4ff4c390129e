"""``sweep --from-checkpoint``: trials branch from a checkpoint of the user's own run — a
``torch.save`` dict, a bare state_dict, a real Lightning ``.ckpt`` and a real Hugging Face
Trainer checkpoint directory — and every bad file is one line with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from bsselect import api
from bsselect.checkpoint import _rename, branch_from, load_checkpoint
from bsselect.errors import UsageError
from bsselect.selection.trials import evaluate
from bsselect.task import load_task

TASKS = Path(__file__).parent / "tasks"
TINY = f"{TASKS / 'sweep_tasks.py'}:tiny"   # an MLP, SGD with momentum 0.9 (Task's default)
CLI_ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train_run(steps: int = 40, seed: int = 3):
    """The user's run: the task's model and optimizer trained ``steps`` steps."""
    task, _ = load_task(TINY)
    torch.manual_seed(seed)
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = task.train_data.tensors
    for _ in range(steps):
        idx = torch.randint(0, len(x), (task.base_batch_size,), generator=gen)
        loss = task.loss_fn(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task, model, optimizer


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    task, model, optimizer = train_run()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 40},
               path / "run.pt")
    torch.save(model.state_dict(), path / "bare.pt")
    return path, model, optimizer


def test_a_dict_checkpoint_round_trips_weights_and_momentum(run_files):
    path, model, optimizer = run_files
    ck = load_checkpoint(path / "run.pt")
    assert (ck.format, ck.step) == ("dict", 40)
    task, _ = load_task(TINY)
    branch = branch_from(ck, task.model, task.make_optimizer, task.lr)
    assert branch.warnings == ()
    for key, value in model.state_dict().items():
        assert torch.equal(branch.model_state[key], value)
    fresh = task.make_optimizer(task.model().parameters(), 0.3)
    fresh.load_state_dict(branch.optimizer_state)
    buffers = [fresh.state[p]["momentum_buffer"] for p in fresh.param_groups[0]["params"]]
    expected = [optimizer.state[p]["momentum_buffer"] for p in optimizer.param_groups[0]["params"]]
    assert all(torch.equal(a, b) for a, b in zip(buffers, expected))


def test_every_trial_starts_from_the_checkpoint(run_files, tmp_path):
    path, model, _ = run_files
    result = api.sweep(TINY, batch_sizes=[8, 32], budget="256", noise_measurements=0,
                       journal=tmp_path / "j.jsonl", from_checkpoint=path / "run.pt")
    cold = api.sweep(TINY, batch_sizes=[8, 32], budget="256", noise_measurements=0,
                     journal=tmp_path / "cold.jsonl")
    # The trials' first loss is the checkpoint model's loss on the sweep's fixed subset.
    task, _ = load_task(TINY)
    setup, _ = api_setup(task)
    expected = evaluate(model.eval(), task, setup.eval_train, torch.device("cpu"),
                        setup.eval_batch_size, metric=False)[0]
    starts = {t.train_loss_start for t in result.trials}
    assert len(starts) == 1
    start = starts.pop()
    assert start == pytest.approx(expected, rel=1e-5)
    assert start < cold.trials[0].train_loss_start / 2
    data = result.to_json()
    ck = data["from_checkpoint"]
    assert ck["path"].endswith("run.pt") and ck["format"] == "dict" and ck["step"] == 40
    assert ck["optimizer_state"] is True and len(ck["sha256"]) == 64
    assert cold.to_json()["from_checkpoint"] is None
    header = json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])
    assert header["settings"]["from_checkpoint_sha256"] == ck["sha256"]  # the resume key
    # --resume with another checkpoint is refused; with the same one it reruns nothing.
    with pytest.raises(UsageError, match="different task or settings"):
        api.sweep(TINY, batch_sizes=[8, 32], budget="256", noise_measurements=0, resume=True,
                  journal=tmp_path / "j.jsonl", from_checkpoint=path / "bare.pt")
    again = api.sweep(TINY, batch_sizes=[8, 32], budget="256", noise_measurements=0,
                      resume=True, journal=tmp_path / "j.jsonl",
                      from_checkpoint=path / "run.pt")
    assert set(again.resumed) == {8, 32}
    assert again.to_json()["from_checkpoint"] == ck


def api_setup(task):
    from bsselect.selection.lr_scaling import LrScaling
    from bsselect.selection.sweep import SweepSettings, make_setup, parse_budget

    return make_setup(task, SweepSettings(budget=parse_budget("256"),
                                          lr_scaling=LrScaling.linear), torch.device("cpu"))


def test_a_bare_state_dict_branches_with_a_fresh_optimizer_and_says_so(run_files, tmp_path):
    path, _, _ = run_files
    done = run_cli("sweep", TINY, "--batch-sizes", "8,32", "--budget", "256",
                   "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"),
                   "--from-checkpoint", str(path / "bare.pt"), "--json", env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert "holds no optimizer state: every trial starts a fresh optimizer" in done.stderr
    data = json.loads(done.stdout)
    assert data["from_checkpoint"]["format"] == "state_dict"
    assert data["from_checkpoint"]["optimizer_state"] is False
    table = run_cli("report", str(tmp_path / "j.jsonl"), env=CLI_ENV)
    assert table.returncode == 0, table.stderr


def test_the_table_says_where_the_trials_branched_from(run_files, tmp_path):
    path, _, _ = run_files
    done = run_cli("sweep", TINY, "--batch-sizes", "8,32", "--budget", "256",
                   "--noise-measurements", "0", "--journal", str(tmp_path / "j.jsonl"),
                   "--from-checkpoint", str(path / "run.pt"), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    before = " ".join(done.stderr.split())  # what the sweep will do: on stderr
    assert "every trial branches from" in before and "(dict, step 40, sha256" in before
    table = " ".join(done.stdout.split())
    assert "trials branched from" in table and "step 40, with its optimizer state)" in table


def _with_nan(state: dict) -> dict:
    state["0.weight"][0, 0] = float("nan")
    return state


class _Holds:
    """Pickled by reference: loading it would import and run code."""


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"model": {}, "hook": _Holds()}, p),
     "holds objects other than tensors and plain containers (it names"),
    (lambda p: p.write_text("not a checkpoint"), "cannot read"),
    (lambda p: p.write_text("hello world\n"), "cannot read"),
    (lambda p: torch.save({"model": _with_nan(load_task(TINY)[0].model().state_dict())}, p),
     "holds non-finite weights (nan or inf in 0.weight)"),
    (lambda p: torch.save({"model": {"w": torch.zeros(2)}, "optimizer": [1, 2]}, p),
     "its optimizer entry is a list, not an optimizer.state_dict()"),
    (lambda p: torch.save({"weights": {"w": torch.zeros(2)}}, p),
     "has no model state_dict under 'model', 'model_state_dict' or 'state_dict'"),
    (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state_dict"),
    (lambda p: torch.save({"model": nn.Linear(3, 3).state_dict()}, p),
     "the checkpoint's parameters do not match the task's model"),
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "is a directory without model.safetensors or pytorch_model.bin"),
])
def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, make, message):
    path = tmp_path / "ck.pt"
    make(path)
    done = run_cli("sweep", TINY, "--batch-sizes", "8,32", "--budget", "256",
                   "--journal", str(tmp_path / "j.jsonl"), "--from-checkpoint", str(path),
                   env=CLI_ENV)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "j.jsonl").exists()  # refused before any trial


def test_tensors_of_the_wrong_shape_are_refused_by_name(tmp_path):
    task, _ = load_task(TINY)
    state = task.model().state_dict()
    key = next(iter(state))
    state[key] = torch.zeros(*[n + 1 for n in state[key].shape])
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UsageError, match=f"do not fit the task's model: size mismatch for {key}"):
        branch_from(load_checkpoint(tmp_path / "wrong.pt"), task.model, task.make_optimizer,
                    task.lr)


def test_a_load_failure_other_than_shapes_says_why(tmp_path):
    """torch's first line only names the model ("Error(s) in loading state_dict for
    Sequential:"): a checkpoint of meta tensors was refused without a reason (review)."""
    task, _ = load_task(TINY)
    state = {k: torch.empty_like(v, device="meta") for k, v in task.model().state_dict().items()}
    torch.save(state, tmp_path / "meta.pt")
    with pytest.raises(UsageError, match="do not fit the task's model: While copying the "
                                         "parameter named .*Cannot copy out of meta tensor"):
        branch_from(load_checkpoint(tmp_path / "meta.pt"), task.model, task.make_optimizer,
                    task.lr)


def test_an_optimizer_state_of_other_shapes_is_left_out_with_a_warning(tmp_path):
    task, _ = load_task(TINY)
    model = task.model()
    params = list(model.parameters())
    other = [nn.Parameter(torch.zeros(p.numel() + 1)) for p in params]  # same count, other shapes
    opt = torch.optim.SGD(other, lr=0.1, momentum=0.9)
    sum(p.sum() for p in other).backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "o.pt")
    branch = branch_from(load_checkpoint(tmp_path / "o.pt"), task.model, task.make_optimizer,
                         task.lr)
    assert branch.optimizer_state is None
    assert len(branch.warnings) == 1
    assert "a momentum_buffer of shape (513,) for a parameter of shape (32, 16)" in branch.warnings[0]


def test_keys_are_matched_across_a_module_prefix_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    class Wrapper(nn.Module):  # as bsselect's adapters wrap a model: keys gain "model."
        def __init__(self):
            super().__init__()
            self.model = Tied()

    inner = Tied().state_dict()
    saved = {f"net.{k}": v for k, v in inner.items() if k != "head.weight"}  # stored once
    renamed, note = _rename(Wrapper(), saved)
    assert set(renamed) == {"model.embed.weight"} and "renaming net.* to model.*" in note
    with pytest.raises(UsageError, match=r"model: 1 unexpected \(e.g. model.x\)"):
        _rename(Wrapper(), {"net.embed.weight": inner["embed.weight"], "net.x": torch.zeros(1)})


def test_a_lightning_checkpoint_branches_with_its_optimizer_state(tmp_path):
    pytest.importorskip("lightning")
    sys.path.insert(0, str(TASKS))
    import lightning_tasks

    module = lightning_tasks.Classifier()
    trainer = lightning_tasks.fit_and_save(module, lightning_tasks.Blobs(), 12,
                                           tmp_path / "run.ckpt")
    ck = load_checkpoint(tmp_path / "run.ckpt")
    assert (ck.format, ck.step) == ("lightning", 12)
    task = lightning_tasks.blobs()
    branch = branch_from(ck, task.model, task.make_optimizer, task.lr)
    assert branch.warnings == ()
    for key, value in module.state_dict().items():  # the adapter's StepModule adds "module."
        assert torch.equal(branch.model_state[f"module.{key}"], value)
    moments = branch.optimizer_state["state"]
    live = trainer.optimizers[0]
    expected = [live.state[p]["momentum_buffer"] for p in live.param_groups[0]["params"]]
    assert all(torch.equal(moments[i]["momentum_buffer"], e) for i, e in enumerate(expected))
    done = run_cli("sweep", f"{TASKS / 'lightning_tasks.py'}:blobs", "--batch-sizes", "8,32",
                   "--budget", "256", "--journal", str(tmp_path / "j.jsonl"),
                   "--from-checkpoint", str(tmp_path / "run.ckpt"), "--json", env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["from_checkpoint"]["optimizer_state"] is True


def test_a_hugging_face_trainer_checkpoint_directory_loads_its_weights(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from bsselect import Task
    from bsselect.examples.hf_trainer import build_trainer

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer()
    trainer.args.output_dir = str(tmp_path / "out")
    trainer.args.max_steps = 2
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    trainer.args.disable_tqdm = True
    trainer.train()
    ck = load_checkpoint(tmp_path / "out" / "checkpoint-2")
    assert (ck.format, ck.step) == ("hf-trainer", 2)
    task = Task.from_trainer(build_trainer())
    branch = branch_from(ck, task.model, task.make_optimizer, task.lr)
    trained = trainer.model.state_dict()
    # safetensors stores the tied lm_head once; the model ties it back
    for key, value in trained.items():
        assert torch.equal(branch.model_state[f"model.{key}"], value)
    # The task's AdamW has the Trainer's two groups (decay, then biases and norms), so the
    # Trainer's moments line up parameter by parameter.
    assert branch.warnings == ()
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in branch.optimizer_state["param_groups"]] == \
        [len(g["params"]) for g in saved["param_groups"]]
    for i, entry in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(branch.optimizer_state["state"][i][name], entry[name])


def test_noise_at_a_checkpoint_is_noise_of_the_checkpoints_weights(run_files):
    import copy
    import dataclasses

    from bsselect.selection.noise_run import measure_noise

    path, model, _ = run_files
    task, _ = load_task(TINY)
    trained = dataclasses.replace(task, model=lambda: copy.deepcopy(model))
    at_checkpoint = measure_noise(task, measurements=4, checkpoint=load_checkpoint(
        path / "run.pt"))
    direct = measure_noise(trained, measurements=4)
    assert at_checkpoint.initial.b_simple == pytest.approx(direct.initial.b_simple, rel=1e-6)
    assert at_checkpoint.initial_loss == pytest.approx(direct.initial_loss, rel=1e-6)
    fresh = measure_noise(task, measurements=4)
    assert at_checkpoint.initial_loss < fresh.initial_loss / 2
    done = run_cli("noise", TINY, "--measurements", "4", "--from-checkpoint",
                   str(path / "run.pt"), "--json", env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["from_checkpoint"]["step"] == 40
    assert data["b_simple"] == pytest.approx(at_checkpoint.initial.b_simple, rel=1e-6)


def test_the_key_is_the_files_sha256_so_a_copied_checkpoint_resumes(run_files, tmp_path):
    import hashlib
    import shutil

    path, _, _ = run_files
    ck = load_checkpoint(path / "run.pt")
    assert ck.sha256 == hashlib.sha256((path / "run.pt").read_bytes()).hexdigest()
    odd = tmp_path / "dir [" / "] with space"  # a path holding "[/]", rich's closing tag
    odd.mkdir(parents=True)
    shutil.copy(path / "run.pt", odd / "step-40.pt")
    args = ("sweep", TINY, "--budget", "256", "--noise-measurements", "0",
            "--journal", str(tmp_path / "j.jsonl"))
    first = run_cli(*args, "--batch-sizes", "8", "--from-checkpoint", str(path / "run.pt"),
                    env=CLI_ENV)
    assert first.returncode == 0, first.stderr
    again = run_cli(*args, "--batch-sizes", "8,32", "--resume", "--from-checkpoint",
                    str(odd / "step-40.pt"), env=CLI_ENV)
    assert again.returncode == 0, again.stderr  # the same bytes under another name
    assert "every trial branches from" in again.stderr
    report = run_cli("report", str(tmp_path / "j.jsonl"), "--json", env=CLI_ENV)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["from_checkpoint"]["path"].endswith("step-40.pt")
    table = run_cli("report", str(tmp_path / "j.jsonl"), env=CLI_ENV)
    assert "trials branched from" in " ".join(table.stdout.split())


def _state_of(optimizer_class, **settings):
    task, _ = load_task(TINY)
    model = task.model()
    optimizer = optimizer_class(model.parameters(), **settings)
    x, y = task.train_data.tensors
    for _ in range(3):
        optimizer.zero_grad()
        task.loss_fn(model(x[:16]), y[:16]).backward()
        optimizer.step()
    return task, model, optimizer


def test_another_optimizers_state_is_refused_with_a_warning(tmp_path):
    task, model, adam = _state_of(torch.optim.Adam, lr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": adam.state_dict()}, tmp_path / "a.pt")
    branch = branch_from(load_checkpoint(tmp_path / "a.pt"), task.model, task.make_optimizer,
                         task.lr)  # the task's optimizer: SGD with momentum
    assert branch.optimizer_state is None
    assert "keeps exp_avg, exp_avg_sq, step per parameter, the task's SGD with its " \
           "settings keeps momentum_buffer: another optimizer's state" in branch.warnings[-1]
    assert branch.run_lr == pytest.approx(1e-3)  # its lr as a base lr: the --lr to pass
    done = run_cli("sweep", TINY, "--batch-sizes", "8,32", "--budget", "256",
                   "--journal", str(tmp_path / "j.jsonl"), "--from-checkpoint",
                   str(tmp_path / "a.pt"), "--json", env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["from_checkpoint"]["optimizer_state"] is False
    assert data["from_checkpoint"]["lr"] == pytest.approx(1e-3)
    assert "the checkpoint's optimizer trains at the equivalent of lr 0.001 at batch 16; the " \
           "trials scale from lr 0.1: to ask from where the run's lr is now, pass --lr 0.001" \
           in " ".join(done.stderr.split())
    assert all(t["status"] == "ok" for t in data["trials"])


def test_the_tasks_optimizer_settings_and_group_ratios_are_kept(tmp_path):
    from bsselect.selection.sweep import from_checkpoint

    task, model, sgd = _state_of(torch.optim.SGD, lr=0.1, momentum=0.5, weight_decay=0.5)
    torch.save({"model": model.state_dict(), "optimizer": sgd.state_dict()}, tmp_path / "s.pt")
    ck = load_checkpoint(tmp_path / "s.pt")
    branch = branch_from(ck, task.model, task.make_optimizer, task.lr)
    assert "differ from the task's (momentum, weight_decay)" in branch.warnings[0]
    group = branch.optimizer_state["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0)  # the task's
    buffers = [branch.optimizer_state["state"][i]["momentum_buffer"] for i in range(4)]
    expected = [sgd.state[p]["momentum_buffer"] for p in sgd.param_groups[0]["params"]]
    assert all(torch.equal(a, b) for a, b in zip(buffers, expected))
    # A task whose optimizer freezes the first layer (lr ratio 0) keeps it frozen.
    import dataclasses

    def frozen_first(params, lr):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2], "lr": 0.0},
                                {"params": params[2:]}], lr=lr, momentum=0.9)

    frozen = dataclasses.replace(task, optimizer=frozen_first)
    opt = frozen_first(model.parameters(), 0.1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "f.pt")
    setup, _ = api_setup(frozen)
    branched = from_checkpoint(setup, load_checkpoint(tmp_path / "f.pt"))
    from bsselect.selection.trials import _fresh_model

    _, trial_opt = _fresh_model(branched, 0.4, branch=True)
    assert [g["lr"] for g in trial_opt.param_groups] == [0.0, 0.4]
    # its lr read from the first group that trains (the frozen one says nothing): 0.1
    assert branched.checkpoint_lr == pytest.approx(0.1)
    decayed = frozen_first(model.parameters(), 0.01)  # the run's schedule cut the lr 10x
    torch.save({"model": model.state_dict(), "optimizer": decayed.state_dict()},
               tmp_path / "d.pt")
    said = []
    later = from_checkpoint(setup, load_checkpoint(tmp_path / "d.pt"), said.append)
    assert later.checkpoint_lr == pytest.approx(0.01)
    assert any("pass --lr 0.01" in m for m in said)


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


def test_a_well_trained_checkpoint_with_dropout_does_not_read_as_divergence(tmp_path):
    import dataclasses

    task, _ = load_task(TINY)
    task = dataclasses.replace(task, model=_Dropout)
    torch.manual_seed(0)
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    x, y = task.train_data.tensors
    for _ in range(400):  # to a train-mode loss far above its eval-mode loss
        idx = torch.randint(0, len(x), (16,))
        optimizer.zero_grad()
        task.loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "d.pt")
    result = api.sweep(task, batch_sizes=[4, 8, 32], budget="256", noise_measurements=0,
                       journal=tmp_path / "j.jsonl", from_checkpoint=tmp_path / "d.pt")
    assert [t.status.value for t in result.trials] == ["ok", "ok", "ok"]


def test_an_unknown_prefix_renaming_is_said():
    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Linear(3, 3)

    saved = {f"teacher.{k}": v for k, v in nn.Linear(3, 3).state_dict().items()}
    renamed, note = _rename(Student(), saved)
    assert set(renamed) == {"student.weight", "student.bias"}
    assert note and "renaming teacher.* to student.*" in note
    _, quiet = _rename(Student(), {f"module.{k}": v for k, v in renamed.items()})
    assert quiet is None


def test_a_sharded_hugging_face_directory_is_read_through_its_index(tmp_path):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path / "sharded")
    assert ck.format == "hf-trainer" and ck.optimizer_state is None
    branch = branch_from(ck, lambda: GPT2LMHeadModel(config), torch.optim.AdamW, 1e-3)
    for key, value in model.state_dict().items():
        assert torch.equal(branch.model_state[key], value)


class _Masked(nn.Module):
    """A model with a legitimate -inf buffer (an additive mask), as attention models have."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 3)
        self.register_buffer("mask", torch.full((3,), float("-inf")).index_fill(0,
                             torch.tensor([0, 1, 2]), 0.0).clone())
        self.register_buffer("never", torch.tensor([float("-inf")]))

    def forward(self, x):
        return self.net(x) + self.mask


def test_an_infinite_buffer_is_not_a_bad_weight_but_a_bad_loss_from_a_checkpoint_is(tmp_path):
    import dataclasses

    task, _ = load_task(TINY)
    task = dataclasses.replace(task, model=_Masked)
    model = task.model()
    torch.save({"model": model.state_dict()}, tmp_path / "m.pt")
    branch = branch_from(load_checkpoint(tmp_path / "m.pt"), task.model, task.make_optimizer,
                         task.lr)
    assert torch.isinf(branch.model_state["never"]).all()
    # From a well-trained checkpoint, a far too high lr that multiplies its loss is diverged,
    # though the loss stays below the loss at initialisation; and the failure says why.
    _, trained, optimizer = train_run(steps=400)
    torch.save({"model": trained.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "t.pt")
    hot = dataclasses.replace(load_task(TINY)[0], lr=3.0)
    result = api.sweep(hot, batch_sizes=[8, 16], budget="256", noise_measurements=0,
                       lr_scaling="none", journal=tmp_path / "j.jsonl",
                       from_checkpoint=tmp_path / "t.pt")
    assert {t.status.value for t in result.trials} == {"diverged"}
    assert any("above 0.00" in t.error and "double the checkpoint's loss" in t.error
               for t in result.trials)  # b=16: its end loss, 2.9, is below 0.73 at init x 10
    failure = result.failure()
    assert failure is not None and "likely above the lr the run trains at by now" in str(failure)


@pytest.mark.parametrize("make", [
    # the task's own optimizer with a group that overrides momentum
    lambda params, lr: torch.optim.SGD([{"params": params[:2], "momentum": 0.9},
                                        {"params": params[2:]}], lr=lr),
    # a factored optimizer: its row/column statistics are not parameter-shaped
    lambda params, lr: torch.optim.Adafactor(params, lr=lr),
    lambda params, lr: torch.optim.Adam(params, lr=lr, amsgrad=True),
    lambda params, lr: torch.optim.RMSprop(params, lr=lr, momentum=0.9, centered=True),
])
def test_an_optimizers_own_state_fits_it(tmp_path, make):
    import dataclasses

    task, _ = load_task(TINY)
    task = dataclasses.replace(task, optimizer=lambda params, lr: make(list(params), lr))
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    x, y = task.train_data.tensors
    for _ in range(2):
        optimizer.zero_grad()
        task.loss_fn(model(x[:16]), y[:16]).backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "o.pt")
    branch = branch_from(load_checkpoint(tmp_path / "o.pt"), task.model, task.make_optimizer,
                         task.lr)
    assert branch.warnings == () and branch.optimizer_state is not None


def test_optimizer_entries_take_the_first_state_dict(tmp_path):
    task, model, sgd = _state_of(torch.optim.SGD, lr=0.1, momentum=0.9)
    torch.save({"model": model.state_dict(), "optimizer": "sgd",
                "optimizer_state_dict": sgd.state_dict()}, tmp_path / "k.pt")
    assert load_checkpoint(tmp_path / "k.pt").optimizer_state is not None
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum 0 keeps no state
    sum(p.sum() for p in model.parameters()).backward()
    plain.step()
    torch.save({"model": model.state_dict(), "optimizer": plain.state_dict()}, tmp_path / "p.pt")
    branch = branch_from(load_checkpoint(tmp_path / "p.pt"), task.model, task.make_optimizer,
                         task.lr)
    assert branch.optimizer_state is None
    assert "holds no per-parameter optimizer state (plain SGD keeps none" in branch.warnings[0]
    # the saved SGD's momentum 0 against the task's 0.9: said with no state too (review)
    assert "differ from the task's (momentum" in branch.warnings[1]


def test_report_ignores_a_malformed_checkpoint_record(run_files, tmp_path):
    path, _, _ = run_files
    journal = tmp_path / "j.jsonl"
    done = api.sweep(TINY, batch_sizes=[8], budget="256", noise_measurements=0,
                     journal=journal, from_checkpoint=path / "run.pt")
    assert done.from_checkpoint["format"] == "dict"
    lines = journal.read_text().splitlines()
    record = json.loads(lines[-1])
    record["from_checkpoint"] = {"path": "x"}
    journal.write_text("\n".join(lines[:-1] + [json.dumps(record)]) + "\n")
    report = run_cli("report", str(journal), "--json", env=CLI_ENV)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["from_checkpoint"]["sha256"] == done.from_checkpoint["sha256"]


def test_lr_sets_the_rate_the_trials_scale_from(run_files, tmp_path):
    import dataclasses

    path, _, _ = run_files
    hot = dataclasses.replace(load_task(TINY)[0], lr=3.0)  # far above the run's lr (0.1)
    result = api.sweep(hot, batch_sizes=[8, 32], budget="256", noise_measurements=0,
                       lr_scaling="linear", lr=0.1, journal=tmp_path / "j.jsonl",
                       from_checkpoint=path / "run.pt")
    assert [t.lr for t in result.trials] == [pytest.approx(0.05), pytest.approx(0.2)]
    assert result.base_lr == 0.1
    header = json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])
    assert header["settings"]["base_lr"] == 0.1  # part of the resume key
    for bad in ("0", "-1", "nan", "inf"):
        done = run_cli("sweep", TINY, "--batch-sizes", "8", "--lr", bad, env=CLI_ENV)
        assert done.returncode == 2 and "--lr must be a number > 0" in done.stderr, done.stderr


def test_the_table_and_report_say_when_the_checkpoints_lr_is_not_the_trials(tmp_path):
    task, model, optimizer = train_run(steps=10)
    for group in optimizer.param_groups:
        group["lr"] = 0.01  # the run's schedule cut its lr 10x from the task's 0.1
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 10},
               tmp_path / "late.pt")
    common = ["--batch-sizes", "8,16", "--budget", "128", "--noise-measurements", "0",
              "--from-checkpoint", str(tmp_path / "late.pt")]
    note = "the checkpoint's optimizer trains at the equivalent of lr 0.01 at batch 16"
    done = run_cli("sweep", TINY, *common, "--journal", str(tmp_path / "j.jsonl"), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert note in done.stdout and "--lr 0.01 asks from the run's lr" in done.stdout
    report = run_cli("report", str(tmp_path / "j.jsonl"), env=CLI_ENV)
    assert report.returncode == 0, report.stderr
    assert note in report.stdout
    # at the run's lr, nothing to say
    done = run_cli("sweep", TINY, *common, "--lr", "0.01", "--journal",
                   str(tmp_path / "k.jsonl"), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    assert "equivalent of lr" not in done.stdout


def test_a_hugging_face_trainer_output_dir_gives_its_checkpoints(tmp_path, monkeypatch):
    """A real Trainer's output_dir after save_model: schedule's points are its checkpoint-N/
    (not the final save beside them, not training_args.bin); read as one checkpoint (what
    sweep and noise branch from), the directory is the final save."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from bsselect.api import _run_checkpoints
    from bsselect.checkpoint import checkpoints_in
    from bsselect.examples.hf_trainer import build_trainer

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer()
    out = tmp_path / "out"
    trainer.args.output_dir = str(out)
    trainer.args.max_steps = 4
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    trainer.args.disable_tqdm = True
    trainer.train()
    trainer.save_model()
    assert (out / "training_args.bin").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in checkpoints_in(out)] == ["checkpoint-2", "checkpoint-4"]
    run, steps = _run_checkpoints([str(out)])
    assert steps == [2, 4] and {c.format for c in run} == {"hf-trainer"}
    final = load_checkpoint(out)
    trained = trainer.model.state_dict()
    assert all(torch.equal(final.model_state[k], v) for k, v in trained.items()
               if k in final.model_state)


def test_a_negative_lr_in_the_file_is_no_run_lr(tmp_path):
    """A file whose optimizer says lr -0.1 gave a 'run lr' of -0.1 to the sweep's JSON, and
    the 1.5x check read it as near (review). It is unreadable, as a missing one."""
    from bsselect.checkpoint import base_lr_of_run

    model = torch.nn.Linear(2, 1)
    saved = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    saved["param_groups"][0]["lr"] = -0.1
    ours = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert base_lr_of_run(ours, saved, 0.05) is None
    saved["param_groups"][0]["lr"] = 0.1
    assert base_lr_of_run(ours, saved, 0.05) == pytest.approx(0.1)


def test_noise_warm_up_from_a_checkpoint_at_another_lr_says_so(run_files, tmp_path):
    """The warm-up steps train at the task's lr; sweep and schedule said so for a file at
    another lr, noise did not (review)."""
    from bsselect.selection.noise_run import measure_noise

    path, model, optimizer = run_files
    task, _ = load_task(TINY)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group["lr"] = task.lr * 10
    torch.save({"model": model.state_dict(), "optimizer": saved, "step": 40},
               tmp_path / "fast.pt")
    said: list[str] = []
    measure_noise(task, measurements=4, warmup_steps=2, every=2,
                  checkpoint=load_checkpoint(tmp_path / "fast.pt"), warn=said.append)
    assert any(f"the warm-up steps train at the task's lr {task.lr:.3g}" in m for m in said)
    said.clear()
    measure_noise(task, measurements=4, checkpoint=load_checkpoint(tmp_path / "fast.pt"),
                  warn=said.append)
    assert not any("warm-up steps" in m for m in said)  # no steps: nothing trains at it


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float64, "float64")])
def test_weights_of_another_precision_are_loaded_cast_and_said(run_files, tmp_path, dtype, name):
    path, model, optimizer = run_files
    task, _ = load_task(TINY)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    torch.save({"model": state, "optimizer": optimizer.state_dict()}, tmp_path / "p.pt")
    branch = branch_from(load_checkpoint(tmp_path / "p.pt"), task.model, task.make_optimizer,
                         task.lr)
    assert all(v.dtype == torch.float32 for v in branch.model_state.values())
    assert any(f"holds {name} weights; they are loaded cast to the task's model (float32)" in w
               for w in branch.warnings)
    same = branch_from(load_checkpoint(path / "run.pt"), task.model, task.make_optimizer,
                       task.lr)
    assert not any("loaded cast" in w for w in same.warnings)


def test_a_step_named_on_a_sweeps_checkpoint_says_where_steps_go(tmp_path):
    """``noise --from-checkpoint file.pt@5`` said only "no such file" (review): PATH@STEP is
    schedule's."""
    torch.save({"model": load_task(TINY)[0].model().state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(UsageError, match=r"ck.pt@5: no such file or directory \(PATH@STEP "
                                         r"names a step for `schedule`'s checkpoints only; "
                                         r"here the file is .*ck.pt\)$"):
        load_checkpoint(f"{tmp_path / 'ck.pt'}@5")
    with pytest.raises(UsageError, match=r"^--from-checkpoint .*other.pt: no such file or "
                                         r"directory$"):
        load_checkpoint(tmp_path / "other.pt")
