"""The ways of finding the largest batch that fits (bsselect measured and simulated, Lightning's
tuner, Accelerate's decorator), run on the same tasks under the same capped CPU "allocator",
for ``bench_probe.py``.

Every run happens inside a session of the stock ``bsselect.memory.capped.CappedCpuAllocator``:
every tensor storage created inside the session (model, optimizer state, batch,
activations, gradients, temporaries) counts while it is alive, and the op that would take the
live total above ``cap`` is refused (its new storage uncounted, as a real allocator never
hands out the block) with ``torch.OutOfMemoryError("CUDA out of memory. ...")``. Lightning
and Accelerate recognise that message as an out-of-memory error (checked against the
installed sources by ``check_oom_recognition``), as they would a real CUDA OOM.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bsselect.device import Budget
from bsselect.errors import DoesNotFitError
from bsselect.memory.capacity import fit_memory, solve_max_batch
from bsselect.memory.capped import CappedCpuAllocator
from bsselect.memory.measured import run_two_steps
from bsselect.memory.probe import Method, run_probe
from bsselect.oom import is_oom_error
from bsselect.task import Task

HUGE = 2**62   # a cap that never bites: pure measurement


# --------------------------------------------------------------------------------------------
# Tasks


class Tiled(Dataset):
    """``base`` repeated to ``length`` items (item i is ``base[i % len(base)]``).

    Lightning's batch-size finder stops growing once the batch reaches the dataset length, and
    a DataLoader yields short batches past it; tiling makes every tool see full batches of any
    size up to ``length`` (8192 is Lightning's default ``max_val``). An item is the base
    dataset's item, so memory per batch is unchanged (for a TensorDataset an item is a view of
    storage made before the session, which the capped counter does not count; bsselect's own
    ``make_batch`` samples with replacement past the dataset length anyway)."""

    def __init__(self, base: Dataset, length: int = 16384) -> None:
        self.base, self.length = base, length
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.base[i % self.n]


def wide_mlp() -> Task:
    """The 'bigger' model: 3 hidden layers of 1024 on the digits (2.2M parameters, AdamW), so
    that parameters + gradients + optimizer state are a large share of the budget."""
    from bsselect.examples.digits import _splits, accuracy

    train, val = _splits((64,))

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
        )

    import torch.nn.functional as F

    return Task(model=model, train_data=train, val_data=val, loss_fn=F.cross_entropy,
                metric=accuracy,
                optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr),
                lr=1e-3, base_batch_size=32)


def make_task(name: str) -> Task:
    from bsselect.task import load_task

    task = wide_mlp() if name == "wide-mlp" else load_task(name)[0]
    task.train_data = Tiled(task.train_data)
    return task


# --------------------------------------------------------------------------------------------
# Ground truth


def fits(task: Task, b: int, cap: int) -> bool:
    """Two real training steps at ``b`` (``run_two_steps``: fresh model, step 1, step 2) run
    inside one capped session without an out-of-memory error."""
    try:
        run_two_steps(task, b, CappedCpuAllocator(cap))
    except torch.OutOfMemoryError:
        return False
    return True


def largest_true(pred: Callable[[int], bool], hi_start: int = 64) -> int:
    """Largest b >= 1 with pred(b), for a monotone predicate: doubling, then exact bisection."""
    if not pred(1):
        return 0
    lo, hi = 1, hi_start
    while pred(hi):
        lo, hi = hi, hi * 2
    return _bisect(pred, lo, hi)


def _bisect(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest b in [lo, hi) with pred(b), given pred(lo) (or lo == 0) and not pred(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_near(pred: Callable[[int], bool], guess: int) -> int:
    """Largest b >= 1 with pred(b) for a monotone predicate, searched outwards from ``guess``
    (steps 1, 2, 4, ...) and then bisected: cheap when the answer is close to the guess."""
    if pred(guess):
        lo, step = guess, 1
        while pred(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi, step = guess, 1
        while hi - step >= 1 and not pred(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)   # 0: nothing below hi known to pass (pred(0) is vacuous)
    return _bisect(pred, lo, hi)


def session_peak(task: Task, b: int) -> tuple[int, int]:
    """(step-2 peak, whole-session peak) of ``run_two_steps`` at ``b``, uncapped."""
    alloc = CappedCpuAllocator(HUGE)
    holder: dict[str, int] = {}
    original = alloc.reset_peak

    def reset_peak() -> None:   # remember the session maximum before step 2 resets it
        holder["before"] = alloc.peak_bytes()
        original()

    alloc.reset_peak = reset_peak  # type: ignore[method-assign]
    step2 = run_two_steps(task, b, alloc)
    return step2, max(step2, holder["before"])


# --------------------------------------------------------------------------------------------
# Independent truth: the CPU allocator's own events, each tool's own loop, no dispatch mode


class _Plain:
    """A backend for ``run_two_steps`` that does nothing: no dispatch mode, no counting (a
    mode changes what autograd allocates: it sums gradients out of place under one)."""

    device = torch.device("cpu")

    def session(self):  # type: ignore[no-untyped-def]
        from contextlib import nullcontext

        return nullcontext()

    def synchronize(self) -> None:
        pass

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0

    def release(self) -> None:
        pass


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes above the starting level that ``fn()`` takes from the CPU allocator, from
    the allocator's own events (the profiler's memory records, as ``memory/cpu_truth.py``
    reads them): every allocation, kernel scratch included, nothing of bsselect's counter."""
    from torch.profiler import ProfilerActivity, profile

    from bsselect.memory.cpu_truth import (_kineto_events, allocator_deltas,
                                           return_freed_memory_to_the_os)

    return_freed_memory_to_the_os()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for _, delta in allocator_deltas(_kineto_events(prof)):
        level += delta
        peak = max(peak, level)
    return peak


