"""Mixed precision, gradient accumulation and optimizer implementations in the one shared step:
the simulation against the real CPU allocator, CUDA's autocast lists against CUDA's own
kernels, raw gradient norms under fp16, and what the CLI reports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.examples import EXAMPLES
from bsselect.memory import cpu_step_peak, simulate_step_peak
from bsselect.memory.cuda_autocast import cuda_autocast_policy
from bsselect.precision import Precision, raw_grads
from bsselect.selection.noise import measure_grad_norms
from bsselect.step import StepSettings, make_batch

BF16, FP16 = StepSettings(Precision.bf16), StepSettings(Precision.fp16)


def relative_error(simulated: int, measured: int) -> float:
    return abs(simulated - measured) / measured


# --- the simulation against the CPU allocator ----------------------------------------------

@pytest.mark.parametrize("settings", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch_size", [8, 128])
def test_reduced_precision_transformer_matches_cpu_allocator(settings, batch_size):
    task = EXAMPLES["tiny-lm"]()
    sim = simulate_step_peak(task, batch_size, settings=settings)
    real = cpu_step_peak(task, batch_size, settings=settings)
    assert relative_error(sim.peak_bytes, real.peak_bytes) < 0.02, (sim, real)
    assert sim.start_bytes == real.start_bytes  # fp16: the GradScaler's scale counted in both
    assert sim.precision == real.precision == settings.precision.value
    fp32 = simulate_step_peak(task, batch_size)
    assert sim.peak_bytes < 0.8 * fp32.peak_bytes  # half-size activations


def test_bf16_matmul_scratch_is_calibrated():
    """oneDNN's bf16 matmul packs its operands in scratch that fake tensors cannot see; without
    it the MLP was 7% low at batch 128."""
    task = EXAMPLES["digits-mlp"]()
    sim, real = simulate_step_peak(task, 128, settings=BF16), cpu_step_peak(task, 128,
                                                                            settings=BF16)
    assert sim.peak_bytes == real.peak_bytes
    assert sim.kernel_workspace_bytes and sim.kernel_workspace_bytes > 0


def test_fake_cpu_honours_autocast_and_meta_does_not():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x.to("meta"), w.to("meta")).dtype is torch.float32
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(mode.from_tensor(x), mode.from_tensor(w)).dtype is torch.bfloat16


# --- accumulation -------------------------------------------------------------------------

def test_accumulation_keeps_gradients_alive_through_later_micro_steps():
    task = EXAMPLES["digits-mlp"]()
    one = simulate_step_peak(task, 32)
    four = StepSettings(accumulate=4)
    sim, real = simulate_step_peak(task, 32, settings=four), cpu_step_peak(task, 32,
                                                                           settings=four)
    assert sim.peak_bytes == real.peak_bytes  # two simulated micro-steps = four real ones
    assert simulate_step_peak(task, 32, settings=StepSettings(accumulate=2)).peak_bytes == \
        sim.peak_bytes
    # From the second micro-step on, the first one's gradients are alive during the forward.
    assert sim.peak_bytes - one.peak_bytes > 0.9 * one.param_bytes


def test_accumulated_step_averages_the_micro_batch_losses():
    from bsselect.step import train_step

    task = EXAMPLES["digits-mlp"]()
    torch.manual_seed(0)
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = iter([make_batch(task, 8, seed=s) for s in (1, 2)])
    x, y = next(batches)
    loss = train_step(model, opt, task, x, y, accumulate=2, next_micro_batch=lambda: next(batches))
    expected = [task.loss_fn(model(xi), yi) for xi, yi in (make_batch(task, 8, seed=s)
                                                          for s in (1, 2))]
    assert loss.item() == pytest.approx(sum(e.item() for e in expected) / 2)


# --- optimizer implementation ----------------------------------------------------------------

def _adamw_task(**kw) -> Task:
    task = EXAMPLES["tiny-lm"]()
    task.optimizer = lambda p, lr: torch.optim.AdamW(p, lr=lr, **kw)
    return task


@pytest.mark.parametrize(("kw", "target", "impl"), [
    ({}, None, "for-loop"), ({}, "cuda", "foreach"), ({"foreach": False}, "cuda", "for-loop"),
    ({"fused": True}, "cuda", "fused"),
])
def test_the_simulation_runs_the_optimizer_the_target_would(kw, target, impl):
    step = simulate_step_peak(_adamw_task(**kw), 8, settings=StepSettings(target_device=target))
    assert step.optimizer_impl == impl


def test_foreach_optimizer_memory_matches_a_real_foreach_step():
    task, cuda = _adamw_task(), StepSettings(target_device="cuda")
    loop = simulate_step_peak(task, 8)
    sim, real = simulate_step_peak(task, 8, settings=cuda), cpu_step_peak(task, 8, settings=cuda)
    assert real.optimizer_impl == "foreach"
    assert relative_error(sim.optimizer_peak_bytes, real.optimizer_peak_bytes) < 1e-4
    # foreach's temporaries cover every parameter at once; the for-loop's one at a time.
    assert sim.optimizer_peak_bytes - loop.optimizer_peak_bytes > 0.5 * sim.param_bytes


# --- CUDA's autocast lists -----------------------------------------------------------------

TRACE = textwrap.dedent('''
    import json, sys, torch, torch.nn.functional as F
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from bsselect.memory.cuda_autocast import cuda_autocast_policy

    class Net(nn.Module):  # layer/group/RMS norm, softmax attention, einsum, pow/rsqrt
        def __init__(self, d=32, v=64):
            super().__init__()
            self.emb, self.ln, self.qkv = nn.Embedding(v, d), nn.LayerNorm(d), nn.Linear(d, 3 * d)
            self.proj, self.gn, self.head = nn.Linear(d, d), nn.GroupNorm(4, d), nn.Linear(d, v)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.w = nn.Parameter(torch.randn(d, d))

        def forward(self, idx):
            x = self.emb(idx)
            q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
            att = (q @ k.transpose(-1, -2)) / 4.0
            mask = torch.ones_like(att, dtype=torch.bool).triu(1)
            x = x + self.proj(att.masked_fill(mask, float("-inf")).softmax(-1) @ v)
            x = x + self.mlp(F.rms_norm(x, (x.shape[-1],)))
            x = x + torch.einsum("btd,de->bte", x, self.w)
            x = self.gn(x.transpose(1, 2)).transpose(1, 2)
            return self.head(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not str(func).startswith("prim."):
                self.ops.append(f"{func} " + ",".join(str(t.dtype) for t in tree_flatten(out)[0]
                                                      if isinstance(t, torch.Tensor)))
            return out

    def trace(device, dtype):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with torch.device("meta"):
            net = Net()
        for m in net.modules():  # no autograd on fake cuda: it aborts a CPU-only build
            for table in (m._parameters, m._buffers):
                for k, t in list(table.items()):
                    table[k] = mode.fake_tensor_converter.from_meta_and_device(
                        mode, t.detach(), torch.device(device))
        with mode:
            idx = torch.zeros(2, 16, dtype=torch.long, device=device)
        tr = Trace()
        def body():
            out = net(idx)
            F.cross_entropy(out.reshape(-1, 64), idx.reshape(-1)) + F.mse_loss(out, out.detach())
            out.logsumexp(-1).sum() + out.float().cumsum(-1).sum()
        with torch.no_grad(), mode, tr:
            if device == "cuda":  # CUDA's own autocast kernels (torch.autocast refuses w/o CUDA)
                torch.set_autocast_dtype("cuda", dtype)
                torch.set_autocast_enabled("cuda", True)
                torch.autocast_increment_nesting()
                try:
                    body()
                finally:
                    torch.autocast_decrement_nesting()
                    torch.set_autocast_enabled("cuda", False)
                    torch.clear_autocast_cache()
            else:
                with cuda_autocast_policy(), torch.autocast("cpu", dtype=dtype):
                    body()
        return tr.ops

    out = {}
    for name in ("bfloat16", "float16"):
        dtype = getattr(torch, name)
        out[name] = [trace("cuda", dtype), trace("cpu", dtype)]
    print(json.dumps(out))
''')


def test_cuda_lists_reproduce_cuda_autocast_op_by_op():
    """The same forward under CUDA's own autocast kernels (fake cuda tensors, no autograd,
    in a subprocess) and under the CPU with CUDA's lists: the same ops with the same dtypes."""
    proc = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for dtype, (cuda, emulated) in json.loads(proc.stdout).items():
        assert emulated == cuda, dtype
        assert any("_softmax.default torch.float32" in op for op in cuda)  # fp32 on CUDA


