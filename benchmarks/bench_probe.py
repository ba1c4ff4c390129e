"""``bsselect probe`` against PyTorch Lightning's and Accelerate's batch-size finders, under one
simulated memory cap.

    /work/venv/bin/python benchmarks/bench_probe.py [--repeats 3] [--json out.json]
        [--models digits-mlp,digits-cnn,tiny-lm,wide-mlp] [--accelerate-start 4096]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: lightning, accelerate).

Every tool runs on the CPU inside a session of the stock capped "allocator"
(``bsselect.memory.capped.CappedCpuAllocator``): every tensor storage created inside the
session counts while it is alive, and the op that would take the live total above the cap is
refused (its outputs uncounted) and raises ``torch.OutOfMemoryError("CUDA out of memory. ...")``, which bsselect, Lightning and
Accelerate all treat as an out-of-memory error. Per model:

* **True maximum**: the largest b for which ``bsselect.memory.measured.run_two_steps`` (fresh
  model and optimizer, a batch of b, training step 1, training step 2) runs inside one capped
  session without an OOM; exact bisection, checked at b and b + 1. Also the largest b at which
  Lightning's own fit loop gets through its 3 tuner steps, i.e. the best a search over
  Lightning trials can reach (its loop keeps a prefetched batch and last step's gradients).
* **bsselect measured**: ``run_probe(..., budget=Budget(cap), margin=0 (and 0.2, the
  default), backend=<capped allocator>)``: peaks at 8, 16, 32, 64, 128, a line, the solve,
  then real steps that check the line's answer where it lands and refine it inside a bracket.
* **bsselect simulated**: ``run_probe(..., method=Method.simulated)``: fake tensors, no
  backend; the line's answer is checked and refined with further simulations, no real step.
* **Lightning**: ``Tuner(trainer).scale_batch_size(model, mode="power"|"binsearch",
  init_val=2)``, all other arguments default (3 steps per trial, 5% margin in binsearch).
* **Accelerate**: ``find_executable_batch_size(starting_batch_size=4096)`` around a function
  that builds the model and runs two training steps (x0.9 on each OOM in accelerate 1.x).

Each repeat runs every tool once per model, in a rotated order; medians over repeats are
reported, and speed ratios are medians of per-repeat ratios (same repeat, same machine
load). Wall time and process CPU time are both reported: the machine is shared, CPU time is
what wall time would be on an idle single core. One-time process costs (imports, first
oneDNN/Lightning set-up) are paid in an untimed warm-up; the simulated method's first call
per model (in-process kernel calibration cache cold) is reported separately.
Results: docs/benchmarks-probe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_tools as pt  # noqa: E402

MiB = 2**20
# Caps chosen so that the true maximum is a few hundred to a few thousand, not a power of two.
CAPS = {
    "digits-mlp": 11 * MiB,
    "digits-cnn": 40 * MiB,
    "tiny-lm": 256 * MiB,
    "wide-mlp": 64 * MiB,
}
BASELINE = "Lightning binsearch"


def tool_table(accelerate_start: int) -> dict:
    return {
        "bsselect (margin 0)": lambda t, cap: pt.run_bsselect(t, cap, 0.0),
        "bsselect (margin 0.2)": lambda t, cap: pt.run_bsselect(t, cap, 0.2),
        "bsselect simulated (margin 0)": lambda t, cap: pt.run_bsselect_simulated(t, cap, 0.0),
        "bsselect simulated (margin 0.2)": lambda t, cap: pt.run_bsselect_simulated(t, cap, 0.2),
        "Lightning power": lambda t, cap: pt.run_lightning(t, cap, "power"),
        "Lightning binsearch": lambda t, cap: pt.run_lightning(t, cap, "binsearch"),
        "Accelerate": lambda t, cap: pt.run_accelerate(t, cap, accelerate_start),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ground_truth(name: str, task, cap: int) -> dict:
    w0 = time.perf_counter()
    true_max = pt.largest_true(lambda b: pt.fits(task, b, cap))
    assert pt.fits(task, true_max, cap) and not pt.fits(task, true_max + 1, cap)
    peak_at, _ = pt.session_peak(task, true_max)
    peak_above, _ = pt.session_peak(task, true_max + 1)
    lightning_max = pt.largest_near(lambda b: pt.lightning_loop_fits(task, b, cap), true_max)
    # The independent truth: the CPU allocator's own events for the loop each tool runs.
    allocator = {}
    for loop, fn in pt.loops(task).items():
        best, at, above = pt.allocator_max(fn, cap, lightning_max if loop == "Lightning"
                                           else true_max)
        allocator[loop] = {"max": best, "peak_at_max": at, "peak_at_max_plus_1": above}
        log(f"{name}: CPU allocator, {loop} loop: largest batch under the cap {best} "
            f"(peak {at} <= cap < {above} at +1)")
    truth = {"cap_bytes": cap, "true_max": true_max, "peak_at_true_max": peak_at,
             "peak_at_true_max_plus_1": peak_above, "lightning_loop_max": lightning_max,
             "allocator": allocator, "seconds": round(time.perf_counter() - w0, 1)}
    log(f"{name}: cap {cap / MiB:g} MiB, true max {true_max} (step-2 peak {peak_at} <= cap < "
        f"{peak_above} at +1), Lightning loop max {lightning_max} [{truth['seconds']} s]")
    return truth


def warm_up(tasks: dict) -> None:
    """Untimed: first ops on each model, a Lightning fit and an Accelerate call, so that no
    tool pays the process's one-time costs."""
    for task in tasks.values():
        pt.run_two_steps(task, 8, pt.CappedCpuAllocator(pt.HUGE))
        pt.lightning_loop_peak(task, 8, steps=1)
        pt.accelerate_peak(task, 8)


