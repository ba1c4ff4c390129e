"""User-facing paths issue 17 found untested, through the real command: the sweep's own choice
of batch sizes (probe -> powers of two, --min-batch/--max-batch, the half-dataset cap), the
accumulation line, and the `examples` and `presets` commands."""

from __future__ import annotations

import json

from conftest import run_cli


def test_examples_and_presets_list_what_they_offer():
    done = run_cli("examples")
    assert done.returncode == 0
    for name in ("digits-mlp", "digits-cnn", "tiny-lm", "linreg"):
        assert name in done.stdout
    done = run_cli("presets")
    assert done.returncode == 0
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "80 GiB" in rows["a100-80gb"] and "h100-80gb" in rows


def test_sweep_without_batch_sizes_takes_powers_of_two_between_min_and_max():
    done = run_cli("sweep", "digits-mlp", "--min-batch", "16", "--max-batch", "64",
                   "--budget", "256", "--noise-measurements", "0", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["batch_sizes"] == [16, 32, 64] and data["max_batch_source"] == "--max-batch"


def test_sweep_without_batch_sizes_probes_and_caps_at_half_the_training_set(task_file):
    # A tiny MLP: memory allows far more than the data; half of the 384 items caps it (192),
    # so the powers of two from 8 stop at 128.
    done = run_cli("sweep", f"{task_file}:make_task", "--budget", "256",
                   "--noise-measurements", "0", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["batch_sizes"] == [8, 16, 32, 64, 128]
    assert "capped at half the" in data["max_batch_source"]


def test_check_with_accumulation_says_which_batch_must_fit():
    done = run_cli("check", "digits-mlp", "--batch-size", "32", "--accumulate", "4",
                   "--memory", "1GiB")
    assert done.returncode == 0, done.stderr
    assert ("accumulation: micro-batch 32 must fit; x 4 micro-steps = effective batch 128 "
            "per optimizer step") in done.stdout
