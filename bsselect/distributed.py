"""Data-parallel runs under ``torchrun``: one process per device, all in one process group.

``torchrun --nproc-per-node N -m bsselect probe|sweep|noise ...`` starts N copies of bsselect
with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. ``setup`` sees them, joins
the group (nccl on CUDA, gloo on the CPU), gives each rank its own device and silences every
rank but 0, which alone prints results and writes the sweep journal. Without those variables
every helper here is a no-op, so a single process behaves exactly as before.

Batch sizes (docs/multi-gpu.md): the **per-device batch** is what one rank puts through its
model; the **global batch** = per-device batch x world size x accumulation steps is what one
optimizer step averages over. probe answers per device (memory is per device); sweep's trial
batch sizes are global (learning rate, noise scale and b_opt are about the global batch);
noise's b_small is per device and b_big global.

Collectives must be called in the same order on every rank, or the group hangs. So a rank never
leaves a step alone: local work runs inside ``agreement()``, which all-reduces an ok/failed flag
and makes every rank raise together when one failed (an OOM on one GPU becomes an OOM trial on
all). The one gap is an OOM on *some* ranks in the middle of DDP's backward, where DDP's own
bucket all-reduces are in flight; a trial's first, untimed steps (where OOMs show up) therefore
run ``train_step(careful=True)``: backward without DDP's overlap, gradients averaged after the
agreement. The process-group timeout (``BSSELECT_DIST_TIMEOUT``) bounds the rest.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import BsselectError, TaskError, UsageError
from .oom import is_oom_error

T = TypeVar("T")

TIMEOUT_ENV = "BSSELECT_DIST_TIMEOUT"   # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 600
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_comm_device = torch.device("cpu")      # where flags and sums live: the device for nccl


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def detect(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The torchrun launch this process is part of, or None when started on its own."""
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [v for v in _LAUNCH_VARS if v not in environ]
    if missing:
        raise UsageError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} not; start "
                         "bsselect with torchrun (docs/multi-gpu.md), or unset RANK and WORLD_SIZE")
    try:
        launch = Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                        int(environ["LOCAL_RANK"]),
                        int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= launch.rank < launch.world_size:
        raise UsageError(f"RANK {launch.rank} is not below WORLD_SIZE {launch.world_size}")
    return launch


def backend_for(device: torch.device) -> str:
    return {"cuda": "nccl", "xpu": "xccl"}.get(device.type, "gloo")


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (if launched by it) and return this rank's device:
    ``cuda:LOCAL_RANK`` for an accelerator, the CPU as it was."""
    global _comm_device
    launch = detect()
    if launch is None:
        return device
    if device.type not in ("cpu", "meta"):
        device = torch.device(device.type, launch.local_rank)
        torch.accelerator.set_device_index(launch.local_rank)
    if not dist.is_initialized():
        backend = backend_for(device)
        dist.init_process_group(backend, timeout=_timeout())
        atexit.register(_teardown)
        _comm_device = device if backend != "gloo" else torch.device("cpu")
    if launch.rank != 0:
        _quiet()
    return device


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None


TEARDOWN_WAIT_S = 10.0  # how long a rank waits at exit for the others (gloo only)
TEARDOWN_DRAIN_S = 0.5  # rank 0, after that barrier, before it closes its connections


def _teardown() -> None:
    """Leave the process group at exit. On gloo, first wait (briefly) for the other ranks:
    a rank that destroys the group while another is still in its last collective can abort
    the other ("terminate called without an active exception"). A bounded wait, because
    after an agreed failure the others may have gone already; NCCL has no bounded barrier."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=TEARDOWN_WAIT_S))
        except Exception:  # noqa: BLE001 - a rank already gone: nothing left to wait for
            pass
        if dist.get_rank() == 0:
            # Rank 0 sends the barrier's last messages; closing its connections at once
            # still aborted a peer reading them, once in ~30 CI runs (SIGABRT, "terminate
            # called without an active exception"). Let them drain first.
            time.sleep(TEARDOWN_DRAIN_S)
    dist.destroy_process_group()


teardown = _teardown  # for scripts that init their own gloo group (tests' and benchmarks' drivers)