def run(models: list[str], repeats: int, accelerate_start: int) -> dict:
    tasks = {name: pt.make_task(name) for name in models}
    out: dict = {"versions": pt.versions(), "oom_recognised": pt.check_oom_recognition(),
                 "accelerate_start": accelerate_start, "repeats": repeats, "models": {}}
    assert all(out["oom_recognised"].values()), out["oom_recognised"]
    log(f"versions: {out['versions']}")
    with pt.CappedCpuAllocator(pt.HUGE).session():   # the first dispatch mode imports torch._dynamo (~1 s)
        torch.ones(2) + 1
    for name in models:
        # Before anything else touches the simulation for this model: a fresh process's cost.
        cold = pt.run_bsselect_simulated(tasks[name], CAPS[name], 0.0)
        out["models"][name] = {"simulated_cold": asdict(cold),
                               "truth": ground_truth(name, tasks[name], CAPS[name]),
                               "runs": {}}
    warm_up(tasks)
    tools = tool_table(accelerate_start)
    order = list(tools)
    for r in range(repeats):
        rotated = order[r % len(order):] + order[: r % len(order)]
        for name in models:
            runs = out["models"][name]["runs"]
            for tool in rotated:
                if any(run["error"] for run in runs.get(tool, [])):
                    continue   # no answer: deterministic under an exact counter, run once
                result = tools[tool](tasks[name], CAPS[name])
                record = asdict(result)
                record.update(tool=tool, largest_ok=result.largest_ok)
                runs.setdefault(tool, []).append(record)
                log(f"[{r + 1}/{repeats}] {name:10s} {tool:32s} -> "
                    f"{result.error or result.found} ({result.trials} tries, "
                    f"{result.wall_s:.2f} s wall, {result.cpu_s:.2f} s CPU)")
    return out


def summarize(data: dict) -> list[dict]:
    rows = []
    for name, model in data["models"].items():
        truth = model["truth"]
        true_max = truth["true_max"]
        base = model["runs"].get(BASELINE, [])
        for tool, runs in model["runs"].items():
            answered = [r["found"] for r in runs if not r["error"]]
            row = {"model": name, "tool": tool, "true_max": true_max,
                   "lightning_loop_max": truth["lightning_loop_max"], "runs": len(runs),
                   "error": next((r["error"] for r in runs if r["error"]), None),
                   "found": statistics.median_low(answered) if answered else 0,
                   "found_min": min(answered, default=0), "found_max": max(answered, default=0),
                   "above_true": any(f > true_max for f in answered),
                   "largest_ok": statistics.median_low([r["largest_ok"] for r in runs]),
                   "trials": statistics.median_low([r["trials"] for r in runs]),
                   "steps": statistics.median_low([r["steps"] for r in runs]),
                   "wall_s": statistics.median(r["wall_s"] for r in runs),
                   "cpu_s": statistics.median(r["cpu_s"] for r in runs),
                   "path": runs[0]["path"], "extra": runs[0]["extra"]}
            row["found_ratio"] = row["found"] / true_max
            own = truth["allocator"][pt.loop_of(tool)]["max"]
            row["allocator_max"] = own
            row["found_ratio_allocator"] = row["found"] / own if own else None
            row["above_allocator"] = any(f > own for f in answered)
            pairs = list(zip(base, runs))   # same repeat
            if pairs and not row["error"]:
                row["speedup_wall"] = statistics.median(b["wall_s"] / r["wall_s"] for b, r in pairs)
                row["speedup_cpu"] = statistics.median(b["cpu_s"] / r["cpu_s"] for b, r in pairs)
            rows.append(row)
    return rows


