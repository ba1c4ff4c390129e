"""Worst-case inputs: probe and check measure batches of the largest items, so the answer holds
for the batch of an epoch that holds the longest sequences, not only for a random batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from tasks.varlen_tasks import LONG, LONG_INDEX, N_ITEMS, variable_length

from bsselect.device import Budget
from bsselect.examples import EXAMPLES
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.cpu_truth import cpu_step_peak
from bsselect.memory.inputs import InputMode, scan_inputs, typical_inputs
from bsselect.memory.items import item_elements
from bsselect.memory.measured import run_two_steps
from bsselect.memory.probe import Method, run_probe
from bsselect.oom import is_oom_error
from bsselect.step import make_batch

CPU = torch.device("cpu")
SIZES = [8, 16, 32, 64]


def probe(task, budget_bytes: int, inputs, **kw):
    return run_probe(task, task_name="varlen", device=CPU, budget=Budget(budget_bytes, "cap"),
                     method=Method.simulated, margin=0.0, batch_sizes=SIZES, inputs=inputs, **kw)


def real_step_peak(task, batch_size: int, cap: int, inputs) -> int | str:
    """Peak of a real CPU training step under an allocator that raises OOM above ``cap``."""
    try:
        return run_two_steps(task, batch_size, CappedCpuAllocator(cap), 0, inputs=inputs)
    except Exception as exc:
        assert is_oom_error(exc), exc
        return "oom"


def test_worst_case_probe_fits_the_longest_items_where_a_random_batch_does_not():
    task = variable_length()
    worst, typical = scan_inputs(task.train_data), typical_inputs(task.train_data)
    assert worst.largest_item_elements == LONG + 1  # 256 tokens and the label
    assert worst.ranked[0] == LONG_INDEX and worst.items_scanned == N_ITEMS
    # A budget where the typical (random-batch) line allows 300.
    free = probe(task, 2**40, typical)
    cap = free.fixed_bytes + 300 * free.per_sample_bytes
    by_typical, by_worst = probe(task, cap, typical), probe(task, cap, worst)
    assert 290 <= by_typical.max_batch <= 310
    assert by_worst.max_batch < by_typical.max_batch // 4  # padded to 256 instead of <= 32
    assert LONG_INDEX not in typical.indices(by_typical.max_batch)
    # Real CPU steps under the cap: the random batch at the typical answer fits, the batch of
    # the longest items at that size runs out of memory; the worst-case answer fits it, and
    # is tight (one more item runs out).
    assert real_step_peak(task, by_typical.max_batch, cap, typical) != "oom"
    assert real_step_peak(task, by_typical.max_batch, cap, worst) == "oom"
    assert real_step_peak(task, by_worst.max_batch, cap, worst) <= cap
    assert real_step_peak(task, by_worst.max_batch + 1, cap, worst) == "oom"
    assert (by_worst.inputs, by_worst.largest_item_elements, by_worst.items_scanned) == (
        "worst-case", LONG + 1, N_ITEMS)


def test_measured_probe_confirms_on_the_largest_items():
    task = variable_length()
    worst = scan_inputs(task.train_data)
    free = probe(task, 2**40, worst)
    cap = free.fixed_bytes + 100 * free.per_sample_bytes
    result = run_probe(task, task_name="varlen", device=CPU, budget=Budget(cap, "cap"),
                       margin=0.0, batch_sizes=SIZES, backend=CappedCpuAllocator(cap),
                       inputs=worst)
    assert result.method == "measured" and 95 <= result.max_batch <= 105
    path = [(s["batch_size"], s["outcome"]) for s in result.confirmation]
    assert (result.max_batch, "ok") in path  # the answer itself ran
    assert all(outcome == "oom" for b, outcome in path if b > result.max_batch)
    assert real_step_peak(task, result.max_batch + 1, cap, worst) == "oom"
    for point in result.points:  # on the longest items, as the CPU allocator sees them
        real = cpu_step_peak(task, point.batch_size, inputs=worst).peak_bytes
        assert point.peak_bytes == pytest.approx(real, rel=0.01), point.batch_size


def test_items_of_one_size_keep_the_random_batch_and_are_not_scanned():
    task = EXAMPLES["digits-mlp"]()
    calls = []
    scan = scan_inputs(task.train_data, progress=lambda done, total: calls.append(done))
    assert scan.uniform and scan.items_scanned == 0 and not calls
    assert scan.largest_item_elements == 64 + 1
    assert scan.indices(32, seed=0) == typical_inputs(task.train_data).indices(32, seed=0)
    plain = probe(task, 2**30, None)
    assert probe(task, 2**30, scan).points == plain.points


def test_equal_items_in_a_list_are_found_uniform_by_the_scan():
    data = [(torch.zeros(5), torch.tensor(1))] * 50
    scan = scan_inputs(data)
    assert scan.uniform and scan.items_scanned == 50 and not scan.picks_largest


def test_large_datasets_are_sampled_with_a_stated_bound():
    data = [(torch.zeros(i % 97 + 1), 0) for i in range(1000)]
    progress: list[tuple[int, int]] = []
    scan = scan_inputs(data, max_items=100, progress=lambda d, t: progress.append((d, t)))
    assert scan.items_scanned == 100 and scan.items_total == 1000
    assert "a random 100 of 1,000" in scan.how
    assert progress[-1] == (100, 100)
    assert len(set(scan.ranked)) == 100
    assert scan.indices(3) == list(scan.ranked[:3])
    assert scan.indices(150)[100:103] == list(scan.ranked[:3])  # beyond the scan: wraps


def test_item_elements_counts_every_leaf():
    item = {"ids": torch.zeros(7, dtype=torch.long), "pixels": np.zeros((2, 3)),
            "text": "hello", "label": 3}
    assert item_elements(item) == 7 + 6 + 5 + 1


def test_typical_mode_skips_the_scan():
    scan = scan_inputs([(torch.zeros(3), 0)] * 5, InputMode.typical)
    assert scan.mode is InputMode.typical and scan.items_scanned == 0


# --- through the CLI ------------------------------------------------------------------------

@pytest.fixture
def varlen_task() -> str:
    return str(Path(__file__).parent / "tasks" / "varlen_tasks.py") + ":variable_length"


def test_cli_probe_and_check_say_which_inputs(varlen_task):
    probe_worst = run_cli("probe", varlen_task, "--memory", "64MiB", "--batch-sizes", "8,16,32",
                          "--json")
    assert probe_worst.returncode == 0, probe_worst.stderr
    data = json.loads(probe_worst.stdout)
    assert data["inputs"] == "worst-case" and data["uniform_items"] is False
    assert data["largest_item_elements"] == LONG + 1 and data["items_scanned"] == N_ITEMS
    # The worst-case answer does not fit typical inputs' larger answer, and check agrees.
    typical = json.loads(run_cli("probe", varlen_task, "--memory", "64MiB", "--batch-sizes",
                                 "8,16,32", "--inputs", "typical", "--json").stdout)
    assert typical["inputs"] == "typical" and typical["max_batch"] > 4 * data["max_batch"]
    # A batch between the two answers, whose random draw misses the long item.
    b = 4 * data["max_batch"]
    assert LONG_INDEX not in typical_inputs(variable_length().train_data).indices(b)
    b = str(b)
    worst_check = run_cli("check", varlen_task, "--batch-size", b, "--memory", "64MiB")
    assert worst_check.returncode == 3, worst_check.stderr
    assert "inputs: worst-case" in worst_check.stdout
    typical_check = run_cli("check", varlen_task, "--batch-size", b, "--memory", "64MiB",
                            "--inputs", "typical")
    assert typical_check.returncode == 0, typical_check.stderr


def test_cli_rejects_an_unknown_inputs_mode():
    proc = run_cli("probe", "digits-mlp", "--inputs", "largest")
    assert proc.returncode == 2
    assert "--inputs must be one of worst-case, typical" in proc.stderr


def test_tokens_per_sample_is_the_measured_batchs_padded_length(varlen_task):
    """Under --inputs typical the tokens per sample came from one random item (5 tokens where
    the measured batch was padded to 48: review); it is the measured batch's length now, and
    under worst-case inputs the longest item's, which every worst-case batch is padded to."""
    task = variable_length()
    typical = json.loads(run_cli("check", varlen_task, "--batch-size", "64", "--memory", "1GiB",
                                 "--inputs", "typical", "--json").stdout)
    x, _ = make_batch(task, 64, 0, typical_inputs(task.train_data))
    assert typical["tokens_per_sample"] == x.shape[1] > make_batch(task, 1, 0)[0].shape[1]
    assert LONG_INDEX not in typical_inputs(task.train_data).indices(64)  # x.shape[1] <= 32
    worst = json.loads(run_cli("check", varlen_task, "--batch-size", "64", "--memory", "1GiB",
                               "--json").stdout)
    assert worst["tokens_per_sample"] == LONG