def test_every_op_only_cuda_autocasts_has_a_policy():
    """If a torch upgrade adds ops to CUDA's lists, this names them."""
    from bsselect.memory.cuda_autocast import cuda_policies

    registered = torch._C._dispatch_get_registrations_for_dispatch_key
    cuda_only = set(registered("AutocastCUDA")) - set(registered("AutocastCPU"))
    missing = sorted(name for name in cuda_only if name.split("::", 1)[1] not in cuda_policies()
                     and not name.startswith("aten::cudnn_"))  # CUDA-only kernels
    assert missing == []


def test_cuda_lists_apply_only_inside_and_change_the_dtypes():
    y = torch.randn(4, 16)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.linear(y, torch.randn(16, 16))
            return F.layer_norm(h, (16,)).dtype, h.softmax(-1).dtype, h.exp().dtype

    assert dtypes() == (torch.bfloat16,) * 3
    with cuda_autocast_policy():
        assert dtypes() == (torch.float32,) * 3
    assert dtypes() == (torch.bfloat16,) * 3


def test_cuda_target_uses_cuda_lists_in_the_simulation():
    task = EXAMPLES["tiny-lm"]()
    cpu_lists = simulate_step_peak(task, 32, kernel_workspace=False, settings=BF16)
    cuda = simulate_step_peak(task, 32, kernel_workspace=False,
                              settings=StepSettings(Precision.bf16, target_device="cuda"))
    # The LM loss: CPU autocast casts the logits to fp32 before cross_entropy (an fp32 copy and
    # fp32 log-probabilities); CUDA keeps bf16 log-probabilities and casts them for nll_loss.
    assert cuda.peak_bytes < cpu_lists.peak_bytes
    fp32 = simulate_step_peak(task, 32, kernel_workspace=False,
                              settings=StepSettings(target_device="cuda"))
    assert fp32.peak_bytes == simulate_step_peak(task, 32, kernel_workspace=False).peak_bytes


