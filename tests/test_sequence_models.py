"""Sequence models that read their batch's values, simulated (issue 13): Hugging Face decoders
fed padded batches with an attention mask, a packed-sequence LSTM, boolean-mask token
selection. The truth is the CPU allocator's own events (``cpu_step_peak``), not the
simulation's counter; the CLI is run for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn
from tasks import seq_tasks

from bsselect.errors import CannotSimulate
from bsselect.memory.cpu_truth import cpu_step_peak
from bsselect.memory.inputs import InputMode, scan_inputs
from bsselect.memory.simulated import simulate_step_peak
from bsselect.memory.values import value_shaped_ops
from bsselect.task import validate_task

pytest.importorskip("transformers")

TASKS = str(Path(__file__).parent / "tasks" / "seq_tasks.py")


@pytest.mark.parametrize("name", ["llama", "gpt2", "packed_lstm", "packed_lstm_trimmed",
                                  "t5"])
@pytest.mark.parametrize("batch_size", [8, 32])
def test_simulation_matches_the_cpu_allocator(name, batch_size):
    task = getattr(seq_tasks, name)()
    validate_task(task, on_meta=True)  # the forward on fake tensors reads the mask's values
    sim = simulate_step_peak(task, batch_size).peak_bytes
    real = cpu_step_peak(task, batch_size).peak_bytes
    assert abs(sim / real - 1) <= 0.005, (name, batch_size, sim, real)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("full_mask", [False, True])
@pytest.mark.parametrize("batch_size", [2, 64])
def test_masked_select_matches_the_cpu_allocator(full_mask, batch_size, threads):
    # Its CPU kernel counts the mask in a long copy and, off its serial path, keeps the mask
    # and its prefix sum as longs beside the output (4x a (B, T, 64) float32 activation under
    # a (B, T, 1) mask); its backward writes into a fresh buffer in place. Unmodelled: the
    # broadcast mask's step 13-30% over the simulation, the full mask's 8-12% under it.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        task = seq_tasks.masked_select(full_mask)
        sim = simulate_step_peak(task, batch_size).peak_bytes
        real = cpu_step_peak(task, batch_size).peak_bytes
    finally:
        torch.set_num_threads(before)
    assert sim == real, (full_mask, batch_size, threads, sim, real)


@pytest.mark.parametrize("width", [2, 64])
@pytest.mark.parametrize("batch_size", [8, 64])
def test_boolean_mask_indexing_counts_its_nonzero_indices(width, batch_size):
    # h[mask] turns the mask into nonzero()'s int64 indices, alive in the forward's index
    # and the backward's index_put_: 16 bytes a token, uncounted before (2-wide features:
    # 15-23% low; 64-wide: within the step's other memory).
    task = seq_tasks.selected_tokens(width)
    assert simulate_step_peak(task, batch_size).peak_bytes == cpu_step_peak(
        task, batch_size).peak_bytes


def test_worst_case_batch_without_padding_skips_the_causal_mask_as_the_real_step_does():
    # The longest items all have T_MAX tokens: the mask is all ones, so transformers skips
    # building the (b, 1, T, T) causal mask. On fake tensors it would not (it takes them for
    # tracing); the simulation keeps the mask real, so it takes the real step's branch.
    task = seq_tasks.llama()
    inputs = scan_inputs(task.train_data, InputMode.worst_case)
    sim = simulate_step_peak(task, 32, inputs=inputs).peak_bytes
    real = cpu_step_peak(task, 32, inputs=inputs).peak_bytes
    assert sim == pytest.approx(real, rel=1e-4)


def test_check_and_probe_run_on_a_padded_decoder_and_a_packed_lstm():
    done = run_cli("check", f"{TASKS}:llama", "--memory", "1GiB", "--batch-size", "16")
    assert done.returncode == 0, done.stderr
    done = run_cli("probe", f"{TASKS}:packed_lstm", "--memory", "256MiB", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["method"] == "simulated" and data["method_note"] == ""
    assert data["max_batch"] > 0


def test_a_branch_on_an_activation_is_one_line_for_check_and_real_steps_for_probe():
    done = run_cli("check", f"{TASKS}:branchy", "--memory", "1GiB", "--batch-size", "8")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ".item()" in lines[0] and "--method measured" in lines[0]
    assert "Traceback" not in done.stderr
    done = run_cli("probe", f"{TASKS}:branchy", "--memory", "64MiB", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["method"] == "measured"
    assert "simulation cannot run this model" in data["method_note"]
    # real steps stop at the data (64 items), or at the largest probed batch (128)
    assert data["max_batch"] == 128 and data["exceeds_dataset"]
    assert max((s["batch_size"] for s in data["confirmation"]), default=0) <= 128
    done = run_cli("probe", f"{TASKS}:branchy", "--memory", "64MiB", "--method", "simulated")
    assert done.returncode == 1 and ".item()" in done.stderr  # asked for: no fallback


class _SelectTokens(torch.nn.Module):
    """Boolean-mask token selection from the batch's lengths: ``h[mask]``, whose output shape
    depends on the (real) mask, not on the (fake) activations."""

    def __init__(self, by_activation: bool = False) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(seq_tasks.VOCAB, 8)
        self.out = torch.nn.Linear(8, 4)
        self.by_activation = by_activation

    def forward(self, x):
        ids, lengths = x
        h = self.emb(ids)
        mask = (h[..., 0] > 0) if self.by_activation else (
            torch.arange(ids.shape[1])[None, :] < lengths[:, None])
        return self.out(h[mask].mean(0, keepdim=True).expand(ids.shape[0], -1))


def _select_task(by_activation: bool):
    from bsselect import Task

    return Task(model=lambda: _SelectTokens(by_activation), train_data=seq_tasks.Sequences(),
                loss_fn=torch.nn.functional.cross_entropy,
                collate_fn=seq_tasks.pad_with_lengths, lr=0.1, base_batch_size=8)


def test_shape_from_a_real_mask_simulates_and_from_an_activation_is_refused():
    peak = simulate_step_peak(_select_task(False), 16)
    assert peak.peak_bytes > 0
    with pytest.raises(CannotSimulate, match=r"aten\.index"):
        simulate_step_peak(_select_task(True), 16)


class _Voxels(torch.nn.Module):
    """Points quantised to a grid and deduplicated with ``torch.unique`` (a voxel net): the
    number of occupied voxels, and every activation after it, follows the points' float
    values, which the simulation holds as fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 64))
        self.head = torch.nn.Linear(64, 2)

    def forward(self, pts):
        q = (pts * 16).floor().clamp(0, 15).long()
        key = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
        key = key + torch.arange(pts.shape[0]).view(-1, 1) * 4096  # per sample
        uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
        vox = torch.zeros(uniq.shape[0], 3).index_add(0, inv, pts.reshape(-1, 3))
        h = self.mlp(vox)  # (occupied voxels, 64): the term that grows with the data
        pooled = torch.zeros(pts.shape[0], 64).index_add(0, uniq // 4096, h)
        return self.head(pooled)


def _voxel_task():
    from torch.utils.data import TensorDataset

    from bsselect import Task

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 256, 3, generator=g),
                         torch.randint(0, 2, (64,), generator=g))
    return Task(model=_Voxels, train_data=data, loss_fn=torch.nn.functional.cross_entropy,
                lr=0.01, base_batch_size=8)


