"""Task.max_grad_norm: the run's gradient clipping, applied in every training step, carried
over from the HF Trainer (max_grad_norm) and Lightning (gradient_clip_val)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from bsselect import Task
from bsselect.precision import Precision
from bsselect.step import train_step


def _task(max_grad_norm=None, lr=0.5) -> Task:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g) * 10, torch.randn(64, 1, generator=g))
    return Task(model=lambda: nn.Linear(8, 1), train_data=data, loss_fn=F.mse_loss, lr=lr,
                optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), max_grad_norm=max_grad_norm)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError),
                                        (float("inf"), ValueError), (float("nan"), ValueError),
                                        (True, TypeError), ("1.0", TypeError)])
def test_a_bad_max_grad_norm_is_one_clear_line(bad, error):
    with pytest.raises(error, match=r"^Task.max_grad_norm must be a number > 0 or None, "):
        _task(max_grad_norm=bad)


@pytest.mark.parametrize("precision", [Precision.fp32, Precision.fp16])
def test_train_step_clips_as_the_frameworks_loop_does(precision):
    """The step's parameters equal a hand-written loop's: backward, (fp16: unscale), clip
    the global norm, step. Large inputs make the gradient norm far above 0.1."""
    task = _task(max_grad_norm=0.1)
    torch.manual_seed(0)
    model = task.model()
    hand = copy.deepcopy(model)
    x, y = task.train_data[:16]
    fp16 = precision is Precision.fp16

    def scaler():  # scale 1: no overflow, so neither step is skipped
        return torch.amp.GradScaler("cpu", init_scale=1.0) if fp16 else None

    opt = task.make_optimizer(model.parameters(), 0.5)
    train_step(model, opt, task, x, y, precision=precision, scaler=scaler())

    hand_opt = task.make_optimizer(hand.parameters(), 0.5)
    hand_opt.zero_grad()
    hand_scaler = scaler()
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss = F.mse_loss(hand(x), y)
    (hand_scaler.scale(loss) if fp16 else loss).backward()
    if fp16:
        hand_scaler.unscale_(hand_opt)
    norm = torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.1)
    assert norm > 1.0  # the clipping did something
    if fp16:
        hand_scaler.step(hand_opt)
    else:
        hand_opt.step()
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

    unclipped = _task()
    free = copy.deepcopy(model)
    free_opt = unclipped.make_optimizer(free.parameters(), 0.5)
    train_step(free, free_opt, unclipped, x, y)
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(free.parameters(),
                                                                model.parameters()))
    assert moved > 1.0  # without clipping the same step goes much further


def test_a_sweep_trial_clips_and_its_journal_says_so(tmp_path):
    """At lr 0.5 on inputs of scale 10 plain SGD blows up; clipped at norm 1 it trains. The
    journal's fingerprint holds the norm (a resume under another clipping is refused)."""
    import json

    from bsselect.api import sweep

    def run(task: Task, name: str):
        return sweep(task, batch_sizes=[8, 16], budget="256", journal=tmp_path / name,
                     noise_measurements=0, warmup_steps=0)

    clipped = run(_task(max_grad_norm=1.0), "clipped.jsonl")
    plain = run(_task(), "plain.jsonl")
    assert plain.trials[0].status == "diverged"
    assert clipped.trials[0].status == "ok"
    header = json.loads((tmp_path / "clipped.jsonl").read_text().splitlines()[0])
    assert header["settings"]["task_fingerprint"]["max_grad_norm"] == 1.0
    header = json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])
    assert header["settings"]["task_fingerprint"]["max_grad_norm"] is None


def test_from_trainer_carries_the_trainers_clipping(tmp_path):
    pytest.importorskip("accelerate")
    from tasks import hf_tasks
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    def make(norm):
        args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=norm, report_to=[],
                                 per_device_train_batch_size=4, use_cpu=True)
        trainer = Trainer(model_init=lambda: GPT2LMHeadModel(hf_tasks.config()), args=args,
                          train_dataset=hf_tasks.Sentences(8),
                          data_collator=DataCollatorForLanguageModeling(hf_tasks.tokenizer(),
                                                                        mlm=False))
        return Task.from_trainer(trainer)

    assert make(0.5).max_grad_norm == 0.5
    # The Trainer clips only above 0, and inf clips nothing: no clipping (review: -1 and inf
    # were refused by Task's check, a traceback-free crash of a valid Trainer)
    for off in (0.0, -1.0, float("inf")):
        assert make(off).max_grad_norm is None
    assert TrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 1.0  # its default


