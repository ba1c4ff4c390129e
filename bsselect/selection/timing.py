"""Step times that hold on a busy machine: interleaved timing rounds, and the CPU thread count.

A trial's own step times are measured inside its own window of wall time, so a slow minute
(another job on the machine, a frequency change) lands on whichever batch sizes happen to run
then, and can reorder them. After the trials, the sweep times every ok batch size again in
rounds that visit all of them in turn (A B C, B C A, C A B, ...): whatever slows the machine
hits every batch size alike. ``steptime.summarize_rounds`` reduces each size's per-round
medians to a load-robust step time with its spread.

On a CPU, the thread count is chosen, not inherited: torch's default (one thread per core)
stalls when another process takes a core, because every parallel region waits for its slowest
thread. ``default_threads`` leaves half of the cores free.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Callable, Iterator, Mapping

from .steptime import TimeInterval, summarize_rounds

ROUNDS = 5                # timing rounds over all batch sizes
ROUND_S = 0.02            # aim for this much timed work per batch size and round ...
MAX_STEPS_PER_ROUND = 8   # ... with at most this many steps
WARMUP_STEPS = 2          # untimed steps per batch size before the first round


@dataclass(frozen=True)
class RoundTiming:
    """One batch size's interleaved timing: the median step time of each round (seconds),
    the steps timed per round, the summary ``step`` (``summarize_rounds``), and how much of a
    step went to fetching its batch (``data_s``; included in the step time, which is what a
    training loop without loader workers sees and what the ranking and ``b_opt`` use)."""

    batch_size: int
    round_medians: tuple[float, ...]
    steps_per_round: int
    step: TimeInterval
    data_s: float | None = None  # median seconds of a step spent fetching its batch
    clock: str = "wall"  # how a step was timed: "thread_cpu" or "wall" (trials.step_clock)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "round_medians_s": list(self.round_medians),
                "steps_per_round": self.steps_per_round, "step_time_s": self.step.mid,
                "step_time_lo_s": self.step.lo, "step_time_hi_s": self.step.hi,
                "data_s": self.data_s, "clock": self.clock}

    @classmethod
    def from_dict(cls, data: Mapping) -> "RoundTiming":
        rounds = tuple(float(v) for v in data["round_medians_s"])
        data_s = data.get("data_s")
        return cls(int(data["batch_size"]), rounds, int(data["steps_per_round"]),
                   summarize_rounds(rounds), None if data_s is None else float(data_s),
                   str(data.get("clock", "wall")))  # journals before the field: wall


def steps_per_round(estimate_s: float) -> int:
    """Timed steps per round for a step of about ``estimate_s`` seconds: enough for ROUND_S
    of work, between 1 and MAX_STEPS_PER_ROUND."""
    if not (estimate_s > 0 and math.isfinite(estimate_s)):
        return MAX_STEPS_PER_ROUND
    return max(1, min(MAX_STEPS_PER_ROUND, math.ceil(ROUND_S / estimate_s)))


def interleaved_rounds(steppers: Mapping[int, Callable[[], float]], *, rounds: int = ROUNDS,
                       warmup: int = WARMUP_STEPS,
                       on_step: Callable[[], None] | None = None,
                       agree: Callable[[float], float] | None = None) -> dict[int, RoundTiming]:
    """Time each batch size's ``stepper`` (one training step; returns its seconds) in
    ``rounds`` interleaved rounds. Round ``r`` visits the sizes rotated by ``r`` places, so no
    size always follows the same one. Each size first gets ``warmup`` untimed steps; the last
    of them sets its steps per round (``steps_per_round``); with more than one step per round,
    one untimed step re-warms a size after the switch (caches, allocator). ``agree`` maps each
    per-round median to the value all ranks use (torchrun: the slowest rank's)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sizes = sorted(steppers)
    if not sizes:
        return {}
    per_round: dict[int, int] = {}
    for b in sizes:
        last = math.nan
        for _ in range(max(1, warmup)):
            last = steppers[b]()
            if on_step:
                on_step()
        per_round[b] = steps_per_round(agree(last) if agree else last)
    medians: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(rounds):
        shift = r % len(sizes)
        for b in sizes[shift:] + sizes[:shift]:
            k = per_round[b]
            if k > 1:
                steppers[b]()
            times = [steppers[b]() for _ in range(k)]
            if on_step:
                on_step()
            value = median(times)
            medians[b].append(agree(value) if agree else value)
    return {b: RoundTiming(b, tuple(medians[b]), per_round[b], summarize_rounds(medians[b]))
            for b in sizes}


def progress_units(n_sizes: int, rounds: int = ROUNDS, warmup: int = WARMUP_STEPS) -> int:
    """How often ``interleaved_rounds`` calls ``on_step`` for ``n_sizes`` batch sizes."""
    return n_sizes * (max(1, warmup) + rounds)


# --------------------------------------------------------------------------- CPU threads


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count where that is
    unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(local_processes: int = 1) -> int:
    """Half of the usable CPUs per local process, at least 1: the step time then does not
    collapse when another process takes a core (measured: docs/benchmarks-sweep.md)."""
    return max(1, usable_cpus() // (2 * max(1, local_processes)))


def oversubscribed(threads: int, local_processes: int = 1) -> str | None:
    """What to say when ``--threads`` asks for more threads than this process's share of the
    usable CPUs (None when it does not)."""
    cpus = usable_cpus()
    if threads * max(1, local_processes) <= cpus:
        return None
    per = " per process" if local_processes > 1 else ""
    return (f"--threads {threads}{per} is more than the {cpus} usable CPU(s): the threads take "
            "turns on the cores, so each step waits for the slowest and a busy core stalls "
            "every step")


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to ``threads`` (None: leave it);
    yields the count in force and restores the previous one afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads is None:
        yield before
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
