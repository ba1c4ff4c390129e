"""Which items make the batches that memory is measured on: the largest ones, or random ones.

When items differ in size (sequences of different lengths, images of different sizes, padded
by the task's collate_fn), a random batch measures a typical step, and a training run meets
every batch of an epoch: the one holding the longest items decides whether it runs out of
memory. ``probe`` and ``check`` therefore default to worst-case inputs: the batch of ``b`` is
the ``b`` largest items, by element count (every tensor, array and string in the item,
target included). Finding them takes one pass over the dataset, at most ``MAX_SCAN_ITEMS``
items (a seeded random sample of larger datasets, which the output says).

Items of one size make worst-case and typical batches the same size; then the random batch
is kept (the answer is exactly what it was before worst-case inputs existed) and a
``TensorDataset`` is recognised without reading a single item.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import Enum
from statistics import median
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from ..step import sample_indices
from .items import (CollateFailed, Progress, Shape, base_dataset, collated_shapes, has_text,
                    item_elements, item_shapes, read_each, sample_note, sampled_indices,
                    shape_elements)
from .orderings import JUDGE_BATCH, MAX_ORDERINGS, ranked_by_nonzero, value_orderings

MAX_SCAN_ITEMS = 100_000
# The simulated step's peak bytes on a batch of these items (None: it cannot say).
Judge = Callable[[Sequence[int]], Optional[int]]


class InputMode(str, Enum):
    worst_case = "worst-case"
    typical = "typical"


def _kind_of(data: Dataset) -> str:
    data = base_dataset(data)
    return "a TensorDataset" if isinstance(data, TensorDataset) else type(data).__name__


def _same_size_by_construction(data: Dataset) -> bool:
    """A TensorDataset (or a Subset of one) indexes tensors along dim 0: one item shape; a
    dataset may also say so itself (``uniform_items = True``)."""
    data = base_dataset(data)
    return isinstance(data, TensorDataset) or getattr(data, "uniform_items", False) is True


@dataclass(frozen=True)
class InputScan:
    """How memory batches are chosen, and what the scan of the dataset found.

    ``ranked`` holds the scanned items' indices, largest first (ties by index); empty when
    no ranking is needed (typical inputs, or items all of one size).
    """

    mode: InputMode
    items_total: int
    items_scanned: int
    uniform: Optional[bool]                  # worst case = typical: every scanned item the same
    #                                          size, and the step's shapes read no values
    largest_item_elements: Optional[int]
    median_item_elements: Optional[float]
    ranked: tuple[int, ...] = ()
    how: str = ""                            # how the sizes were found, for people
    scan_s: float = 0.0
    padding_lead: int = 1                    # ranked's first items, which pad a batch the most
    # Where the step's shapes follow the batch's values (``_judged``): other orderings of the
    # items, and the simulated step's peak on given items that picks among them per batch.
    alternatives: tuple[tuple[int, ...], ...] = ()
    judge: Optional[Judge] = dataclasses.field(default=None, compare=False, repr=False)
    _chosen: dict = dataclasses.field(default_factory=dict, init=False, compare=False,
                                      repr=False)

    @property
    def picks_largest(self) -> bool:
        return self.mode is InputMode.worst_case and bool(self.ranked or self.alternatives)

    def indices(self, batch_size: int, seed: int = 0) -> list[int]:
        """The items of a batch: the ``batch_size`` largest (repeated from the largest on if
        the batch is larger than the scanned items), else the random draw ``make_batch``
        makes with ``seed``. With ``alternatives``, the heaviest in the simulated step of
        that batch and each alternative's first ``batch_size`` items (judged at this size:
        the ordering heaviest at 8 items was lighter at 64 on a task with both long items
        and value-heavy ones, review)."""
        own = self._own(batch_size, seed)
        if not self.alternatives or self.judge is None:
            return own
        key = (batch_size, seed)
        if key not in self._chosen:
            batches = [own] + [[r[i % len(r)] for i in range(batch_size)]
                               for r in self.alternatives]
            peaks = [self.judge(b) for b in batches]
            best = max(range(len(batches)), key=lambda i: (
                -1 if peaks[i] is None else peaks[i], -i))
            self._chosen[key] = batches[best]
        return list(self._chosen[key])

    def _own(self, batch_size: int, seed: int) -> list[int]:
        if self.mode is not InputMode.worst_case or not self.ranked:
            gen = torch.Generator().manual_seed(seed)
            return sample_indices(self.items_total, batch_size, gen)
        ranked = self.ranked
        return [ranked[i % len(ranked)] for i in range(batch_size)]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": self.mode.value, "largest_item_elements": self.largest_item_elements,
                "median_item_elements": self.median_item_elements,
                "items_scanned": self.items_scanned, "items_total": self.items_total,
                "uniform_items": self.uniform, "inputs_note": self.how}

    def describe(self) -> str:
        """One line for people."""
        if self.mode is InputMode.typical:
            return "inputs: typical (random batches; --inputs worst-case measures the largest items)"
        if self.uniform:
            return f"inputs: worst-case = typical: {self.how}"
        return (f"inputs: worst-case, each batch of b is the b largest items — largest "
                f"{self.largest_item_elements:,} elements, median {self.median_item_elements:,.0f}"
                f" ({self.how})")


def typical_inputs(data: Dataset) -> InputScan:
    return InputScan(InputMode.typical, len(data), 0, None, None, None)  # type: ignore[arg-type]


def scan_inputs(data: Dataset, mode: InputMode = InputMode.worst_case, *, seed: int = 0,
                max_items: int = MAX_SCAN_ITEMS, progress: Optional[Progress] = None,
                by_values: Sequence[str] = (), reads_values: bool = False,
                collate_fn: Optional[Callable[[list], Any]] = None,
                judge: Optional[Judge] = None) -> InputScan:
    """The items memory batches are made of, for ``mode``: a pass over ``data`` (at most
    ``max_items`` items, a seeded random sample beyond) ranking items by element count,
    after the items longest in each dimension (``_ranked``). Items holding text are
    measured as ``collate_fn`` makes them (tokens, not characters).
    ``by_values``: the ops whose output shapes the batch's values decided in the simulated
    step (``values.value_shaped_ops``: ``h[mask]`` on a padding mask). Items of one size are
    then ranked by their nonzero integer and boolean elements (real tokens under a mask,
    non-padding ids), when those differ.

    ``judge`` (the simulated step's peak on a batch of given items) with ``by_values`` or
    ``reads_values`` (the step read a batch value: ``int(mask.sum(1).max())`` trimming the
    padding): the memory follows values no size or count sees for sure — a pad id that is not
    0, labels of -100, a lengths field — so ``_judged`` tries the other orderings those values
    give and keeps the one whose batch needs the most memory (review: each heuristic alone
    measured batches 2.4-4.5x below the real worst)."""
    scan = _scan_inputs(data, mode, seed, max_items, progress, by_values, collate_fn)
    if (judge is None or not (by_values or reads_values) or mode is InputMode.typical
            or getattr(base_dataset(data), "memory_follows_values", True) is False):
        return scan
    return _judged(data, scan, seed, max_items, progress, judge)


def _scan_inputs(data: Dataset, mode: InputMode, seed: int, max_items: int,
                 progress: Optional[Progress], by_values: Sequence[str],
                 collate_fn: Optional[Callable[[list], Any]]) -> InputScan:
    n = len(data)  # type: ignore[arg-type]
    if mode is InputMode.typical:
        return typical_inputs(data)

    def sampled(limit: int = max_items) -> list[int]:
        return sampled_indices(n, limit, seed)

    def by_nonzero(order: list[int], largest: int, mid: float, how: str,
                   start: float) -> Optional[InputScan]:
        """Items of one size whose values the step's shapes read: ranked by nonzero
        elements, when those differ (None: nothing to rank by)."""
        ranked = ranked_by_nonzero(data, order, progress) if by_values else ()
        if not ranked:
            return None
        return InputScan(mode, n, len(order), False, largest, mid, ranked,
                         _by_values_note(how, by_values, len(order), n),
                         time.perf_counter() - start)

    start = time.perf_counter()
    if _same_size_by_construction(data):
        size = item_elements(data[0]) if n else 0
        how = f"{_kind_of(data)}: every item has {size:,} elements"
        # the items are read only for a collate_fn's shapes or their values
        order = sampled() if collate_fn is not None or by_values else []
        reshaped = _collated_differ(data, order, collate_fn, progress, sampled)
        if reshaped is None or reshaped[0] is None:
            how += reshaped[1] if reshaped else ""
            if by_values:
                found = by_nonzero(order, size, float(size), how, time.perf_counter())
                if found:
                    return found
            return InputScan(mode, n, 0, True, size, float(size), how=how)
        shapes, text, order = reshaped
    else:
        shapes, text, order = _text_shapes(data, sampled(), collate_fn, progress, sampled)
        if shapes is None:
            shapes = read_each(data, order, progress, item_shapes)
            if all(sh == shapes[0] for sh in shapes):
                reshaped = _collated_differ(data, order, collate_fn, progress, sampled)
                if reshaped is not None and reshaped[0] is not None:
                    shapes, text, order = reshaped
                elif reshaped is not None:
                    text = reshaped[1]
    elapsed = time.perf_counter() - start
    sizes = [shape_elements(sh) for sh in shapes]
    largest, mid = max(sizes), median(sizes)
    if all(sh == shapes[0] for sh in shapes):
        how = f"all {len(order):,} items scanned have {largest:,} elements"
        return by_nonzero(order, largest, float(mid), how, start) or InputScan(
            mode, n, len(order), True, largest, float(mid),
            how=how + text + sample_note(len(order), n), scan_s=elapsed)
    ranked, extremes = _ranked(shapes, sizes, order)
    how = (f"{len(order):,} items scanned in {elapsed:.1f} s" + text
           + (f"; after the largest, the {extremes} item(s) longest in some dimension: a "
              "collate_fn that pads takes the whole batch to their extents" if extremes else "")
           + sample_note(len(order), n))
    return InputScan(mode, n, len(order), False, largest, float(mid), ranked, how, elapsed,
                     padding_lead=1 + extremes)


COLLATE_SCAN_S = 30.0  # the most the per-item collation of text items may take


def _text_shapes(data: Dataset, order: list[int], collate_fn: Optional[Callable[[list], Any]],
                 progress: Optional[Progress], sampled: Callable[[int], list[int]]
                 ) -> tuple[Optional[list[tuple[Shape, ...]]], str, list[int]]:
    """For items holding text and a collate_fn: the shapes of each item collated alone,
    the note that says so, and the items scanned (fewer, a random sample, when collating
    them all would take over ``COLLATE_SCAN_S``). None (and a note why) where the raw
    shapes, characters for text, are the better ranking: the collate_fn cannot take one
    item, or it makes every item alone one shape (a BatchEncoding unseen, a list per item)
    while the characters differ — a fixed-length tokenizer makes every real batch one size
    too, so ranking by characters then costs nothing."""
    if collate_fn is None or not order or not has_text(data[order[0]]):
        return None, "", order
    size_of = collated_shapes(collate_fn)
    try:
        tick = time.perf_counter()
        first = [size_of(data[i]) for i in order[:16]]
        shapes, order = _collate_each(data, order, size_of, first, time.perf_counter() - tick,
                                      progress, sampled)
    except CollateFailed as exc:
        return None, (f"; text ranked by characters: the collate_fn cannot take one item "
                      f"alone ({exc})"), order
    if all(sh == shapes[0] for sh in shapes) and len(
            {item_shapes(data[i]) for i in order[:4096]}) > 1:
        return None, ("; text ranked by characters: the collate_fn makes every item alone "
                      "one shape"), order
    return shapes, "; text measured as the collate_fn makes it (its tokens)", order


def _collate_each(data: Dataset, order: list[int], size_of: Callable[[Any], tuple[Shape, ...]],
                  first: list[tuple[Shape, ...]], first_s: float, progress: Optional[Progress],
                  sampled: Callable[[int], list[int]]
                  ) -> tuple[list[tuple[Shape, ...]], list[int]]:
    """``size_of`` every item of ``order``, or of a seeded random sample of them where all
    would take over ``COLLATE_SCAN_S`` at the pace of the ``first`` ones (``first_s``
    seconds); and the items read."""
    per_item = first_s / len(first)
    limit = max(len(first), int(COLLATE_SCAN_S / max(per_item, 1e-9)))
    if limit < len(order):
        order = sampled(limit)
    return read_each(data, order, progress, size_of), order


COLLATE_PROBE_ITEMS = 256  # items collated alone to see whether the collate_fn reshapes
RANDOM_COLLATE_NOTE = ("; the collate_fn draws each batch's shapes at random (the same items "
                       "collated again came out other shapes): memory is measured on one of "
                       "its draws, and a larger draw needs more")


def _collated_differ(data: Dataset, order: list[int],
                     collate_fn: Optional[Callable[[list], Any]], progress: Optional[Progress],
                     sampled: Callable[[int], list[int]]
                     ) -> Optional[tuple[Optional[list[tuple[Shape, ...]]], str, list[int]]]:
    """Items all one shape as stored, which ``collate_fn`` makes into different shapes
    alone (items stored padded to 512, a collate_fn that trims each batch to its longest
    real row: the scan called them uniform and measured a random batch, 12x under the batch
    holding the one long item, review): each item's collated shapes, the note, the items
    read. None where there is no collate_fn, it cannot take one item, or the first
    ``COLLATE_PROBE_ITEMS`` come out one shape (the common case: it only stacks); no shapes
    and ``RANDOM_COLLATE_NOTE`` where it draws them at random."""
    if collate_fn is None or collate_fn is torch.utils.data.default_collate or not order:
        return None
    import random

    size_of = collated_shapes(collate_fn, text_only=False)
    state = random.getstate()  # a collate_fn that draws (augmentation): the user's streams
    try:                       # go on as if the scan had not run
        with torch.random.fork_rng(devices=[]):
            tick = time.perf_counter()
            probe = [size_of(data[i]) for i in order[:COLLATE_PROBE_ITEMS]]
            if all(sh == probe[0] for sh in probe):
                return None
            if [size_of(data[i]) for i in order[:8]] != probe[:8]:
                # the same items, other shapes: the collate_fn draws them (a random crop
                # size), not a property of the item to rank by (review); said, since the
                # batch measured is then one draw of the collate_fn's, not its largest
                return None, RANDOM_COLLATE_NOTE, order
            shapes, order = _collate_each(data, order, size_of, probe,
                                          time.perf_counter() - tick, progress, sampled)
    except CollateFailed:
        return None
    finally:
        random.setstate(state)
    return shapes, ("; items one shape as stored, measured as the collate_fn makes each "
                    "alone"), order


def _ranked(shapes: list[tuple[Shape, ...]], sizes: list[int], order: list[int]
            ) -> tuple[tuple[int, ...], int]:
    """``order``'s items for worst-case batches, and how many lead it out of size order.

    By element count (most first, ties by index), except that where every item has the same
    leaves of the same ranks, the first items are chosen greedily for the padded batch they
    make: the largest item, then each time the one that pads the batch so far the most, until
    every dimension is at its longest. A collate_fn that pads does so per dimension, so the
    worst batch holds the tallest and the widest item (500 images of 32x32 with one of 8x128
    and one of 128x8 have equal element counts, and a batch holding both is padded to
    128x128: review); and the largest item stays first, the worst batch of one."""
    by_size = sorted(range(len(order)), key=lambda k: (-sizes[k], order[k]))
    ranks = [len(s) for s in shapes[0]]
    first: list[int] = by_size[:1]
    chosen = set(first)

    def padded_by(reach: list[Shape], k: int) -> list[Shape]:
        """Each leaf's extents once item ``k`` joins a batch padded to ``reach``."""
        return [tuple(max(a, b) for a, b in zip(r, s)) for r, s in zip(reach, shapes[k])]

    if all([len(s) for s in sh] == ranks for sh in shapes):
        longest = [tuple(max(sh[j][d] for sh in shapes) for d in range(r))
                   for j, r in enumerate(ranks)]
        reach = list(shapes[first[0]])
        while reach != longest:
            best = min((k for k in range(len(order)) if k not in chosen),
                       key=lambda k: (-shape_elements(tuple(padded_by(reach, k))), -sizes[k],
                                      order[k]))
            first.append(best)
            chosen.add(best)
            reach = padded_by(reach, best)
    lead = 0 if first == by_size[:len(first)] else len(first) - 1
    rest = [k for k in by_size if k not in chosen]
    return tuple(order[k] for k in first + rest), lead


def _by_values_note(how: str, ops: Sequence[str], scanned: int, total: int) -> str:
    names = ", ".join(f"aten.{op}" for op in ops)
    return (f"{how}, but the step's shapes follow their values ({names}): ranked by their "
            f"nonzero integer and boolean elements (real tokens under a mask)"
            + sample_note(scanned, total))


RANDOM_DRAW = "a random draw"  # _judged's ordering that is no ordering: a seeded shuffle


def _judged(data: Dataset, scan: InputScan, seed: int, max_items: int,
            progress: Optional[Progress], judge: Judge) -> InputScan:
    """``scan``, or the same scan ranked by another of ``value_orderings``' orderings where that
    one's batch of ``JUDGE_BATCH`` needs more memory in the simulated step than the scan's
    own batch (its largest items, or a random batch where it found them all one size)."""
    start = time.perf_counter()
    n = scan.items_total
    order = sampled_indices(n, max_items, seed)
    k = min(JUDGE_BATCH, len(order))
    # A random draw first: the memory may follow a value no ordering counts (a separator
    # token's occurrences, shorter items holding more), and the scan's largest items were
    # then lighter than a typical batch: worst-case said 5.5 MB where a random batch of 64
    # needs 26.9 MB (review). No worst case is lighter than the typical draw.
    # (Where the scan found the items all one size, its own batch is such a draw already.)
    candidates: dict[str, tuple[int, ...]] = {}
    if scan.ranked:
        shuffled = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))
        candidates[RANDOM_DRAW] = tuple(order[i] for i in shuffled.tolist())
    try:
        candidates.update(value_orderings(data, order, progress))
    except Exception:  # noqa: BLE001 - values it cannot count (uint64 past int64, sparse,
        pass            # meta): no ordering by them; the random draw and the scan's own
    if not candidates or k == 0:
        return scan
    own = scan.indices(k, seed)
    base = judge(own)
    if base is None:
        return scan
    best_name, best_peak, seen = "", base, {tuple(sorted(own))}
    tried = MAX_ORDERINGS + 1  # the random draw and the value orderings
    for name, ranked in list(candidates.items())[:tried]:
        batch = tuple(sorted(ranked[:k]))
        if batch in seen:
            continue
        seen.add(batch)
        peak = judge(list(ranked[:k]))
        if peak is not None and peak > best_peak:
            best_name, best_peak = name, peak
    if not best_name:
        if len(candidates) > tried:  # said: the heaviest may be among them
            return dataclasses.replace(scan, how=scan.how + (
                f"; {len(candidates) - tried} of the value orderings were not tried "
                f"(at most {MAX_ORDERINGS})"))
        return scan
    winner = candidates[best_name]
    # The items that pad a batch the most (the longest), then the winner's: a batch holding
    # both the long items and the value-heavy ones (review: at 64 items the long prompts
    # weighed more, at 8 the long answers).
    lead = tuple(scan.ranked[:scan.padding_lead])
    alternatives = (winner,) + ((lead + tuple(i for i in winner if i not in lead),)
                                if lead else ())
    first = "largest items" if scan.ranked else "random items"
    untried = list(candidates)[tried:]
    cut = (f" ({len(untried)} more not tried: by {', '.join(untried)})" if untried else "")
    how = (f"{scan.how}; the step's shapes follow the batch's values, so {len(seen)} "
           f"orderings{cut} were tried on a simulated batch of {k}: by {best_name} it needs "
           f"{best_peak / base:.2f}x the {first}' memory. Each batch is the heaviest in the "
           f"simulated step of the {first}, that ordering's"
           + (" and the same after the items that pad the most" if len(alternatives) > 1
              else "")
           + sample_note(len(winner), n))
    return dataclasses.replace(scan, uniform=False, alternatives=alternatives, judge=judge,
                               how=how, scan_s=scan.scan_s + time.perf_counter() - start)
