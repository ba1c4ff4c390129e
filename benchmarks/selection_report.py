"""Analysis and markdown of ``bench_selection.py``'s saved runs: the oracle, every rule's
picks and regrets (real sweeps and replays), the acceptance table of issue 12, and the page.
Reads the JSON-ready records only, so ``--from-json`` re-renders a run without training."""

from __future__ import annotations

import math
from statistics import median

import selection_lib as lib

CONDITIONS = ("quiet", "loaded")  # loaded: one busy process holds a core during the sweep


# --------------------------------------------------------------------------- analysis


def analyse(ex: dict) -> dict:
    """Oracle table, every rule's pick and regret (real sweeps and emulated ones)."""
    times = lib.oracle_times(ex)
    best = lib.best_batch(times)
    step_t = {b: ex["timing"][str(b)]["cpu_s"] for b in ex["batch_sizes"]}
    real = []
    for sw in ex["sweeps"]:
        trials = lib.trials_from_sweep(sw["result"])
        picks = lib.rule_picks(ex, trials, sw["seed"])
        # What the sweep itself recommended (with its timing rounds' intervals), not a
        # re-ranking of its trials.
        picks["sweep"] = sw["result"]["recommended_batch_size"]
        timing = sw["result"].get("timing") or {}
        rounds = {r["batch_size"] for r in timing.get("rounds", [])}
        # Sweeps before 377b688 timed every ok size; later ones only the contenders.
        timed = rounds if "not_timed" in timing else {t.batch_size for t in trials}
        ideal_cost = sum(lib.steps_run(t, t.batch_size in timed) * step_t[t.batch_size]
                         for t in trials)
        real.append(dict(seed=sw["seed"], condition=sw.get("condition", "quiet"),
                         tied=sw["result"].get("tied_with_best", []), picks=picks,
                         regrets={k: lib.regret(times, v) for k, v in picks.items()},
                         cpu_s=sw["cpu_s"], wall_s=sw["wall_s"], train_cpu_ideal_s=ideal_cost,
                         b_hat=sw["result"]["fit"]["b_hat"],
                         b_hat_source=sw["result"]["fit"]["b_hat_source"],
                         b_opt=sw["result"]["fit"]["b_opt"]))
    emulated: dict[str, list[dict]] = {}
    for frac in ex["fractions"]:
        emulated[frac] = []
        for i in range(len(ex["runs"])):
            trials = lib.emulated_trials(ex, i, frac, step_t)
            picks = lib.rule_picks(ex, trials, i)
            summary = lib.rank_summary(ex, trials, i)
            emulated[frac].append(dict(
                picks=picks, regrets={k: lib.regret(times, v) for k, v in picks.items()},
                b_hat=summary.ranking.b_hat, b_opt=summary.ranking.b_opt,
                cost_s=sum(lib.steps_run(t) * step_t[t.batch_size] for t in trials)))
    # The emulation is only as good as its claim that a trial is the full run's prefix: compare
    # the real sweep's trials with the rebuilt x1 trials (same seed) on what the ranking uses.
    check = dict(status_mismatch=0, max_abs_dloss=0.0, max_rel_db_simple=0.0)
    for sw in ex["sweeps"]:
        emu = {t.batch_size: t for t in lib.emulated_trials(ex, sw["seed"], "1", step_t)}
        for t in lib.trials_from_sweep(sw["result"]):
            e = emu[t.batch_size]
            if e.status != t.status:
                check["status_mismatch"] += 1
                continue
            if not t.ok:
                continue
            check["max_abs_dloss"] = max(check["max_abs_dloss"],
                                         abs(e.train_loss_end - t.train_loss_end),
                                         abs(e.val_loss - t.val_loss))
            if t.b_simple and e.b_simple:
                check["max_rel_db_simple"] = max(check["max_rel_db_simple"],
                                                 abs(e.b_simple / t.b_simple - 1))
    b_implied = lib.implied_b_noise(times)
    true_model_pick = None
    if b_implied is not None:
        trials = lib.emulated_trials(ex, 0, "1", step_t)
        true_model_pick = lib.model_pick(trials, b_implied)
    return dict(times=times, best=best, real=real, emulated=emulated, check=check,
                implied_b_noise=b_implied, implied_model_pick=true_model_pick,
                implied_model_regret=lib.regret(times, true_model_pick))


