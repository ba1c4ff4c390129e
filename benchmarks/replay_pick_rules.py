"""Re-rank saved sweeps' trials under variants of the pick rule (no training).

    PYTHONPATH=. python3 benchmarks/replay_pick_rules.py benchmarks/results/sweep-b2-old-ws0-6a8349b.json.gz \
        benchmarks/results/sweep-b2-fresh-ws0-6a8349b.json.gz \
        benchmarks/results/sweep-b2-fresh2-ws0-6a8349b.json.gz benchmarks/results/sweep-fresh3-40cf877.json.gz

``choice.choose`` picks, among the batch sizes tied with the best, the one with the smallest
worst-case slowdown over the noise scale at its interval's low end, its estimate and its high
end. The variants: ``shipped`` (those three), ``no_lo`` (the estimate and the high end only:
the noise scale of the run is above the trials' on 13 of 17 tasks, docs/benchmarks-sweep.md),
``point`` (the best at the estimate), ``geo_lo`` (the low end raised to the geometric mean of
low end and estimate). Each sweep's trials are re-ranked with their own step times, as
``bench_selection.py --from-json`` does; the regret of a pick is its oracle time to the target
over the best batch size's. Prints each task's picks and worst regret per variant.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection_lib as lib  # noqa: E402
from bench_selection import read_json  # noqa: E402

import bsselect.selection.rank as rank  # noqa: E402
from bsselect.selection.choice import Choice, cost, is_tied, predicted  # noqa: E402

VARIANTS = ("shipped", "no_lo", "point", "geo_lo")


def scenarios(variant: str, b_noise) -> tuple[float, ...]:
    if variant == "shipped":
        return (b_noise.lo, b_noise.value, b_noise.hi)
    if variant == "no_lo":
        return (b_noise.value, b_noise.hi)
    if variant == "point":
        return (b_noise.value,)
    return (math.sqrt(max(b_noise.lo, 1e-12) * b_noise.value), b_noise.value, b_noise.hi)


def make_choose(variant: str):
    """``choice.choose`` with the variant's scenarios (the rest as shipped)."""
    def choose(times, b_noise):
        sizes = sorted(times)
        pred = {b: predicted(b, times[b], b_noise) for b in sizes}
        best = min(sizes, key=lambda b: (pred[b].mid, b))
        tied = tuple(b for b in sizes
                     if b == best or is_tied(b, times[b], best, times[best], b_noise))
        scen = scenarios(variant, b_noise)
        fastest = {B: min(cost(c, times[c].mid, B) for c in sizes) for B in scen}
        regret = {b: max(cost(b, times[b].mid, B) / fastest[B] for B in scen) for b in tied}
        pick = min(tied, key=lambda b: (round(regret[b], 9), b != best, -b))
        return Choice(best, tied, pick, regret, pred)
    return choose


def main() -> None:
    results: dict[str, dict[str, tuple[list, float]]] = {}
    for variant in VARIANTS:
        rank.choose = make_choose(variant)
        for path in sys.argv[1:]:
            for ex in read_json(Path(path))["examples"]:
                times = lib.oracle_times(ex)
                picks = [lib.rank_summary(ex, lib.trials_from_sweep(sw["result"]),
                                          sw["seed"]).recommended_batch_size
                         for sw in ex["sweeps"]]
                worst = max(lib.regret(times, p) for p in picks)
                results.setdefault(ex["name"], {})[variant] = (picks, worst)
    print("| task | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name, by in results.items():
        cells = [f"{','.join(str(p) for p in sorted(set(by[v][0])))} ({by[v][1]:.2f})"
                 for v in VARIANTS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for v in VARIANTS:
        worst = [by[v][1] for by in results.values()]
        print(f"{v}: median of the tasks' worst regret {statistics.median(worst):.2f}, "
              f"worst {max(worst):.2f}, tasks above 1.25: {sum(w > 1.25 for w in worst)}")


if __name__ == "__main__":
    main()
