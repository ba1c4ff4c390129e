"""Re-rank saved sweeps' trials under variants of the pick rule (no training).

    cd benchmarks/results && PYTHONPATH=../.. python3 ../replay_pick_rules.py \
        sweep-b2-old-ws0-6a8349b.json.gz sweep-b2-fresh-ws0-6a8349b.json.gz \
        sweep-b2-fresh2-ws0-6a8349b.json.gz sweep-fresh3-40cf877.json.gz

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

import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection_lib as lib  # noqa: E402
from bench_selection import read_json  # noqa: E402

import bsselect.selection.rank as rank  # noqa: E402
from bsselect.selection import choice  # noqa: E402

VARIANTS = ("shipped", "no_lo", "point", "geo_lo")


def scenarios(variant: str, b_noise) -> tuple[float, ...]:
    if variant == "shipped":
        return choice.regret_scenarios(b_noise)
    if variant == "no_lo":
        return (b_noise.value, b_noise.hi)
    if variant == "point":
        return (b_noise.value,)
    return (math.sqrt(max(b_noise.lo, 1e-12) * b_noise.value), b_noise.value, b_noise.hi)


def make_choose(variant: str):
    """``choice.choose`` taking its worst case over the variant's scenarios."""
    return functools.partial(choice.choose, scenarios=lambda b_noise: scenarios(variant, b_noise))


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
