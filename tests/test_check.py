"""check: the CI gate, by exit code through a real subprocess, as CI would run it."""

from __future__ import annotations

import json
import resource
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from bsselect.errors import UsageError
from bsselect.gate.check import PRESETS, merge_config, read_pyproject

CHECK_FIELDS = {"fits", "batch_size", "required_bytes", "budget_bytes", "max_batch"}

BIG_MODEL = '''
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))

def seven_billion():
    # 52 blocks of 8 * 4096**2 weights: 52 * 134M = 6.98B, + a 0.2B head = 7.2B parameters.
    d = 4096
    data = TensorDataset(torch.randn(64, 16, d), torch.randint(0, 50_000, (64, 16)))
    model = lambda: nn.Sequential(*[Block(d) for _ in range(52)], nn.Linear(d, 50_000))
    loss = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    return Task(model=model, train_data=data, loss_fn=loss, lr=1e-4,
                optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr))
'''


def check(*args, **kw):
    return run_cli("check", *args, **kw)


def test_fits_exits_0_with_json_fields():
    proc = check("digits-mlp", "--batch-size", "64", "--memory", "1GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert CHECK_FIELDS <= set(data)
    assert data["fits"] is True and data["batch_size"] == 64
    assert data["required_bytes"] <= 0.8 * data["budget_bytes"]
    assert data["max_batch"] > 64


def test_does_not_fit_exits_3_and_says_by_how_much():
    proc = check("tiny-lm", "--batch-size", "4096", "--memory", "1GiB")
    assert proc.returncode == 3, proc.stderr
    assert "does NOT fit" in proc.stdout and "over by" in proc.stdout
    assert "largest batch that fits:" in proc.stdout


def test_max_batch_is_consistent_with_fits():
    proc = check("tiny-lm", "--batch-size", "256", "--memory", "1GiB", "--json")
    data = json.loads(proc.stdout)
    at_max = check("tiny-lm", "--batch-size", str(data["max_batch"]), "--memory", "1GiB", "--json")
    above = check("tiny-lm", "--batch-size", str(data["max_batch"] + 8), "--memory", "1GiB",
                  "--json")
    assert at_max.returncode == 0 and above.returncode == 3


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "64"], "check needs the device's memory"),
    (["--memory", "1GiB"], "check needs --batch-size"),
    (["--batch-size", "64", "--memory", "1GiB", "--device-preset", "t4-16gb"], "not both"),
    (["--batch-size", "64", "--device-preset", "tpu-v9"], "unknown --device-preset"),
    (["--batch-size", "64", "--memory", "1GiB", "--margin", "-0.1"], "--margin must be in"),
    (["--batch-size", "0", "--memory", "1GiB"], "batch size must be an integer from 1 to 2,147,483,647"),
    (["--batch-size", "64", "--memory", "1GiB", "--format", "xml"], "--format must be"),
])
def test_usage_errors_exit_2(args, message):
    proc = check("digits-mlp", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_broken_task_exits_1(task_file):
    proc = check(f"{task_file}:raises", "--batch-size", "8", "--memory", "1GiB")
    assert proc.returncode == 1
    assert "ValueError: no data here" in proc.stderr


BROKEN_STEPS = Path(__file__).parent / "tasks" / "broken_steps.py"


@pytest.mark.parametrize("name, error", [
    ("label_out_of_range", "IndexError: Target 2 is out of bounds"),
    ("float64_inputs", "must have the same dtype"),
    ("bf16_weights", "must have the same dtype"),
])
def test_a_task_whose_real_step_fails_never_fits(name, error):
    """Fake tensors check neither dtypes nor class indices: check and a simulated probe said
    "fits", exit 0, for these (review). One real step on two items now says it cannot run."""
    for command in (("check", "--batch-size", "8", "--device-preset", "t4-16gb"),
                    ("probe", "--method", "simulated", "--memory", "1GiB")):
        proc = run_cli(command[0], f"{BROKEN_STEPS}:{name}", *command[1:])
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and error in lines[0] and "cannot run" in lines[0], lines


@pytest.mark.parametrize("name, error", [
    ("float_targets", "expected target dtype to be Long"),
    ("lbfgs", "closure optimizers (LBFGS) are not supported"),
])
def test_an_error_a_real_step_meets_too_is_not_blamed_on_the_simulation(name, error):
    """Both said "if the step runs for real, it is the simulation that cannot run it:
    --method measured" (review): the float targets' error read as a gather's dtype on fake
    tensors, and LBFGS is not supported either way."""
    proc = check(f"{BROKEN_STEPS}:{name}", "--batch-size", "8", "--device-preset", "t4-16gb")
    assert proc.returncode == 1, proc.stderr
    assert error in proc.stderr and "--method measured" not in proc.stderr, proc.stderr


def test_the_real_step_after_a_failed_simulation_runs_at_the_runs_precision():
    """A bf16-weight model with an op the simulation cannot run: under --precision bf16 the
    real step runs, so the simulation is what fails (--method measured), not "the step cannot
    run" (the real step ran in fp32 and met the dtype mismatch: review)."""
    proc = check(f"{BROKEN_STEPS}:bf16_custom_op", "--batch-size", "8", "--device-preset",
                 "t4-16gb", "--precision", "bf16")
    assert proc.returncode == 1, proc.stderr
    assert "--method measured" in proc.stderr and "cannot run at any" not in proc.stderr


def test_a_dtype_mismatch_under_autocast_is_not_forgiven_as_a_missing_cpu_kernel():
    """The step fails under bf16 autocast on every device (a custom backward mixes bf16 and
    fp32) and runs in fp32: check said "fits", exit 0, taking it for a kernel the CPU lacks
    (review)."""
    proc = check(f"{BROKEN_STEPS}:bf16_dtype_mismatch", "--batch-size", "8",
                 "--device-preset", "t4-16gb", "--precision", "bf16")
    assert proc.returncode == 1, proc.stdout
    assert "cannot run at any batch size" in proc.stderr and "same dtype" in proc.stderr
    fp32 = check(f"{BROKEN_STEPS}:bf16_dtype_mismatch", "--batch-size", "8",
                 "--device-preset", "t4-16gb")
    assert fp32.returncode == 0, fp32.stderr


def test_bf16_weights_fit_under_bf16_autocast():
    """The real step runs under the run's precision: with --precision bf16 it runs."""
    proc = check(f"{BROKEN_STEPS}:bf16_weights", "--batch-size", "8", "--device-preset",
                 "t4-16gb", "--precision", "bf16")
    assert proc.returncode == 0, proc.stderr


def test_preset_implies_cuda_terms_and_github_format():
    proc = check("digits-cnn", "--batch-size", "128", "--device-preset", "t4-16gb",
                 "--format", "github")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("::notice title=bsselect check::batch 128 of digits-cnn fits")
    bad = check("tiny-lm", "--batch-size", "100000", "--device-preset", "t4-16gb",
                "--format", "github")
    assert bad.returncode == 3
    assert bad.stdout.startswith("::error title=bsselect check::batch 100000 (6,400,000 tokens, "
                                 "64 per sample) of tiny-lm does NOT")
    data = json.loads(check("digits-cnn", "--batch-size", "128", "--device-preset",
                            "t4-16gb", "--json").stdout)
    assert data["target"] == "cuda" and data["budget_bytes"] == PRESETS["t4-16gb"][0]
    assert {t["name"] for t in data["terms"]} >= {"CUDA context", "cuDNN workspace"}


def test_pyproject_supplies_everything(tmp_path, task_file):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(f'''
        [project]
        name = "someone-elses-model"
        [tool.bsselect]
        task = "{task_file}:make_task"
        batch_size = 64
        memory = "512MiB"
        margin = 0.1
    '''))
    proc = run_cli("check", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["batch_size"], data["margin"], data["budget_bytes"]) == (64, 0.1, 512 * 2**20)
    # The CLI overrides the file:
    proc = run_cli("check", "--batch-size", "32", "--json")
    assert json.loads(proc.stdout)["batch_size"] == 32