def _real_fits(task, batch_size: int, cap: int, scan) -> bool:
    """Whether a real CPU step on the scan's batch of ``batch_size`` peaks within ``cap``."""
    return cpu_step_peak(task, batch_size, inputs=scan).peak_bytes <= cap


def test_padding_per_dimension_puts_the_tallest_and_the_widest_item_in_the_worst_batch():
    """Equal element counts (3x32x32, 3x8x128, 3x128x8) read as "worst-case = typical", and a
    probe answered 365 where a batch holding the two odd images needs 4.5x the budget
    (review). They lead the ranking now, and the answer fits a real step on them."""
    from tasks.varlen_tasks import padded_images

    task = padded_images()
    scan = scan_inputs(task.train_data, collate_fn=task.collate_fn)
    assert not scan.uniform and set(scan.ranked[1:3]) == {500, 501}
    assert "after the largest, the 2 item(s) longest in some dimension" in scan.how
    x, _ = make_batch(task, 3, 0, scan)
    assert tuple(x.shape) == (3, 3, 128, 128)
    cap = 96 * 2**20
    answer = probe(task, cap, scan).max_batch
    assert _real_fits(task, answer, cap, scan)
    assert not _real_fits(task, 2 * answer, cap, scan)


def test_text_items_are_ranked_by_the_tokens_the_collate_fn_makes():
    """Ranked by characters, 960 twelve-token texts of 250 characters came before 40
    sixty-token texts of 119, and the answer was 4x what the worst batch fits (review)."""
    from tasks.varlen_tasks import LONG_TEXT, raw_texts

    task = raw_texts()
    by_characters = scan_inputs(task.train_data)
    assert by_characters.ranked[0] < LONG_TEXT  # what the scan did before
    scan = scan_inputs(task.train_data, collate_fn=task.collate_fn)
    assert scan.ranked[:40] == tuple(range(LONG_TEXT, LONG_TEXT + 40))
    assert scan.largest_item_elements == 60 + 1 and "its tokens" in scan.how
    cap = 16 * 2**20
    answer = probe(task, cap, scan).max_batch
    assert _real_fits(task, answer, cap, scan)
    assert not _real_fits(task, probe(task, cap, by_characters).max_batch, cap, scan)


