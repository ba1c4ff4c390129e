"""Task.from_hf and Task.from_trainer on a real transformers setup (a locally built tokenizer,
DataCollatorForLanguageModeling, a GPT-2 from its config, a real Trainer): the commands run on
it, the simulation matches the CPU allocator, the Trainer's settings are taken over."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from tasks import hf_tasks  # noqa: E402

from bsselect import Task  # noqa: E402
from bsselect.errors import TaskError, UsageError  # noqa: E402
from bsselect.memory.cpu_truth import cpu_step_peak  # noqa: E402
from bsselect.memory.inputs import InputMode, scan_inputs  # noqa: E402
from bsselect.memory.simulated import simulate_step_peak  # noqa: E402
from bsselect.precision import Precision  # noqa: E402
from bsselect.step import StepSettings  # noqa: E402
from bsselect.task import validate_task  # noqa: E402

TASKS = str(Path(__file__).parent / "tasks" / "hf_tasks.py")


def test_an_hf_task_simulates_to_the_cpu_allocator_on_padded_worst_case_batches():
    task = hf_tasks.gpt2_lm()
    validate_task(task, on_meta=True)
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    assert not inputs.uniform  # 4..40 words: the scan sees token lengths
    for b in (8, 32):
        sim = simulate_step_peak(task, b, inputs=inputs).peak_bytes
        real = cpu_step_peak(task, b, inputs=inputs).peak_bytes
        assert abs(sim / real - 1) <= 0.005, (b, sim, real)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_from_hf_simulates_to_the_cpu_allocator_at_8_and_128(family):
    task = hf_tasks.gpt2_lm() if family == "gpt2" else hf_tasks.bert_classifier()
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    for b in (8, 128):
        sim = simulate_step_peak(task, b, inputs=inputs).peak_bytes
        real = cpu_step_peak(task, b, inputs=inputs).peak_bytes
        assert abs(sim / real - 1) <= 0.01, (family, b, sim, real)


def test_sweep_runs_on_the_hf_setup_with_the_models_own_loss(tmp_path):
    done = run_cli("sweep", f"{TASKS}:gpt2_lm", "--batch-sizes", "8,32", "--budget", "256",
                   "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [t["status"] for t in data["trials"]] == ["ok", "ok"]
    assert all(t["train_loss_end"] < t["train_loss_start"] for t in data["trials"])
    assert data["recommended_batch_size"] in (8, 32)


def test_from_trainer_takes_the_trainers_model_data_and_arguments(tmp_path):
    pytest.importorskip("accelerate")
    # The Trainer's accumulation is the commands' to apply: said, not silently left out.
    with pytest.warns(UserWarning, match=r"2 gradient-accumulation steps: probe and check "
                                         r"answer for its step with accumulate=2"):
        task = hf_tasks.trainer_task()
    assert task.lr == 3e-4 and task.base_batch_size == 4 * 2
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    # As the Trainer builds it: biases and norms in a second group, without weight decay.
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = [names[id(p)] for p in optimizer.param_groups[1]["params"]]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and exempt
    assert all("bias" in n or "ln_" in n for n in exempt)
    assert not any("bias" in names[id(p)] for p in optimizer.param_groups[0]["params"])
    assert task.model() is not model  # model_init: a fresh model each time
    assert len(task.val_data) == 120
    validate_task(task)


def test_from_trainer_refuses_a_trainer_without_data_and_a_model_in_one_line(tmp_path,
                                                                            monkeypatch):
    """A Trainer without train_dataset blamed Task.train_data, which the user never set; a
    model passed for the Trainer was a raw AttributeError (review)."""
    pytest.importorskip("accelerate")
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from bsselect.errors import UsageError

    monkeypatch.chdir(tmp_path)
    model = GPT2LMHeadModel(hf_tasks.config())
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", report_to=[],
                                                          use_cpu=True))
    with pytest.raises(UsageError, match=r"^the Trainer has no train_dataset"):
        Task.from_trainer(trainer)
    with pytest.raises(UsageError, match=r"^from_trainer takes a transformers.Trainer, got "
                                         r"GPT2LMHeadModel \(a model: Task.from_hf"):
        Task.from_trainer(model)


def test_from_trainer_applies_the_trainers_gradient_checkpointing(tmp_path):
    """TrainingArguments(activation_checkpointing=True) (gradient_checkpointing before
    transformers 5): every model built has it on, as
    Trainer.train turns it on, and the simulated step is the checkpointed one (it was the
    plain one: the answer about 3x too small a batch; review)."""
    pytest.importorskip("accelerate")
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    from bsselect.memory.simulated import simulate_step_peak

    import inspect

    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    new = "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
    name = "activation_checkpointing" if new else "gradient_checkpointing"

    def task(checkpointing: bool) -> Task:
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 **{name: checkpointing,
                                    f"{name}_kwargs": {"use_reentrant": False}})
        trainer = Trainer(model_init=lambda: GPT2LMHeadModel(hf_tasks.config()), args=args,
                          train_dataset=hf_tasks.Sentences(16),
                          data_collator=DataCollatorForLanguageModeling(hf_tasks.tokenizer(),
                                                                        mlm=False))
        return Task.from_trainer(trainer)

    plain, checkpointed = task(False), task(True)
    assert getattr(checkpointed.model().model, f"is_{name}")
    assert not getattr(plain.model().model, f"is_{name}")
    peak = {name: simulate_step_peak(t, 8).peak_bytes
            for name, t in (("plain", plain), ("checkpointed", checkpointed))}
    assert peak["checkpointed"] < peak["plain"]
    assert peak["checkpointed"] == pytest.approx(cpu_step_peak(checkpointed, 8).peak_bytes,
                                                 rel=0.005)


@pytest.mark.parametrize("settings, expected", [
    (dict(adam_beta2=0.95, adam_epsilon=1e-6), (torch.optim.AdamW, {"betas": (0.9, 0.95),
                                                                    "eps": 1e-6})),
    (dict(optim="sgd"), (torch.optim.SGD, {"momentum": 0})),
])
def test_from_trainer_builds_the_optimizer_its_arguments_name(tmp_path, settings, expected):
    pytest.importorskip("accelerate")
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from bsselect import Task

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.01,
                             report_to=[], use_cpu=True, **settings)
    trainer = Trainer(model_init=lambda: GPT2LMHeadModel(hf_tasks.config()), args=args,
                      train_dataset=hf_tasks.Sentences(8))
    task = Task.from_trainer(trainer)
    optimizer = task.make_optimizer(task.model().parameters(), 1e-3)
    cls, values = expected
    assert type(optimizer) is cls
    assert all(optimizer.defaults[k] == v for k, v in values.items())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_from_trainer_rebuilds_a_given_optimizer_with_its_own_groups_and_settings(tmp_path):
    """optimizers=(AdamW(...), None): the Trainer trains with it as given. Its defaults were
    passed back to AdamW (torch 2.13 keeps 'decoupled_weight_decay' there, which AdamW does not
    take: every probe failed), and its groups were replaced by the Trainer's two at
    args.weight_decay (0.0) and one lr."""
    pytest.importorskip("accelerate")
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    from bsselect import check

    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_tasks.config())
    head = [p for n, p in model.named_parameters() if n.startswith("transformer.h.1.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformer.h.1.")]
    given = torch.optim.AdamW([{"params": rest, "weight_decay": 0.1},
                               {"params": head, "lr": 1e-3, "weight_decay": 0.0}],
                              lr=1e-4, betas=(0.8, 0.95), eps=1e-7)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-5, report_to=[],
                             use_cpu=True, per_device_train_batch_size=2)
    collator = DataCollatorForLanguageModeling(hf_tasks.tokenizer(), mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=hf_tasks.Sentences(8),
                      data_collator=collator, optimizers=(given, None))
    task = Task.from_trainer(trainer)
    assert task.lr == 1e-4   # the given optimizer's, not args.learning_rate
    built = task.make_optimizer(task.model().parameters(), 2e-4)
    assert type(built) is torch.optim.AdamW
    assert [len(g["params"]) for g in built.param_groups] == [len(rest), len(head)]
    assert [g["lr"] for g in built.param_groups] == pytest.approx([2e-4, 2e-3])
    assert [g["weight_decay"] for g in built.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7 for g in built.param_groups)
    assert check(task, memory="8GiB", batch_size=2).fits


def test_a_local_config_directory_builds_the_model_and_a_missing_one_is_refused(tmp_path):
    hf_tasks.config().save_pretrained(tmp_path / "cfg")
    task = Task.from_hf(str(tmp_path / "cfg"), hf_tasks.Sentences(64), lr=1e-3,
                        data_collator=_lm_collator())
    validate_task(task)
    assert type(task.model().model).__name__ == "GPT2LMHeadModel"
    with pytest.raises(UsageError, match="never downloads"):
        Task.from_hf(str(tmp_path / "absent"), hf_tasks.Sentences(64))


def test_a_batch_without_labels_says_how_to_get_a_loss():
    task = Task.from_hf(hf_tasks.config(), _Unlabelled(), lr=1e-3)
    with pytest.raises(TaskError, match="labels"):
        validate_task(task)


def _lm_collator():
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(hf_tasks.tokenizer(), mlm=False)


class _Unlabelled(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.arange(1, 9), "attention_mask": torch.ones(8, dtype=torch.long)}


def _tiny_llama_config(path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path / "config.json"


def _tiny_config(path: Path, kind: str, **fields: Any) -> Path:
    import transformers

    getattr(transformers, kind)(**fields).save_pretrained(path)  # no "architectures"
    return path / "config.json"


def test_hf_config_of_t5_naming_its_class_is_checked(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
             decoder_start_token_id=0, architectures=["T5ForConditionalGeneration"]
             ).save_pretrained(tmp_path)
    done = run_cli("check", "--hf-config", str(tmp_path), "--seq-len", "64", "--batch-size", "8",
                   "--memory", "1GiB", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True
    # On a CUDA preset, T5's learned position bias (an attention mask that needs a gradient)
    # runs CUDA's memory-efficient kernel; the step failed, exit 1 (review).
    done = run_cli("check", "--hf-config", str(tmp_path), "--seq-len", "64", "--batch-size", "8",
                   "--device-preset", "t4-16gb", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True


def test_an_moe_looping_over_its_experts_is_measured_from_hf_config(tmp_path):
    """Experts run as a loop over those the router picked (``experts_implementation``
    "eager"): the fake forward cannot run it, and ``probe --hf-config --method measured``
    refused to measure, pointing at --method measured (review). It measures; check, which
    only simulates, says so in one line."""
    from transformers import MixtralConfig

    from conftest import one_error

    MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=128,
                  architectures=["MixtralForCausalLM"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())  # not kept by save_pretrained
    (tmp_path / "config.json").write_text(json.dumps({**config,
                                                      "experts_implementation": "eager"}))
    done = run_cli("probe", "--hf-config", str(tmp_path), "--seq-len", "32", "--batch-sizes",
                   "2,4", "--memory", "256MiB", "--method", "measured", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "measured"
    refused = run_cli("check", "--hf-config", str(tmp_path), "--seq-len", "32",
                      "--batch-size", "4", "--memory", "256MiB")
    assert refused.returncode == 1 and "aten.nonzero" in one_error(refused)


def test_a_mixture_of_experts_simulates_byte_exact_and_checks_on_a_cuda_preset(tmp_path):
    """Mixtral's experts run ``torch._grouped_mm`` in fp32 (also under bf16 autocast), which
    its meta kernel refused ("Expected inputs of BF16 type"): ``check`` failed, exit 1, and
    the probe fell back to real steps (review). The CPU kernel and CUDA's fallback take fp32;
    the simulated step now matches the real CPU allocator where the backward sets the peak."""
    from bsselect.adapters.hf_config import config_task

    config = _tiny_config(tmp_path / "mixtral", "MixtralConfig", vocab_size=256, hidden_size=32,
                          intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64)
    task = config_task(str(config), 32)
    for b in (4, 8):
        for precision in (Precision.fp32, Precision.bf16):
            settings = StepSettings(precision=precision)
            sim = simulate_step_peak(task, b, settings=settings)
            assert sim.peak_phase.name == "BACKWARD"
            assert sim.peak_bytes == cpu_step_peak(task, b, settings=settings).peak_bytes
    done = run_cli("check", "--hf-config", str(config), "--seq-len", "32", "--batch-size", "8",
                   "--device-preset", "t4-16gb", "--precision", "bf16", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True


def test_an_optimizer_phase_peak_matches_the_cpu_allocator(tmp_path):
    """At batch 1 a Qwen2-style step peaks in AdamW's step, whose live temporaries depend on
    the order it steps the parameters in: its two groups (weight decay and exempt, marked on
    the parameters) were lost on the fake twins, and the peak was 32,524 bytes low (review)."""
    from bsselect.adapters.hf_config import config_task

    config = _tiny_config(tmp_path / "qwen2", "Qwen2Config", vocab_size=1000, hidden_size=64,
                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, tie_word_embeddings=False,
                          max_position_embeddings=64)
    task = config_task(str(config), 32)
    sim = simulate_step_peak(task, 1)
    assert sim.peak_phase.name == "OPTIMIZER"
    assert sim.peak_bytes == cpu_step_peak(task, 1).peak_bytes


def test_check_hf_config_answers_for_an_architecture_and_agrees_with_from_hf(tmp_path):
    from transformers import AutoConfig

    from bsselect import check
    from bsselect.adapters.hf import RandomTokens

    config = _tiny_llama_config(tmp_path / "llama")
    done = run_cli("check", "--hf-config", str(config), "--seq-len", "96", "--batch-size", "8",
                   "--memory", "1GiB", "--precision", "bf16", "--json")
    assert done.returncode == 0, done.stderr
    via_cli = json.loads(done.stdout)
    assert via_cli["fits"] and via_cli["task"] == f"hf-config:{config}"
    same = Task.from_hf(AutoConfig.from_pretrained(str(config.parent)),
                        RandomTokens(512, 96), lr=1e-4)
    via_task = check(same, batch_size=8, memory="1GiB", precision="bf16")
    assert via_task.required_bytes == via_cli["required_bytes"]
    small = run_cli("check", "--hf-config", str(config), "--seq-len", "96", "--batch-size", "8",
                    "--memory", "4MiB")
    assert small.returncode == 3


def test_hf_config_mistakes_are_one_line_usage_errors(tmp_path):
    config = _tiny_llama_config(tmp_path / "llama")
    for args, words in [
        (["--hf-config", str(tmp_path / "nope.json")], "never downloads"),
        (["digits-mlp", "--hf-config", str(config)], "not both"),
        (["digits-mlp", "--seq-len", "64"], "--seq-len goes with --hf-config"),
        (["--hf-config", str(config), "--seq-len", "1"], ">= 2"),
        # not a causal LM and no class named: which class to name (it used to blame the meta
        # device, exit 1); no vocabulary: --hf-config is for language models (it used to ask
        # for --seq-len)
        (["--hf-config", str(_tiny_config(tmp_path / "t5", "T5Config", d_model=32, d_kv=8,
                                          d_ff=64, num_layers=1, num_heads=2)),
          "--seq-len", "16"], '"architectures": ["T5ForConditionalGeneration"]'),
        (["--hf-config", str(_tiny_config(tmp_path / "vit", "ViTConfig", hidden_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64))], "has no vocab_size"),
    ]:
        done = run_cli("check", *args, "--batch-size", "8", "--memory", "1GiB")
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_hf_config_reads_the_file_it_is_given_not_the_config_json_beside_it(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100,
               n_positions=64).save_pretrained(tmp_path)  # tmp_path/config.json: a tiny one
    bigger = tmp_path / "gpt2-wider.json"
    bigger.write_text(GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=1000,
                                 n_positions=64).to_json_string())
    peaks = {}
    for name, config in (("tiny", tmp_path / "config.json"), ("named", bigger),
                         ("directory", tmp_path)):
        done = run_cli("check", "--hf-config", str(config), "--seq-len", "32", "--batch-size",
                       "4", "--memory", "1GiB", "--json")
        assert done.returncode == 0, done.stderr
        peaks[name] = json.loads(done.stdout)["required_bytes"]
    assert peaks["directory"] == peaks["tiny"] < peaks["named"]


def test_a_sequence_longer_than_learned_positions_fails_as_a_real_step_does(tmp_path):
    """GPT-2 looks positions up in a table of n_positions rows: a real step at a longer
    sequence raises IndexError. Fake tensors do not check indices; the simulation checks the
    real ones and fails alike (a rotary model has no such table and simulates). With
    --hf-config the tokens are within the vocabulary, so the position is --seq-len's: a usage
    error, exit 2 (it was exit 1, a failed task)."""
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100,
               n_positions=64).save_pretrained(tmp_path / "gpt2")
    fits = run_cli("check", "--hf-config", str(tmp_path / "gpt2"), "--seq-len", "64",
                   "--batch-size", "4", "--memory", "1GiB")
    assert fits.returncode == 0, fits.stderr
    done = run_cli("check", "--hf-config", str(tmp_path / "gpt2"), "--seq-len", "65",
                   "--batch-size", "4", "--memory", "1GiB")
    assert done.returncode == 2
    assert ("--seq-len 65 is past this model's learned positions (it looks positions up in a "
            "table of 64 rows, at index 64): use --seq-len 64 or less" in done.stderr), \
        done.stderr
    assert "Traceback" not in done.stderr and "--method measured" not in done.stderr
    # probe says it the same way (its auto method fell back to a real step, whose bare
    # "IndexError: index out of range in self" it printed: review)
    for method in ("auto", "measured"):  # real steps (a GPU's auto) hit a bare IndexError
        done = run_cli("probe", "--hf-config", str(tmp_path / "gpt2"), "--seq-len", "65",
                       "--memory", "1GiB", "--method", method)
        assert done.returncode == 2, (method, done.stderr)
        assert "use --seq-len 64 or less" in done.stderr, done.stderr
    # RoBERTa's positions start after its padding index: a table of 16 rows takes 14 tokens,
    # and the config's own max_position_embeddings (the default --seq-len) is past them
    from transformers import BertConfig, RobertaConfig

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=16,
                 is_decoder=True)
    RobertaConfig(**small).save_pretrained(tmp_path / "roberta")
    done = run_cli("check", "--hf-config", str(tmp_path / "roberta"), "--batch-size", "2",
                   "--memory", "1GiB")
    assert done.returncode == 2
    assert ("the default --seq-len (the config's max_position_embeddings, 16) is past this "
            "model's learned positions" in done.stderr and "use --seq-len 14 or less" in
            done.stderr), done.stderr
    assert run_cli("check", "--hf-config", str(tmp_path / "roberta"), "--seq-len", "14",
                   "--batch-size", "2", "--memory", "1GiB").returncode == 0
    # BERT fails past its positions elsewhere (its token-type buffer): the same usage error
    BertConfig(**small).save_pretrained(tmp_path / "bert")
    done = run_cli("check", "--hf-config", str(tmp_path / "bert"), "--seq-len", "17",
                   "--batch-size", "2", "--memory", "1GiB")
    assert done.returncode == 2 and "use --seq-len 16 or less" in done.stderr, done.stderr
    rotary = _tiny_llama_config(tmp_path / "llama")  # max_position_embeddings 128
    done = run_cli("check", "--hf-config", str(rotary), "--seq-len", "160", "--batch-size", "4",
                   "--memory", "1GiB")
    assert done.returncode == 0, done.stderr
    # a length whose one item does not fit in host memory: that, not its position (review)
    done = run_cli("check", "--hf-config", str(rotary), "--seq-len", str(10**11),
                   "--batch-size", "4", "--memory", "1GiB")
    assert done.returncode == 1 and "can't allocate memory" in done.stderr, done.stderr
    assert "positions" not in done.stderr and "max_position_embeddings" not in done.stderr


@pytest.mark.parametrize("entry, words", [
    ("no_loss", "the batch has no 'labels'"),
    ("datamodule_setup_fails", "FileNotFoundError: data/train.parquet"),
    ("streaming_trainer", "streaming (iterable) dataset"),
])
def test_adapter_mistakes_are_one_line_and_exit_1(entry, words):
    pytest.importorskip("lightning")
    pytest.importorskip("accelerate")
    tasks = Path(__file__).parent / "tasks"
    done = run_cli("probe", f"{tasks / 'bad_adapters.py'}:{entry}",
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, lines


def test_an_hf_lm_weights_by_its_shifted_label_tokens_and_evaluates_their_mean():
    """Task.loss_weight of the model's own causal-LM loss counts labels[..., 1:] != -100 (what
    the loss averages over), so evaluation is the token mean over the whole set — not the
    mean of the batches' token means."""
    from bsselect.selection.trials import evaluate

    task = hf_tasks.gpt2_lm()
    model = task.model()
    model.eval()
    items = [task.val_data[i] for i in range(12)]
    _, labels = task.collate_fn(items[:6])
    assert labels.ne(-100).sum() > labels[:, 1:].ne(-100).sum()
    assert task.loss_weight(labels) == float(labels[:, 1:].ne(-100).sum())
    with torch.no_grad():  # each sentence alone: its token mean times its predicted tokens
        per = [(float(model(task.collate_fn([item])[0]).loss), len(item["input_ids"]) - 1)
               for item in items]
    exact = sum(loss * n for loss, n in per) / sum(n for _, n in per)
    loss, _ = evaluate(model, task, items, torch.device("cpu"), batch_size=4)
    assert loss == pytest.approx(exact, rel=1e-5)
    assert Task.from_hf(hf_tasks.config(), hf_tasks.Sentences(8),
                        loss_fn=lambda out, y: out.loss).loss_weight is None


