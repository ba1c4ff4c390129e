"""Orderings of a dataset's items by what their integer values say, for a step whose memory
follows the batch's values and not only its shapes: a pad id that is not 0, labels of -100
on a prompt, a lengths field, a model that trims its batch to its longest real row.

``inputs.scan_inputs`` judges these orderings in the simulated step (``inputs._judged``) and
keeps the heaviest; ``ranked_by_nonzero`` ranks items of one size for a step whose shapes
read a mask (``h[mask]``)."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .items import CollateFailed, Progress, item_leaves, most_first, read_each

JUDGE_BATCH = 8       # the batch each ordering is judged on: its first items
MAX_ORDERINGS = 16    # orderings judged at most, beside the scan's own (8 cut the one that
# mattered, the 9th field's, on items with 8 integer tag fields first: 10x, review)
_PAD_PROBE_ITEMS = 256  # items read to guess each leaf's padding value
SIZE = "size"  # value_orderings' feature: a float leaf's element count
MIN_DISTINCT_VALUES = 8  # an integer scalar ordered by: a length, not a class label
# Counts that differ by less cannot move the memory by more; a tenth (before) left items of
# lengths 91-100 unordered, and check said "fits" 3.3% under their heaviest batch (review).
MIN_SPREAD = 0.02
ORDERINGS_SCAN_S = 5.0  # the most reading the items' integer fields may take; beyond, a sample


def _nonzero_counts(item: Any) -> int:
    """Nonzero elements of an item's integer and boolean tensors."""
    return sum(int(torch.count_nonzero(t)) for t in item_leaves(item)
               if isinstance(t, torch.Tensor) and not t.dtype.is_floating_point
               and not t.dtype.is_complex)


def ranked_by_nonzero(data: Dataset, order: list[int], progress: Optional[Progress]
                       ) -> tuple[int, ...]:
    """``order``'s items, most nonzero integer/boolean elements first (ties by index); ()
    when every item has as many (nothing to rank by). A TensorDataset is counted whole."""
    base, index = data, list(order)
    while isinstance(base, Subset):
        index = [base.indices[i] for i in index]
        base = base.dataset
    if isinstance(base, TensorDataset):
        counts_all = sum((t != 0).reshape(len(t), -1).sum(1) for t in base.tensors
                         if not t.dtype.is_floating_point and not t.dtype.is_complex)
        if not isinstance(counts_all, torch.Tensor):
            return ()
        counts = counts_all[torch.tensor(index, dtype=torch.long)].tolist() if index else []
    else:
        counts = read_each(data, order, progress, _nonzero_counts)
    # As value_orderings: counts that differ by less than MIN_SPREAD order nothing the
    # memory follows (a class label of 0 among 100 real tokens ranked items by their label).
    if not counts or max(counts) - min(counts) <= MIN_SPREAD * max(max(counts), 1):
        return ()
    return most_first(counts, order)


def _int_leaf(leaf: Any) -> Optional[torch.Tensor]:
    """An integer or boolean leaf as a dense tensor of real values (a list of ints, a numpy
    array too); None for anything else (floats, text, images, sparse or meta tensors, a
    64-bit unsigned hash past int64)."""
    try:
        t = _as_int_tensor(leaf)
    except Exception:  # noqa: BLE001 - a value torch cannot hold as an integer tensor
        return None
    if t is None or t.layout is not torch.strided or t.is_meta:
        return None
    return t


def _as_int_tensor(leaf: Any) -> Optional[torch.Tensor]:
    if isinstance(leaf, torch.Tensor):
        t = leaf
    elif isinstance(leaf, (list, tuple)) and leaf and all(
            isinstance(v, int) for v in leaf):
        t = torch.tensor(leaf)
    elif isinstance(leaf, int):
        t = torch.tensor(leaf)
    elif hasattr(leaf, "dtype") and hasattr(leaf, "shape") and hasattr(leaf, "__array__"):
        try:
            t = torch.as_tensor(leaf)
        except Exception:  # noqa: BLE001 - an array torch cannot hold: not a candidate
            return None
    else:
        return None
    return t if not (t.dtype.is_floating_point or t.dtype.is_complex) else None


