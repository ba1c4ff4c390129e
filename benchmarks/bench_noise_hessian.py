"""Diagnostic: is the sweep's low noise scale a matter of *when* it is measured (the noise scale
grows over the run) or of *what* is measured (B_simple = tr(Σ)/|G|² assumes a Hessian ∝ I)?

On the selection benchmark's tasks, along one base-configuration run (the task's base batch
size and lr) to the oracle's target, at fractions of the run, this measures

- ``B_simple = tr(Σ)/|G|²`` (the sweep's estimator: two batch sizes' squared gradient norms);
- ``B_H = tr(HΣ)/GᵀHG``, McCandlish et al.'s (2018, eq. 2.11) noise scale under the local
  quadratic model, which is the critical batch for SGD when H is not ∝ I: the same two-batch
  estimator with each squared norm taken in the Hessian's metric, ``vᵀHv``, by Hessian-vector
  products on an independent batch (so ``E[g_bᵀ H g_b] = GᵀHG + tr(HΣ)/b``). For Adam-family
  optimizers the step is ``P⁻¹g`` with ``P = √v̂ + ε`` from the optimizer's own state, so the
  same estimator runs on preconditioned gradients (``B_H`` then reads ``tr(HP⁻¹ΣP⁻¹) /
  (P⁻¹G)ᵀH(P⁻¹G)``);

and integrates each over the run with the weight of the optimal steps spent between points,
``B_eff = Σ B_i ΔS_min,i / Σ ΔS_min,i`` with ``ΔS_min,i = ΔS_i / (1 + B_i/b)``: the noise
scale a *fixed* batch size sees over the whole run, since ``S(b) = Σ ΔS_min,i (1 + B_i/b)``.
Each is set against the noise scale the oracle's full runs imply (steps to target against 1/b).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_noise_hessian.py \\
        --examples logreg,autoenc --json /tmp/hess.json

Oracles: benchmarks/results/sweep-ramp-93f9bcf.json.gz (the nine old tasks),
sweep-fresh-b2d7097.json.gz, sweep-fresh2-3a274f4.json.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import selection_lib as lib  # noqa: E402
from bench_selection import TASKS  # noqa: E402

from bsselect.selection.noise_math import estimate_from_norms  # noqa: E402
from bsselect.step import collate, sample_indices  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORACLES = ("sweep-ramp-93f9bcf.json.gz", "sweep-fresh-b2d7097.json.gz",
           "sweep-fresh2-3a274f4.json.gz", "sweep-fresh3-40cf877.json.gz")
FRACTIONS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def oracle_examples() -> dict[str, dict]:
    out = {}
    for name in ORACLES:
        data = json.load(gzip.open(RESULTS / name))
        out.update({ex["name"]: ex for ex in data["examples"]})
    return out


def _loss(model, task, items) -> torch.Tensor:
    x, y = collate(task, items)
    return task.loss_fn(model(x), y)


def preconditioner(optimizer) -> list[torch.Tensor] | None:
    """P⁻¹ per parameter from an Adam-family (exp_avg_sq) or RMSprop (square_avg) state; None
    for SGD or before the first step."""
    inv = []
    for group in optimizer.param_groups:
        eps = group.get("eps", 1e-8)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state:
                step = float(state["step"])
                v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
            elif "square_avg" in state:
                v_hat = state["square_avg"]
            else:
                return None
            inv.append(1.0 / (v_hat.sqrt() + eps))
    return inv


def measure(model, task, optimizer, n_data: int, b_small: int, b_big: int, m: int,
            gen: torch.Generator) -> dict:
    """B_simple and B_H from ``m`` paired measurements (sub-batches of ``b_small`` of a
    ``b_big`` batch), the Hessian from an independent ``b_big`` batch each time."""
    params = [p for p in model.parameters() if p.requires_grad]
    inv = preconditioner(optimizer)
    small_sq, big_sq, small_h, big_h = [], [], [], []
    n_sub = b_big // b_small
    for _ in range(m):
        idx = sample_indices(n_data, b_big, gen)
        grads = []
        for j in range(n_sub):
            items = [task.train_data[i] for i in idx[j * b_small:(j + 1) * b_small]]
            g = torch.autograd.grad(_loss(model, task, items), params)
            grads.append([x.detach() for x in g])
        big = [torch.stack(parts).mean(0) for parts in zip(*grads)]
        if inv is not None:
            grads = [[x * w for x, w in zip(g, inv)] for g in grads]
            big = [x * w for x, w in zip(big, inv)]
        small_sq.append(sum(sum(float((x * x).sum()) for x in g) for g in grads) / n_sub)
        big_sq.append(sum(float((x * x).sum()) for x in big))
        h_idx = sample_indices(n_data, b_big, gen)
        h_loss = _loss(model, task, [task.train_data[i] for i in h_idx])
        h_grad = torch.autograd.grad(h_loss, params, create_graph=True)

        def hnorm(v: list[torch.Tensor]) -> float:
            dot = sum((a * b).sum() for a, b in zip(h_grad, v))
            hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
            return sum(float((h * x).sum()) for h, x in zip(hv, v) if h is not None)

        small_h.append(sum(hnorm(g) for g in grads) / n_sub)
        big_h.append(hnorm(big))
    simple = estimate_from_norms(small_sq, big_sq, b_small, b_big, n_data)
    hess = estimate_from_norms(small_h, big_h, b_small, b_big, n_data)
    return dict(b_simple=simple.b_simple, b_h=hess.b_simple, gthg=hess.grad_sq_norm,
                tr_h_sigma=hess.trace_sigma, g2=simple.grad_sq_norm,
                tr_sigma=simple.trace_sigma, preconditioned=inv is not None)


def run(name: str, ex: dict, m: int, fractions: tuple[float, ...] = FRACTIONS) -> dict:
    task = TASKS[name]()
    b = task.base_batch_size
    hits = [r[str(b)]["to_target"] for r in ex["runs"]]
    run_samples = median(h["samples"] for h in hits if h)
    total_steps = max(1, round(run_samples / b))
    points = sorted({round(f * total_steps) for f in fractions})
    torch.manual_seed(0)
    model = task.model()
    model.train()
    optimizer = task.make_optimizer(model.parameters(), task.lr)
    n_data = len(task.train_data)
    b_big = min(8 * b, n_data)
    gen = torch.Generator().manual_seed(1)
    train_gen = torch.Generator().manual_seed(2)
    rows, step = [], 0
    t0 = time.perf_counter()
    for point in points:
        while step < point:
            idx = sample_indices(n_data, b, train_gen)
            loss = _loss(model, task, [task.train_data[i] for i in idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        with torch.no_grad():
            idx = sample_indices(n_data, min(1024, n_data), gen)
            train_loss = float(_loss(model, task, [task.train_data[i] for i in idx]))
        rows.append(dict(step=step, fraction=step / total_steps, train_loss=train_loss,
                         **measure(model, task, optimizer, n_data, b, b_big, m, gen)))
        print(f"  {name} step {step}/{total_steps}: loss {train_loss:.4g}, B_simple "
              f"{lib.fmt(rows[-1]['b_simple'])}, B_H {lib.fmt(rows[-1]['b_h'])}", flush=True)
    times = lib.oracle_times(ex)
    return dict(name=name, split=ex["split"], base_batch_size=b, run_steps=total_steps,
                implied=lib.implied_b_noise(times), best=lib.best_batch(times),
                optimizer=type(optimizer).__name__, rows=rows,
                b_eff_simple=b_eff(rows, "b_simple", b), b_eff_h=b_eff(rows, "b_h", b),
                wall_s=time.perf_counter() - t0)


def b_eff(rows: list[dict], key: str, b: int) -> float | None:
    """Σ B_i ΔS_min,i / Σ ΔS_min,i over the intervals between points, B_i the mean of the
    interval's two ends (an end without a positive estimate leaves its interval out)."""
    num = den = 0.0
    for a, c in zip(rows, rows[1:]):
        ends = [r[key] for r in (a, c)]
        if any(e is None or not math.isfinite(e) or e <= 0 for e in ends):
            continue
        bi = sum(ends) / 2
        ds_min = (c["step"] - a["step"]) / (1 + bi / b)
        num += bi * ds_min
        den += ds_min
    return num / den if den else None