def test_a_sequence_classifier_weighs_each_item_once():
    task = hf_tasks.bert_classifier()
    task.model()
    _, labels = task.collate_fn([task.train_data[i] for i in range(5)])
    assert task.loss_weight(labels) == 5.0


@pytest.mark.parametrize("name, shifts", [
    ("GPT2LMHeadModel", True), ("GPT2DoubleHeadsModel", True), ("XLNetLMHeadModel", False),
    ("BartForCausalLM", False)])
def test_the_label_shift_is_read_from_what_the_models_loss_does(name, shifts):
    """``loss_function`` says ForCausalLMLoss for every model without a loss type; the ones
    that compute their loss inline shift or not as their forward does (review)."""
    import transformers as T

    from bsselect.adapters.hf import _loss_shifts_labels

    small = dict(vocab_size=50)
    config = {"GPT2": lambda: T.GPT2Config(n_embd=16, n_layer=1, n_head=2, **small),
              "XLNet": lambda: T.XLNetConfig(d_model=16, n_layer=1, n_head=2, d_inner=32,
                                             **small),
              "Bart": lambda: T.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                           encoder_attention_heads=2, decoder_attention_heads=2,
                                           encoder_ffn_dim=32, decoder_ffn_dim=32, **small)}
    model = getattr(T, name)(config[next(k for k in config if name.startswith(k))]())
    assert _loss_shifts_labels(model) is shifts