def loops(task: Task) -> dict[str, Callable[[int], Any]]:
    """The loop each tool really runs at batch b, outside any capped session: bsselect's
    probe step (fresh model and optimizer, two steps), Lightning's fit loop (the tuner's 3
    steps per trial), Accelerate's decorated function (two steps)."""
    def lightning(b: int) -> None:
        _lightning()
        with tempfile.TemporaryDirectory() as root:
            lit_trainer(root, max_steps=3).fit(lit_module(task, b))

    return {"bsselect": lambda b: run_two_steps(task, b, _Plain()),  # type: ignore[arg-type]
            "Lightning": lightning,
            "Accelerate": lambda b: accelerate_train_fn(task, [])(b)}


def loop_of(tool: str) -> str:
    return tool.split()[0]   # "bsselect simulated (margin 0)" -> bsselect


def allocator_max(loop: Callable[[int], Any], cap: int, guess: int) -> tuple[int, int, int]:
    """(largest b whose allocator peak of ``loop(b)`` is <= ``cap``, its peak, the peak at
    b + 1), searched outwards from ``guess``."""
    peaks: dict[int, int] = {}

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = allocator_peak(lambda: loop(b))
        return peaks[b]

    best = largest_near(lambda b: peak(b) <= cap, guess)
    return best, peak(best) if best else 0, peak(best + 1)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ToolRun:
    tool: str
    found: int
    trials: int                 # batch sizes tried (each a fresh attempt at one size)
    steps: int                  # training steps started (an OOM step counts)
    wall_s: float
    cpu_s: float
    path: list[tuple[int, str]] = field(default_factory=list)   # (batch size, "ok"|"oom")
    extra: dict = field(default_factory=dict)
    error: str | None = None    # the tool gave no answer (found is 0)

    @property
    def largest_ok(self) -> int:
        return max((b for b, outcome in self.path if outcome == "ok"), default=0)


class Forwards:
    """Counts the training steps a tool starts: a copy of the task whose models count their
    top-level forward calls (one per step, whether or not the step then runs out of memory)."""

    def __init__(self, task: Task) -> None:
        self.count = 0

        def model() -> nn.Module:
            net = task.model()
            net.register_forward_pre_hook(self._hook)
            return net

        self.task = dataclasses.replace(task, model=model)

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.count += 1


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# --------------------------------------------------------------------------------------------
# bsselect


def _line_max(result: Any, cap: int, margin: float) -> int:
    """The line's own answer (before any confirmation or refinement), from the probe points."""
    fit = fit_memory([(p.batch_size, p.required_bytes) for p in result.points])
    try:
        return solve_max_batch(cap, margin, fit)
    except DoesNotFitError:
        return 0


def _refine_path(confirmation: Any, sim: bool = False) -> list[tuple[int, str]]:
    """``ProbeResult.confirmation`` as (batch size, outcome): ok | oom (refused) | over (ran,
    but its peak is above the budget after the margin); simulated: sim | sim-over."""
    if sim:
        return [(s["batch_size"], "sim" if s["outcome"] == "ok" else "sim-" + s["outcome"])
                for s in confirmation]
    return [(s["batch_size"], s["outcome"]) for s in confirmation]


