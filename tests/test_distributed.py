"""bsselect under torchrun: two real processes on the CPU with the gloo backend.

Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node 2`` in its
own session with a timeout, so a hang fails the test (and the whole process tree is killed)
instead of blocking the suite. The fake allocator in tests/tasks/ddp_tasks.py runs out of
memory on rank 1 only; tests/tasks/ddp_driver.py runs the core functions on every rank and
writes each rank's results, so that the ranks can be compared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bsselect import distributed
from bsselect.errors import UsageError
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.measured import run_two_steps

from conftest import run_cli
from test_probe import quadratic_task

TASKS = Path(__file__).parent / "tasks"
OOM_TASK = f"{TASKS / 'ddp_tasks.py'}:oom_forward"
TINY = f"{TASKS / 'sweep_tasks.py'}:tiny"
# One thread per rank (2 cores); a collective that waits 60 s for a peer is a failure.
ENV = {"OMP_NUM_THREADS": "1", "BSSELECT_DIST_TIMEOUT": "60", "COLUMNS": "200"}
sys.path.insert(0, str(TASKS))
import ddp_tasks  # noqa: E402


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux, where the suite runs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def torchrun(*args: str, timeout: float = 150, world: int = 2) -> subprocess.CompletedProcess:
    """``world`` ranks on this machine; the whole process group is killed if it outlives
    ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: kill the whole tree, or a hung
        # rank keeps the pipes open and communicate() below never returns
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: {' '.join(args)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def bsselect(*args: str) -> dict:
    """``torchrun ... -m bsselect ARGS --json``: rank 0's one JSON document."""
    proc = torchrun("-m", "bsselect", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)  # fails if rank 1 had printed too


def single(*args: str) -> dict:
    proc = run_cli(*args, "--json", env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- in one process


def test_detect_reads_torchrun_variables():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert distributed.detect({}) is None
    assert distributed.detect(env) == distributed.Launch(rank=1, world_size=4, local_rank=1,
                                                         local_world_size=2)
    with pytest.raises(UsageError, match="MASTER_ADDR, MASTER_PORT not; start bsselect with"):
        distributed.detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_without_torchrun_every_helper_is_a_no_op():
    assert (distributed.active(), distributed.rank(), distributed.world_size()) == (False, 0, 1)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.per_device(7) == 7
    data = {"max_batch": 9, "max_batch_pow2": 8, "b_small": 4, "b_big": 32, "trials": []}
    assert distributed.probe_json(data) == data and distributed.sweep_json(data) == data
    assert distributed.noise_json(data) == data and distributed.describe("probe", data) is None
    assert distributed.journal_settings() == {}


# --------------------------------------------------------------------------- two ranks


def test_probe_answers_per_device_and_names_the_global_batch():
    args = ("probe", "linreg", "--memory", "256MiB")
    one, two = single(*args), bsselect(*args)

    assert two["max_batch"] == one["max_batch"]  # per device: the same device budget
    assert (two["world_size"], two["per_device_batch"], two["accumulation_steps"]) == (
        2, one["max_batch"], 1)
    assert two["global_batch"] == 2 * one["max_batch"]
    assert two["global_batch_pow2"] == 2 * one["max_batch_pow2"]
    assert "world_size" not in one  # one process: the output is as before


def test_sweep_with_an_oom_on_rank_1_only(tmp_path):
    """Global batches 16..128 = per-device 8..64 on 2 ranks; rank 1 cannot fit more than 16
    per device, so trials 64 and 128 are OOM on both ranks, and nothing hangs."""
    out = bsselect("sweep", OOM_TASK, "--batch-sizes", "16,32,64,128", "--budget", "256",
                   "--noise-measurements", "2", "--lr-scaling", "linear", "--journal",
                   str(tmp_path / "j.jsonl"))

    trials = out["trials"]
    assert [(t["batch_size"], t["per_device_batch"], t["status"]) for t in trials] == [
        (16, 8, "ok"), (32, 16, "ok"), (64, 32, "oom"), (128, 64, "oom")]
    for t in trials[:2]:  # the global batch is the one the budget, the lr and the loss count
        assert (t["steps"], t["samples"]) == (256 // t["batch_size"], 256)
        assert t["lr"] == 0.1 * t["batch_size"] / 16
        assert t["train_loss_end"] < t["train_loss_start"] and t["b_simple"] is not None
    for t in trials[2:]:
        per_device = t["batch_size"] // 2
        assert t["error"] == (
            f"OutOfMemoryError: rank 1: CUDA out of memory in forward. Tried to allocate "
            f"{per_device * 2} MiB (GPU 1; {ddp_tasks.CAP * 2} MiB total capacity)")
    assert sorted(out["ranking"]) == [16, 32]
    rec = out["recommended_batch_size"]
    assert (out["world_size"], out["per_device_batch"], out["global_batch"]) == (2, rec // 2, rec)

    lines = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert lines[0]["settings"]["world_size"] == 2  # resuming at another world size refuses
    timed = ("per_device_batch", "step_time_s", "samples_per_s", "loss_drop_per_s")
    assert [{k: v for k, v in line["trial"].items() if k not in timed}
            for line in lines[1:] if "trial" in line] == [
        {k: v for k, v in t.items() if k not in timed} for t in trials]  # once each
    # Both ok batch sizes were timed in interleaved rounds, at the slower rank's pace.
    assert [r["batch_size"] for r in lines[-1]["timing"]] == [16, 32]


def test_noise_data_parallel_equals_the_single_process_estimate():
    """Same seed, same batches: rank r's sub-batches are the single-process sub-batches
    r*4 .. r*4+3, and the warm-up's DDP step averages the two halves of the same base batch,
    so only the order of floating-point sums differs."""
    args = ("noise", "linreg", "--b-small", "16", "--b-big", "128", "--measurements", "16",
            "--warmup-steps", "5")  # warm-up: DDP on 2 shards of each base batch
    one, two = single(*args), bsselect(*args)

    for key in ("b_simple", "grad_sq_norm", "trace_sigma", "final_loss", "initial_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert two["final_loss"] < two["initial_loss"]  # the warm-up trained
    assert (two["b_small"], two["b_big"], two["measurements"]) == (16, 128, 16)
    assert (two["world_size"], two["per_device_batch"], two["accumulation_steps"],
            two["global_batch"]) == (2, 16, 4, 128)


def test_token_weighted_noise_and_warm_up_under_ddp_equal_one_process():
    """Task.loss_weight under torchrun: the warm-up's DDP steps weight each rank's token mean
    by its tokens (the global batch's token mean, as one process trains), and the measurement
    all-reduces the units with the gradients (before: 2 ranks read B_simple 1.229 where one
    process read 0.952, on a task of very uneven lengths)."""
    args = ("noise", f"{TASKS / 'token_tasks.py'}:linear_tokens", "--b-small", "2",
            "--b-big", "16", "--measurements", "16", "--warmup-steps", "5")
    one, two = single(*args), bsselect(*args)
    for key in ("b_simple", "grad_sq_norm", "trace_sigma", "final_loss", "initial_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key


def test_core_functions_agree_across_ranks(tmp_path):
    proc = torchrun(str(TASKS / "ddp_driver.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # probe: rank 1's cap decides (MIN over ranks); rank 1's OOMs back both ranks off alike.
    p0, p1 = r0["probe"], r1["probe"]
    for key in ("points", "fixed_bytes", "per_sample_bytes", "max_batch", "confirmation"):
        assert p0[key] == p1[key], key
    truth = lambda b: run_two_steps(quadratic_task(), b, CappedCpuAllocator(2**40))  # noqa: E731
    steps = [(s["batch_size"], s["outcome"]) for s in p1["confirmation"]]
    assert len(steps) >= 3 and steps[0][1] == "oom"
    for b, outcome in steps:  # every agreed outcome is what rank 1's cap says
        assert (truth(b) <= p1["cap_bytes"]) == (outcome == "ok"), (b, outcome)
    assert p0["ooms_here"] == 0 and p1["ooms_here"] == sum(o == "oom" for _, o in steps)

    # sweep: an OOM inside rank 1's backward (DDP's all-reduce territory) is agreed too.
    assert r0["backward_oom"] == r1["backward_oom"]
    assert [(t["batch_size"], t["status"]) for t in r0["backward_oom"]["trials"]] == [
        (16, "ok"), (32, "ok"), (64, "oom")]
    assert "rank 1: CUDA out of memory in backward" in r0["backward_oom"]["trials"][2]["error"]

    # resume: rank 0 read the journal; every rank skipped the same trials.
    assert r0["first"] == r1["first"] and r0["resumed"] == r1["resumed"]
    assert r0["resumed"]["resumed"] == [16, 32]
    timed = ("step_time_s", "samples_per_s", "loss_drop_per_s")  # timed again on resume

    def untimed(trials):
        return [{k: v for k, v in t.items() if k not in timed} for t in trials]

    assert untimed(r0["resumed"]["trials"][:2]) == untimed(r0["first"]["trials"])
    journal = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [line["trial"]["batch_size"] for line in journal[1:] if "trial" in line] == [16, 32, 64]
    # Each run timed its ok batch sizes together (the resumed run those of all three that can
    # still be the fastest: choice.contenders), on every rank alike.
    rounds = [[r["batch_size"] for r in line["timing"]] for line in journal if "timing" in line]
    not_timed = r0["resumed"]["timing"]["not_timed"]
    assert r1["resumed"]["timing"]["not_timed"] == not_timed
    assert rounds == [[16, 32], [b for b in (16, 32, 64) if b not in not_timed]]
    assert len(rounds[1]) >= 2

    # noise: one estimate, on every rank.
    assert r0["noise"] == r1["noise"] and r0["noise"]["resolved"]