def _median_regret(entries: list[dict], rule: str) -> float:
    return lib.median_inf(e["regrets"][rule] for e in entries)


def _worst_regret(entries: list[dict], rule: str) -> float:
    return max(e["regrets"][rule] for e in entries)


def _cell(entries: list[dict], rule: str) -> str:
    """``picks: median regret`` and, with several seeds, the worst seed's regret."""
    text = f"{_picks(entries, rule)}: {lib.fmt_regret(_median_regret(entries, rule))}"
    worst = _worst_regret(entries, rule)
    if len(entries) > 1 and worst != _median_regret(entries, rule):
        text += f" (worst {lib.fmt(worst, 2)})"
    return text


def _picks(entries: list[dict], rule: str) -> str:
    return ",".join(str(e["picks"][rule]) for e in entries)


def acceptance(data: dict, analyses: dict) -> list[str]:
    """Issue 12's bars: held-out regret (every repeat, quiet and loaded), stability of the
    picks, loaded vs quiet wall time, and cost against one full run at the best size."""
    fmt, table = lib.fmt, lib.table
    rows, by_split = [], {}
    for ex in data["examples"]:
        a = analyses[ex["name"]]
        t, best = a["times"], a["best"]
        real = a["real"]
        quiet = [e for e in real if e["condition"] == "quiet"]
        loaded = [e for e in real if e["condition"] == "loaded"]
        picks_q = [e["picks"]["sweep"] for e in quiet]
        picks_l = [e["picks"]["sweep"] for e in loaded]
        modal = max(set(picks_q), key=picks_q.count) if picks_q else None
        in_tied = all(p in e["tied"] for p in picks_q + picks_l for e in real)
        spread = max((abs(math.log2(p / modal)) for p in picks_q + picks_l if p and modal),
                     default=0.0)
        walls = {c: median(e["wall_s"] for e in real if e["condition"] == c) for c in CONDITIONS
                 if any(e["condition"] == c for e in real)}
        t_best = t[best]["time_s"] if best else math.inf
        cost = walls.get("quiet", math.inf)
        worst_pick = max(real, key=lambda e: e["regrets"]["sweep"])["picks"]["sweep"]
        resolved = lib.regret_interval(ex, worst_pick)
        for cond, entries in (("quiet", quiet), ("loaded", loaded)):
            by_split.setdefault((ex["split"], cond), []).extend(
                e["regrets"]["sweep"] for e in entries)
        rows.append([
            ex["name"], ex["split"], f"{best} ({fmt(t_best)} s)",
            ",".join(map(str, picks_q)) + f" ({fmt(max(e['regrets']['sweep'] for e in quiet), 3)})",
            ",".join(map(str, picks_l)) + f" ({fmt(max(e['regrets']['sweep'] for e in loaded), 3)})"
            if loaded else "–",
            " / ".join("{" + ",".join(map(str, e["tied"])) + "}" for e in real[:1]),
            ("✓" if in_tied else "✗") + f" {spread:.0f}",
            f"{walls.get('loaded', math.nan) / walls['quiet']:.2f}" if "loaded" in walls else "–",
            f"{fmt(cost)} s = {cost / t_best:.2f}x" + (" ✓" if cost < t_best else
                                                      (" ✗" if t_best > 10 else " (n/a: < 10 s)"))
            if math.isfinite(t_best) else "–",
            f"{worst_pick}: {fmt(resolved[0], 3)}–{fmt(resolved[1], 3)}" if resolved else "–",
        ])
    out = ["## Acceptance: generalisation and load (issue 12)\n",
           "Regret = T(pick) / T(best), every sweep repeat counted (same seed: only the machine "
           "differs between repeats). *loaded*: one busy process (`while True: pass`) holds a "
           "core during the sweep; the benchmark starts it and stops it by its PID.\n"]
    summary = []
    for (split, cond), regrets in sorted(by_split.items()):
        if not regrets:
            continue
        med, worst = lib.median_inf(regrets), max(regrets)
        ok = med <= 1.10 and worst <= 1.25
        summary.append([split, cond, len(regrets), f"{fmt(med, 3)}", f"{fmt(worst, 3)}",
                        "✓" if ok else "✗"])
    out.append(table(["split", "machine", "sweeps", "median regret", "worst regret",
                      "<= 1.10 / <= 1.25"], summary))
    out.append("")
    out.append(table(["task", "split", "best b (T s)", "quiet picks (worst regret)",
                      "loaded picks (worst regret)", "tied set (first quiet sweep)",
                      "every pick in every sweep's tied set; max log2 distance from the modal "
                      "quiet pick", "loaded / quiet wall", "quiet sweep wall vs T(best)",
                      "worst pick's regret, 80% over the oracle's seeds (bootstrap)"], rows))
    return out