# --- gradient noise under reduced precision ---------------------------------------------------

def test_fp16_noise_norms_are_of_unscaled_gradients():
    task = EXAMPLES["digits-mlp"]()
    torch.manual_seed(0)
    model = task.model()
    x, y = make_batch(task, 64, seed=3)
    norms = {p: measure_grad_norms(model, task, x, y, 8, p) for p in Precision}
    for p in (Precision.bf16, Precision.fp16):
        for got, want in zip(norms[p], norms[Precision.fp32]):
            assert got == pytest.approx(want, rel=0.05), p


def test_raw_grads_back_off_the_scale_until_nothing_overflows():
    p = nn.Parameter(torch.ones(4))
    loss = (p.half() * 1e3).float().sum()  # d loss/d p.half() = 1e3: x 2^16 overflows fp16
    (grad,) = raw_grads(loss, [p], Precision.fp16)
    assert torch.equal(grad, torch.full((4,), 1e3))


# --- sweep, CLI --------------------------------------------------------------------------

def test_sweep_trains_effective_batches_of_micro_batches(tmp_path):
    from bsselect.selection.lr_scaling import LrScaling
    from bsselect.selection.sweep import SweepSettings, run_sweep
    from bsselect.selection.trials import BudgetKind, TrialBudget

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    task = Task(model=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)),
                train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.05, base_batch_size=16)
    settings = SweepSettings(TrialBudget(BudgetKind.steps, 6), LrScaling.linear,
                             noise_measurements=2, precision=Precision.bf16, accumulate=2)
    result = run_sweep(task, task_name="t", batch_sizes=[16, 32], settings=settings,
                       device=torch.device("cpu"), journal_path=tmp_path / "j.jsonl",
                       resume=False, max_batch=16, max_batch_source="test")
    data = result.to_json()
    assert (data["precision"], data["accumulate"]) == ("bf16", 2)
    for t in data["trials"]:
        assert t["status"] == "ok", t
        assert (t["micro_batch"], t["effective_batch"]) == (t["batch_size"] // 2, t["batch_size"])
        assert t["samples"] == 6 * t["batch_size"]


def test_cli_probe_reports_precision_accumulation_and_optimizer():
    proc = run_cli("probe", "tiny-lm", "--memory", "2GiB", "--precision", "bf16",
                   "--accumulate", "4", "--target", "cuda", "--batch-sizes", "8,16", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["precision"], data["accumulate"], data["optimizer_impl"]) == (
        "bf16", 4, "foreach")
    assert data["micro_batch"] == data["max_batch"]
    assert data["effective_batch"] == 4 * data["max_batch"]
    text = run_cli("check", "tiny-lm", "--batch-size", "64", "--memory", "2GiB",
                   "--precision", "fp16", "--accumulate", "2")
    assert text.returncode == 0, text.stderr
    assert "precision: fp16 autocast with GradScaler" in text.stdout
    assert "micro-batch 64 must fit; x 2 micro-steps = effective batch 128" in text.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["probe", "--precision", "fp8"], "--precision must be one of fp32, bf16, fp16"),
    (["probe", "--accumulate", "0"], "--accumulate must be an integer from 1 to 2,147,483,647"),
    (["sweep", "--accumulate", "3", "--batch-sizes", "8,16"], "not multiples of --accumulate 3"),
])
def test_cli_rejects_bad_precision_and_accumulation(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


# --- the parameters' dtype -------------------------------------------------------------------

HALF_TASK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task

def task():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    return Task(model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).half(),
                train_data=TensorDataset(x, y), loss_fn=nn.functional.cross_entropy, lr=0.1,
                base_batch_size=8)