CLIP_TASK = """
import os
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from bsselect import Task


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    norm = os.environ.get("CLIP")
    return Task(model=lambda: nn.Linear(4, 2), train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                loss_fn=F.cross_entropy, lr=0.1, base_batch_size=8,
                max_grad_norm=float(norm) if norm else None)
"""


def test_resume_refuses_a_journal_trained_with_other_clipping(tmp_path):
    """Clipped trials are not unclipped ones: a resume that switches clipping on or off is
    refused (review: the fingerprint held the norm only when set, and the comparison reads
    the fields both journals hold, so on <-> off resumed). A journal written before the field
    existed trained without clipping: it resumes unclipped, and is refused clipped."""
    import json

    from conftest import run_cli

    (tmp_path / "clip.py").write_text(CLIP_TASK)
    spec = f"{tmp_path / 'clip.py'}:make"

    def sweep(journal: str, clip: str | None, *extra: str):
        return run_cli("sweep", spec, "--batch-sizes", "8,16", "--budget", "128", "--journal",
                       str(tmp_path / journal), "--noise-measurements", "0", *extra,
                       env={"CLIP": clip or ""})

    for first, then in (("1.0", None), (None, "1.0")):
        name = f"j-{first}.jsonl"
        done = sweep(name, first)
        assert done.returncode == 0, done.stderr
        said = "gradients clipped to norm 1 before every step (Task.max_grad_norm)"
        assert (said in done.stderr) == (first is not None), done.stderr
        again = sweep(name, then, "--resume")
        assert again.returncode == 2, again.stderr
        assert "max_grad_norm" in again.stderr and "its trials do not apply" in again.stderr
    # An older journal: no max_grad_norm in its fingerprint.
    journal = tmp_path / "old.jsonl"
    assert sweep("old.jsonl", None).returncode == 0
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    del header["settings"]["task_fingerprint"]["max_grad_norm"]
    journal.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    assert sweep("old.jsonl", None, "--resume").returncode == 0
    refused = sweep("old.jsonl", "1.0", "--resume")
    assert refused.returncode == 2 and "max_grad_norm None -> 1.0" in refused.stderr


def test_a_measured_probe_for_cuda_of_a_checkpointed_model_takes_the_larger_headroom():
    """``--target cuda`` with real steps (a CUDA machine's auto method): the steps recompute,
    so the fragmentation headroom is the recomputing step's 30% (review: it was always 15%:
    only simulations said whether they recomputed). The allocator is the CPU one with a cap,
    the seam the measured path takes on any device."""
    from torch.utils.checkpoint import checkpoint

    from bsselect.device import Budget
    from bsselect.memory.capped import CappedCpuAllocator
    from bsselect.memory.probe import Method, run_probe
    from bsselect.memory.targets import Target

    class Net(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.a, self.b, self.checkpointed = nn.Linear(8, 64), nn.Linear(64, 1), checkpointed

        def forward(self, x):
            h = checkpoint(self.a, x, use_reentrant=False) if self.checkpointed else self.a(x)
            return self.b(torch.relu(h))

    data = _task().train_data
    for checkpointed, note in ((True, "30% of the peak"), (False, "15% of the peak")):
        task = Task(model=lambda c=checkpointed: Net(c), train_data=data, loss_fn=F.mse_loss)
        result = run_probe(task, task_name="t", device=torch.device("cpu"),
                           budget=Budget(2**31, "test"), method=Method.measured,
                           target=Target.cuda, batch_sizes=[8, 16],
                           backend=CappedCpuAllocator(2**40), confirm=False)
        headroom = next(t for t in result.terms if t.name == "fragmentation headroom")
        assert headroom.note.startswith(note), (checkpointed, headroom.note)