def render(results: list[dict]) -> str:
    lines = ["| task | split | optimizer | best b | implied B | B_simple: start → end, run "
             "average | B_H: start → end, run average | implied / B_H average |",
             "|---|---|---|---:|---:|---|---|---:|"]
    for r in results:
        first, last = r["rows"][0], r["rows"][-1]
        ratio = (r["implied"] / r["b_eff_h"] if r["implied"] and r["b_eff_h"] else None)
        lines.append(
            f"| {r['name']} | {r['split']} | {r['optimizer']} | {r['best']} | "
            f"{lib.fmt(r['implied'])} | {lib.fmt(first['b_simple'])} → "
            f"{lib.fmt(last['b_simple'])}, {lib.fmt(r['b_eff_simple'])} | "
            f"{lib.fmt(first['b_h'])} → {lib.fmt(last['b_h'])}, {lib.fmt(r['b_eff_h'])} | "
            f"{lib.fmt(ratio, 2)} |")
    return "\n".join(lines) + "\n"


def drive(parser: argparse.ArgumentParser, run_one, render_all) -> None:
    """The diagnostics' shared main: ``--examples``, ``--json`` (written after each task, so a
    long run that dies keeps what it finished), ``--from-json`` (re-render, no training);
    ``run_one(args, name, oracle example)`` -> one task's record."""
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args()
    if args.from_json:
        print(render_all(json.loads(args.from_json.read_text())["results"]), end="")
        return
    torch.set_num_threads(1)
    oracles = oracle_examples()
    results = []
    for name in [n.strip() for n in args.examples.split(",") if n.strip()]:
        results.append(run_one(args, name, oracles[name]))
        if args.json:
            args.json.write_text(json.dumps(dict(command=" ".join(sys.argv), results=results)))
    print(render_all(results), end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default="logreg,autoenc,spirals,softmax-50,linreg,"
                        "digits-mlp,digits-cnn,cnn-bn")
    parser.add_argument("--measurements", type=int, default=16)
    drive(parser, lambda args, name, ex: run(name, ex, args.measurements), render)


if __name__ == "__main__":
    main()