"""


@pytest.mark.parametrize("command", [
    ["probe"], ["probe", "--method", "measured"], ["check", "--batch-size", "8", "--memory", "1GiB"],
    ["sweep", "--budget", "64"], ["noise"]])
def test_fp16_loss_scaling_on_float16_parameters_is_the_tasks_error(tmp_path, command):
    """GradScaler cannot unscale float16 gradients: every command says so up front, as the
    task's error (exit 1), not as "the simulation cannot run it" (it said that before)."""
    (tmp_path / "half.py").write_text(HALF_TASK)
    out = run_cli(command[0], f"{tmp_path / 'half.py'}:task", *command[1:], "--precision", "fp16")
    assert out.returncode == 1, out.stderr
    assert "cannot unscale float16 gradients" in out.stderr
    assert "simulation" not in out.stderr and "Traceback" not in out.stderr


def test_the_precision_line_names_the_parameters_dtype(tmp_path):
    """bf16 autocast over float16 parameters: the line said "fp32 parameters" whatever they
    were; now the dtype the step ran, in the text and the JSON."""
    (tmp_path / "half.py").write_text(HALF_TASK)
    out = run_cli("probe", f"{tmp_path / 'half.py'}:task", "--precision", "bf16")
    assert out.returncode == 0, out.stderr
    assert "bf16 autocast, float16 parameters and gradients" in out.stdout
    data = json.loads(run_cli("probe", "digits-mlp", "--precision", "bf16", "--json").stdout)
    assert data["parameter_dtype"] == "float32"
    data = json.loads(run_cli("check", f"{tmp_path / 'half.py'}:task", "--batch-size", "8",
                              "--memory", "1GiB", "--precision", "bf16", "--json").stdout)
    assert data["parameter_dtype"] == "float16"
