"""probe through its core and the CLI: the measured path's OOM back-off on a CPU allocator
with a cap (the same seam a GPU allocator plugs into), and the JSON contract."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn
from torch.utils.data import TensorDataset

from bsselect.device import Budget
from bsselect.errors import DoesNotFitError
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.cpu_truth import cpu_step_peak
from bsselect.memory.measured import run_two_steps
from bsselect.memory.probe import Method, run_probe
from bsselect.task import Task, load_task

PROBE_FIELDS = {"device", "method", "margin", "budget_bytes", "fixed_bytes", "per_sample_bytes",
                "max_batch", "max_batch_pow2", "points"}


class BatchGram(nn.Module):
    """Memory grows with b**2 (a b x b Gram matrix), so a line fitted on small batches
    underestimates large ones: the confirming step must back off."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = x @ x.T                     # (b, b)
        return self.fc(x + 1e-3 * (gram @ x))


def quadratic_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    return Task(model=BatchGram, train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.01)


def test_measured_backoff_follows_exact_path_under_a_cap():
    task = quadratic_task()
    cpu = torch.device("cpu")
    sizes = [8, 16, 32, 64]
    free = run_probe(task, task_name="quad", device=cpu, budget=Budget(2**40, "x"), margin=0.0,
                     batch_sizes=sizes, backend=CappedCpuAllocator(2**40), confirm=False)
    # A cap where the line (fitted on b <= 64) promises b = 400; memory really grows with b**2.
    cap = free.fixed_bytes + 400 * free.per_sample_bytes
    backend = CappedCpuAllocator(cap)
    result = run_probe(task, task_name="quad", device=cpu, budget=Budget(cap, "cap"),
                       margin=0.0, batch_sizes=sizes, backend=backend)
    assert (result.fixed_bytes, result.per_sample_bytes) == (free.fixed_bytes,
                                                             free.per_sample_bytes)
    uncapped = CappedCpuAllocator(2**40)
    truth = lambda b: run_two_steps(task, b, uncapped)  # noqa: E731
    path = [(s["batch_size"], s["outcome"]) for s in result.confirmation]
    assert path[0][0] in (399, 400)  # floor of the fitted line
    assert path[0][1] == "oom", "memory grows with b**2: the line's answer must not fit"
    # Every real step's outcome is what the uncapped truth says, and the answer is exact.
    for b, outcome in path:
        assert (truth(b) <= cap) == (outcome == "ok"), (b, outcome)
    true_max = result.max_batch
    assert truth(true_max) <= cap < truth(true_max + 1)
    assert (true_max + 1, "oom") in path  # the answer's neighbour was run and failed
    assert backend.ooms == sum(1 for _, o in path if o == "oom")
    assert len(path) <= 8 and result.method == "measured"


def test_measured_peaks_match_simulation_for_linear_memory():
    task, _ = load_task("digits-mlp")
    backend = CappedCpuAllocator(2**40)
    # 4 MiB: the answer (~760) is inside the 1,500-item training set, which real steps
    # never pass (test_measured_probe_stops_at_the_training_set)
    sim = run_probe(task, task_name="d", device=torch.device("cpu"), budget=Budget(2**22, "x"),
                    method=Method.simulated, batch_sizes=[8, 32, 128])
    meas = run_probe(task, task_name="d", device=torch.device("cpu"), budget=Budget(2**22, "x"),
                     batch_sizes=[8, 32, 128], backend=backend)
    # The truth is the CPU allocator's own events (not the counter both probes share).
    for point in sim.points:
        real = cpu_step_peak(task, point.batch_size).peak_bytes
        assert point.peak_bytes == pytest.approx(real, rel=0.01), point.batch_size
    assert meas.max_batch == sim.max_batch < 1500


def test_measured_probe_stops_at_the_training_set():
    task, _ = load_task("digits-mlp")
    backend = CappedCpuAllocator(2**40)
    sim = run_probe(task, task_name="d", device=torch.device("cpu"), budget=Budget(2**26, "x"),
                    method=Method.simulated, batch_sizes=[8, 32, 128])
    meas = run_probe(task, task_name="d", device=torch.device("cpu"), budget=Budget(2**26, "x"),
                     batch_sizes=[8, 32, 128], backend=backend)
    n = len(task.train_data)
    assert sim.max_batch > n and sim.exceeds_dataset  # a simulation answers past it, cheaply
    assert meas.max_batch == n and meas.exceeds_dataset
    assert max(s["batch_size"] for s in meas.confirmation) == n


def test_nothing_fits_is_a_clear_error():
    task, _ = load_task("tiny-lm")
    with pytest.raises(DoesNotFitError, match="the fixed memory alone needs"):
        run_probe(task, task_name="t", device=torch.device("cpu"),
                  budget=Budget(2**20, "x"), method=Method.simulated)