def test_a_task_file_in_pyproject_is_relative_to_its_folder(tmp_path, task_file, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    task_file.rename(project / "tiny_task.py")
    (project / "pyproject.toml").write_text(
        '[tool.bsselect]\ntask = "tiny_task.py:make_task"\nbatch_size = 8\nmemory = "1GiB"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    proc = run_cli("check", "--config", str(project / "pyproject.toml"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"]


def test_pyproject_errors(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.bsselect]\nbatch_sise = 3\n")
    with pytest.raises(UsageError, match="unknown key"):
        read_pyproject(path)
    path.write_text("[tool.bsselect\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_pyproject(path)
    with pytest.raises(UsageError, match="batch size must be an integer"):
        merge_config({}, {"batch_size": "big", "memory": "1GiB"})


def test_an_error_from_pyproject_values_says_they_came_from_the_file():
    """The shard and budget errors name CLI flags; when a value came from the file the
    message says so (review: `--shard fsdp needs --world-size` for a pyproject shard key)."""
    with pytest.raises(UsageError, match=r"needs --world-size .* \(shard from "
                                         r"\[tool.bsselect\] in pyproject.toml\)$"):
        merge_config({}, {"batch_size": 8, "memory": "1GiB", "shard": "fsdp"})
    with pytest.raises(UsageError, match=r"not both \(memory, device_preset from "):
        merge_config({}, {"batch_size": 8, "memory": "1GiB", "device_preset": "t4-16gb"})
    with pytest.raises(UsageError, match=r"got 0$"):  # about the CLI's --world-size only
        merge_config({"world_size": 0}, {"batch_size": 8, "memory": "1GiB", "shard": "fsdp"},
                     "my.toml")
    with pytest.raises(UsageError, match=r"got 0 \(world_size from \[tool.bsselect\] in "
                                         r"my.toml\)$"):
        merge_config({}, {"batch_size": 8, "memory": "1GiB", "shard": "fsdp", "world_size": 0},
                     "my.toml")
    with pytest.raises(UsageError, match=r"needs --world-size N \(the ranks it shards over\)$"):
        merge_config({"shard": "fsdp", "memory": "1GiB"}, {"batch_size": 8})
    # Only the keys the error is about: not a file's precision beside --shard without
    # --world-size, not a file's device preset that --memory replaced (review).
    with pytest.raises(UsageError, match=r"shards over\)$"):
        merge_config({"shard": "fsdp", "memory": "1GiB"}, {"batch_size": 8, "precision": "bf16"})
    with pytest.raises(UsageError) as caught:
        merge_config({"memory": "lots"}, {"batch_size": 8, "device_preset": "t4-16gb"})
    assert "tool.bsselect" not in str(caught.value)


def test_seven_billion_parameters_without_allocating_them(tmp_path):
    path = tmp_path / "big.py"
    path.write_text(BIG_MODEL)
    # 7.2B fp32 params + grads + AdamW state = 115 GB: far beyond this 24 GiB machine.
    proc = check(f"{path}:seven_billion", "--batch-size", "4", "--device-preset", "h100-80gb",
                 "--json", timeout=240)
    assert proc.returncode == 3, proc.stderr   # it cannot fit an 80 GB GPU either
    data = json.loads(proc.stdout)
    assert data["required_bytes"] > 100e9 and data["max_batch"] == 0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert children < 4 * 2**30, f"the check used {children / 2**30:.1f} GiB of real memory"


def test_check_largest_batch_is_checked_by_simulation_not_read_off_the_line(tmp_path, monkeypatch):
    """issue 17: the two-point line's answer is simulated where it lands and refined; the
    answer fits and one more sample does not."""
    import json as _json

    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    proc = run_cli("check", "tiny-lm", "--batch-size", "64", "--memory", "512MiB", "--json")
    assert proc.returncode == 0, proc.stderr
    out = _json.loads(proc.stdout)
    assert any(step == f"{out['max_batch']} ok" for step in out["max_batch_checked"])
    from bsselect.examples import EXAMPLES
    from bsselect.memory.simulated import simulate_step_peak

    task = EXAMPLES["tiny-lm"]()
    usable = out["usable_bytes"]
    b = out["max_batch"]
    # target "same": required = the simulated peak (with CPU kernel scratch, as check runs it).
    assert simulate_step_peak(task, b).peak_bytes <= usable
    assert simulate_step_peak(task, b + 1).peak_bytes > usable


def test_a_batch_beyond_the_training_set_fits_with_a_note():
    """The memory answer stays the memory answer (exit 0), but a batch the data can never
    fill, or a largest batch that only the data limits, is said, not left as a bare "fits"."""
    task = str(Path(__file__).parent / "tasks" / "sweep_tasks.py") + ":tiny"  # 384 items
    proc = check(task, "--batch-size", "4096", "--memory", "4GiB")
    assert proc.returncode == 0, proc.stderr
    assert "batch 4096 of" in proc.stdout and " fits:" in proc.stdout
    assert ("note: batch 4,096 is more than the task's 384 training items: every step would "
            "see at most 384") in proc.stdout.replace("\n", " ")
    data = json.loads(check(task, "--batch-size", "64", "--accumulate", "8", "--memory",
                            "4GiB", "--json").stdout)
    assert data["train_items"] == 384 and data["effective_batch"] == 512
    assert data["data_note"].startswith("batch 512 (64 x 8 accumulated) is more than")
    data = json.loads(check(task, "--batch-size", "16", "--memory", "4GiB", "--json").stdout)
    assert data["max_batch"] >= 384
    assert "memory does not limit the batch here, the data does" in data["data_note"]
    data = json.loads(check("digits-mlp", "--batch-size", "64", "--memory", "1MiB",
                            "--json").stdout)
    assert data["max_batch"] < data["train_items"] and data["data_note"] is None


def test_the_data_note_counts_ranks_and_skips_made_up_data():
    """A sharded run trains on batch x ranks items a step (review: the note said "the largest
    batch ... reaches" for 16,384 sequences a step on 6,556); --hf-config's random tokens are
    not a training set; the GitHub annotation carries the note too."""
    data = json.loads(check("tiny-lm", "--batch-size", "2048", "--memory", "64GiB", "--shard",
                            "fsdp", "--world-size", "8", "--json").stdout)
    assert data["train_items"] == 6556
    assert data["data_note"].startswith("batch 16,384 (2048 x 8 ranks) is more than the task's "
                                        "6,556 training items")
    task = str(Path(__file__).parent / "tasks" / "sweep_tasks.py") + ":tiny"
    proc = check(task, "--batch-size", "4096", "--memory", "4GiB", "--format", "github")
    assert proc.returncode == 0 and "::notice" in proc.stdout
    assert "; note: batch 4,096 is more than the task's 384 training items" in proc.stdout
    data = json.loads(check("--hf-config", "llama-7b", "--seq-len", "64", "--batch-size", "4",
                            "--memory", "80GiB", "--json").stdout)
    assert data["train_items"] is None and data["data_note"] is None


def test_the_real_step_is_skipped_where_it_would_be_large():
    """The real step runs only where the model (parameters and buffers) and the step's
    simulated peak on two items are small: a long context's activations took 8 GB and 38 s
    for real on a small Llama (review). Skipped, a broken task is left to the simulation."""
    import importlib.util

    from bsselect.memory.real_check import check_real_step

    spec = importlib.util.spec_from_file_location("broken_steps", BROKEN_STEPS)
    broken = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(broken)
    task = broken.label_out_of_range()
    assert check_real_step(task, max_step_bytes=1) is False
    assert check_real_step(task, max_bytes=1) is False
    with pytest.raises(Exception, match="Target 2 is out of bounds"):
        check_real_step(task)


def test_an_embedding_bag_is_not_simulated_low_but_measured_or_refused():
    """Its backward's kernel scratch is not in the simulation: check said "fits" 26-37% under
    the allocator (review). probe measures real steps; check, which cannot, says so."""
    import bsselect
    from tasks.broken_steps import embedding_bag

    result = bsselect.probe(embedding_bag(), memory="256MiB")
    assert result.method == "measured" and "EmbeddingBag" in result.method_note
    proc = check(f"{BROKEN_STEPS}:embedding_bag", "--batch-size", "64", "--memory", "256MiB")
    assert proc.returncode == 1, proc.stdout
    assert "nn.EmbeddingBag's backward" in proc.stderr and "--method measured" in proc.stderr


def test_a_preset_implies_cuda_over_the_files_target_and_same_with_a_preset_is_refused():
    """A pyproject `target = "same"` won over the --device-preset that implies --target
    cuda: the T4's max_batch came out 23% high, without the CUDA terms (review). And a GPU
    preset against this machine's CPU step is refused, whoever asked for it."""
    config = merge_config({"device_preset": "t4-16gb"},
                          {"batch_size": 8, "memory": "16GiB", "target": "same"})
    assert config.target.value == "cuda"
    with pytest.raises(UsageError, match=r"^--device-preset h100-80gb is a GPU, and --target "
                                         r"same would check this machine's CPU step"):
        merge_config({"device_preset": "h100-80gb", "target": "same"}, {"batch_size": 8})
    with pytest.raises(UsageError, match=r'^device_preset = "t4-16gb" in my.toml is a GPU, and '
                                         r'target = "same" in my.toml would'):
        merge_config({}, {"batch_size": 8, "device_preset": "t4-16gb", "target": "same"},
                     "my.toml")
    assert merge_config({}, {"batch_size": 8, "memory": "1GiB"}).target.value == "same"


def test_a_cpu_target_says_so_under_the_verdict():
    """`check --memory 80GiB` on a CPU machine checks the CPU's step: said, not left to the
    user to guess (review)."""
    proc = check("digits-mlp", "--batch-size", "8", "--memory", "1GiB")
    assert proc.returncode == 0, proc.stderr
    assert "target: this machine's CPU step, without CUDA's terms" in proc.stdout
    cuda = check("digits-mlp", "--batch-size", "8", "--device-preset", "t4-16gb")
    assert "target: this machine's CPU step" not in cuda.stdout


def test_the_sharded_precision_line_names_the_parameters_dtype_at_any_world_size():
    """World size 1 was described as plain autocast, and a bf16-built model's shards as fp32,
    where both simulate FSDP2's MixedPrecisionPolicy over the model's own dtype (review)."""
    from bsselect.run_options import step_lines

    lines = step_lines({"precision": "bf16", "sharding": "FSDP2 over 1 ranks", "shard_ranks": 1,
                        "parameter_dtype": "bfloat16"})
    assert ("precision: FSDP2 MixedPrecisionPolicy — bf16 copies of the parameters for "
            "compute, bfloat16 sharded parameters, gradients reduced in fp32") in lines