def test_the_largest_item_stays_first_before_the_padding_extremes():
    """300 images of 96x96 and two strips (8x160, 160x8): the extremes led the ranking, so
    the worst batch of 1 was a strip and check said a batch of 1 fits where one square image
    does not (review). The largest item is first; then the strips."""
    from tasks.varlen_tasks import pad_images

    class Squares(torch.utils.data.Dataset):
        shapes = [(96, 96)] * 300 + [(8, 160), (160, 8)]

        def __len__(self):
            return len(self.shapes)

        def __getitem__(self, i):
            return torch.zeros(3, *self.shapes[i]), 0

    scan = scan_inputs(Squares(), collate_fn=pad_images)
    assert scan.ranked[0] < 300 and set(scan.ranked[1:3]) == {300, 301}
    assert tuple(make_batch_of(Squares(), scan, 1).shape) == (1, 3, 96, 96)
    assert tuple(make_batch_of(Squares(), scan, 2).shape[2:]) in {(96, 160), (160, 96)}
    assert tuple(make_batch_of(Squares(), scan, 3).shape[2:]) == (160, 160)


def make_batch_of(data, scan, b: int) -> torch.Tensor:
    from tasks.varlen_tasks import pad_images

    return pad_images([data[i] for i in scan.indices(b)])[0]


class _Encoding(__import__("collections").UserDict):
    """What a tokenizer returns (transformers.BatchEncoding is a UserDict)."""


def _word_ids(texts):
    return [[len(w) for w in t.split()] for t in texts]


def _padded(ids):
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out


TEXTS_LONG_LAST = ["aaaaaaaaaaaaaaaaaaaa " * 12] * 300 + ["a " * 60] * 3  # 12 vs 60 tokens