def _quiet() -> None:
    """Ranks other than 0 print no results and no progress (errors still: see cli_boundary.guarded)."""
    from . import report

    report.console.quiet = True
    report.out.quiet = True
    sys.stdout = open(os.devnull, "w")  # emit_json writes here
    if report.json_stream is not None:  # --json: the document goes to rank 0's stdout only
        report.json_stream = sys.stdout


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def host_share(total_bytes: int) -> tuple[int, str]:
    """Host RAM per rank: the ranks of one node share it."""
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1
    return total_bytes // share, (f" / {share} ranks on this node" if share > 1 else "")


# --- collectives ------------------------------------------------------------------------------

def sum_(tensors: Sequence[torch.Tensor]) -> None:
    """All-reduce (SUM) each tensor in place, e.g. gradient sums; no-op in one process."""
    if not active():
        return
    for t in tensors:
        if t.device == _comm_device:
            dist.all_reduce(t)
        else:  # e.g. an MPS tensor with gloo
            moved = t.to(_comm_device)
            dist.all_reduce(moved)
            t.copy_(moved)


def sum_floats(*values: float) -> tuple[float, ...]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def max_float(value: float) -> float:
    """The maximum of ``value`` over ranks (all_reduce MAX)."""
    return float(_reduce_scalar(value, torch.float64, dist.ReduceOp.MAX))


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def agree_min(value: int) -> int:
    """The minimum of ``value`` over ranks (all_reduce MIN)."""
    return int(_reduce_scalar(value, torch.int64, dist.ReduceOp.MIN))