def render(data: dict) -> str:
    fmt, table = lib.fmt, lib.table
    parts: list[str] = []
    analyses = {ex["name"]: analyse(ex) for ex in data["examples"]}
    parts += acceptance(data, analyses)
    parts.append("")

    rows = []
    for ex in data["examples"]:
        a = analyses[ex["name"]]
        t, best = a["times"], a["best"]
        r = a["real"]
        rec = [e["picks"]["sweep"] for e in r]
        cost = median(e["cpu_s"] for e in r)
        t_best = t[best]["time_s"] if best else math.inf
        t_rec = lib.median_inf(t[p]["time_s"] if p else math.inf for p in rec)
        base_b = ex["base_batch_size"]
        t_base = t[base_b]["time_s"] if base_b in t else math.inf
        calib = ex["runs"][0][str(ex["calibration"]["batch_size"])]["cpu_s"]
        rows.append([
            ex["name"], f"{ex['target']:.3g}", best, fmt(t_best),
            f"{_picks(r, 'sweep')} ({lib.fmt_regret(_median_regret(r, 'sweep'))})",
            f"{_picks(r, 'b_opt')} ({lib.fmt_regret(_median_regret(r, 'b_opt'))})",
            f"{_picks(r, 'largest')} ({lib.fmt_regret(_median_regret(r, 'largest'))})",
            f"{_picks(r, 'base')} ({lib.fmt_regret(_median_regret(r, 'base'))})",
            fmt(cost), fmt(median(e["wall_s"] for e in r)),
            f"{cost / t_best:.1f}" if t_best and math.isfinite(t_best) else "–",
            f"{cost / t_rec:.1f}" if math.isfinite(t_rec) else "–",
            f"{cost / t_base:.1f}" if math.isfinite(t_base) else "–",
            f"{cost / calib:.2f}",
        ])
    parts.append("## Summary (regret = T(pick) / T(best); ✓ <= 1.15)\n")
    parts.append(table(["example", "target val loss", "best b", "T(best) s",
                        "sweep pick (regret)", "b_opt pick (regret)", "largest (regret)",
                        "base b (regret)", "sweep CPU s", "sweep wall s", "cost / T(best)",
                        "cost / T(pick)", "cost / T(base b)", "cost / calibration run"], rows))

    for ex in data["examples"]:
        a = analyses[ex["name"]]
        t = a["times"]
        cal = ex["calibration"]
        sweep0 = ex["sweeps"][0]["result"]
        trials = {tr["batch_size"]: tr for tr in sweep0["trials"]}
        rank = {b: i + 1 for i, b in enumerate(sweep0["ranking"])}
        rowsd = {r["batch_size"]: r for r in sweep0["rows"]}
        parts.append(f"\n## {ex['name']}\n")
        parts.append(
            f"Batch sizes {ex['batch_sizes'][0]}..{ex['batch_sizes'][-1]}, LR scaling "
            f"{ex['lr_scaling']} from {ex['base_lr']} at b={ex['base_batch_size']}; "
            f"calibration at b={cal['batch_size']} for {ex['config']['calib_samples']} samples: "
            f"L0 = {cal['l0']:.4g}, best = {cal['l_best']:.4g}, f = {cal['drop_fraction']} "
            f"-> target {cal['target']:.4g}. Sweep budget {ex['sweep_budget_samples']:g} "
            f"samples per trial; B_hat {fmt(sweep0['fit']['b_hat'])} "
            f"({sweep0['fit']['b_hat_source']}), b_opt {fmt(sweep0['fit']['b_opt'])}; "
            f"B_noise implied by the oracle's steps-to-target: {fmt(a['implied_b_noise'])}. "
            f"Emulation check (real sweep trials vs. the full runs' x1 prefixes): "
            f"{a['check']['status_mismatch']} status mismatches, max |Δ loss| "
            f"{a['check']['max_abs_dloss']:.1e}, max relative Δ B_simple "
            f"{a['check']['max_rel_db_simple']:.1e}.\n")
        rows = []
        for b in ex["batch_sizes"]:
            v, tr = t[b], trials[b]
            rows.append([
                b, fmt(ex["runs"][0][str(b)]["lr"]),
                f"{v['reached']}/{v['seeds']}" + (f" ({v['diverged']} div)" if v["diverged"]
                                                  else ""),
                fmt(v["samples"]), fmt(v["steps"]), fmt(v["step_cpu_s"] * 1e3),
                fmt(v["time_s"]), lib.fmt_regret(lib.regret(t, b)), fmt(v["raw_cpu_s"]),
                fmt(v["raw_wall_s"]), tr["status"], fmt((tr["step_time_s"] or 0) * 1e3
                                                        if tr["step_time_s"] else None),
                fmt(tr["loss_drop_per_s"]), fmt(tr["val_loss"]),
                fmt(rowsd[b]["relative_time"]), rank.get(b, "–")])
        parts.append(table(
            ["b", "lr", "reached", "samples to target", "steps", "t(b) CPU ms", "T(b) s",
             "regret", "raw CPU s", "raw wall s", "sweep trial", "trial step ms (wall)",
             "loss drop/s", "trial val loss", "predicted rel. time", "sweep rank"], rows))

    parts.append("\n## Every rule on the same data\n")
    parts.append("Regret of each rule's pick (median over seeds). *real*: the actual sweep's "
                 "trials (its wall-clock step times); *emu xF*: sweep trials rebuilt from the "
                 "full runs at F times the default per-trial budget, with the robust CPU step "
                 "times t(b).\n")
    cols = []
    for ex in data["examples"]:
        cols += [f"{ex['name']} real"] + [f"emu x{f}" for f in ex["fractions"]]
    rows = []
    for rule in lib.RULES:
        row = [rule]
        for ex in data["examples"]:
            a = analyses[ex["name"]]
            row.append(_cell(a["real"], rule))
            row += [_cell(a["emulated"][f], rule) for f in ex["fractions"]]
        rows.append(row)
    row = ["(1+B/b)t(b), B implied by oracle"]
    for ex in data["examples"]:
        a = analyses[ex["name"]]
        row += [f"{a['implied_model_pick']}: {lib.fmt_regret(a['implied_model_regret'])}"] + [
            "" for _ in ex["fractions"]]
    rows.append(row)
    row = ["sweep cost, CPU s (real: measured, of which Σ steps·t(b) incl. timing-only "
           "steps; emu: Σ steps·t(b))"]
    for ex in data["examples"]:
        a = analyses[ex["name"]]
        row.append(f"{fmt(median(e['cpu_s'] for e in a['real']))} (training "
                   f"{fmt(median(e['train_cpu_ideal_s'] for e in a['real']))})")
        row += [fmt(median(e["cost_s"] for e in a["emulated"][f])) for f in ex["fractions"]]
    rows.append(row)
    # worst example per rule and budget
    fracs = data["examples"][0]["fractions"]
    worst_rows = []
    for rule in lib.RULES:
        row = [rule]
        for col in ["real"] + fracs:
            vals = []
            for ex in data["examples"]:
                a = analyses[ex["name"]]
                entries = a["real"] if col == "real" else a["emulated"][col]
                vals.append((_median_regret(entries, rule), ex["name"]))
            worst = max(v for v, _ in vals)
            failing = [n for v, n in vals if v > 1.15]
            row.append(f"{lib.fmt(worst)}" + (f" ({', '.join(failing)})" if failing else " ✓"))
        worst_rows.append(row)
    parts.append("\nWorst example (median regret over seeds) per rule; the examples above 1.15 "
                 "in parentheses.\n")
    parts.append(table(["rule", "real"] + [f"emu x{f}" for f in fracs], worst_rows))
    # one table per example keeps the markdown readable
    for i, ex in enumerate(data["examples"]):
        k = 1 + len(ex["fractions"])
        start = 1 + sum(1 + len(e["fractions"]) for e in data["examples"][:i])
        parts.append(f"\n### {ex['name']}\n")
        parts.append(table(["rule"] + cols[start - 1:start - 1 + k],
                           [[r[0]] + r[start:start + k] for r in rows]))
    return "\n".join(parts) + "\n"
