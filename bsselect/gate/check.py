"""``check``: will this batch fit on that device? A CI gate that needs no GPU.

The step is simulated on the ``meta`` device (no parameter is ever allocated), the target's
terms are added, and the result is compared with the budget after the margin.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import CannotSimulate, DoesNotFitError, UsageError, first_line, parse_choice
from ..memory.capacity import (MAX_BATCH_SIZE, check_margin, fit_memory, largest_pow2_at_most,
                               usable_bytes)
from ..memory.inputs import InputMode
from ..memory.targets import Target, Term, cuda_terms
from ..precision import Precision
from ..step import StepSettings, tokens_per_sample
from ..task import Task
from ..units import json_document, parse_size

if TYPE_CHECKING:
    from ..memory.inputs import InputScan

GiB, MiB = 2**30, 2**20

# Total device memory as the driver reports it (nvidia-smi "MiB" total). The CUDA context is
# NOT subtracted here: with --target cuda it is its own term, so it shows in the output.
PRESETS: dict[str, tuple[int, str]] = {
    "a100-40gb": (40_960 * MiB, "NVIDIA A100 40GB (SXM/PCIe)"),
    "a100-80gb": (81_920 * MiB, "NVIDIA A100 80GB"),
    "h100-80gb": (81_559 * MiB, "NVIDIA H100 80GB HBM3 (SXM/PCIe)"),
    "h100-94gb": (95_830 * MiB, "NVIDIA H100 NVL 94GB"),
    "h200-141gb": (143_771 * MiB, "NVIDIA H200 141GB"),
    "l4-24gb": (23_034 * MiB, "NVIDIA L4"),
    "l40s-48gb": (46_068 * MiB, "NVIDIA L40S"),
    "a10g-24gb": (23_028 * MiB, "NVIDIA A10G (AWS g5)"),
    "rtx4090-24gb": (24_564 * MiB, "NVIDIA GeForce RTX 4090"),
    "rtx3090-24gb": (24_576 * MiB, "NVIDIA GeForce RTX 3090"),
    "v100-16gb": (16_160 * MiB, "NVIDIA V100 16GB"),
    "v100-32gb": (32_510 * MiB, "NVIDIA V100 32GB"),
    "t4-16gb": (15_360 * MiB, "NVIDIA T4"),
}
HOPPER = {"h100-80gb", "h100-94gb", "h200-141gb"}


@dataclass(frozen=True)
class CheckConfig:
    """Settings after merging ``[tool.bsselect]`` in pyproject.toml under the CLI options."""

    task: str | None
    batch_size: int
    budget_bytes: int
    budget_source: str
    margin: float
    target: Target
    hopper: bool | None = None       # sm90+ (workspaces); None: GPU not named
    precision: Precision = Precision.fp32
    accumulate: int = 1              # batch_size is the micro-batch; it trains on batch x this
    inputs: InputMode = InputMode.worst_case
    shard: Any = None                # memory.sharded.ShardPlan: one rank of a sharded run


@dataclass(frozen=True)
class CheckResult:
    task: str
    fits: bool
    batch_size: int
    required_bytes: int
    budget_bytes: int
    usable_bytes: int
    margin: float
    headroom_bytes: int       # usable - required (negative: over by that much)
    headroom_pct: float       # headroom as a percentage of usable
    max_batch: int            # largest batch that fits (0: none), checked by simulation
    max_batch_pow2: int
    peak_bytes: int           # simulated step peak, before the target's terms
    target: str
    budget_source: str
    terms: tuple[Term, ...]
    precision: str = "fp32"
    accumulate: int = 1
    optimizer_impl: str | None = None
    parameter_dtype: str = "float32"  # of the trainable parameters, as simulated
    inputs: str = "typical"
    largest_item_elements: int | None = None
    items_scanned: int = 0
    uniform_items: bool | None = None
    inputs_note: str = ""
    max_batch_checked: tuple[str, ...] = ()  # the simulations that checked max_batch
    max_batch_exact: bool = True  # False: the search stopped early; max_batch is a lower bound
    max_batch_stop: str | None = None  # why, where a larger batch could not be simulated
    # Sharded runs and activation checkpointing (memory.sharded.ShardPlan.describe()); the
    # per-rank terms of the step's peak; what checkpointing saves at this batch size.
    sharding: str = ""
    shard_ranks: int = 1                  # ranks the model is sharded over (FSDP2)
    rank_terms: tuple[tuple[str, int], ...] = ()
    checkpointing_saves_bytes: int | None = None
    tokens_per_sample: int | None = None  # a token batch's sequence length (LM tasks)
    train_items: int | None = None  # the task's training set (None: it has no len())

    @property
    def data_note(self) -> str | None:
        """What the training set says about a batch that memory allows: a batch (micro-batch
        x accumulation) above it never occurs in training, and a largest fitting batch that
        reaches it is not limited by memory."""
        n = self.train_items
        if n is None:
            return None
        ranks = self.shard_ranks
        trained = self.batch_size * self.accumulate * ranks
        items = f"{n:,} training item{'s' if n != 1 else ''}"
        if trained > n:
            parts = [str(self.batch_size)] + ([f"{self.accumulate} accumulated"]
                                              if self.accumulate > 1 else []) + (
                [f"{ranks} ranks"] if ranks > 1 else [])
            what = (f"batch {trained:,} ({' x '.join(parts)})" if len(parts) > 1
                    else f"batch {trained:,}")
            return (f"{what} is more than the task's {items}: every step would see at most "
                    f"{n:,} (the memory answer is for {self.batch_size} items per micro-batch"
                    f"{' and rank' if ranks > 1 else ''} as asked)")
        if self.max_batch * self.accumulate * ranks >= n:
            return (f"the largest batch that fits reaches the task's {items}: memory does not "
                    "limit the batch here, the data does")
        return None

    def to_json(self) -> dict:
        # batch_size is the micro-batch that must fit; the effective batch is what trains.
        return json_document(dict(
            asdict(self), terms=[asdict(t) for t in self.terms], micro_batch=self.batch_size,
            effective_batch=self.batch_size * self.accumulate,
            global_batch=self.batch_size * self.accumulate * self.shard_ranks,
            data_note=self.data_note))

    def to_dict(self) -> dict:
        """The ``--json`` output (``to_json``'s name in the Python API)."""
        return self.to_json()


def resolve_budget(memory: str | None, preset: str | None) -> tuple[int, str, bool | None]:
    """(bytes, source, is_hopper) from exactly one of --memory / --device-preset; is_hopper is
    None (unknown GPU) with --memory."""
    if memory and preset:
        raise UsageError("give --memory or --device-preset, not both")
    if preset is not None and not isinstance(preset, str):
        raise UsageError(f"--device-preset must be a preset name such as 'h100-80gb', got "
                         f"{preset!r}")
    if preset:
        key = preset.lower()
        if key not in PRESETS:
            raise UsageError(f"unknown --device-preset {preset!r}; known: {', '.join(PRESETS)}")
        size, name = PRESETS[key]
        return size, f"{key} ({name})", key in HOPPER
    if memory:
        return parse_size(memory), "--memory", None
    raise UsageError("check needs the device's memory: --memory 80GiB or --device-preset "
                     "a100-80gb (or memory/device_preset in [tool.bsselect] of pyproject.toml)")


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,), "batch_size": (int,), "memory": (str, int, float), "device_preset": (str,),
    "margin": (int, float), "target": (str,), "precision": (str,), "accumulate": (int,),
    "inputs": (str,), "shard": (str,), "world_size": (int,), "shard_unit": (str,),
    "reshard_after_forward": (bool,), "activation_checkpointing": (bool,)}