def _reduce_scalar(value: float, dtype: torch.dtype, op: Any) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=dtype, device=_comm_device)
    dist.all_reduce(t, op=op)
    return t.item()


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result, or its BsselectError, on every rank."""
    if not active():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except BsselectError as exc:
            outcome = ("error", exc)
    kind, value = from_main(outcome)
    if kind == "error":
        raise value
    return value


# --- failure agreement ------------------------------------------------------------------------

def _report(exc: BaseException | None) -> tuple[bool, type | None, str] | None:
    """(is an OOM, its BsselectError class or None, first line of its message)."""
    if exc is None:
        return None
    cls = type(exc) if isinstance(exc, BsselectError) else None
    lines = str(exc).strip().splitlines()
    return is_oom_error(exc), cls, lines[0] if lines else type(exc).__name__


def _agree(exc: BaseException | None, payload: torch.Tensor | None = None
           ) -> torch.Tensor | None:
    """One all-reduce of [failed, *payload]: raise on every rank if any failed, else return
    the payload summed over ranks. Called by every rank at the same point."""
    values = [torch.tensor([float(exc is not None)], dtype=torch.float64, device=_comm_device)]
    if payload is not None:
        values.append(payload.detach().reshape(-1).to(_comm_device, torch.float64))
    flat = torch.cat(values)
    dist.all_reduce(flat)
    if flat[0].item() == 0:
        return flat[1:] if payload is not None else None
    reports = gather(_report(exc))
    failed = next(r for r, report in enumerate(reports) if report is not None)
    oom, cls, message = reports[failed]  # type: ignore[misc]
    text = f"rank {failed}: {message}"
    if oom:  # every rank records the same OOM, so a sweep's trial reads the same everywhere
        raise torch.OutOfMemoryError(text) from exc
    if failed == rank() and exc is not None:
        raise exc
    raise (cls or TaskError)(text) from exc


class agreement:
    """``with agreement(): <local work, no collectives>`` — every rank learns whether any rank
    failed inside; if one did, all raise: an OOM as ``torch.OutOfMemoryError("rank r: ...")``
    everywhere, another error as itself on its rank and as the same BsselectError class (else
    TaskError) on the others. KeyboardInterrupt and friends are not agreed: they stop the run."""

    def __enter__(self) -> "agreement":
        return self

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: Any) -> bool:
        if not active() or (exc is not None and not isinstance(exc, Exception)):
            return False
        _agree(exc)
        return False


def agreed(fn: Callable[..., T], *args: Any) -> T:
    with agreement():
        return fn(*args)


def agree_meter(meter: Any) -> Any:
    """probe's Meter with every measurement (the probed points and the refinement's steps)
    agreed across ranks, so an OOM on one rank counts as an OOM on all."""
    if active():
        peak = meter.peak
        # The largest peak over ranks: every rank then takes the same decisions (fits / does
        # not) in the refinement, so the ranks' collectives stay in step.
        meter.peak = lambda b: int(max_float(float(agreed(peak, b))))
    return meter


def journal_settings() -> dict[str, Any]:
    """Part of a sweep journal's resume key under torchrun: trials at another world size
    (other per-device batches, other step times) are not the same trials."""
    return {"world_size": world_size()} if active() else {}


def agree_trial(result: T) -> T:
    """One trial result for every rank: rank 0's, or the first rank's that did not end "ok"
    when ranks disagree (they should not: every failure inside a trial is agreed)."""
    if not active():
        return result
    results: list[Any] = gather(result)
    if len({r.status for r in results}) == 1:
        return results[0]
    return next(r for r in results if r.status.value != "ok")


# --- data-parallel training -------------------------------------------------------------------

def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (the module itself in one process).

    ``gradient_as_bucket_view=True``: gradients live in DDP's buckets, so a DDP step needs no
    second copy of them and probe's per-device numbers hold (with DDP's default False, add the
    parameter bytes once more)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def per_device(batch_size: int, what: str = "batch size") -> int:
    """The per-device share of a global batch; UsageError unless it divides evenly."""
    world = world_size()
    if batch_size % world:
        raise UsageError(f"{what} {batch_size} is not a multiple of the world size {world}; "
                         f"global batches are per-device batch x {world} ranks")
    return batch_size // world


def cycle_shards(data: Dataset, batch_size: int, seed: int, collate_fn: Any) -> Iterator[Any]:
    """This rank's per-device batches of global ``batch_size``, forever, from a
    DistributedSampler (reshuffled each epoch; every rank gets the same number of batches)."""
    sampler = DistributedSampler(data, num_replicas=world_size(), rank=rank(), shuffle=True,
                                 seed=seed)
    drop_last = len(data) >= batch_size  # type: ignore[arg-type]
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        epoch += 1
        yield from DataLoader(data, batch_size=per_device(batch_size), sampler=sampler,
                              drop_last=drop_last, collate_fn=collate_fn)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (the whole in one process)."""
    world, r = world_size(), rank()
    n = len(items)
    return items[r * n // world:(r + 1) * n // world]


def shard_dataset(data: Dataset) -> Dataset:
    """Every ``world``-th item from ``rank`` on, for evaluation summed over ranks."""
    if not active():
        return data
    return Subset(data, range(rank(), len(data), world_size()))  # type: ignore[arg-type]


def seed_rank(seed: int) -> None:
    """Per-rank global RNG (dropout masks), so that ranks' sub-batches are independent."""
    if active():
        torch.manual_seed(seed * 1_000_003 + rank() + 1)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Mean of ``.grad`` over ranks, in place — what DDP's backward does, done afterwards.
    One all-reduce per tensor: no flat copy, so no memory beyond DDP's own."""
    grads = [p.grad for p in params if p.grad is not None]
    sum_(grads)
    for g in grads:
        g.div_(world_size())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, task: Any, x: Any, y: Any,
               *, careful: bool = True, **options: Any) -> torch.Tensor:
    """Forward, loss, backward, optimizer step; the loss averaged over ranks (so every rank
    takes the same decisions from it). In one process: ``step.train_step``, which also takes
    ``options`` (precision, scaler, accumulate, next_micro_batch); under DDP they must be the
    defaults for now.

    Under DDP a failure anywhere on any rank is agreed before the next collective. With
    ``careful`` the backward runs under ``no_sync`` (local), the failure flag is agreed, then
    the gradients are averaged; otherwise DDP overlaps its all-reduce with the backward, which
    is what training does and so what a timed step must measure."""
    from .step import train_step as local_step

    if not active():
        return local_step(model, optimizer, task, x, y, **options)
    if options.get("accumulate", 1) > 1 or options.get("scaler") is not None or \
            getattr(options.get("precision"), "value", "fp32") != "fp32":
        raise UsageError("--precision and --accumulate are not supported under torchrun yet")
    optimizer.zero_grad(set_to_none=True)
    failure: Exception | None = None
    loss = torch.zeros(())
    scale = _unit_scale(task, y)
    if careful:
        with agreement(), model.no_sync():  # type: ignore[operator]
            loss = task.loss_fn(model(x), y) * scale
            loss.backward()
        average_gradients([p for p in model.parameters() if p.requires_grad])
    else:
        with agreement():
            loss = task.loss_fn(model(x), y) * scale
    try:
        if not careful:
            loss.backward()
        from .step import clip_gradients

        clip_gradients(model, optimizer, task)  # after the average, as DDP's own loop does
        optimizer.step()
    except Exception as exc:  # noqa: BLE001 - agreed below, then raised on every rank
        failure = exc
    total = _agree(failure, loss.detach())
    assert total is not None
    return (total[0] / world_size()).to(loss.device, loss.dtype)


