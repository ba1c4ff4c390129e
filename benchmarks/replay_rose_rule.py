"""Re-rank saved sweeps' trials with and without the rule that a trial whose training loss
rose is not picked while another's fell (``rank._risen``; no training).

    cd benchmarks/results && PYTHONPATH=../.. python3 ../replay_rose_rule.py \
        sweep-b2-old-ws32-6a8349b.json.gz sweep-b2-fresh-ws32-6a8349b.json.gz \
        sweep-b2-fresh2-ws32-6a8349b.json.gz sweep-b2-old-ws0-6a8349b.json.gz \
        sweep-b2-fresh-ws0-6a8349b.json.gz sweep-b2-fresh2-ws0-6a8349b.json.gz

Each sweep's trials are re-ranked with their own step times, as ``bench_selection.py
--from-json`` does, by the current code; the regret of a pick is its oracle time to the
target over the best batch size's. Prints each task's six picks and worst regret, both ways.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import selection_lib as lib  # noqa: E402
from bench_selection import read_json  # noqa: E402

import bsselect.selection.rank as rank  # noqa: E402

SHIPPED = rank._risen


def picks(path: str, with_rule: bool) -> dict[str, tuple[list, list]]:
    rank._risen = SHIPPED if with_rule else (lambda ok: set())
    out = {}
    for ex in read_json(Path(path))["examples"]:
        times = lib.oracle_times(ex)
        chosen = [lib.rank_summary(ex, lib.trials_from_sweep(sw["result"]),
                                   sw["seed"]).recommended_batch_size for sw in ex["sweeps"]]
        out[ex["name"]] = (chosen, [lib.regret(times, p) for p in chosen])
    return out


def main() -> None:
    for path in sys.argv[1:]:
        without, with_rule = picks(path, False), picks(path, True)
        for name, (pa, ra) in without.items():
            pb, rb = with_rule[name]
            mark = "" if pa == pb else "  <-- changed"
            print(f"{Path(path).name:40s} {name:12s} without {pa} worst {max(ra):.2f} | "
                  f"with {pb} worst {max(rb):.2f}{mark}")


if __name__ == "__main__":
    main()