def read_pyproject(path: Path, required: bool = False) -> dict[str, Any]:
    """``[tool.bsselect]`` of ``path`` ({} when the file or the table is absent; a missing
    file is a UsageError when ``required``, i.e. named with --config). Every key is checked
    for its type, with a message that names the file and the key."""
    if not path.is_file():
        if required:
            raise UsageError(f"--config {str(path)!r} does not exist")
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise UsageError(f"[tool] in {path} must be a table, got {tool!r}")
    table = tool.get("bsselect", {})
    if not isinstance(table, dict):
        raise UsageError(f"[tool.bsselect] in {path} must be a table (a [tool.bsselect] "
                         f"section), got bsselect = {table!r}")
    known = set(_KEY_TYPES)
    unknown = set(table) - known
    if unknown:
        raise UsageError(f"[tool.bsselect] in {path}: unknown key(s) {sorted(unknown)}; "
                         f"known: {sorted(known)}")
    for key, value in table.items():
        types = _KEY_TYPES[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = {str: "a string", int: "an integer", float: "a number",
                     bool: "true or false"}
            want = " or ".join(names[t] for t in types
                               if not (t is int and float in types))  # a number covers it
            raise UsageError(f"[tool.bsselect] in {path}: {key} must be {want}, got {value!r}")
    task = table.get("task")
    if isinstance(task, str) and ":" in task:  # a task file is relative to this file's folder
        file_part, _, function = task.rpartition(":")
        here = path.parent.resolve() == Path.cwd().resolve()
        if file_part.endswith(".py") and not Path(file_part).is_absolute() and not here:
            table = {**table, "task": f"{path.parent / file_part}:{function}"}
    return table


def merge_config(cli: dict[str, Any], file: dict[str, Any],
                 source: str = "pyproject.toml") -> CheckConfig:
    """CLI options win over ``[tool.bsselect]``; the file (``source``, named in messages)
    fills what the CLI left out."""
    def pick(name: str, default: Any = None) -> Any:
        return cli[name] if cli.get(name) is not None else file.get(name, default)

    batch = pick("batch_size")
    if batch is None:
        raise UsageError(f"check needs --batch-size (or batch_size in [tool.bsselect] of "
                         f"{source})")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH_SIZE:
        raise UsageError(f"batch size must be an integer from 1 to {MAX_BATCH_SIZE:,}, got "
                         f"{batch!r}")
    def named(keys: Sequence[str], call: Callable[[], Any]) -> Any:
        """``call()``; its usage error, whose text names CLI flags, also says which of
        ``keys`` came from the file (review: a pyproject value was reported as a flag)."""
        try:
            return call()
        except UsageError as exc:
            text = str(exc)  # only the keys the message is about (review: precision was
            own = [k for k in keys if cli.get(k) is None and file.get(k) is not None  # named
                   and ("--" + k.replace("_", "-") in text or k in text)]  # for --world-size)
            if not own:
                raise
            raise UsageError(f"{exc} ({', '.join(own)} from [tool.bsselect] in {source})"
                             ) from None

    memory, preset = cli.get("memory"), cli.get("device_preset")
    if memory is None and preset is None:
        memory, preset = file.get("memory"), file.get("device_preset")
    size, budget_source, hopper = named(("memory", "device_preset"),
                                        lambda: resolve_budget(memory, preset))
    if budget_source == "--memory" and cli.get("memory") is None:
        budget_source = f"memory in {source}"  # not a flag the user passed (review)
    margin = named(("margin",), lambda: check_margin(float(pick("margin", 0.2))))
    if cli.get("target") is None and cli.get("device_preset") is not None:
        target_name = "cuda"  # the flag's "implies --target cuda" wins over the file's target
    else:
        target_name = pick("target", "cuda" if preset else "same")
    target = parse_choice(Target, target_name, "target")
    if preset and target is Target.same:
        where = "--target same" if cli.get("target") else f"target = \"same\" in {source}"
        named_preset = (f"--device-preset {preset}" if cli.get("device_preset") else
                        f"device_preset = \"{preset}\" in {source}")
        raise UsageError(
            f"{named_preset} is a GPU, and {where} would check this machine's CPU "
            "step against its memory (CPU kernels, no CUDA context, workspaces or "
            "fragmentation): leave the target out, as the preset implies --target cuda")
    from ..run_options import check_accumulate, shard_plan

    accumulate = check_accumulate(pick("accumulate", 1), "accumulate")
    if batch * accumulate > MAX_BATCH_SIZE:
        raise UsageError(f"batch size {batch} x accumulate {accumulate} is an effective batch of "
                         f"{batch * accumulate:,}, more than the largest batch "
                         f"({MAX_BATCH_SIZE:,}); check the numbers")

    precision = pick("precision", "fp32")
    plan = named(("shard", "world_size", "shard_unit", "reshard_after_forward",
                  "activation_checkpointing", "precision"),
                 lambda: shard_plan(pick("shard"), pick("world_size"), pick("shard_unit"),
                                    pick("reshard_after_forward"),
                                    pick("activation_checkpointing"), precision))
    return CheckConfig(pick("task"), batch, size, budget_source, margin, target, hopper,
                       precision=parse_choice(Precision, precision, "precision"),
                       accumulate=accumulate,
                       inputs=parse_choice(InputMode, pick("inputs", "worst-case"), "inputs"),
                       shard=plan)


def _required(peak: int, rounded: int | None, config: CheckConfig, uses_cudnn: bool,
              recomputes: bool = False) -> tuple[int, list[Term]]:
    if config.target is Target.same:
        return peak, []
    terms = cuda_terms(peak, rounded, uses_cudnn, hopper=config.hopper, budget_is_total=True,
                       recomputes=recomputes)
    return peak + sum(t.bytes for t in terms), terms


def run_check(task: Task, task_name: str, config: CheckConfig,
              inputs: "InputScan | None" = None) -> CheckResult:
    """Simulate the step at the requested batch (and one more size for the line through
    which the largest fitting batch is solved), with the config's precision and accumulation,
    on ``inputs`` (the largest items for worst-case inputs; None: random items)."""
    from ..memory.probe import model_uses_cudnn, step_fields
    from ..memory.simulated import simulate_step_peak

    b = config.batch_size
    other = b // 2 if b >= 16 else 2 * max(b, 8)
    uses_cudnn = config.target is not Target.same and model_uses_cudnn(task)
    # CPU kernels' internal scratch (oneDNN layouts) applies only when the target is this CPU.
    scratch = config.target is Target.same
    settings = StepSettings(config.precision, config.accumulate,
                            None if config.target is Target.same else config.target.value,
                            shard=config.shard)
    steps = {b: simulate_step_peak(task, b, kernel_workspace=scratch, settings=settings,
                                   inputs=inputs)}
    # The line's second point; above b it may be a batch the simulation cannot run (the
    # answer for b stands: review), then one below b.
    unrun = None
    for n in [other] + ([b // 2] if other > b and b >= 2 else []):
        try:
            steps[n] = simulate_step_peak(task, n, kernel_workspace=scratch,
                                          settings=settings, inputs=inputs)
            break
        except CannotSimulate as exc:
            unrun = (n, first_line(exc) or type(exc).__name__)
    recomputes = steps[b].recomputes
    req = {n: _required(s.peak_bytes, s.rounded_peak_bytes, config, uses_cudnn, recomputes)
           for n, s in steps.items()}
    required, terms = req[b]
    usable = int(usable_bytes(config.budget_bytes, config.margin))
    from ..memory.capacity import (SIMULATED_TRIES, RefineResult, SearchStep, refine_max_batch,
                                   solve_max_batch)

    guess = 0
    if len(steps) > 1:
        try:
            guess = solve_max_batch(config.budget_bytes, config.margin,
                                    fit_memory([(n, r) for n, (r, _) in req.items()],
                                               min_batch=1))
        except DoesNotFitError:
            pass

    def required_at(n: int) -> int:
        step = simulate_step_peak(task, n, kernel_workspace=scratch, settings=settings,
                                  inputs=inputs)
        return _required(step.peak_bytes, step.rounded_peak_bytes, config, uses_cudnn,
                         recomputes)[0]

    # The two-point line is only piecewise right: the largest batch that fits is checked by
    # simulating it where the line lands and refined inside a bracket, as the probe does.
    if len(steps) > 1:
        refined = refine_max_batch(required_at, usable, [(n, r) for n, (r, _) in req.items()],
                                   max(guess, 1), max_jump=2**40, max_tries=SIMULATED_TRIES,
                                   stops=(CannotSimulate,))
    else:  # no line: the batch asked about is all that is known
        assert unrun is not None
        fits = required <= usable
        refined = RefineResult(b if fits else 0, (SearchStep(unrun[0], "unsimulated"),),
                               exact=not fits, stop=unrun[1] if fits else None)
    best = refined.batch_size
    headroom = usable - required
    saves = None
    if config.shard is not None and config.shard.checkpointing:  # what it saves, here
        without = simulate_step_peak(
            task, b, kernel_workspace=scratch, inputs=inputs,
            settings=dataclasses.replace(settings, shard=dataclasses.replace(
                config.shard, checkpointing=False) if config.shard.fsdp else None))
        saves = without.peak_bytes - steps[b].peak_bytes
    return CheckResult(
        task=task_name, fits=required <= usable, batch_size=b, required_bytes=required,
        budget_bytes=config.budget_bytes, usable_bytes=usable, margin=config.margin,
        headroom_bytes=headroom, headroom_pct=100.0 * headroom / usable,
        max_batch=best, max_batch_pow2=largest_pow2_at_most(best) if best else 0,
        max_batch_checked=tuple(f"{st.batch_size} {st.outcome}" for st in refined.path),
        max_batch_exact=refined.exact, max_batch_stop=refined.stop,
        peak_bytes=steps[b].peak_bytes, target=config.target.value,
        budget_source=config.budget_source, terms=tuple(terms),
        **step_fields(settings, inputs), optimizer_impl=steps[b].optimizer_impl,
        parameter_dtype=steps[b].parameter_dtype, **shard_fields(config.shard, steps[b], saves),
        tokens_per_sample=tokens_per_sample(task, inputs, b), train_items=_train_items(task),
    )


def _train_items(task: Task) -> int | None:
    """The task's training set size; None without one (``--hf-config``'s random tokens stand
    in for data whose size the config does not say)."""
    from ..adapters.hf_config import RandomTokens

    if isinstance(task.train_data, RandomTokens):
        return None
    try:
        return len(task.train_data)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset
        return None


def shard_fields(plan: Any, step: Any, saves: int | None) -> dict[str, Any]:
    """CheckResult/ProbeResult fields of a sharded or checkpointed step: the plan in words,
    the world size, and the per-rank terms of the peak."""
    if plan is None:
        return {}
    kept = step.param_bytes + step.optimizer_state_bytes + step.batch_bytes
    # The gradients counted as themselves: the rest of what lives between steps (buffers,
    # which FSDP2 does not shard; a module's cached tensors) is a term of its own (review:
    # a 606 KB buffer read as gradients).
    grads = (step.grad_bytes if step.grad_bytes is not None
             else max(0, step.start_bytes - kept))
    other = max(0, step.start_bytes - kept - grads)
    activations = step.peak_bytes - kept - grads - other  # the terms sum to the peak
    terms = (("parameters (this rank's shard)" if plan.fsdp else "parameters",
              step.param_bytes),
             ("gradients", grads),
             ("optimizer state", step.optimizer_state_bytes),
             ("batch", step.batch_bytes),
             *((("buffers and other tensors kept between steps", other),) if other else ()),
             (f"activations{', unsharded parameters and gradients' if plan.fsdp else ''} at "
              f"the {step.peak_phase.value} peak", activations))
    return dict(sharding=plan.describe(), shard_ranks=plan.world_size if plan.fsdp else 1,
                rank_terms=terms, checkpointing_saves_bytes=saves)
