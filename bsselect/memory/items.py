"""Reading a dataset's items: their leaves, shapes and element counts, and a pass over many
of them (``read_each``) with progress and one clear error. Shared by the size scan
(``inputs``) and the value orderings (``orderings``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset

from ..errors import TaskError, one_line

Progress = Callable[[int, int], None]  # (items scanned, items to scan)
Shape = tuple[int, ...]

def item_leaves(obj: Any) -> list[Any]:
    """The leaves of an item or a collated batch: inside lists, tuples and every mapping
    (a ``transformers.BatchEncoding`` is a UserDict, which pytree takes for one leaf: the
    token tensors inside it went unseen, review)."""
    if isinstance(obj, Mapping):
        return [leaf for value in obj.values() for leaf in item_leaves(value)]
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, _NUMBERS) for v in obj):
            return [obj]  # a sequence of numbers (token ids in a list): one leaf, 1-D
        return [leaf for value in obj for leaf in item_leaves(value)]
    return [obj]


_NUMBERS = (int, float, bool)


def item_shapes(item: Any) -> tuple[Shape, ...]:
    """The shape of every leaf of one dataset item: tensors' and arrays' shapes, a string's
    length, an image's (bands, height, width), () for any other scalar."""
    shapes: list[Shape] = []
    for leaf in item_leaves(item):
        if isinstance(leaf, torch.Tensor):
            shapes.append(tuple(leaf.shape))
        elif isinstance(leaf, (str, bytes, list, tuple)):
            shapes.append((len(leaf),))
        elif hasattr(leaf, "getbands") and hasattr(leaf, "width"):  # a PIL image
            shapes.append((len(leaf.getbands()), leaf.height, leaf.width))
        elif hasattr(leaf, "size") and hasattr(leaf, "shape") and isinstance(leaf.size, int):
            shapes.append(tuple(int(d) for d in leaf.shape))  # a numpy array
        else:
            shapes.append(())
    return tuple(shapes)


def shape_elements(shapes: tuple[Shape, ...]) -> int:
    return sum(math.prod(s) for s in shapes)


def item_elements(item: Any) -> int:
    """Elements in one dataset item: tensor and array elements, characters of strings (a
    collate_fn may tokenise them: ``scan_inputs`` then counts its tokens), images' pixels
    times bands, 1 per other scalar."""
    return shape_elements(item_shapes(item))


def has_text(item: Any) -> bool:
    return any(isinstance(leaf, (str, bytes)) for leaf in item_leaves(item))


class CollateFailed(Exception):
    """The collate_fn could not take one item alone (a pairing collate, say)."""


def collated_shapes(collate_fn: Callable[[list], Any], text_only: bool = True
                    ) -> Callable[[Any], tuple[Shape, ...]]:
    """``item_shapes`` of what ``collate_fn`` makes of the item alone (without a leading
    batch dimension of 1), for items holding text: a collate_fn that tokenises makes tokens
    of its characters, and characters are not tokens (a 60-word text of 119 characters is 60
    tokens, a 12-word one of 250 is 12: review); for every item with ``text_only`` False (a
    collate_fn that trims items stored padded). ``CollateFailed`` when it cannot."""
    def shapes(item: Any) -> tuple[Shape, ...]:
        if text_only and not has_text(item):
            return item_shapes(item)
        try:
            out = collate_fn([item])
        except Exception as exc:  # noqa: BLE001 - the scan falls back to characters
            raise CollateFailed(one_line(exc)) from exc
        return tuple(tuple(t.shape[1:]) if t.dim() and t.shape[0] == 1 else tuple(t.shape)
                     for t in item_leaves(out) if isinstance(t, torch.Tensor))
    return shapes


def base_dataset(data: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(data, Subset):
        data = data.dataset
    return data


def sampled_indices(n: int, limit: int, seed: int) -> list[int]:
    """The items a scan reads: all ``n``, or a seeded random ``limit`` of them."""
    return (list(range(n)) if n <= limit else torch.randperm(
        n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def most_first(counts: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """``order``'s items by their ``counts``, most first (ties by index)."""
    return tuple(i for _, i in sorted(zip(counts, order), key=lambda ci: (-ci[0], ci[1])))


def sample_note(scanned: int, total: int) -> str:
    if scanned >= total:
        return ""
    return (f"; a random {scanned:,} of {total:,} (the scan stops at {scanned:,}: a larger item "
            "may be among the rest)")


def read_each(data: Dataset, order: list[int], progress: Optional[Progress],
           size_of: Callable[[Any], Any] = item_elements) -> list[Any]:
    sizes = []
    every = max(1, len(order) // 200)  # ~200 progress updates, whatever the size
    for j, i in enumerate(order):
        try:
            sizes.append(size_of(data[i]))
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"reading train_data[{i}] to find the largest items failed: "
                            f"{one_line(exc)} (--inputs typical skips the scan)") from exc
        if progress is not None and (j % every == 0 or j + 1 == len(order)):
            progress(j + 1, len(order))
    return sizes