@pytest.mark.parametrize("collate, note", [
    # a BatchEncoding: a mapping pytree takes for one leaf (every item was "1 element")
    (lambda texts: (_Encoding(input_ids=_padded(_word_ids(texts))), torch.zeros(len(texts))),
     "its tokens"),
    # one tensor per item, no batch dimension
    (lambda texts: [torch.tensor(ids) for ids in _word_ids(texts)], "its tokens"),
])
def test_text_collated_into_a_mapping_or_a_list_is_still_counted_in_tokens(collate, note):
    """Both made every text item alone look one size, and worst-case inputs fell back to
    random batches: 2.6 MiB simulated where the batch with the long texts needs 38.7 MiB
    (review)."""
    scan = scan_inputs(TEXTS_LONG_LAST, collate_fn=collate)
    assert not scan.uniform and set(scan.ranked[:3]) == {300, 301, 302}, scan.how
    assert note in scan.how


def test_a_collate_fn_that_cannot_take_one_item_ranks_text_by_characters():
    """A pairing collate (contrastive pairs) fails on one item: the scan failed the
    command (review); it ranks by characters, as before, and says why."""
    def pairs(texts):
        assert len(texts) % 2 == 0, "pairs"
        return _padded(_word_ids(texts))

    scan = scan_inputs(TEXTS_LONG_LAST, collate_fn=pairs)
    assert "text ranked by characters: the collate_fn cannot take one item alone" in scan.how
    assert scan.ranked[0] < 300  # the longest in characters


def test_token_ids_in_plain_lists_are_one_leaf_each():
    """A Hugging Face dataset's items hold token ids as lists of ints: each list is one 1-D
    leaf (one shape per item, not one per token, which for 100,000 items of 512 tokens
    would hold 51 million entries), and the longest list leads."""
    from bsselect.memory.items import item_shapes

    items = [{"input_ids": [1] * n, "attention_mask": [1] * n, "label": n % 2}
             for n in [5, 9, 300, 7] * 25]
    assert item_shapes(items[2]) == ((300,), (300,), ())
    scan = scan_inputs(items)
    assert scan.ranked[0] == 2 and scan.largest_item_elements == 601


# --------------------------------------------------------------------------- value orderings
# Review (session 23): where the step's shapes follow the batch's values, item sizes and
# nonzero counts each missed the heaviest batch on a realistic task (a pad id that is not 0,
# a model that trims to its longest real row through a value read, a loss on the answer
# tokens only); check said "fits" at 2.4-4.5x under the real step. The scan now judges the
# orderings those values give by the simulated step and keeps the heaviest.

@pytest.mark.parametrize("make, ordering", [
    ("prepadded_task", "elements of field 0 other than 63"),
    ("trimmed_task", "elements of field 0 other than 0"),
    ("answer_task", "elements of field 1 other than -100"),
])
def test_the_scan_finds_the_heavy_items_that_values_decide(make, ordering):
    from tasks import value_order_tasks as v

    from bsselect.api import _judge
    from bsselect.memory.inputs import InputScan
    from bsselect.memory.values import reads_batch_values, value_shaped_ops
    from bsselect.task import validate_task

    task = getattr(v, make)()
    validate_task(task, on_meta=True)
    assert value_shaped_ops() or reads_batch_values()
    plain = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops(),
                        collate_fn=task.collate_fn)
    judged = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops(),
                         reads_values=reads_batch_values(), collate_fn=task.collate_fn,
                         judge=_judge(task))
    assert set(judged.indices(8)) <= set(v.HEAVY)
    assert not set(plain.indices(8)) <= set(v.HEAVY)  # what the review found
    assert f"by {ordering} it needs" in judged.how
    # The truth: the real CPU step on the heavy items is what the judged scan simulates.
    truth_scan = InputScan(InputMode.worst_case, v.N, v.N, False, 0, 0.0,
                           tuple(v.HEAVY + [i for i in range(v.N) if i not in v.HEAVY]))
    truth = cpu_step_peak(task, 8, inputs=truth_scan).peak_bytes
    from bsselect.memory.simulated import simulate_step_peak
    assert simulate_step_peak(task, 8, inputs=judged).peak_bytes == truth
    assert simulate_step_peak(task, 8, inputs=plain).peak_bytes < 0.5 * truth


def test_check_on_a_value_ordered_task_says_it_does_not_fit_where_the_real_step_would_not():
    from tasks.value_order_tasks import answer_task

    import bsselect

    result = bsselect.check(answer_task(), batch_size=8, memory="20MiB", margin=0.0)
    assert not result.fits and result.peak_bytes > 20 * 2**20
    assert "orderings were tried" in result.inputs_note


