"""Shared fixtures: every test runs in its own working directory, so journals and other files
the tool writes land in tmp_path; small real tasks written to real files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after (numbers that should not depend on
    the thread count's reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_TASK = '''
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from bsselect import Task

def make_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] > 0).long()
    return Task(model=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)),
                train_data=TensorDataset(x[:384], y[:384]), val_data=TensorDataset(x[384:], y[384:]),
                loss_fn=F.cross_entropy, lr=0.1, base_batch_size=16)

def not_a_task():
    return 42

def raises():
    raise ValueError("no data here")

def empty():
    return Task(model=lambda: nn.Linear(4, 2), train_data=TensorDataset(torch.zeros(0, 4), torch.zeros(0)),
                loss_fn=F.cross_entropy)

def bad_items():
    return Task(model=lambda: nn.Linear(4, 2), train_data=[torch.zeros(4)] * 8, loss_fn=F.cross_entropy)

def bad_forward():
    return Task(model=lambda: nn.Linear(5, 2), train_data=TensorDataset(torch.zeros(8, 4), torch.zeros(8).long()),
                loss_fn=F.cross_entropy)

value = 3
'''


@pytest.fixture
def task_file(tmp_path) -> Path:
    path = tmp_path / "tiny_task.py"
    path.write_text(textwrap.dedent(TINY_TASK))
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess: real exit codes, real stdout/stderr."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bsselect", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def one_error(proc) -> str:
    """The single ``error:`` line; no traceback, no 'internal error', nothing on stdout."""
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def model_loss_curve(batch_size: int, b_noise: float, s_min: float, samples: int, *,
                     start: float = 2.0, floor: float = 0.0, thin: bool = True) -> list:
    """A trial's loss curve on the McCandlish model, whose noise scale is ``b_noise``: batch b
    needs ``S_min (1 + B/b)`` updates for what ``S_min`` updates do at an infinite batch, so
    its loss after u updates is the same function of ``u / (1 + B/b)`` for every b. Recorded
    as a trial records it (``LossPoint``s; the point of step s holds that step's forward-pass
    loss, after s - 1 updates) and thinned like a trial's (``thin_curve``)."""
    import math

    from bsselect.selection.trial_types import LossPoint, thin_curve
    from bsselect.selection.trials import MAX_CURVE_POINTS

    scale = s_min * (1 + b_noise / batch_size)
    curve = [LossPoint(s, s * batch_size, 0.0,
                       floor + (start - floor) * math.exp(-(s - 1) / scale))
             for s in range(1, samples // batch_size + 1)]
    return list(thin_curve(curve, MAX_CURVE_POINTS)) if thin else curve