def run_bsselect(task: Task, cap: int, margin: float) -> ToolRun:
    """``run_probe`` on the measured path through the stock capped allocator: peaks at the
    default batch sizes (8..128), a line fit, the solve, then real steps that check the line's
    answer where it lands and refine it inside a bracket (``capacity.refine_max_batch``).
    If it gives up (DoesNotFitError), the run is recorded with its time, the tries listed in
    the error, and the answer of the line alone."""
    fw = Forwards(task)
    w0, c0 = _clock()
    try:
        result = run_probe(fw.task, task_name="bench", device=torch.device("cpu"),
                           budget=Budget(cap, "cap"), margin=margin,
                           backend=CappedCpuAllocator(cap))
    except DoesNotFitError as exc:
        w1, c1 = _clock()
        path = [(int(b), o) for b, o in re.findall(r"(\d+) (ok|oom|over)\b", str(exc))]
        return ToolRun(f"bsselect (margin {margin:g})", 0, len(path), fw.count, w1 - w0,
                       c1 - c0, path, {}, error=f"{type(exc).__name__}: {exc}")
    w1, c1 = _clock()
    path = [(p.batch_size, "ok") for p in result.points] + _refine_path(result.confirmation)
    return ToolRun(f"bsselect (margin {margin:g})", result.max_batch, len(path), fw.count,
                   w1 - w0, c1 - c0, path,
                   {"line_max": _line_max(result, cap, margin),
                    "fixed_bytes": result.fixed_bytes,
                    "per_sample_bytes": result.per_sample_bytes})


def run_bsselect_simulated(task: Task, cap: int, margin: float = 0.0) -> ToolRun:
    """``run_probe(method=simulated)``: fake tensors, no backend; the line's answer is checked
    and refined with further simulations (no real step)."""
    w0, c0 = _clock()
    result = run_probe(task, task_name="bench", device=torch.device("cpu"),
                       budget=Budget(cap, "cap"), margin=margin, method=Method.simulated)
    w1, c1 = _clock()
    path = [(p.batch_size, "sim") for p in result.points]
    path += _refine_path(result.confirmation, sim=True)
    return ToolRun(f"bsselect simulated (margin {margin:g})", result.max_batch, len(path), 0,
                   w1 - w0, c1 - c0, path,
                   {"line_max": _line_max(result, cap, margin),
                    "fixed_bytes": result.fixed_bytes,
                    "per_sample_bytes": result.per_sample_bytes})


# --------------------------------------------------------------------------------------------
# PyTorch Lightning


def _lightning():
    import logging

    import lightning.pytorch as pl

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    return pl


def lit_module(task: Task, batch_size: int):
    """A LightningModule wrapping the task's model, loss, optimizer and data, as a user would
    write it: ``batch_size`` attribute for the tuner, ``train_dataloader`` with shuffling."""
    pl = _lightning()

    class LitTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = task.model()
            self.batch_size = batch_size

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return task.loss_fn(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return task.make_optimizer(self.parameters(), task.lr)

        def train_dataloader(self):  # type: ignore[no-untyped-def]
            return DataLoader(task.train_data, batch_size=self.batch_size, shuffle=True,
                              collate_fn=task.collate_fn)

    return LitTask()


def lit_trainer(root: str, **kwargs: Any):
    pl = _lightning()
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
                      default_root_dir=root, num_sanity_val_steps=0, **kwargs)


def run_lightning(task: Task, cap: int, mode: str, init_val: int = 2) -> ToolRun:
    """``Tuner(trainer).scale_batch_size(model, mode=mode, init_val=init_val)`` with every other
    argument at its default (steps_per_trial=3, max_trials=25, margin=0.05 for binsearch,
    max_val=8192). Model, Trainer and search all run inside the capped session; the clock
    covers the ``scale_batch_size`` call only (building the module and Trainer is work a
    Lightning user does anyway)."""
    _lightning()
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.tuner import batch_size_scaling as bss

    path: list[tuple[int, str]] = []
    original = bss._try_loop_run

    def counted(trainer, params):  # type: ignore[no-untyped-def]
        b = trainer.lightning_module.batch_size
        try:
            original(trainer, params)
        except BaseException as exc:
            path.append((b, "oom" if is_oom_error(exc) else "error"))
            raise
        path.append((b, "ok"))

    bss._try_loop_run = counted
    alloc = CappedCpuAllocator(cap)
    fw = Forwards(task)
    try:
        with tempfile.TemporaryDirectory() as root, alloc.session():
            module = lit_module(fw.task, init_val)
            trainer = lit_trainer(root)
            tuner = Tuner(trainer)
            w0, c0 = _clock()
            found = tuner.scale_batch_size(module, mode=mode, init_val=init_val)
            w1, c1 = _clock()
            del module, trainer, tuner
    finally:
        bss._try_loop_run = original
    return ToolRun(f"Lightning {mode}", int(found), len(path), fw.count, w1 - w0, c1 - c0, path)