def render(data: dict, rows: list[dict]) -> str:
    v = data["versions"]
    lines = [f"bsselect {v['bsselect']}, torch {v['torch']}, lightning {v['lightning']}, accelerate {v['accelerate']}, "
             f"python {v['python']}, {v['cpus']} CPUs, {v['threads']} torch thread; "
             f"medians of {data['repeats']} repeats", ""]
    lines.append("| model | cap | counter max (the cap's enforcer): bsselect's step / "
                 "Lightning's loop | **CPU allocator max**: bsselect's step / Lightning's loop "
                 "/ Accelerate's function | allocator / counter peak, bsselect's step at its "
                 "max | simulated probe, first call (cold) |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, model in data["models"].items():
        t, cold = model["truth"], model["simulated_cold"]
        a = t["allocator"]
        ratio = a["bsselect"]["peak_at_max"] / t["peak_at_true_max"] if a["bsselect"]["max"] == \
            t["true_max"] else None
        lines.append(f"| {name} | {t['cap_bytes'] / MiB:g} MiB ({t['cap_bytes']}) | "
                     f"{t['true_max']} / {t['lightning_loop_max']} | "
                     f"**{a['bsselect']['max']} / {a['Lightning']['max']} / "
                     f"{a['Accelerate']['max']}** | "
                     + (f"{ratio:.4f}" if ratio else "(other b)") + " | "
                     f"{cold['found']} in {cold['wall_s']:.2f} s wall, "
                     f"{cold['cpu_s']:.2f} s CPU |")
    lines.append("")
    lines.append("| model | tool | found | own loop's allocator max | found / it | above it? | "
                 "found / counter max | largest OK try | tries | steps | wall s | CPU s | "
                 "speed-up vs Lightning binsearch, wall / CPU |")
    lines.append("|---|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["error"]:
            found, ratio = "none: " + row["error"].split(":")[0], "-"
        else:
            found, ratio = str(row["found"]), f"{row['found_ratio']:.3f}"
            if row["found_min"] != row["found_max"]:
                found += f" ({row['found_min']}-{row['found_max']})"
        speed = (f"{row['speedup_wall']:.1f}x / {row['speedup_cpu']:.1f}x"
                 if "speedup_wall" in row else "-")
        own = row["found_ratio_allocator"]
        own_text = f"{own:.3f}" if own is not None and not row["error"] else "-"
        lines.append(
            f"| {row['model']} | {row['tool']} | {found} | {row['allocator_max']} | "
            f"{own_text} | {'**YES**' if row['above_allocator'] else 'no'} | {ratio} | "
            f"{row['largest_ok'] or '-'} | "
            f"{row['trials']} | {row['steps']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
            f"{speed} |")
    lines.append("")
    lines.append("Tries (first repeat, in order; `!` = out of memory, `^` = ran but above the "
                 "budget after the margin, `~` = simulated; bsselect: `|` separates the 5 probe "
                 "points from the checks of the line's answer):")
    lines.append("")
    for row in rows:
        marks = {"ok": "", "oom": "!", "over": "^", "sim": "~", "sim-over": "~^"}
        tries = [f"{b}{marks.get(o, '?')}" for b, o in row["path"]]
        if row["tool"].startswith("bsselect") and len(tries) > 5:
            tries[5:5] = ["|"]
        path = " ".join(tries)
        line_max = row["extra"].get("line_max")
        note = f" (line alone: {line_max})" if line_max is not None else ""
        lines.append(f"- {row['model']}, {row['tool']}: {path}{note}")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    verdicts = []
    for row in rows:
        if row["tool"] != "bsselect (margin 0)":
            continue
        if row["error"]:
            verdicts.append(f"{row['model']}: bsselect gave no answer ({row['error']}) after "
                            f"{row['wall_s']:.1f} s: target NOT met")
            continue
        fast = row.get("speedup_wall", 0) >= 4 and row.get("speedup_cpu", 0) >= 4
        verdicts.append(
            f"{row['model']}: >= 4x faster than Lightning binsearch: {'met' if fast else 'NOT met'} "
            f"({row.get('speedup_wall', 0):.1f}x wall, {row.get('speedup_cpu', 0):.1f}x CPU); "
            f"never above the true max (the CPU allocator's, for bsselect's step): "
            f"{'met' if not row['above_allocator'] else 'NOT met'}"
            f"{'' if not row['above_true'] else ' (above the counter max)'}")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(CAPS))
    parser.add_argument("--accelerate-start", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="write raw runs and the summary here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CAPS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(CAPS)}")
    w0 = time.perf_counter()
    data = run(models, args.repeats, args.accelerate_start)
    rows = summarize(data)
    data["summary"] = rows
    data["total_seconds"] = round(time.perf_counter() - w0, 1)
    print(render(data, rows))
    print()
    print("Targets (bsselect measured, margin 0):")
    for line in targets(rows):
        print(f"- {line}")
    print(f"\ntotal {data['total_seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
