"""Summarise fuzz runs: python summary.py RUN.jsonl [EARLIER.jsonl ...]

Per run: cases exact (every phase within 64 bytes of the CPU allocator), close (within
0.5%), flagged (a phase off by more than max(64 bytes, 0.5%)), and simulation failures; with
an earlier run, which seeds moved between those. Then the flagged cases of the first run,
worst under-estimate first.
"""
import gzip
import json
import sys
from collections import Counter


def load(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return {r["seed"]: r for r in map(json.loads, f)}


def worst(r):
    ph = r.get("ph") or {}
    return min((v[2] / v[1] for v in ph.values() if v[1]), default=0.0), \
        max((v[2] / v[1] for v in ph.values() if v[1]), default=0.0)


runs = [load(p) for p in sys.argv[1:]]
for path, run in zip(sys.argv[1:], runs):
    print(path, dict(Counter(r["status"] for r in run.values())))
if len(runs) > 1:
    now, before = runs[0], runs[1]
    print("before -> now:", dict(Counter((before[s]["status"], now[s]["status"])
                                         for s in now if s in before)))
flagged = sorted((s for s, r in runs[0].items() if r["status"] == "flag"),
                 key=lambda s: worst(runs[0][s])[0])
for s in flagged:
    r = runs[0][s]
    lo, hi = worst(r)
    print(f"seed {s:5d} {r['family']:9s} {r['settings']:5s} b={r['bs']:<3d} "
          f"low {lo:+.1%} high {hi:+.1%} {{" + ", ".join(
              f"{k}: {v[2]:+d}" for k, v in r["ph"].items()) + "}")
