"""Errors in the caller's words: keyword arguments for a Python caller, options for the CLI's."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bsselect
from bsselect import wording
from bsselect.wording import in_python_words

PACKAGE = Path(bsselect.__file__).parent


@pytest.mark.parametrize("cli, python", [
    ("use --method simulated (or auto)", 'use method="simulated" (or auto)'),
    ("--target cuda needs --memory (the target device's memory)",
     'target="cuda" needs memory= (the target device\'s memory)'),
    ("--seq-len 4096", "seq_len=4096"),
    ("--lr 0.05.", "lr=0.05."),
    ("--memory 80GiB or --device-preset a100-80gb", 'memory="80GiB" or device_preset="a100-80gb"'),
    ("--batch-sizes 8,16,32 lists the sizes", "batch_sizes=[8, 16, 32] lists the sizes"),
    ("--batch-sizes 128,256 lists", "batch_sizes=[128, 256] lists"),
    ("--points 6 exceeds what --horizon 10,000 spaces",
     "points=6 exceeds what horizon=10000 spaces"),
    ("--batch-sizes, --min-batch", "batch_sizes=, min_batch="),
    ("give --warmup-steps N.", "give warmup_steps=N."),
    ("choose another --journal path", "choose another journal=path"),
    ("--shard-unit LlamaDecoderLayer: no module", 'shard_unit="LlamaDecoderLayer": no module'),
    ("--from-checkpoint ckpt/step.pt@2000: step", 'from_checkpoint="ckpt/step.pt@2000": step'),
    ("--budget 200steps", 'budget="200steps"'),
    ("--warmup-steps=auto", 'warmup_steps="auto"'),
    # switches: what follows belongs to the sentence
    ("--resume and --overwrite exclude each other",
     "resume=True and overwrite=True exclude each other"),
    ("--no-activation-checkpointing saves", "activation_checkpointing=False saves"),
    ("--reshard-after-forward needs --shard fsdp", 'reshard_after_forward=True needs shard="fsdp"'),
    # a word after an option that takes a value is not its value
    ("--world-size must be >= 1", "world_size= must be >= 1"),
    ("leave --points out", "leave points= out"),
    # options with no keyword, and commands quoted whole, are left as written
    ("rerun with --debug; --json output", "rerun with --debug; --json output"),
    ("use `bsselect probe --method measured` or --method simulated",
     'use `bsselect probe --method measured` or method="simulated"'),
    ("torchrun --nproc-per-node 2 -m bsselect sweep --resume",
     "torchrun --nproc-per-node 2 -m bsselect sweep --resume"),
    ("for memory without one: bsselect probe --method simulated",
     "for memory without one: bsselect probe --method simulated"),
    # not options
    ("b=2,048 and x--y and a -- b", "b=2,048 and x--y and a -- b"),
])
def test_python_words(cli: str, python: str) -> None:
    assert in_python_words(cli) == python


def test_every_option_with_a_keyword_is_known() -> None:
    options = wording._options()
    assert options["--resume"] == ("resume", True, False)
    assert options["--no-reshard-after-forward"] == ("reshard_after_forward", False, False)
    assert options["--hf-config"] == ("hf_config", None, False)
    assert options["--device-preset"] == ("device_preset", None, False)
    assert options["--batch-sizes"] == ("batch_sizes", None, True)
    for cli_only in ("--json", "--plot", "--format", "--debug"):
        assert cli_only not in options


def _filled(field: ast.FormattedValue) -> str:
    """An f-string field as it prints: a number, with thousands separators where its format
    asks for them."""
    spec = ast.unparse(field.format_spec) if field.format_spec is not None else ""
    return "10,000" if "," in spec else "7"


def _messages() -> list[str]:
    """Every string in bsselect's code (not docstrings) that names an option, f-string
    fields filled with a value of the shape they hold at run time."""
    texts = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "wording.py"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                     ast.Module))
                and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else _filled(v)
                               for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                text = node.value
            else:
                continue
            if re.search(r"(?<![\w-])--[a-z]", text):
                texts.append(text)
    return texts


def test_no_message_keeps_an_option_that_has_a_keyword() -> None:
    messages = _messages()
    assert len(messages) > 100  # the scan finds them
    options = wording._options()
    for text in messages:
        # what is left of it outside commands quoted whole
        python = in_python_words(text)
        assert "=[" not in python or "batch_sizes=[" in python, text  # a number is no list
        left = re.sub(wording._COMMAND, "", python)
        kept = [flag for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", left)
                if flag in options]
        assert not kept, (text, kept)


def test_a_python_caller_is_told_keywords(tmp_path: Path) -> None:
    with pytest.raises(bsselect.UsageError) as info:
        bsselect.probe("bsselect.examples.digits:make_task", method="measured", target="cuda")
    message = str(info.value)
    assert message.startswith('target="cuda" with method="measured": ')
    assert 'use method="simulated" (or auto)' in message and "--" not in message
    with pytest.raises(bsselect.UsageError, match=r'^check needs the device\'s memory: '
                       r'memory="80GiB" or device_preset="a100-80gb"'):
        bsselect.check("bsselect.examples.digits:make_task", batch_size=4)
    with pytest.raises(bsselect.UsageError,
                       match=r"^resume=True and overwrite=True exclude each other$"):
        bsselect.sweep("bsselect.examples.digits:make_task", resume=True, overwrite=True,
                       journal=tmp_path / "j.jsonl")


def test_the_cli_is_told_its_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "bsselect", "probe",
                           "bsselect.examples.digits:make_task", "--method", "measured",
                           "--target", "cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: --target cuda with --method measured: " in proc.stderr
    assert "use --method simulated (or auto)" in proc.stderr and "Traceback" not in proc.stderr


def _small_task():
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=g)
    return bsselect.Task(model=lambda: nn.Linear(4, 2), loss_fn=F.cross_entropy, lr=0.05,
                         train_data=TensorDataset(x, (x[:, 0] > 0).long()),
                         val_data=TensorDataset(x[:16], (x[:16, 0] > 0).long()),
                         base_batch_size=8)


def test_a_python_caller_gets_the_sweeps_warnings(tmp_path: Path) -> None:
    """A sweep called from Python without hooks dropped its warnings, such as the batch sizes
    it skipped (review): they are Python warnings now, in the caller's words."""
    with pytest.warns(UserWarning, match=r"^batch sizes 128 are larger than the 80 training "
                                         r"items: skipped"):
        result = bsselect.sweep(_small_task(), batch_sizes=[8, 16, 128], budget="32",
                                journal=tmp_path / "j.jsonl", noise_measurements=0)
    assert sorted(t.batch_size for t in result.trials) == [8, 16]
    # hooks without a warn callback get the same
    from bsselect.selection.sweep import SweepHooks

    with pytest.warns(UserWarning, match="are larger than the 80 training items"):
        bsselect.sweep(_small_task(), batch_sizes=[8, 16, 128], budget="32",
                       journal=tmp_path / "j.jsonl", overwrite=True, noise_measurements=0,
                       hooks=SweepHooks())
    # a caller's own callback gets them instead
    said: list[str] = []
    bsselect.sweep(_small_task(), batch_sizes=[8, 16, 128], budget="32",
                   journal=tmp_path / "j.jsonl", overwrite=True, noise_measurements=0,
                   hooks=SweepHooks(warn=said.append))
    assert any("are larger than the 80 training items" in w for w in said)


def test_a_python_caller_is_warned_of_too_many_threads(tmp_path: Path) -> None:
    from bsselect.selection.timing import usable_cpus

    too_many = usable_cpus() + 1
    with pytest.warns(UserWarning, match=rf"^threads={too_many} is more than the "):
        bsselect.plan_sweep(_small_task(), threads=too_many, batch_sizes=[8, 16],
                            journal=tmp_path / "j.jsonl")