def _mode(values: list[int]) -> Optional[int]:
    return max(set(values), key=lambda v: (values.count(v), -v)) if values else None


def value_orderings(data: Dataset, order: list[int], progress: Optional[Progress]
               ) -> dict[str, tuple[int, ...]]:
    """Orderings of ``order``'s items (most first, ties by index) by what their integer
    values say, where the memory may follow values: per integer leaf of one dimension or
    more, the elements that are not its padding value (0; the value most items end with,
    right padding; the one most begin with, left padding or a prompt's -100 labels), alone
    and summed over leaves; per integer scalar (a length), its value; per float leaf of one
    dimension or more, its element count. Only counts that differ between items make an
    ordering; {} when the items' leaves do not line up."""
    head = [item_leaves(data[i]) for i in order[:_PAD_PROBE_ITEMS]]
    width = len(head[0]) if head else 0
    if not head or any(len(leaves) != width for leaves in head):
        return {}
    # (name, leaf, pad; None: the value; SIZE: a float leaf's element count)
    features: list[tuple[str, int, Optional[int | str]]] = []
    for j in range(width):
        ts = [_int_leaf(leaves[j]) for leaves in head]
        if any(t is None for t in ts):
            if all(isinstance(leaves[j], torch.Tensor) and leaves[j].dim() >= 1
                   and leaves[j].dtype.is_floating_point for leaves in head):
                # A float leaf's size: a packed RNN over frames beside a float vector the
                # model only averages; the summed element count ranked the vector-heavy
                # items first, 5.5x under the frames' worst batch (review)
                features.append((f"elements of float field {j}", j, SIZE))
            continue
        if all(t.dim() == 0 for t in ts):
            features.append((f"the value of integer field {j}", j, None))
            continue
        flat = [t.reshape(-1) for t in ts if t.numel()]
        pads = {0}
        for ends in ([int(t[-1]) for t in flat], [int(t[0]) for t in flat]):
            v = _mode(ends)
            # Padding ends (or begins) many items; the commonest last token of text does not.
            if v is not None and ends.count(v) >= len(ends) / 4:
                pads.add(v)
        for v in sorted(pads):
            features.append((f"elements of field {j} other than {v}", j, v))
    if not features:
        return {}

    def counts(item: Any) -> list[int]:
        leaves = item_leaves(item)
        if len(leaves) != width:
            raise CollateFailed("items with different fields")
        out = []
        for _, j, v in features:
            if v == SIZE:
                leaf = leaves[j]
                out.append(leaf.numel() if isinstance(leaf, torch.Tensor) else 0)
                continue
            t = _int_leaf(leaves[j])
            out.append(0 if t is None else int(t) if v is None and t.dim() == 0 else
                       int((t != (0 if v is None else v)).sum()))
        return out

    try:
        tick = time.perf_counter()
        first = [counts(data[i]) for i in order[:64]]
        per_item = (time.perf_counter() - tick) / max(1, len(first))
        limit = max(len(first), int(ORDERINGS_SCAN_S / max(per_item, 1e-9)))
        if limit < len(order):  # a seeded random sample of them, as the scan samples
            order = [order[i] for i in sorted(torch.randperm(
                len(order), generator=torch.Generator().manual_seed(0))[:limit].tolist())]
        table = read_each(data, order, progress, counts)
    except CollateFailed:
        return {}
    columns = list(zip(*table))
    named = {name: list(col) for (name, _, _), col in zip(features, columns)}
    by_pad: dict[str, list[int]] = {}
    for (name, _, v), col in zip(features, columns):
        if isinstance(v, int) and len([f for f in features if isinstance(f[2], int)]) > 1:
            key = f"elements other than {v}, over every field"
            by_pad[key] = [a + b for a, b in zip(by_pad.get(key, [0] * len(col)), col)]
    named.update(by_pad)
    # An ordering needs counts that differ by something (MIN_SPREAD of the largest): random
    # ids' rare zeros, or a class label, order nothing the memory follows.
    return {name: most_first(col, order) for name, col in named.items()
            if max(col) - min(col) > MIN_SPREAD * max(abs(max(col)), abs(min(col)), 1)
            and (len(set(col)) >= MIN_DISTINCT_VALUES or not name.startswith("the value"))}