def test_unique_on_the_batch_floats_is_refused_not_simulated_as_one_element():
    # Before: zeros and ones both give one unique value, so the simulation took one occupied
    # voxel for the whole batch (a review's voxel net: 0.8 MB/sample simulated, 15 MB real,
    # the answer 19x above the truth). Now the op is refused and `auto` measures instead.
    with pytest.raises(CannotSimulate, match=r"aten\._unique2"):
        simulate_step_peak(_voxel_task(), 8)
    from bsselect import probe

    result = probe(_voxel_task(), memory="256MiB", batch_sizes=[2, 4, 8], device="cpu")
    assert result.method == "measured"
    real = cpu_step_peak(_voxel_task(), 8).peak_bytes
    assert result.points[-1].peak_bytes == pytest.approx(real, rel=0.05)


class _Unpad(torch.nn.Module):
    """Padded token rows of one length whose model keeps only the real tokens (``h[mask]``,
    as BERT unpadding does): memory follows the mask's values, not the items' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.GELU(),
                                       torch.nn.Linear(256, 16))
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        ids, mask = x[:, 0], x[:, 1].bool()
        h = self.mlp(self.emb(ids)[mask])
        seg = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)[mask]
        return self.head(torch.zeros(ids.shape[0], 16).index_add(0, seg, h))


def _unpad_task(n: int = 4096, length: int = 32):
    from torch.utils.data import TensorDataset

    from bsselect import Task

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, length), generator=g) * mask
    return Task(model=_Unpad, train_data=TensorDataset(torch.stack([ids, mask], 1),
                                                       torch.randint(0, 2, (n,), generator=g)),
                loss_fn=torch.nn.functional.cross_entropy, lr=0.01, base_batch_size=8)


def test_a_stretched_batch_keeps_its_items_real_values_in_proportion():
    # Above REAL_ITEMS_MAX (1024) items the simulation collates 1024 and stretches them. It
    # repeated the first item, so a model that keeps a mask's real tokens measured that one
    # item's tokens times the batch: less memory at 1025 than at 1024 (review finding M2).
    from bsselect.memory.fake import REAL_ITEMS_MAX

    task = _unpad_task()
    scan = scan_inputs(task.train_data, InputMode.typical)
    peaks = {b: simulate_step_peak(task, b, inputs=scan).peak_bytes
             for b in (REAL_ITEMS_MAX, REAL_ITEMS_MAX + 1, 2 * REAL_ITEMS_MAX)}
    assert peaks[REAL_ITEMS_MAX + 1] >= peaks[REAL_ITEMS_MAX]
    real = cpu_step_peak(task, 2 * REAL_ITEMS_MAX, inputs=scan).peak_bytes
    assert peaks[2 * REAL_ITEMS_MAX] == pytest.approx(real, rel=0.05)


def test_items_of_one_size_are_ranked_by_the_values_the_steps_shapes_read():
    # Padded rows all have one element count, so the scan called worst-case = typical and
    # measured random items; a model that keeps the mask's real tokens needs more for the
    # fullest rows (review finding M2b: the longest 512 items needed 1.36 GB where `check`
    # said 728 MB fit). The validation on fake tensors records that h[mask] read the mask.
    from bsselect import probe

    task = _unpad_task()
    validate_task(task, on_meta=True)
    assert value_shaped_ops()
    scan = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops())
    assert scan.picks_largest and scan.uniform is False and "ranked by" in scan.how
    ids, mask = task.train_data.tensors[0][list(scan.indices(64))].unbind(1)
    assert int(mask.sum()) == 64 * 32  # the 64 fullest rows are full
    worst = simulate_step_peak(task, 64, inputs=scan).peak_bytes
    assert worst == pytest.approx(cpu_step_peak(task, 64, inputs=scan).peak_bytes, rel=0.005)
    typical = simulate_step_peak(task, 64, inputs=scan_inputs(task.train_data,
                                                              InputMode.typical)).peak_bytes
    assert worst > 1.3 * typical
    assert probe(task, memory="64MiB").to_json()["uniform_items"] is False
    # a model whose shapes read no values keeps worst-case = typical, without a scan
    plain = _unpad_task()
    plain = type(plain)(**{**plain.__dict__, "model": lambda: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 2))})
    plain = type(plain)(**{**plain.__dict__, "train_data": torch.utils.data.TensorDataset(
        task.train_data.tensors[0].float(), task.train_data.tensors[1])})
    validate_task(plain, on_meta=True)
    assert not value_shaped_ops()
    assert scan_inputs(plain.train_data, by_values=value_shaped_ops()).uniform is True


def test_a_measured_probe_also_ranks_items_of_one_size_by_the_values_its_shapes_read():
    # The ranking above came only with a simulation; a measured probe (real steps, here on
    # the CPU) validated the task for real only, so it measured random padded rows and its
    # answer held for typical batches, not for the fullest (the memory review's leftover).
    from bsselect import probe

    task = _unpad_task()
    measured = probe(task, memory="64MiB", method="measured", batch_sizes=[16, 32, 64])
    out = measured.to_json()
    assert out["method"] == "measured" and out["uniform_items"] is False
    typical = probe(task, memory="64MiB", method="measured", batch_sizes=[16, 32, 64],
                    inputs="typical").to_json()
    assert out["per_sample_bytes"] > 1.3 * typical["per_sample_bytes"]
    # the answer holds for the fullest rows: a real step there stays inside the budget
    scan = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops())
    assert cpu_step_peak(task, out["max_batch"], inputs=scan).peak_bytes <= out["budget_bytes"]


def _max_rss_bytes(*args: str) -> tuple[int, dict]:
    """Peak resident memory of a real `bsselect` process (its own, from a wrapper that runs
    nothing else), and its JSON."""
    import subprocess
    import sys

    wrapper = ("import resource, subprocess, sys; "
               "out = subprocess.run([sys.executable, '-m', 'bsselect', *sys.argv[1:]], "
               "capture_output=True, text=True); "
               "print(out.stdout); print(out.returncode, file=sys.stderr); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True,
                          text=True, timeout=600)
    rc, rss_kib = done.stderr.strip().splitlines()[-2:]
    assert rc == "0", done.stderr
    return int(rss_kib) * 1024, json.loads(done.stdout)


def test_measured_probe_on_the_cpu_stays_within_a_few_step_peaks_of_resident_memory():
    # Before: glibc kept the freed blocks of every profiled step (issue 13: 14.6 GB resident
    # for a 49 MB step; 7.8 GB here for this task). The baseline is the same command on tiny
    # batches: the interpreter, torch and the profiler.
    base, _ = _max_rss_bytes("probe", f"{TASKS}:packed_lstm", "--method", "measured",
                             "--memory", "256MiB", "--batch-sizes", "2,4", "--margin", "0.99",
                             "--json")
    big, data = _max_rss_bytes("probe", f"{TASKS}:packed_lstm", "--method", "measured",
                               "--memory", "256MiB", "--json")
    largest_peak = max(s["peak_bytes"] for s in data["confirmation"] if s.get("peak_bytes"))
    assert data["max_batch"] == 400
    # 5.0x here (167 MB over the baseline for a 33 MB step: the profiler's event buffers,
    # the heap's small blocks); 230x before
    assert big - base <= 8 * largest_peak, (big, base, largest_peak)


def test_measured_probe_on_the_cpu_budgets_half_the_available_ram_by_default():
    # Issue 14: a measured probe on the CPU allocates for real; without --memory it plans
    # for half of the RAM available now, says so, and its real steps stay far below it.
    from bsselect.device import available_ram_bytes

    before = available_ram_bytes()
    rss, data = _max_rss_bytes("probe", f"{TASKS}:packed_lstm", "--method", "measured",
                               "--json")
    assert data["method"] == "measured" and data["budget_source"].startswith("half of the")
    assert data["budget_bytes"] <= 0.5 * max(before, available_ram_bytes()) * 1.05
    assert rss < data["budget_bytes"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_activation_checkpointing_on_a_padded_decoder_matches_the_cpu_allocator(name):
    """``--activation-checkpointing`` on a Hugging Face decoder fed padded batches: the KV
    cache is off as HF's own gradient checkpointing turns it off (on, the recomputation
    appends every layer's keys and values again: wrong memory, and an error with a mask)."""
    from bsselect.memory.sharded import ShardPlan
    from bsselect.step import StepSettings

    task = getattr(seq_tasks, name)()
    settings = StepSettings(shard=ShardPlan(fsdp=False, checkpointing=True))
    sim = simulate_step_peak(task, 8, settings=settings).peak_bytes
    real = cpu_step_peak(task, 8, settings=settings).peak_bytes
    plain = simulate_step_peak(task, 8).peak_bytes
    assert abs(sim / real - 1) <= 0.005, (name, sim, real)
    assert sim < plain


