"""Selection quality of ``bsselect sweep``: regret against full training runs to a target.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_selection.py \
        [--examples digits-mlp,...,lstm-count] [--repeats N] [--sweep-repeats 3] [--json out.json]
    .venv/bin/python benchmarks/bench_selection.py --from-json out.json   # re-analyse (selection_report.py)

For every task (the built-in examples: tuning half; bench_tasks.py: held-out half) and every
power-of-two batch size the sweep would try (8 .. the
sweep's cap, half the training set; tiny-lm capped at 256 to bound the cost):

1. **The sweep** — ``bsselect.selection.sweep.run_sweep`` with default settings on those batch sizes
   (explicit sizes, so no probe), timed (process CPU and wall). Its recommendation, what the
   closed form ``b_opt`` rounds to, and the baseline "largest batch that fits" (the largest
   tried power of two) are recorded.
2. **Calibration** — one run at the task's base batch size (the one its learning rate was set
   for) for a fixed sample budget, evaluating validation loss every ``eval_every`` samples.
   ``target = L_best + f * (L_0 - L_best)`` (L_best: best 3-eval moving average; f per example,
   see CONFIG): the loss at which a run has made 1 - f of the calibration run's best drop.
3. **Full runs** — every batch size from the same seeded initial weights and data order as the
   sweep's trials (``bsselect.selection.sweep.make_setup``, ``bsselect.selection.trials.cycle_batches``), the same
   scaled learning rate (``bsselect.selection.lr_scaling.scale_lr`` with the sweep's default rule), the same
   training step (``bsselect.step.train_step``) and divergence rule, until the validation loss
   reaches the target (crossing interpolated linearly between evaluations) or the calibration
   budget runs out (then time-to-target is inf). Evaluations are not on the clock.
4. **Step times** — per batch size, interleaved rounds of timed steps from the run's final
   state; ``t(b)`` = min over rounds of the median per-step process CPU time. Time to target is
   ``T(b) = steps_to_target(b) * t(b)``: steps to target are deterministic for a seed, and
   min-of-medians CPU time is robust to the other jobs on a shared machine. Raw in-run CPU and
   wall seconds to target are reported beside it.

Regret = T(pick) / min_b T(b). The sweep's cost is its measured process CPU time (all of it:
trials, evaluations, noise measurements) over T of one full run, at the best batch size and
at the recommended one.

The full runs also save, at 1/2, 1, 2 and 4x the sweep's default per-trial budget, what a
sweep trial of that budget would have measured (a trial is exactly the first ceil(B/b) steps of
the full run), so other ranking rules and budgets can be scored on the same data
(``selection_lib.rule_picks``). The sweep runs with bsselect's defaults (budget
``default_budget(largest size, base batch size)``, noise measurements, LR rule, seed), so the benchmark
follows them when they change. Results: docs/benchmarks-sweep.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_lib as lib  # noqa: E402
from bench_tasks import HELD_OUT  # noqa: E402
from bench_tasks_fresh import FRESH, FRESH_2, FRESH_3  # noqa: E402
from selection_report import CONDITIONS, render  # noqa: E402

from bsselect.examples import EXAMPLES  # noqa: E402
from bsselect.selection.lr_scaling import scale_lr  # noqa: E402
from bsselect.selection.sweep import (RAMP_BASE_STEPS, SweepSettings, data_cap,  # noqa: E402
                                      default_budget, make_setup, powers_of_two, resolve_lr_scaling,
                                      run_sweep)
from bsselect.selection.timing import default_threads  # noqa: E402
from bsselect.selection.trials import (DIVERGENCE_FACTOR, TrialBudget, cycle_batches,  # noqa: E402
                                       evaluate, measure_trial_noise, trial_lr, trial_seed)
from bsselect.step import to_device, train_step  # noqa: E402

# cap: largest batch (None: the sweep's own data cap, half the training set).
# calib_samples: the calibration run's budget, also every full run's maximum.
# eval_every: samples between validation evaluations. drop_fraction: f in the target rule.
# split: "tune" (the built-in examples, on which the sweep's rules were developed) or
# "held-out" (benchmarks/bench_tasks.py, written for this benchmark and never tuned on).
CONFIG: dict[str, dict[str, Any]] = {
    "digits-mlp": dict(cap=None, calib_samples=60_000, eval_every=64, drop_fraction=0.05,
                       split="tune"),
    "digits-cnn": dict(cap=None, calib_samples=40_000, eval_every=64, drop_fraction=0.05,
                       split="tune"),
    "tiny-lm": dict(cap=256, calib_samples=32_768, eval_every=1024, drop_fraction=0.05,
                    split="tune"),
    "linreg": dict(cap=None, calib_samples=200_000, eval_every=64, drop_fraction=0.01,
                   split="tune"),
    "logreg": dict(cap=None, calib_samples=100_000, eval_every=256, drop_fraction=0.05,
                   split="held-out"),
    "mlp-adam": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                     split="held-out"),
    "cnn-bn": dict(cap=None, calib_samples=40_000, eval_every=128, drop_fraction=0.05,
                   split="held-out"),
    "gru-lm": dict(cap=256, calib_samples=40_000, eval_every=1024, drop_fraction=0.05,
                   split="held-out"),
    "lstm-count": dict(cap=None, calib_samples=40_000, eval_every=512, drop_fraction=0.05,
                       split="held-out"),
    # "fresh": bench_tasks_fresh.py, written in session 9 after the held-out half had been
    # looked at many times; the rule compared on them was fixed before they first ran.
    "conv1d-wave": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                        split="fresh"),
    "autoenc": dict(cap=None, calib_samples=60_000, eval_every=64, drop_fraction=0.05,
                    split="fresh"),
    "attn-count": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                       split="fresh"),
    "softmax-50": dict(cap=None, calib_samples=60_000, eval_every=256, drop_fraction=0.05,
                       split="fresh"),
    # "fresh-2": the second set in bench_tasks_fresh.py, written after the rule adopted from
    # the first was fixed: that rule's held-out number.
    "gru-sum": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                    split="fresh-2"),
    "spirals": dict(cap=None, calib_samples=60_000, eval_every=256, drop_fraction=0.05,
                    split="fresh-2"),
    "topics": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                   split="fresh-2"),
    "teacher": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                    split="fresh-2"),
    # "fresh-3": the third set, written in session 11 after B_steps as a lower bound was
    # adopted (found on topics): the held-out number of the rule at c13edf6.
    "poly-tanh": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                      split="fresh-3"),
    "motif-cnn": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                      split="fresh-3"),
    "noisy-labels": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                         split="fresh-3"),
    "delay-gru": dict(cap=None, calib_samples=40_000, eval_every=256, drop_fraction=0.05,
                      split="fresh-3"),
}
TASKS = {**EXAMPLES, **HELD_OUT, **FRESH, **FRESH_2, **FRESH_3}
WARM_START_STEPS = 0  # --warm-start-steps: the sweep's, for every example
# --warm-start-run-fraction: the warm start as a fraction of the run (samples to the target at
# the base batch size, median over the oracle's seeds), with --reuse-oracle only
WARM_START_RUN_FRACTION: float | None = None
SWEEP_CONDITIONS = CONDITIONS  # --quiet-only: ("quiet",), for screening a rule
SWEEP_NO_RAMP = False  # --sweep-no-ramp: the sweep's trials without the lr ramp (oracle keeps it)
LR_RAMP = True  # the sweep's default (--warmup-steps auto), in its trials and the full runs
FRACTIONS = ("0.5", "1", "2", "4")   # of the sweep's default per-trial budget
EVAL_BS = 256                               # the loss is a mean: batch size only changes speed
TIMING_ROUNDS = 3
TIMING_SECONDS = 0.4                        # per measurement, at least 5 and at most 200 steps
CPU = torch.device("cpu")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


# --------------------------------------------------------------------------- full runs


def full_run(task, setup, b: int, lr: float, *, target: float | None, max_samples: int,
             eval_every: int, checkpoints: dict[str, int]) -> tuple[dict, Any]:
    """Train at ``b`` until the validation loss reaches ``target`` (None: the whole budget)
    and every checkpoint step has passed. Returns the record and the final (model, optimizer)
    state, or None for the state when the run diverged."""
    torch.manual_seed(trial_seed(setup.seed, b))  # the sweep trial's RNG stream (dropout)
    model = task.model().to(CPU)
    model.load_state_dict(setup.initial_state)
    model.train()
    opt = task.make_optimizer(model.parameters(), lr)
    loss_start, _ = evaluate(model, task, setup.eval_train, CPU, EVAL_BS, metric=False)
    val0, _ = evaluate(model, task, setup.val_data, CPU, EVAL_BS, metric=False)
    evals = [[0, 0, 0.0, 0.0, val0]]
    cp_at: dict[int, list[str]] = {}   # several budgets can round to the same step count
    for name, steps in checkpoints.items():
        cp_at.setdefault(steps, []).append(name)
    last_cp = max(checkpoints.values())
    cps: dict[str, dict] = {}
    train_curve: list[list[float]] = []
    batches = cycle_batches(setup, b)
    step = samples = 0
    cpu = wall = 0.0
    step_cpu: list[float] = []
    status, reached = "ok", False
    next_eval = eval_every
    while True:
        for group in opt.param_groups:  # the sweep trial's schedule (lr ramp), then constant
            group["lr"] = trial_lr(step, lr, b, task.lr, setup.warmup_steps,
                                   setup.lr_ramp_samples)
        c0, w0 = clock()
        x, y = to_device(next(batches), CPU)
        loss = float(train_step(model, opt, task, x, y))  # .item(): a sync point, as in trials
        c1, w1 = clock()
        cpu += c1 - c0
        wall += w1 - w0
        step += 1
        samples += len(y) if isinstance(y, torch.Tensor) else b
        step_cpu.append(c1 - c0)
        if step <= last_cp:
            train_curve.append([step, round(loss, 6) if math.isfinite(loss) else None])
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(loss_start, 1e-12):
            status = "diverged"
            evals.append([step, samples, cpu, wall, math.inf])
            break
        if step in cp_at:
            train_loss, _ = evaluate(model, task, setup.eval_train, CPU, EVAL_BS, metric=False)
            val_loss, val_metric = evaluate(model, task, setup.val_data, CPU, EVAL_BS)
            noise = measure_trial_noise(setup, model, None, b)  # the trial's own batches
            cp = dict(steps=step, samples=samples, status="ok" if train_loss <= loss_start
                      else "diverged", train_loss=train_loss, val_loss=val_loss,
                      val_metric=val_metric, b_simple=noise.b_simple,
                      grad_sq_norm=noise.grad_sq_norm, trace_sigma=noise.trace_sigma)
            for name in cp_at[step]:
                cps[name] = dict(cp)
        if not reached and samples >= next_eval:
            next_eval = (samples // eval_every + 1) * eval_every
            val, _ = evaluate(model, task, setup.val_data, CPU, EVAL_BS, metric=False)
            evals.append([step, samples, cpu, wall, val])
            reached = target is not None and val <= target
        if samples >= max_samples or (reached and step >= last_cp):
            break
    for name, steps in checkpoints.items():
        cps.setdefault(name, dict(steps=min(step, steps), status=status))
    warm = step_cpu[3:] or step_cpu
    record = dict(batch_size=b, lr=lr, status=status, steps=step, samples=samples, cpu_s=cpu,
                  wall_s=wall, median_step_cpu_s=median(warm), train_loss_start=loss_start,
                  evals=evals, checkpoints=cps, train_curve=train_curve, to_target=None)
    state = None if status == "diverged" else (copy.deepcopy(model.state_dict()),
                                               copy.deepcopy(opt.state_dict()))
    return record, state


def time_steps(task, setup, b: int, lr: float, state, n_steps: int) -> tuple[float, float]:
    """(median CPU, median wall) seconds of ``n_steps`` training steps at ``b`` after 3
    warm-up steps, from ``state`` (or the initial weights)."""
    model = task.model().to(CPU)
    model.load_state_dict(state[0] if state else setup.initial_state)
    model.train()
    opt = task.make_optimizer(model.parameters(), lr)
    if state:
        opt.load_state_dict(state[1])
    batches = cycle_batches(setup, b)
    cpus, walls = [], []
    for i in range(3 + n_steps):
        c0, w0 = clock()
        x, y = to_device(next(batches), CPU)
        float(train_step(model, opt, task, x, y))
        c1, w1 = clock()
        if i >= 3:
            cpus.append(c1 - c0)
            walls.append(w1 - w0)
    return median(cpus), median(walls)


# --------------------------------------------------------------------------- one example


def run_samples(saved: dict | None) -> float:
    """The run a user knows before the sweep: samples to the target at the base batch size
    (median over the saved oracle's seeds)."""
    if saved is None:
        raise SystemExit("--warm-start-run-fraction needs --reuse-oracle")
    base = str(saved["base_batch_size"])
    hits = [r[base]["to_target"] for r in saved["runs"] if base in r]
    if not hits or any(h is None for h in hits):
        raise SystemExit(f"{saved['name']}: the base batch size never reached the target")
    return median(h["samples"] for h in hits)


def start_busy() -> subprocess.Popen:
    """One process spinning on a core (pure Python, so it holds one core, not more)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def stop_busy(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def bench_example(name: str, repeats: int, workdir: Path, sweep_repeats: int = 3,
                  saved: dict | None = None) -> dict:
    """Sweeps, then (unless ``saved`` holds this example's oracle from an earlier run of
    this benchmark, ``--reuse-oracle``) calibration, full runs and step times."""
    cfg = CONFIG[name]
    task = TASKS[name]()
    n_train = len(task.train_data)
    cap = cfg["cap"] or data_cap(n_train)
    sizes = powers_of_two(8, cap)
    scaling = resolve_lr_scaling(task, None)
    budget = default_budget(max(sizes), task.base_batch_size)
    lrs = {b: scale_lr(task.lr, task.base_batch_size, b, scaling) for b in sizes}
    out: dict[str, Any] = dict(
        name=name, split=cfg["split"], config=cfg, batch_sizes=sizes, n_train=n_train,
        base_lr=task.lr, base_batch_size=task.base_batch_size, lr_scaling=scaling.value,
        sweep_budget_samples=budget.amount, fractions=list(FRACTIONS), sweeps=[], runs=[])
    # The lr ramp the sweep applies by default: the full runs train with it too, so the oracle
    # is the run a user makes with the recommended batch size and lr.
    ramp = RAMP_BASE_STEPS * task.base_batch_size if LR_RAMP else 0
    log(f"== {name}: batch sizes {sizes}, lr scaling {scaling.value}, "
        f"sweep budget {budget.amount:g} samples/trial")

    # 1. the sweep, as `bsselect sweep NAME --batch-sizes ... --json` runs it: the same seed
    # (identical trials) `sweep_repeats` times on a quiet machine and as many times with one
    # busy process holding a core, so that only the machine differs.
    warm = WARM_START_STEPS
    if WARM_START_RUN_FRACTION is not None:
        warm = round(WARM_START_RUN_FRACTION * run_samples(saved) / task.base_batch_size)
        log(f"   warm start: {warm} base steps ({WARM_START_RUN_FRACTION:g} of the run)")
    settings = SweepSettings(budget=budget, lr_scaling=scaling, seed=0,
                             warm_start_steps=warm,
                             lr_ramp_samples=0 if SWEEP_NO_RAMP else ramp)
    out["sweep_settings"] = settings.journal_settings(task)
    for condition in SWEEP_CONDITIONS:
        busy = start_busy() if condition == "loaded" else None
        try:
            for rep in range(sweep_repeats):
                c0, w0 = clock()
                result = run_sweep(task, task_name=name, batch_sizes=sizes, settings=settings,
                                   device=CPU, journal_path=workdir / f"{name}-{condition}-{rep}.jsonl",
                                   resume=False, overwrite=True, max_batch=max(sizes),
                                   max_batch_source="--batch-sizes", threads=default_threads())
                c1, w1 = clock()
                sweep = result.to_json()
                out["sweeps"].append(dict(seed=0, condition=condition, repeat=rep,
                                          cpu_s=c1 - c0, wall_s=w1 - w0,
                                          loadavg=os.getloadavg()[0], result=sweep))
                log(f"   sweep {condition} #{rep}: {c1 - c0:.1f} s CPU, {w1 - w0:.1f} s wall, "
                    f"recommends {sweep['recommended_batch_size']} (tied "
                    f"{sweep['tied_with_best']}), B_hat {lib.fmt(sweep['fit']['b_hat'])}")
        finally:
            if busy is not None:
                stop_busy(busy)

    if saved is not None:  # the oracle does not depend on the sweep's rules: reuse it
        if saved["batch_sizes"] != sizes or saved["sweep_budget_samples"] != budget.amount:
            raise SystemExit(f"{name}: the saved oracle has other batch sizes or budget")
        if saved["sweep_settings"].get("lr_ramp_samples", 0) != ramp:
            raise SystemExit(f"{name}: the saved oracle's full runs used another lr ramp")
        out.update({k: saved[k] for k in ("runs", "calibration", "target", "timing")})
        out["oracle_from"] = saved.get("oracle_from", "reused")
        return out

    checkpoints = {b: {f: TrialBudget(budget.kind, budget.amount * float(f)).steps_for(b)
                       for f in FRACTIONS} for b in sizes}

    # 2. calibration at the base batch size (seed 0), 3. full runs
    base = task.base_batch_size if task.base_batch_size in sizes else sizes[0]
    states: dict[int, Any] = {}
    target = None
    for seed in range(repeats):
        settings = SweepSettings(budget=budget, lr_scaling=scaling, seed=seed,
                                 lr_ramp_samples=ramp)
        setup, _ = make_setup(task, settings, CPU)
        runs: dict[str, dict] = {}
        order = ([base] + [b for b in sizes if b != base]) if seed == 0 else sizes
        for b in order:
            rec, state = full_run(task, setup, b, lrs[b],
                                  target=target if not (seed == 0 and b == base) else None,
                                  max_samples=cfg["calib_samples"], eval_every=cfg["eval_every"],
                                  checkpoints=checkpoints[b])
            if seed == 0 and b == base:
                out["calibration"] = dict(batch_size=b, **lib.choose_target(
                    [e[4] for e in rec["evals"]], cfg["drop_fraction"]))
                target = out["calibration"]["target"]
                log(f"   calibration b={b}: L0 {out['calibration']['l0']:.4g}, best "
                    f"{out['calibration']['l_best']:.4g} -> target {target:.4g}")
            rec["to_target"] = lib.crossing(rec["evals"], target)
            runs[str(b)] = rec
            if seed == 0:
                states[b] = state
            tt = rec["to_target"]
            log(f"   seed {seed} b={b}: {rec['status']}, {rec['samples']} samples, "
                f"{rec['cpu_s']:.1f} s CPU, to target: "
                + (f"{tt['samples']:.0f} samples, {tt['cpu_s']:.2f} s CPU" if tt else "never"))
        out["runs"].append(runs)
    out["target"] = target

    # 4. step times: interleaved rounds, min of medians
    setup, _ = make_setup(task, SweepSettings(budget=budget, lr_scaling=scaling), CPU)
    rounds: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    for _ in range(TIMING_ROUNDS):
        for b in sizes:
            est = out["runs"][0][str(b)]["median_step_cpu_s"]
            n = max(5, min(200, round(TIMING_SECONDS / max(est, 1e-6))))
            rounds[b].append(time_steps(task, setup, b, lrs[b], states[b], n))
    out["timing"] = {str(b): dict(cpu_s=min(c for c, _ in r), wall_s=min(w for _, w in r),
                                  rounds=r) for b, r in rounds.items()}
    return out


# --------------------------------------------------------------------------- main


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return dict(cpu=model, cpus=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                python=platform.python_version(), loadavg_start=os.getloadavg())


def read_json(path: Path) -> dict:
    """A saved run (``.json`` or ``.json.gz``, as in benchmarks/results/)."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


def parse_repeats(text: str, names: list[str]) -> dict[str, int]:
    """``3`` for every example, or ``digits-mlp=3,tiny-lm=1`` (others: 1)."""
    if "=" not in text:
        return {n: int(text) for n in names}
    out = {n: 1 for n in names}
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default=",".join(CONFIG))
    parser.add_argument("--repeats", default="1",
                        help="oracle seeds per example: N, or name=N,name=N (others 1)")
    parser.add_argument("--warm-start-steps", type=int, default=0,
                        help="sweep option: base-configuration steps before the trials branch")
    parser.add_argument("--warm-start-run-fraction", type=float,
                        help="warm start = this fraction of the run (the oracle's samples to "
                             "the target at the base batch size); needs --reuse-oracle")
    parser.add_argument("--quiet-only", action="store_true",
                        help="sweeps on a quiet machine only (screening a rule)")
    parser.add_argument("--sweep-no-ramp", action="store_true",
                        help="the sweep's trials without the lr ramp; the oracle's full runs "
                             "keep it (screening: how much the ramp costs short trials)")
    parser.add_argument("--no-lr-ramp", action="store_true",
                        help="trials and full runs without the default lr ramp")
    parser.add_argument("--sweep-repeats", type=int, default=3,
                        help="sweeps per machine condition (quiet, loaded), same seed")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--from-json", type=Path, help="re-analyse a saved run; no training")
    parser.add_argument("--reuse-oracle", type=Path,
                        help="a saved run whose calibration, full runs and step times to reuse: "
                             "only the sweeps run again (after a change to the sweep's rules)")
    args = parser.parse_args()
    if args.from_json:
        print(render(read_json(args.from_json)), end="")
        return
    torch.set_num_threads(1)
    global WARM_START_STEPS, LR_RAMP, WARM_START_RUN_FRACTION, SWEEP_CONDITIONS, SWEEP_NO_RAMP
    SWEEP_NO_RAMP = args.sweep_no_ramp
    WARM_START_STEPS = args.warm_start_steps
    WARM_START_RUN_FRACTION = args.warm_start_run_fraction
    if args.quiet_only:
        SWEEP_CONDITIONS = ("quiet",)
    LR_RAMP = not args.no_lr_ramp
    names = [n.strip() for n in args.examples.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIG]
    if unknown:
        parser.error(f"unknown examples {unknown}; choose from {list(CONFIG)}")
    repeats = parse_repeats(args.repeats, names)
    data: dict[str, Any] = dict(machine=machine(), command=" ".join(sys.argv), examples=[])
    oracle = {}
    if args.reuse_oracle:
        old = read_json(args.reuse_oracle)
        oracle = {ex["name"]: dict(ex, oracle_from=old.get("command", str(args.reuse_oracle)))
                  for ex in old["examples"]}
        data["oracle_machine"] = old["machine"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            data["examples"].append(bench_example(name, repeats[name], Path(tmp),
                                                  args.sweep_repeats, oracle.get(name)))
            if args.json:  # save as we go: a long run that dies keeps what it finished
                args.json.write_text(json.dumps(data))
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["total_wall_s"] = time.perf_counter() - started
    if args.json:  # inf (never reached, diverged) is written as JSON's Infinity extension
        args.json.write_text(json.dumps(data))
    data = json.loads(json.dumps(data))
    print(render(data), end="")
    log(f"total {data['total_wall_s']:.0f} s wall; load average {data['machine']['loadavg_start']}"
        f" -> {data['machine']['loadavg_end']}")


if __name__ == "__main__":
    # SIGTERM (kill, timeout) unwinds like Ctrl-C, so that the `finally` around each loaded
    # sweep stops its busy process: killed by signal, the benchmark left it spinning and the
    # next run's "quiet" sweeps ran beside it (session 15).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
