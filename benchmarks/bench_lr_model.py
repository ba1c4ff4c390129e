"""Diagnostic: does the local quadratic model *at the lr the sweep actually trains with* predict
the best batch size, where the noise-scale formula (which assumes every batch at its best lr)
does not?

McCandlish et al. (2018, sec. 2.2) expand the loss along one SGD step at lr ``η`` and batch
``b``: the expected decrease is

    ΔL(η, b) = η |G|² − (η²/2) (GᵀHG + tr(HΣ)/b)  =  GᵀHG [η ε − (η²/2)(1 + B/b)],

with ``ε = |G|²/GᵀHG`` (the step that is best without noise) and ``B = tr(HΣ)/GᵀHG``. Choosing
``η`` best for each ``b`` gives the familiar ``S = S_min (1 + B/b)``; but the sweep and the
user's run do not choose: they scale the task's lr, ``η(b) = η0 · b/b0`` (linear) or
``η0 · sqrt(b/b0)``. Evaluated at that lr, the model predicts the steps a batch size needs
relative to the base batch, point by point along the base run:

    steps(b) = Σ_i ΔS_i · ΔL_i(η(b0), b0) / ΔL_i(η(b), b)     (∞ where ΔL_i <= 0: divergence)

(the ``GᵀHG_i`` cancel), and ``T(b) = steps(b) · t(b)`` with the oracle's step times. With a
base lr well below ``ε`` (lr headroom), ``ΔL`` grows ∝ ``η`` and so ∝ ``b``: steps ∝ 1/b,
perfect scaling, until ``η(b)`` nears ``ε/(1 + B/b)``, far past ``B``. This is the mechanism
session 10 measured (benchmarks-sweep.md, "Why the certain misses miss"); here it is a
prediction from ``|G|²``, ``GᵀHG`` and ``tr(HΣ)`` measured along one base run (by
``bench_noise_hessian.measure``: two-batch estimators, Hessian-vector products on independent
batches), scored against the oracle's full runs. SGD tasks only: momentum ``β`` enters as the
effective lr ``η/(1 − β)`` (the small-step limit: it fails where ``η/(1 − β) · GᵀHG/|G|² ≳ 1``,
which is where this model predicts no descent on five of the eight tasks); an Adam step is
not ``η g``, and is left out. The table's steps are the model's over 0 to 3/4 of the run
against the oracle's whole run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lr_model.py --json /tmp/lrmodel.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import selection_lib as lib  # noqa: E402
from bench_noise_hessian import drive, run  # noqa: E402
from bench_selection import TASKS  # noqa: E402

from bsselect.selection.lr_scaling import LrScaling, scale_lr  # noqa: E402

FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)


def decrease(eta: float, eps: float, big_b: float, b: int) -> float:
    """ΔL / GᵀHG at effective lr ``eta``: ``eta·eps − eta²/2 · (1 + B/b)``."""
    return eta * eps - 0.5 * eta * eta * (1 + max(big_b, 0.0) / b)


def predicted_steps(rows: list[dict], b: int, b0: int, eta_of) -> float:
    """Σ over the base run's intervals of its steps times ΔL(b0)/ΔL(b), each interval at the
    measurements of its first point (a point without a positive GᵀHG and |G|² is skipped:
    the interval takes the last usable point's)."""
    total, usable = 0.0, None
    for a, c in zip(rows, rows[1:] + [None]):
        if a["gthg"] and a["gthg"] > 0 and a["g2"] and a["g2"] > 0:
            usable = a
        if usable is None or c is None:
            continue
        eps = usable["g2"] / usable["gthg"]
        big_b = usable["tr_h_sigma"] / usable["gthg"]
        d0, d = decrease(eta_of(b0), eps, big_b, b0), decrease(eta_of(b), eps, big_b, b)
        if d <= 0 or d0 <= 0:  # no descent predicted: the model says nothing here
            return math.inf
        total += (c["step"] - a["step"]) * d0 / d
    return total


def run_one(args, name: str, ex: dict) -> dict:
    task = TASKS[name]()
    probe = task.make_optimizer(task.model().parameters(), task.lr)
    group = probe.param_groups[0]
    if not isinstance(probe, __import__("torch").optim.SGD):
        return dict(name=name, split=ex["split"], skipped=type(probe).__name__)
    beta = float(group.get("momentum", 0.0) or 0.0)
    b0 = task.base_batch_size
    record = run(name, ex, args.measurements, FRACTIONS)

    def eta_of(b: int) -> float:
        return scale_lr(task.lr, b0, b, LrScaling.linear) / (1 - beta)

    times = lib.oracle_times(ex)
    steps = {b: predicted_steps(record["rows"], b, b0, eta_of) for b in ex["batch_sizes"]}
    model_t = {b: steps[b] * times[b]["step_cpu_s"] for b in ex["batch_sizes"]}
    finite = [(t, b) for b, t in model_t.items() if math.isfinite(t)]
    pick = min(finite)[1] if finite else None
    first = next((r for r in record["rows"] if r["gthg"] and r["gthg"] > 0), None)
    headroom = (first["g2"] / first["gthg"]) / eta_of(b0) if first and first["g2"] else None
    return dict(record, momentum=beta, lr=task.lr, predicted_steps=steps,
                predicted_time=model_t, pick=pick, regret=lib.regret(times, pick),
                oracle_steps={b: times[b]["steps"] for b in ex["batch_sizes"]},
                headroom_at_start=headroom)


def render(results: list[dict]) -> str:
    lines = ["| task | split | momentum | best b | ε/η(b0) at start | model's pick (regret) | "
             "steps: model (0–3/4 of the run) / oracle at b0, 2b0, 4b0, 8b0 |", "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['split']} | {r['skipped']}: not modelled | | | | |")
            continue
        b0 = r["base_batch_size"]
        cells = []
        for k in (1, 2, 4, 8):
            b = str(b0 * k) if isinstance(next(iter(r["predicted_steps"])), str) else b0 * k
            ps, os_ = r["predicted_steps"].get(b), r["oracle_steps"].get(b)
            cells.append(f"{lib.fmt(ps)} / {lib.fmt(os_)}")
        lines.append(f"| {r['name']} | {r['split']} | {r['momentum']:g} | {r['best']} | "
                     f"{lib.fmt(r['headroom_at_start'])} | {r['pick']} ({lib.fmt(r['regret'], 2)})"
                     f" | {'; '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", default="autoenc,spirals,softmax-50,logreg,linreg,"
                        "digits-mlp,digits-cnn,cnn-bn,conv1d-wave,teacher,topics,attn-count,"
                        "gru-sum,mlp-adam,tiny-lm,gru-lm,lstm-count")
    parser.add_argument("--measurements", type=int, default=16)
    drive(parser, run_one, render)


if __name__ == "__main__":
    main()