@pytest.mark.parametrize("batch_size", [8, 32])
def test_a_random_draw_into_a_real_tensor_is_drawn_for_real(batch_size):
    """``keep = torch.zeros(s).bernoulli_(0.85)`` keeps ~85% of the tokens in the simulation
    too (a draw of its own, so within a few percent of a real step's), not none of them."""
    task = seq_tasks.word_dropout()
    before = torch.random.get_rng_state()
    sim = simulate_step_peak(task, batch_size).peak_bytes
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's generator
    real = cpu_step_peak(task, batch_size).peak_bytes
    assert sim == pytest.approx(real, rel=0.05), (sim, real)


def test_an_lstm_checks_in_fp16_though_the_cpu_has_no_fp16_lstm():
    done = run_cli("check", f"{TASKS}:plain_lstm", "--precision", "fp16", "--batch-size", "8",
                   "--device-preset", "t4-16gb")
    assert done.returncode == 0, done.stderr


def test_check_answers_when_a_larger_batch_cannot_be_simulated(monkeypatch):
    """A packed GRU's lengths, (ids != 0).long().sum(1), are a real tensor only while that
    int64 intermediate is under ``values.REAL_RESULT_MAX_BYTES``; past it the search for the
    largest batch failed the whole check with a message that blamed the model's weights
    (review). The check answers now, its largest batch a lower bound that names the limit."""
    import bsselect
    from bsselect.memory import values

    monkeypatch.setattr(values, "REAL_RESULT_MAX_BYTES", 2**12)  # 512 int64s: b * T over it
    gen = torch.Generator().manual_seed(0)
    items = [(torch.randint(1, 20, (int(n),), generator=gen), int(n) % 2)
             for n in torch.randint(4, 17, (256,), generator=gen)]

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(20, 8), nn.GRU(8, 8, batch_first=True), \
                nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            lengths = (ids != 0).long().sum(1)
            packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lengths.cpu(),
                                                       batch_first=True, enforce_sorted=False)
            return self.out(self.rnn(packed)[1][-1])

    def pad(batch):
        xs, ys = zip(*batch)
        return nn.utils.rnn.pad_sequence(list(xs), batch_first=True), torch.tensor(ys)

    task = bsselect.Task(model=Packed, train_data=items, loss_fn=F.cross_entropy, collate_fn=pad)
    result = bsselect.check(task, batch_size=8, memory="1GiB", target="same")
    assert result.fits and not result.max_batch_exact
    assert 8 <= result.max_batch <= 2**12 // 8 // 16 + 1  # T = 16: the last batch under it
    assert "over the 4 KiB the simulation computes for real" in result.max_batch_stop
    assert "aten._pack_padded_sequence" in result.max_batch_stop
    # The line's second point above the batch (2 x 8 for a batch under 16) cannot run either
    monkeypatch.setattr(values, "REAL_RESULT_MAX_BYTES", 2**9)  # 64 int64s: b <= 4 runs
    for b in (1, 4):
        small = bsselect.check(task, batch_size=b, memory="1GiB", target="same")
        assert small.fits and not small.max_batch_exact and b <= small.max_batch <= 4
        assert "the simulation computes for real" in small.max_batch_stop