def test_items_whose_values_decide_nothing_are_not_judged():
    from bsselect.memory.orderings import value_orderings

    task = EXAMPLES["digits-mlp"]()
    calls = []
    scan = scan_inputs(task.train_data, InputMode.worst_case, by_values=(),
                       reads_values=False, judge=lambda items: calls.append(items) or 1)
    assert calls == [] and scan.uniform
    # Integer fields that are all alike give no ordering to try.
    assert value_orderings([(torch.ones(4, dtype=torch.long), 3)] * 5, list(range(5)), None) == {}


def test_random_token_data_is_not_read_for_orderings():
    """--hf-config's random tokens: the model reads mask values, but no ordering of random
    ids makes a heavier batch; the judging read all 100,000 sampled items (13 s: review)."""
    from bsselect.adapters.hf_config import RandomTokens

    calls = []
    scan = scan_inputs(RandomTokens(100, 64), InputMode.worst_case, reads_values=True,
                       judge=lambda items: calls.append(items) or 1)
    assert calls == [] and scan.uniform and scan.items_scanned == 0


def test_reading_the_orderings_stops_at_its_time_budget(monkeypatch):
    import bsselect.memory.orderings as orderings_module
    from tasks.value_order_tasks import HEAVY, PrePadded

    monkeypatch.setattr(orderings_module, "ORDERINGS_SCAN_S", 0.0)  # the first 64 items only
    orderings = orderings_module.value_orderings(PrePadded(), list(range(300)), None)
    assert orderings and all(len(r) == 64 for r in orderings.values())
    sample = sorted(next(iter(orderings.values())))
    assert sample != list(range(64)) and set(HEAVY) & set(sample)  # seeded, over all items


def test_each_batch_size_gets_the_heaviest_of_the_orderings():
    """The ordering heaviest at 8 items replaced the size ranking at every batch size: with
    three long prompts beside the long answers, check said "fits" at 64 at 1.34x under the
    real step (review). Each batch size now takes the heaviest of the orderings there."""
    from tasks import value_order_tasks as v

    from bsselect.api import _judge
    from bsselect.memory.inputs import InputScan
    from bsselect.memory.simulated import simulate_step_peak
    from bsselect.memory.values import reads_batch_values, value_shaped_ops
    from bsselect.task import validate_task

    task = v.mixed_task()
    validate_task(task, on_meta=True)
    scan = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops(),
                       reads_values=reads_batch_values(), collate_fn=task.collate_fn,
                       judge=_judge(task))
    n = len(task.train_data)

    def real(b, first):
        truth = InputScan(InputMode.worst_case, n, n, False, 0, 0.0,
                          tuple(first + [i for i in range(n) if i not in first]))
        return cpu_step_peak(task, b, inputs=truth).peak_bytes

    for b in (8, 64):
        heaviest = max(real(b, v.HEAVY), real(b, v.LONG_PROMPTS + v.HEAVY),
                       real(b, v.LONG_PROMPTS))
        assert simulate_step_peak(task, b, inputs=scan).peak_bytes >= heaviest
    assert set(scan.indices(8)) <= set(v.HEAVY)  # the long answers alone, at 8
    assert set(v.LONG_PROMPTS) & set(scan.indices(64))  # a long prompt beside them, at 64
    assert set(v.HEAVY) <= set(scan.indices(64))


def test_worst_case_is_never_lighter_than_a_random_batch():
    """Memory that follows a separator token's count, which the shorter items hold more of:
    no size or value ordering sees it, and the largest items' batch of 64 needed 5.5 MB in
    the simulation where a random one needs 26.9 MB; check answered above what trains
    (review). A random draw is now one of the judged orderings."""
    from tasks.value_order_tasks import separated_task

    from bsselect.api import _judge
    from bsselect.memory.simulated import simulate_step_peak
    from bsselect.memory.values import reads_batch_values, value_shaped_ops
    from bsselect.task import validate_task

    task = separated_task()
    validate_task(task, on_meta=True)
    scan = scan_inputs(task.train_data, InputMode.worst_case, by_values=value_shaped_ops(),
                       reads_values=reads_batch_values(), collate_fn=task.collate_fn,
                       judge=_judge(task))
    assert "by a random draw it needs" in scan.how
    typical = typical_inputs(task.train_data)
    for b in (8, 64):
        random_batch = cpu_step_peak(task, b, inputs=typical).peak_bytes
        assert simulate_step_peak(task, b, inputs=scan).peak_bytes >= random_batch, b
        largest = cpu_step_peak(task, b, inputs=dataclasses.replace(
            scan, alternatives=(), judge=None)).peak_bytes
        assert largest < 0.5 * random_batch  # what the review found