def test_a_config_registered_with_the_auto_classes_builds():
    """A model plugged in with AutoConfig.register / AutoModelForCausalLM.register (as a
    remote-code model is once loaded) builds from its config with or without an
    architectures entry naming its class, which transformers itself does not have (the
    buildability check rejected both: review)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class TinyConfig(PretrainedConfig):
        model_type = "bsselect-test-tiny"

        def __init__(self, vocab_size: int = 64, hidden: int = 16, **kw: Any) -> None:
            super().__init__(**kw)
            self.vocab_size, self.hidden = vocab_size, hidden

    class TinyForCausalLM(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.emb = nn.Embedding(config.vocab_size, config.hidden)
            self.head = nn.Linear(config.hidden, config.vocab_size)
            self.post_init()

        def forward(self, input_ids: Any = None, labels: Any = None, **kw: Any) -> Any:
            logits = self.head(self.emb(input_ids))
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1))
            return CausalLMOutput(loss=loss, logits=logits)

    AutoConfig.register(TinyConfig.model_type, TinyConfig)
    AutoModelForCausalLM.register(TinyConfig, TinyForCausalLM)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))}
            for _ in range(16)]
    for config in (TinyConfig(), TinyConfig(architectures=["TinyForCausalLM"])):
        task = Task.from_hf(config, data)
        assert type(task.model().model) is TinyForCausalLM


def test_from_trainer_after_train_with_a_trial_model_init_and_another_loss(tmp_path):
    """Three things a review found in ordinary Trainer code: after trainer.train() the
    optimizer is accelerate's wrapper, whose class takes no lr (sweep raised TypeError);
    model_init(trial), the form hyperparameter_search documents, was refused; label
    smoothing (the Trainer's loss, not the model's) was dropped without a word."""
    pytest.importorskip("accelerate")
    import warnings

    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=3e-4,
                             per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, label_smoothing_factor=0.1, save_strategy="no")
    trainer = Trainer(model_init=lambda trial: GPT2LMHeadModel(hf_tasks.config()), args=args,
                      train_dataset=hf_tasks.Sentences(),
                      data_collator=DataCollatorForLanguageModeling(hf_tasks.tokenizer(),
                                                                    mlm=False))
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = Task.from_trainer(trainer)
    assert any("label_smoothing_factor=0.1" in str(w.message) for w in caught)
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), 2 * task.lr)
    assert type(optimizer) is torch.optim.AdamW and task.lr == 3e-4
    assert optimizer.param_groups[0]["lr"] == 6e-4


class _WithExtraColumns(torch.utils.data.Dataset):
    """``hf_tasks._Labelled`` with a text column and an index beside the tokens, as a user's
    list of dicts often has them."""

    def __init__(self, n: int = 200) -> None:
        self.items = hf_tasks._Labelled(n)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "text": f"sentence {i}", "idx": i}


def test_from_trainer_drops_the_columns_the_trainer_drops(tmp_path):
    """``remove_unused_columns`` (the default): the Trainer trains on such a dataset, and the
    task's collation failed with "activate truncation and/or padding" on the text column
    (review). The task collates as the Trainer's loader does; a dict of eval datasets gives
    its first, with a warning (it failed as "KeyError: 0")."""
    pytest.importorskip("accelerate")
    from transformers import (BertConfig, BertForSequenceClassification,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    from bsselect import check

    config = BertConfig(vocab_size=len(hf_tasks.WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(BertForSequenceClassification(config), args,
                      train_dataset=_WithExtraColumns(),
                      eval_dataset={"a": _WithExtraColumns(40), "b": _WithExtraColumns(20)},
                      data_collator=DataCollatorWithPadding(hf_tasks.tokenizer()))
    trainer.train()
    with pytest.warns(UserWarning, match="eval_dataset holds 2 datasets; the task evaluates "
                                         "on the first, 'a'"):
        task = Task.from_trainer(trainer)
    assert len(task.val_data) == 40
    x, _ = task.collate_fn([task.train_data[0], task.train_data[1]])
    assert "text" not in x and "idx" not in x and "input_ids" in x
    assert check(task, batch_size=8, memory="256MiB").fits


def test_a_long_hf_config_sequence_checks_its_real_step_on_short_items(tmp_path, monkeypatch):
    """The real check (dtype and index errors) ran a real step on two items at the full
    --seq-len: at 100,000 tokens a tiny model's check did not finish in 5 minutes (review).
    It runs on 1,024-token items of the same random data; the simulation keeps the length."""
    import bsselect.memory.real_check as real_check
    from bsselect import check
    from bsselect.adapters.hf_config import REAL_CHECK_TOKENS, config_task

    seen = []
    original = real_check._step_error

    def spy(model, task, x, y, precision):
        seen.append(tuple(x["input_ids"].shape))
        return original(model, task, x, y, precision)

    monkeypatch.setattr(real_check, "_step_error", spy)
    task = config_task(str(_tiny_llama_config(tmp_path)), 4096)
    result = check(task, batch_size=1, memory="1GiB")
    assert seen == [(2, REAL_CHECK_TOKENS)]
    assert result.tokens_per_sample == 4096
    assert task.train_data.real_check_data().real_check_data().seq_len == REAL_CHECK_TOKENS


@pytest.mark.parametrize("optim, lr_factor", [("adamw_torch", 1), ("sgd", 4)])
def test_from_trainer_matches_the_summed_gradient_of_a_head_that_ignores_num_items(
        tmp_path, optim, lr_factor):
    """BERT's heads take ``**kwargs``, so the Trainer passes ``num_items_in_batch`` and does
    not divide their plain-mean loss by the accumulation steps: it steps with the sum of the
    micro-batches' mean gradients, 4x the task's at 4 steps, and clips that at
    max_grad_norm. The task was built with the Trainer's clipping and lr unchanged (review).
    The truth: the Trainer's own training_step on the micro-batches."""
    pytest.importorskip("accelerate")
    from transformers import (BertConfig, BertForSequenceClassification,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    config = BertConfig(vocab_size=len(hf_tasks.WORDS) + 2, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, max_grad_norm=1.0, optim=optim,
                             learning_rate=1e-3, report_to=[], save_strategy="no",
                             use_cpu=True)
    collator = DataCollatorWithPadding(hf_tasks.tokenizer())
    data = hf_tasks._Labelled(64)
    trainer = Trainer(model, args, train_dataset=data, data_collator=collator)
    with pytest.warns(UserWarning, match="loss is a plain mean that ignores the "
                                         "num_items_in_batch.*4x the mean gradient"):
        task = Task.from_trainer(trainer)
    assert task.max_grad_norm == pytest.approx(0.25)
    assert task.lr == pytest.approx(1e-3 * lr_factor)
    # The Trainer's gradient over 4 micro-batches of 4 against the task's over their 16.
    items = [data[i] for i in range(16)]
    micro = [collator(items[4 * j:4 * j + 4]) for j in range(4)]
    trainer.model.zero_grad()
    for batch in micro:  # the Trainer counts the 16 labels of the step's micro-batches
        trainer.training_step(trainer.model, dict(batch), num_items_in_batch=torch.tensor(16))
    theirs = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    trainer.model.zero_grad()
    x, y = task.collate_fn(items)
    task.loss_fn(trainer.model(**x) if isinstance(x, dict) else trainer.model(x), y).backward()
    ours = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    ratio = (sum(t.pow(2).sum() for t in theirs) / sum(o.pow(2).sum() for o in ours)).sqrt()
    assert float(ratio) == pytest.approx(4.0, rel=1e-3)


def test_from_trainer_leaves_a_model_that_divides_by_num_items_alone():
    pytest.importorskip("accelerate")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = hf_tasks.trainer_task()  # GPT-2, 2 accumulation steps, max_grad_norm 1.0
    assert not any("plain mean" in str(w.message) for w in caught)
    assert task.lr == 3e-4 and task.max_grad_norm == 1.0


def test_a_config_without_architectures_says_it_builds_the_causal_lm():
    """A BertConfig with num_labels=2 and no architectures became BertLMHeadModel in silence,
    and a classification dataset then failed with a shape mismatch naming no class
    (review)."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    data = [{"input_ids": torch.randint(0, 100, (8,)), "labels": torch.tensor(i % 2)}
            for i in range(8)]
    with pytest.warns(UserWarning, match=r"names no architectures, so bsselect builds "
                                         r"BertLMHeadModel.*BertForSequenceClassification"):
        Task.from_hf(config, data)
    config.architectures = ["BertForSequenceClassification"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(Task.from_hf(config, data).model().model).__name__ == \
            "BertForSequenceClassification"


def test_ragged_items_without_a_collator_are_told_to_pass_a_padding_one():
    """Token lists of different lengths and no data_collator failed with torch's "stack
    expects each tensor to be equal size" and no hint (review)."""
    from bsselect import probe
    from bsselect.errors import TaskError

    data = [{"input_ids": torch.randint(0, 64, (4 + i % 3,)),
             "labels": torch.randint(0, 64, (4 + i % 3,))} for i in range(16)]
    with pytest.raises(TaskError, match=r"different lengths and no data_collator pads them: "
                                        r"pass one \(DataCollatorWithPadding"):
        probe(Task.from_hf(hf_tasks.config(), data), memory="64MiB")
