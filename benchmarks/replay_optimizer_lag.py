"""Re-rank saved sweeps with the optimizer's start-up transient taken out of ``B_steps``.

    cd benchmarks/results && PYTHONPATH=../.. python3 ../replay_optimizer_lag.py \
        sweep-s16-{old,fresh,fresh2,fresh3}-0a40b20.json.gz          # about 1 minute

The hypothesis (session 19): SGD with momentum ``beta`` starts with its buffer at one gradient
(torch's convention) and needs about ``1/(1 - beta)`` steps to reach its steady step
``lr·g/(1 - beta)``; over ``n`` steps it falls ``beta/(1 - beta)`` steps behind (9 at 0.9).
A trial at a large batch takes few steps, so the lag is a large share of them, and
``pareto.steps_to_loss_fit`` reads ``S(b) = S_min + E_min/b`` with the lag added to
``S_min``: ``B_steps = E_min/S_min`` biased low — the way the lr-headroom misses go.

The replay measures each task's optimizer response to a constant gradient (its own
optimizer at the base lr, weight decay off, 3,000 steps; ``r_k`` = step ``k``'s size over the
last one's), maps every trial's steps to a level to effective steps ``sum_{k<=n} r_k``, and
re-ranks each sweep with bsselect's own summary (``selection_lib.rank_summary``). No
constant is fitted: the lag comes from the optimizer's definition (Adam's bias correction
makes it 0; RMSprop's unnormalised average makes it negative). Prints, per task, the
shipped and the corrected picks with their worst regret over the task's sweeps, and
``B_steps`` before and after.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import selection_lib as lib  # noqa: E402
from bench_selection import TASKS, read_json  # noqa: E402

from bsselect.selection import pareto  # noqa: E402

RESPONSE_STEPS = 3000


def effective_steps(task, lr: float) -> list[float]:
    """``cum[n]``: the effective updates after ``n`` updates, in units of the optimizer's
    steady step under a constant gradient."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = task.make_optimizer([p], lr)
    for group in opt.param_groups:
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    sizes = []
    for _ in range(RESPONSE_STEPS):
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step()
        sizes.append(float((before - p.detach()).abs()))
    cum = [0.0]
    for s in sizes:
        cum.append(cum[-1] + s / sizes[-1])
    return cum


def mapping(cum: list[float]):
    def eff(x: float) -> float:
        i = int(x)
        if i + 1 >= len(cum):
            return cum[-1] + x - (len(cum) - 1)
        return cum[i] + (x - i) * (cum[i + 1] - cum[i])
    return eff


def main() -> None:
    raw_steps_to = pareto._steps_to
    current = {"eff": lambda x: x}

    def steps_to(curve, level):
        s = raw_steps_to(curve, level)
        return None if s is None else current["eff"](s)

    pareto._steps_to = steps_to
    worst_by: dict[str, list[float]] = {"shipped": [], "lag": []}
    print("| task | optimizer | lag (steps) | best b | shipped: picks (worst regret), B_steps "
          "| lag removed: picks (worst regret), B_steps |")
    print("|---|---|---:|---:|---|---|")
    for path in sys.argv[1:]:
        for ex in read_json(Path(path))["examples"]:
            task = TASKS[ex["name"]]()
            cum = effective_steps(task, ex["base_lr"])
            times = lib.oracle_times(ex)
            cells = []
            for variant in ("shipped", "lag"):
                current["eff"] = mapping(cum) if variant == "lag" else (lambda x: x)
                picks, steps = [], []
                for sw in ex["sweeps"]:
                    s = lib.rank_summary(ex, lib.trials_from_sweep(sw["result"]), sw["seed"])
                    picks.append(s.recommended_batch_size)
                    fit = s.ranking.fit_dict()
                    steps.append(fit.get("b_steps"))
                worst = max(lib.regret(times, p) for p in picks)
                worst_by[variant].append(worst)
                known = [x for x in steps if x is not None]
                b_steps = f"{statistics.median(known):.0f}" if known else "–"
                cells.append(f"{','.join(str(p) for p in sorted(set(picks)))} ({worst:.2f}), "
                             f"{b_steps}")
            name = type(task.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 0.1)).__name__
            lag = len(cum) - 1 - cum[-1]
            print(f"| {ex['name']} | {name} | {lag:.1f} | {lib.best_batch(times)} | "
                  f"{cells[0]} | {cells[1]} |", flush=True)
    for variant, worst in worst_by.items():
        print(f"{variant}: median of the tasks' worst regret {statistics.median(worst):.2f}, "
              f"worst {max(worst):.2f}, tasks above 1.25: {sum(w > 1.25 for w in worst)}")


if __name__ == "__main__":
    main()