def test_values_the_orderings_cannot_count_leave_the_scan_as_it_was():
    """A 64-bit unsigned hash in each item (past int64) made the scan an internal error; the
    field is skipped, the others still order the items."""
    from tasks.value_order_tasks import Masked, Trimmed

    from bsselect import Task, check

    class WithHash(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.items = Masked()

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i):
            x, y = self.items[i]
            return {**x, "hash": (0x9E3779B97F4A7C15 * (i + 1)) % 2**64}, y

    def collate(items):
        return ({k: torch.stack([x[k] for x, _ in items]) for k in ("ids", "mask")},
                torch.stack([y for _, y in items]))

    task = Task(model=Trimmed, train_data=WithHash(), loss_fn=torch.nn.functional.cross_entropy,
                collate_fn=collate, optimizer=torch.optim.SGD, lr=0.1, base_batch_size=8)
    result = check(task, batch_size=8, memory="1GiB")
    assert result.fits and "orderings were tried" in result.inputs_note  # the hash skipped


def test_a_step_that_needs_sorted_items_fails_the_real_check():
    """enforce_sorted=True after a collate that does not sort: worst-case batches come out
    sorted by length and the real check's items 0 and 1 were too, so check said "fits" for a
    step whose first random batch fails (review). The real check now takes the smallest item,
    then the largest."""
    from tasks.value_order_tasks import unsorted_task

    from bsselect import check
    from bsselect.errors import TaskError

    with pytest.raises(TaskError, match="a real training step on 2 items fails.*sorted"):
        check(unsorted_task(), batch_size=16, memory="16MiB")


def test_lengths_a_tenth_apart_are_still_ordered():
    """Items of lengths 91-100 padded with a nonzero id: an ordering needed counts a tenth
    apart, so none was tried, the class label's zeros ranked the items, and check said
    "fits" 3.3% under the real step on the 64 longest (review). The judged batch now needs
    at least the CPU allocator's peak on them."""
    from tasks.value_order_tasks import near_uniform_task

    import bsselect
    from bsselect.memory.cpu_truth import cpu_step_peak
    from bsselect.memory.inputs import InputScan

    task = near_uniform_task()
    result = bsselect.check(task, batch_size=64, memory="1GiB", margin=0.0)
    lengths = task.train_data.lengths
    longest = tuple(sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)))
    scan = InputScan(InputMode.worst_case, len(lengths), len(lengths), False, 102, 102.0,
                     longest)
    truth = cpu_step_peak(task, 64, inputs=scan).peak_bytes
    assert result.peak_bytes >= truth
    assert "ranked by their nonzero" not in result.inputs_note  # not by the label's zeros