def lightning_loop_fits(task: Task, b: int, cap: int, steps: int = 3) -> bool:
    """Whether Lightning's own fit loop (the one the tuner's trials run) gets through ``steps``
    steps at batch ``b`` under ``cap``: the largest such b is the best any search over
    Lightning trials can find."""
    _lightning()
    alloc = CappedCpuAllocator(cap)
    try:
        with tempfile.TemporaryDirectory() as root, alloc.session():
            module = lit_module(task, b)
            trainer = lit_trainer(root, max_steps=steps)
            trainer.fit(module)
    except torch.OutOfMemoryError:
        return False
    return True


def lightning_loop_peak(task: Task, b: int, steps: int = 3) -> int:
    _lightning()
    alloc = CappedCpuAllocator(HUGE)
    with tempfile.TemporaryDirectory() as root, alloc.session():
        module = lit_module(task, b)
        trainer = lit_trainer(root, max_steps=steps)
        trainer.fit(module)
        peak = alloc.peak_bytes()
        del module, trainer
    return peak


# --------------------------------------------------------------------------------------------
# Accelerate


def accelerate_train_fn(task: Task, sizes: list[int]):
    """The function a user decorates: fresh model and optimizer, a DataLoader at
    ``batch_size``, two training steps (zero_grad after the step, the common loop)."""

    def train(batch_size: int) -> int:
        sizes.append(batch_size)
        torch.manual_seed(0)
        model = task.model()
        optimizer = task.make_optimizer(model.parameters(), task.lr)
        loader = DataLoader(task.train_data, batch_size=batch_size, shuffle=True,
                            collate_fn=task.collate_fn)
        for i, (x, y) in enumerate(loader):
            loss = task.loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i == 1:
                break
        return batch_size

    return train


def run_accelerate(task: Task, cap: int, start: int) -> ToolRun:
    """``accelerate.utils.find_executable_batch_size(starting_batch_size=start)`` around two
    training steps; on an OOM it retries at ``int(0.9 * b)`` (the installed 1.15.0; releases
    before accelerate PR #3650 halved)."""
    from accelerate.utils import find_executable_batch_size

    sizes: list[int] = []
    alloc = CappedCpuAllocator(cap)
    fw = Forwards(task)
    with alloc.session():
        decorated = find_executable_batch_size(accelerate_train_fn(fw.task, sizes),
                                               starting_batch_size=start)
        w0, c0 = _clock()
        found = decorated()
        w1, c1 = _clock()
    path = [(b, "oom") for b in sizes[:-1]] + [(sizes[-1], "ok")]
    return ToolRun("Accelerate", found, len(sizes), fw.count, w1 - w0, c1 - c0, path)


def accelerate_peak(task: Task, b: int) -> int:
    sizes: list[int] = []
    alloc = CappedCpuAllocator(HUGE)
    with alloc.session():
        accelerate_train_fn(task, sizes)(b)
        peak = alloc.peak_bytes()
    return peak


# --------------------------------------------------------------------------------------------
# Sanity checks


def check_oom_recognition() -> dict[str, bool]:
    """The capped allocator's error, as each tool's own OOM test sees it."""
    from accelerate.utils.memory import should_reduce_batch_size
    from lightning.pytorch.utilities.memory import is_oom_error as lightning_is_oom

    try:
        with CappedCpuAllocator(0).session():
            torch.ones(4)
    except torch.OutOfMemoryError as exc:
        err = exc
    else:  # pragma: no cover
        raise AssertionError("a zero cap did not raise")
    return {"bsselect": is_oom_error(err), "lightning": lightning_is_oom(err),
            "accelerate": should_reduce_batch_size(err)}


def versions() -> dict[str, str]:
    import platform
    import subprocess

    import accelerate
    import lightning

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no",
                                "--", "bsselect"], capture_output=True, text=True).stdout.strip()
        commit += " (bsselect/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"bsselect": commit, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "accelerate": accelerate.__version__,
            "cpus": str(os.cpu_count()), "threads": str(torch.get_num_threads())}
