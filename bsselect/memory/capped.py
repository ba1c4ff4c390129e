"""A CPU "device" whose allocator runs out of memory above a cap.

It implements the measured path's :class:`~bsselect.memory.measured.AllocatorBackend` seam, so
the code that runs on a GPU — allocator peak statistics, confirming step, OOM back-off — runs
unchanged on a CPU in tests and benchmarks. Live bytes are every tensor storage created inside
``session()`` that is still alive (the same counter as the simulation, on real tensors); when
they exceed ``cap_bytes`` the op raises ``torch.OutOfMemoryError`` with CUDA's wording, which
bsselect, Lightning and Accelerate all recognise as an OOM.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._pytree import tree_flatten

from ..units import format_bytes
from .simulated import LiveStorageCounter


class _CappedCounter(LiveStorageCounter):
    def __init__(self, cap_bytes: int) -> None:
        super().__init__()
        self.cap_bytes = cap_bytes
        self.max_bytes = 0
        self.ooms = 0
        self._inputs: set[int] = set()
        self._new: list[tuple[int, bool, int]] = []  # (storage key, existed, bytes added)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # A view of a tensor made before the session (a dataset row, say) shares a storage
        # the allocator handed out long ago: it is not a new allocation.
        self._inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                        if isinstance(t, torch.Tensor)}
        self._new = []
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._inputs = set()

    def track(self, t: torch.Tensor, real_nbytes: int | None = None) -> None:
        key = id(t.untyped_storage())
        if key in self._inputs and key not in self._bytes:
            return
        existed, before = key in self._bytes, self.live_bytes
        super().track(t, real_nbytes)
        if self.live_bytes != before:
            self._new.append((key, existed, self.live_bytes - before))

    def _refuse_new(self) -> None:
        """Uncount this op's new storage: a real allocator never hands out a refused block,
        and an OOM handler that allocates (Lightning's does) must not fail again because the
        exception's traceback still holds the op's outputs."""
        for key, existed, added in self._new:
            if existed:  # grown in place: undo the growth
                self._bytes[key] -= added
                self.live_bytes -= added
            elif key in self._bytes:  # new: forget it, weakref and its callback included
                self.live_bytes -= self._bytes.pop(key)
                del self._fake_nbytes[key], self._refs[key]
        self._new = []

    def note(self, level_bytes: int, workspace_bytes: int = 0) -> None:
        if level_bytes > self.cap_bytes:
            self._refuse_new()
        super().note(level_bytes, workspace_bytes)
        self.max_bytes = max(self.max_bytes, min(level_bytes, self.cap_bytes))
        if level_bytes > self.cap_bytes:
            self.ooms += 1
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate past the cap: {format_bytes(level_bytes)}"
                f" live > {format_bytes(self.cap_bytes)} (bsselect fake allocator cap)"
            )


class CappedCpuAllocator:
    """``AllocatorBackend`` on the CPU with a hard cap (bytes of live tensor storage)."""

    device = torch.device("cpu")

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._counter: _CappedCounter | None = None
        self.ooms = 0

    @contextmanager
    def session(self) -> Iterator[None]:
        """Count (and cap) every storage created inside; tensors from before are free."""
        counter = _CappedCounter(self.cap_bytes)
        self._counter = counter
        try:
            with counter:
                yield
        finally:
            self.ooms += counter.ooms
            self._counter = None

    def oom_count(self) -> int:
        """Out-of-memory errors raised so far, those of the running session included."""
        return self.ooms + (self._counter.ooms if self._counter else 0)

    @property
    def live_bytes(self) -> int:
        return self._counter.live_bytes if self._counter else 0

    def reset_peak(self) -> None:
        if self._counter is not None:
            self._counter.max_bytes = self._counter.live_bytes

    def peak_bytes(self) -> int:
        return self._counter.max_bytes if self._counter else 0

    def synchronize(self) -> None:
        pass

    def release(self) -> None:
        pass
