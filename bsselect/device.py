"""Which device to use and how much memory it offers."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import UsageError


@contextmanager
def callers_rng(device: torch.device) -> Iterator[None]:
    """Torch's global RNG (the CPU's, and ``device``'s when it is an accelerator) forked for
    the duration: bsselect seeds it so that its trials and measurements repeat, and the
    caller's stream must go on as if bsselect had not run (a user who seeds, chooses a batch
    size with the API, then initialises and trains, gets the run of their own seed)."""
    accelerator = device.type not in ("cpu", "meta")
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else "cuda"):
        yield


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None) picks the current accelerator, else the CPU."""
    if name in (None, "auto"):
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return acc if acc is not None else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:1, mps, xpu") from exc
    if device.type != "cpu" and device.type != "meta":
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if acc is None or acc.type != device.type:
            raise UsageError(
                f"device {name!r} is not available on this machine; to plan memory for it "
                "without one, use `bsselect probe --target cuda --memory SIZE` or "
                "`bsselect check --device-preset NAME`"
            )
    return device


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where the number came from, shown to the user


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device) -> Budget:
    """Free memory on an accelerator (``mem_get_info``), available RAM on the CPU."""
    if device.type == "cpu" or device.type == "meta":
        from .distributed import host_share  # torchrun: the node's ranks share its RAM

        ram, shared = host_share(available_ram_bytes())
        return Budget(ram, f"available RAM (/proc/meminfo MemAvailable){shared}")
    free, _total = torch.accelerator.get_memory_info(device)
    return Budget(int(free), f"free memory on {device} (mem_get_info)")