def _stored_padded(n: int = 600, long_every: int = 100):
    """Items stored padded to 256 ids (pad 0), real lengths 10-40 but every
    ``long_every``-th 250; the collate_fn trims each batch to its longest real row."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 41, (n,), generator=g)
    lengths[::long_every] = 250
    items = []
    for length in lengths.tolist():
        x = torch.zeros(256, dtype=torch.long)
        x[:length] = torch.randint(1, 50, (length,), generator=g)
        items.append((x, torch.tensor(length % 2)))
    return items, lengths


def _trim(batch):
    xs = torch.stack([x for x, _ in batch])
    return xs[:, :int((xs != 0).sum(1).max())], torch.stack([y for _, y in batch])


def _stored_padded_task(data):
    from torch import nn

    import bsselect

    class Mean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(50, 32), nn.Linear(32, 2)
            self.mlp = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))

        def forward(self, x):
            return self.out(self.mlp(self.emb(x)).mean(1))

    return bsselect.Task(model=Mean, train_data=data, collate_fn=_trim,
                         loss_fn=torch.nn.functional.cross_entropy, lr=0.05)


def test_items_one_shape_as_stored_are_ranked_as_the_collate_fn_makes_them():
    """Stored padded to one shape, trimmed by the collate_fn: the scan called them uniform
    and measured a random batch, 12x under one that holds a long item (review)."""
    import bsselect
    from bsselect.memory.inputs import InputScan

    data, lengths = _stored_padded()
    task = _stored_padded_task(data)
    scan = scan_inputs(data, InputMode.worst_case, collate_fn=_trim)
    assert not scan.uniform and int(lengths[scan.ranked[0]]) == 250
    assert "as the collate_fn makes each alone" in scan.how
    result = bsselect.check(task, batch_size=16, memory="1GiB", margin=0.0)
    one_long = (0,) + tuple(i for i in range(1, len(data)) if int(lengths[i]) < 250)
    truth_scan = InputScan(InputMode.worst_case, len(data), len(data), False, 257, 257.0,
                           one_long)
    assert result.peak_bytes >= cpu_step_peak(task, 16, inputs=truth_scan).peak_bytes
    # a collate_fn that only stacks leaves one-shape items uniform
    assert scan_inputs(data, InputMode.worst_case,
                       collate_fn=lambda b: (torch.stack([x for x, _ in b]),
                                             torch.stack([y for _, y in b]))).uniform


def test_the_ninth_fields_ordering_is_judged_too():
    """Items with 8 integer tag fields ahead of the tokens: the orderings were cut at 8, the
    tokens' was never judged, and check said a batch 10x too large fit (review). The judge
    here is the seam: memory that follows field 8's real tokens."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(300):
        short = i % 3 == 0  # many tags, few tokens
        tags = [torch.ones(int(torch.randint(25, 51, (1,), generator=g)) if short else 1 + i % 2,
                           dtype=torch.long) for _ in range(8)]
        tokens = torch.zeros(120, dtype=torch.long)
        tokens[:10 if short else 100 + (i == 7) * 20] = 5
        items.append(tags + [tokens])
    peak = lambda batch: sum(int((items[i][8] != 0).sum()) for i in batch)  # noqa: E731
    scan = scan_inputs(items, InputMode.worst_case, reads_values=True, judge=peak)
    assert scan.alternatives and "by elements of field 8 other than 0" in scan.how
    batch = scan.indices(8, 0)
    assert peak(batch) == 8 * 100 + 20  # the longest-token items, the 120 one among them


def test_a_float_leafs_size_is_an_ordering_when_the_step_reads_values():
    """Float frames (a packed RNN's) beside a float vector the model only averages, their
    sizes anti-correlated: the summed element count ranked the vector-heavy items first,
    and nothing ordered by the frames (5.5x under the real worst batch, review). The judge
    is the seam: memory that follows the frames."""
    g = torch.Generator().manual_seed(0)
    items = [((torch.randn(100 if i % 3 else 10, 4, generator=g),
               torch.randn(10 if i % 3 else 2000, generator=g)), torch.tensor(i % 2))
             for i in range(300)]
    items[7] = ((torch.randn(120, 4, generator=g), torch.randn(1, generator=g)),
                torch.tensor(1))
    peak = lambda batch: sum(len(items[i][0][0]) for i in batch)  # noqa: E731
    scan = scan_inputs(items, InputMode.worst_case, reads_values=True, judge=peak)
    assert "by elements of float field 0" in scan.how
    assert peak(scan.indices(8, 0)) == 7 * 100 + 120


def test_a_collate_fn_that_draws_its_shapes_is_not_ranked_by_them():
    """A random crop size per call: single-item collations differ by chance, and the scan
    ranked the items that happened to draw the largest crop (review). Same items, other
    shapes: nothing to rank by; and the user's random streams go on untouched."""
    import random

    data = torch.utils.data.TensorDataset(torch.randn(300, 3, 16, 16),
                                          torch.randint(0, 10, (300,)))

    def random_crop(items):
        s = random.choice([8, 12, 16])
        return (torch.stack([x for x, _ in items])[..., :s, :s],
                torch.stack([y for _, y in items]))

    random.seed(5)
    expected = random.random()
    random.seed(5)
    scan = scan_inputs(data, InputMode.worst_case, collate_fn=random_crop)
    assert scan.uniform and "collate_fn makes each alone" not in scan.how
    # and it says the batch measured is one of the collate_fn's draws (was silent)
    assert "draws each batch's shapes at random" in scan.how
    assert random.random() == expected