def _unit_scale(task: Any, y: Any) -> float:
    """With ``Task.loss_weight`` (a mean over tokens, say): this rank's loss factor
    ``w_r * world / sum of w`` so that DDP's mean over ranks is the global batch's mean over
    its units, as one process would train on it (and the HF Trainer's
    ``average_tokens_across_devices``); 1 otherwise, and when some rank holds no unit (its
    mean is 0/0: the step stays the ranks' plain mean)."""
    if getattr(task, "loss_weight", None) is None:
        return 1.0
    from .task import loss_units

    with agreement():
        w = loss_units(task, y)
    total, empty = sum_floats(w, float(w == 0))
    return w * world_size() / total if total > 0 and not empty else 1.0


# --- output: which batch is which ----------------------------------------------------------

def batch_fields(per_device_batch: int | None, accumulation_steps: int = 1) -> dict[str, Any]:
    """JSON siblings under torchrun: ``world_size``, ``per_device_batch``,
    ``accumulation_steps``, ``global_batch`` (= their product); {} in one process."""
    if not active():
        return {}
    world = world_size()
    global_batch = None if per_device_batch is None else (
        per_device_batch * world * accumulation_steps)
    return {"world_size": world, "per_device_batch": per_device_batch,
            "accumulation_steps": accumulation_steps, "global_batch": global_batch}


def probe_json(data: dict[str, Any]) -> dict[str, Any]:
    """probe's numbers are per device; add the global batch they make."""
    extra = batch_fields(data["max_batch"])
    if extra:
        extra["global_batch_pow2"] = data["max_batch_pow2"] * extra["world_size"]
    return {**data, **extra}


def noise_json(data: dict[str, Any]) -> dict[str, Any]:
    """noise: b_small is the per-device batch, b_big the global batch."""
    world = world_size()
    return {**data, **batch_fields(data["b_small"], data["b_big"] // (data["b_small"] * world))}


def sweep_json(data: dict[str, Any]) -> dict[str, Any]:
    """sweep: trial batch sizes are global; each trial gains its per-device batch."""
    if not active():
        return data
    world = world_size()
    trials = [{**t, "per_device_batch": t["batch_size"] // world} for t in data["trials"]]
    rec = data.get("recommended_batch_size")
    return {**data, "trials": trials, **batch_fields(rec // world if rec else None)}


def describe(command: str, data: dict[str, Any]) -> str | None:
    """One line under the human table saying which batch is which; None in one process."""
    if not active():
        return None
    w = world_size()
    if command == "probe":
        b = data["max_batch"]
        return (f"per device (each of {w} ranks): max batch {b}; global batch = {b} x {w} "
                f"ranks = {b * w} (largest power of two per device: {data['max_batch_pow2']} "
                f"-> {data['max_batch_pow2'] * w} global)")
    if command == "noise":
        k = data["b_big"] // (data["b_small"] * w)
        return (f"b_small {data['b_small']} is the per-device batch; b_big {data['b_big']} = "
                f"{data['b_small']} x {w} ranks x {k} accumulation steps is the global batch "
                "(data-parallel estimate, McCandlish et al. 2018 App. A.1)")
    per = ", ".join(str(b // w) for b in data["batch_sizes"])
    rec = data.get("recommended_batch_size")
    return (f"batch sizes are global = per-device batch x {w} ranks (per device: {per})"
            + (f"; recommended: {rec // w} per device" if rec else ""))