@pytest.mark.parametrize("example", ["digits-mlp", "digits-cnn", "tiny-lm", "linreg"])
def test_probe_json_on_each_example(example):
    proc = run_cli("probe", example, "--memory", "4GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert PROBE_FIELDS <= set(data)
    assert data["method"] == "simulated" and data["budget_bytes"] == 4 * 2**30
    assert data["max_batch_pow2"] <= data["max_batch"] < 2 * data["max_batch_pow2"]
    usable = 0.8 * data["budget_bytes"]
    # The line's answer is checked by simulating there, refined until exact.
    steps = data["confirmation"]
    ok = [st for st in steps if st["outcome"] == "ok"]
    assert ok and max(st["batch_size"] for st in ok) == data["max_batch"]
    assert all(st["peak_bytes"] <= usable for st in ok)
    assert all(st["peak_bytes"] > usable for st in steps if st["outcome"] == "over")
    assert len(steps) <= 12
    assert [p["batch_size"] for p in data["points"]] == [8, 16, 32, 64, 128]


def test_probe_target_cuda_shows_each_term():
    proc = run_cli("probe", "digits-cnn", "--memory", "16GiB", "--target", "cuda", "--json")
    assert proc.returncode == 0, proc.stderr
    names = [t["name"] for t in json.loads(proc.stdout)["terms"]]
    assert names == ["allocator rounding", "cuBLAS + cuBLASLt workspace", "cuDNN workspace",
                     "CUDA context", "fragmentation headroom"]


@pytest.mark.parametrize("args,code,message", [
    (["--margin", "1.2"], 2, "--margin must be in [0, 1)"),
    (["--memory", "12 parsecs"], 2, "cannot read memory size"),
    (["--batch-sizes", "0,8"], 2, "--batch-sizes takes integers >= 1"),
    (["--method", "guess"], 2, "--method must be one of"),
    (["--target", "cuda"], 2, "--target cuda needs --memory"),
    (["--memory", "1MiB"], 3, "the fixed memory alone needs"),
    (["no_such_module:make"], 2, "module 'no_such_module' not found"),
])
def test_probe_errors_are_one_line_with_exit_code(args, code, message):
    proc = run_cli("probe", *args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_broken_task_exits_1(task_file):
    proc = run_cli("probe", f"{task_file}:bad_forward")
    assert proc.returncode == 1
    # Validated on fake tensors first; it fails for real too, so that is the error shown,
    # in one line (torch's own log of the failing meta kernel is silenced)
    assert proc.stderr.strip().splitlines() == [
        "error: the model's forward failed: RuntimeError: mat1 and mat2 shapes cannot be "
        "multiplied (2x4 and 5x2)"]
    proc = run_cli("check", f"{task_file}:bad_forward", "--batch-size", "8", "--memory", "1GiB")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    # a real step on two items shows the real error (it used to be the fake kernel's,
    # "a and b must have same reduction dim")
    assert "mat1 and mat2 shapes cannot be multiplied (2x4 and 5x2)" in proc.stderr
    assert "--method measured" not in proc.stderr  # the task's own error, not a limit


def test_the_host_guard_refuses_a_real_cpu_step_that_would_crowd_the_ram(monkeypatch):
    """A measured probe on the CPU must never push the host into the OOM killer: a step
    predicted (from the steps so far) above half the RAM available now is an OOM result."""
    import bsselect.device as device_mod
    from bsselect.memory.probe import check_host_headroom
    from bsselect.oom import is_oom_error

    monkeypatch.setattr(device_mod, "available_ram_bytes", lambda: 1000 * 2**20)  # 1000 MiB
    seen = {8: 100 * 2**20, 16: 150 * 2**20}  # 50 MiB fixed + 6.25 MiB per sample
    check_host_headroom(64, seen)  # about 450 MiB: fine
    with pytest.raises(MemoryError) as info:
        check_host_headroom(128, seen)  # about 850 MiB > 500 MiB
    assert is_oom_error(info.value)
    assert "a real step at batch 128 would need about 850 MiB" in str(info.value)
    check_host_headroom(10**9, {})  # nothing measured yet: no prediction, no refusal


def test_cuda_terms_are_those_of_the_step_measured_at_the_answer():
    from bsselect.memory.targets import Target

    task, _ = load_task("tiny-lm")
    result = run_probe(task, task_name="t", device=torch.device("cpu"),
                       budget=Budget(2 * 2**30, "x"), method=Method.simulated, target=Target.cuda,
                       batch_sizes=[8, 16, 32])
    at_best = [s for s in result.confirmation if s["batch_size"] == result.max_batch]
    assert at_best and at_best[-1]["outcome"] == "ok"
    # required at the answer (as the search measured it) = its step peak + the terms printed
    from bsselect.memory.simulated import simulate_step_peak
    from bsselect.step import StepSettings

    step = simulate_step_peak(task, result.max_batch, kernel_workspace=False,
                              settings=StepSettings(target_device="cuda"))
    assert at_best[-1]["peak_bytes"] - sum(t.bytes for t in result.terms) == step.peak_bytes


def test_a_term_in_batch_squared_is_named_where_the_checks_find_it(tmp_path):
    # A b x b similarity matrix: the line through the small probed batches has ~800 B per
    # sample, the checks find the max batch where one more sample costs ~400x that (review
    # finding M3: the output blamed "the peak moving between phases of the step")
    path = tmp_path / "contrast.py"
    path.write_text(
        "import torch, torch.nn.functional as F\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n"
        "from bsselect import Task\n"
        "def loss(z, y):\n"
        "    z = F.normalize(z, dim=1)\n"
        "    sim = (z @ z.T / 0.1).log_softmax(dim=1)\n"
        "    pos = (y[:, None] == y[None, :]).float()\n"
        "    return -((sim * pos).sum(1) / pos.sum(1)).mean()\n"
        "def make_task():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(8192, 16, generator=g), torch.randint(0, 10, (8192,), generator=g)\n"
        "    return Task(model=lambda: nn.Linear(16, 32), train_data=TensorDataset(x, y),\n"
        "                loss_fn=loss)\n")
    done = run_cli("probe", f"{path}:make_task", "--memory", "256MiB")
    assert done.returncode == 0, done.stderr
    assert "memory grows faster than the batch" in done.stdout
    plain = run_cli("probe", "digits-mlp", "--memory", "256MiB")
    assert plain.returncode == 0 and "grows faster" not in plain.stdout


def test_measured_steps_here_are_not_a_cuda_answer():
    """--target cuda adds CUDA's terms to a simulation; on real CPU steps (the CPU's kernels,
    its for-loop optimizer) they made a mix, accepted without a word (review)."""
    done = run_cli("probe", "tiny-lm", "--method", "measured", "--target", "cuda",
                   "--memory", "1GiB")
    assert done.returncode == 2
    assert "--method simulated" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_auto_measures_when_the_optimizer_step_cannot_simulate(tmp_path):
    """Adafactor reads each parameter's norm with .item() in its step: the forward simulates,
    the step does not. auto fell back to real steps only for the forward and otherwise
    failed with "measure with real steps instead"; now it measures and says why."""
    path = tmp_path / "adafactor.py"
    path.write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "from bsselect import Task\n\n"
        "def task():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)\n"
        "    return Task(model=lambda: nn.Linear(8, 3), train_data=TensorDataset(x, y),\n"
        "                loss_fn=nn.functional.cross_entropy, lr=0.01, base_batch_size=8,\n"
        "                optimizer=lambda p, lr: torch.optim.Adafactor(p, lr=lr))\n")
    out = run_cli("probe", f"{path}:task", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["method"] == "measured"
    assert "simulation cannot run this model" in data["method_note"]
    simulated = run_cli("probe", f"{path}:task", "--method", "simulated")
    assert simulated.returncode == 1 and "real steps" in simulated.stderr


class _Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 256), torch.nn.Linear(256, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).squeeze(-1)


def test_a_measured_fp16_step_counts_the_optimizer_state_the_scaler_would_skip():
    """Unnormalised targets overflow fp16's first loss scales: a real GradScaler skipped both
    measured steps, Adam's state never came into being, and the answer ran out of memory at
    the run's fifth step (review). The measurement steps as the simulation does."""
    from torch.utils.data import TensorDataset

    from bsselect.run_options import step_settings

    stepped = []

    class Counted(torch.optim.Adam):
        def step(self, closure=None):
            stepped.append(1)
            return super().step(closure)

    g = torch.Generator().manual_seed(0)
    task = Task(model=_Regressor, loss_fn=torch.nn.functional.mse_loss, lr=1e-3,
                train_data=TensorDataset(torch.randn(512, 16, generator=g),
                                         1e4 * torch.randn(512, generator=g)),
                optimizer=lambda p, lr: Counted(p, lr=lr))
    run_two_steps(task, 64, CappedCpuAllocator(2**40), settings=step_settings("fp16", 1, None))
    assert len(stepped) == 2  # both steps made and used Adam's state


class _InitFromFirstBatch(torch.nn.Module):
    """A codebook set from the first batch (k-means-style initialisation): a batch-sized
    temporary in step 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 2)
        self.ready = False

    def forward(self, x):
        if not self.ready:
            scratch = x[:, None, :] * torch.ones(1, 256, 16)  # b x 256 x 16 floats
            self.ready = bool(scratch.sum() == scratch.sum())
            del scratch
        return self.lin(x)


def test_a_peak_of_the_first_step_alone_counts():
    """Only the second step's peak was read: a model initialising from its first batch
    answered 5,832 where 63 fit (review)."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    task = Task(model=_InitFromFirstBatch, loss_fn=torch.nn.functional.cross_entropy,
                train_data=TensorDataset(torch.randn(512, 16, generator=g),
                                         torch.randint(2, (512,), generator=g)))
    peak = run_two_steps(task, 64, CappedCpuAllocator(2**40))
    assert peak >= 64 * 256 * 16 * 4
