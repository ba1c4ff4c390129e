"""Rich rendering of results for people (stderr-safe); JSON goes through ``emit_json``."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .units import format_bytes, format_percent

# emoji=False: user text (task names, paths, messages) is printed as written; rich would turn
# `:ok:` or `:smile:` in `d:smile:/tasks.py:fn` into an emoji (bsselect writes no emoji codes).
# Markup in user text is escaped where it is printed (``escape``).
class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (``| head -1``): the rest of this output is dropped and the
        command goes on, to its journal, plot and exit code. rich's own raised SystemExit(1),
        which read as the task's sys.exit and lost check's exit code 3 (review)."""
        self.quiet = True
        drop_stream(self.file)


def drop_stream(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null: what is still written to it goes nowhere
    instead of raising BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no descriptor: nothing more to do
        pass


console = _Console(stderr=True, emoji=False)      # progress, logs and human tables
# Results for people when not --json. Piped or in CI there is no terminal width to read;
# 80 columns would squeeze the sweep table into unreadable ellipses.
out = (_Console(emoji=False) if (sys.stdout is not None and sys.stdout.isatty())
       or "COLUMNS" in os.environ else _Console(width=160, emoji=False))
# Where --json's document goes: the real stdout, while the task's own prints go to stderr
# (cli_boundary.guarded), so that stdout stays one JSON document (review: a task that printed on
# import broke it). None: sys.stdout.
json_stream: Any = None


def _nonlinear_why(result: Any) -> str:
    if result.uniform_items is False:
        return "worst-case batches take the longest items first"
    return "the peak moves between phases of the step"


def _marginal_note(result: Any) -> str | None:
    """When one more sample at the max batch costs far more than the line's per-sample
    bytes (a b x b term: contrastive losses, attention over the batch), say so: the max batch
    was found by the checks, and the line's two numbers hold over the probed sizes only."""
    checked = {s["batch_size"]: s.get("peak_bytes") for s in result.confirmation or ()}
    ok = result.max_batch
    # 10% or more apart, so that an allocator's rounding of one block is not read as a trend
    over = min((b for b in checked if b >= 1.1 * ok and checked[b] is not None), default=None)
    if over is None or checked.get(ok) is None:
        return None
    marginal = (checked[over] - checked[ok]) / (over - ok)
    if result.per_sample_bytes <= 0 or marginal <= 4 * result.per_sample_bytes:
        return None
    return (f"[yellow]note:[/] from b={ok} to {over} one more sample costs "
            f"{format_bytes(marginal)}, "
            f"{marginal / result.per_sample_bytes:,.0f}x the line's "
            f"{format_bytes(result.per_sample_bytes)}: memory grows faster than the batch (a "
            "term in b², such as a b×b similarity matrix). The max batch is what the checks "
            "found; the fixed and per-sample bytes describe the probed sizes only")


def emit_json(data: Any) -> None:
    """Machine-readable results: one JSON document on stdout (a reader that went away, as
    ``| head -1`` does, takes the rest of it: the command goes on to its exit code)."""
    stream = json_stream or sys.stdout
    try:
        stream.write(json.dumps(data, indent=2, default=str) + "\n")
        stream.flush()
    except BrokenPipeError:
        drop_stream(stream)


def _terms_table(terms: Any, first: tuple[str, int, str] | None = None) -> Table:
    """One row per named memory term: name, bytes, why."""
    table = Table()
    table.add_column("term")
    table.add_column("bytes", justify="right")
    table.add_column("why")
    for name, nbytes, note in ([first] if first else []) + [(t.name, t.bytes, t.note)
                                                             for t in terms]:
        table.add_row(name, format_bytes(nbytes), note)
    return table


def render_probe(result: Any) -> None:
    out.print(f"[bold]Peak memory of one training step — {escape(result.task)}[/]",
              highlight=False)
    table = Table()
    table.add_column("batch", justify="right")
    table.add_column("peak", justify="right")
    if result.target != "same":
        table.add_column(f"required on {result.target}", justify="right")
    table.add_column("fit", justify="right")
    for p in result.points:
        fit = result.fixed_bytes + result.per_sample_bytes * p.batch_size
        row = [str(p.batch_size), format_bytes(p.peak_bytes)]
        if result.target != "same":
            row.append(format_bytes(p.required_bytes))
        row.append(format_bytes(fit))
        table.add_row(*row)
    out.print(table)
    if result.terms:
        out.print(f"{result.target} terms at batch {result.max_batch}")
        out.print(_terms_table(result.terms))
    usable = result.budget_bytes * (1 - result.margin)
    if result.fit_raised_bytes:
        out.print(
            f"[yellow]note:[/] the peaks are not linear in the batch (the least-squares line is "
            f"{result.fit_max_error_pct:.1f}% off at b={result.fit_max_error_batch}; "
            + _nonlinear_why(result)
            + f"): the line is raised {format_bytes(result.fit_raised_bytes)} to lie on or above every peak, "
            "and the max batch is checked where it lands", highlight=False)
    out.print(
        f"method [bold]{result.method}[/] on {result.device} · fixed "
        f"{format_bytes(result.fixed_bytes)} + {format_bytes(result.per_sample_bytes)}/sample "
        f"(fit residual {format_bytes(result.fit_residual_bytes)})"
    )
    out.print(
        f"budget {format_bytes(result.budget_bytes)} ({result.budget_source}), "
        f"{format_percent(result.margin)} margin → {format_bytes(usable)} usable"
    )
    if result.confirmation:
        path = " → ".join(f"{s['batch_size']} {s['outcome']}" for s in result.confirmation)
        how = "real steps" if result.method == "measured" else "simulations"
        out.print(f"checked with {how}: {path}", highlight=False)
        note = _marginal_note(result)
        if note:
            out.print(note, highlight=False)
    if result.sharding:
        out.print(f"sharding: {result.sharding}; batch sizes are per device", highlight=False)
        _rank_terms(result, f" at batch {result.max_batch}")
    out.print(
        f"[bold green]max batch {'at least ' if not result.max_batch_exact else ''}"
        f"{result.max_batch}[/]{_tokens(result, result.max_batch)} · largest power of two "
        f"[bold green]{result.max_batch_pow2}[/]"
        + ("" if result.max_batch_exact else
           f" ({result.max_batch_stop}; a larger batch may fit)" if result.max_batch_stop else
           f" (the search stopped after {len(result.confirmation)} real steps; a larger "
           "batch may fit)"))
    if result.exceeds_dataset:
        what = ("the whole" if result.max_batch == result.train_items
                else "larger than the")
        out.print(f"[yellow]note:[/] that is {what} {result.train_items:,}-item "
                  "training set: memory does not limit the batch here, the data does",
                  highlight=False)


def _f(value: float | None, fmt: str = ".3g", none: str = "—") -> str:
    return none if value is None else format(value, fmt)


def render_noise(report: Any) -> None:
    est = report.final
    out.print("[bold]Gradient noise scale B_simple = tr(Σ)/|G|²[/]")
    branch = getattr(report, "from_checkpoint", None)
    if branch:  # step 0 of the table is the checkpoint
        out.print(f"from {escape(branch['path'])} ({branch['format']}"
                  + (f", its step {branch['step']}" if branch.get("step") is not None else "")
                  + "): step 0 below is the checkpoint", highlight=False)
    table = Table()
    for col in ("step", "train loss", "B_simple", f"{est.confidence:.0%} CI", "|G|²", "tr(Σ)"):
        table.add_column(col, justify="right")
    points = report.trajectory or (
        [(0, report.initial_loss, report.initial)]
        + ([(report.warmup_steps, report.final_loss, est)] if report.warmup_steps else []))
    for step, loss, e in points:
        ci = f"{e.b_simple_ci[0]:.3g} – {e.b_simple_ci[1]:.3g}" if e.b_simple_ci else "—"
        shown = _f(e.b_simple) if e.resolved else f"> {_f(e.b_simple_lower)} (unresolved)"
        table.add_row(str(step), f"{loss:.4g}", shown, ci, f"{e.grad_sq_norm:.3g}",
                      f"{e.trace_sigma:.3g}")
    out.print(table)
    out.print(f"b_small {est.b_small}, b_big {est.b_big}, {est.measurements} measurements per "
              f"point ({est.samples} examples) · {report.passes} forward/backward passes in "
              f"{report.wall_s:.1f} s")
    if est.resolved and est.b_simple is not None:
        out.print(f"[bold]B_simple ≈ {est.b_simple:.3g}[/]: batches well below it use data "
                  "efficiently; well above it, extra samples per step buy little.")
    else:
        out.print("[yellow]|G|² is not distinguishable from zero[/]: the gradient signal is "
                  "below its noise here (e.g. near a minimum); the noise scale is at least the "
                  "lower bound shown. Use more --measurements or a larger --b-big.")
    for note in getattr(est, "notes", ()):  # e.g. the dropout-mask noise moved to tr(Σ)
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def render_sweep(result: Any) -> None:
    from .selection.rank import interval_label
    from .selection.sweep import checkpoint_lr_note

    r = result.ranking
    out.print(f"[bold]Sweep — {escape(result.task)}[/] ({result.settings.budget.amount:g} "
              f"{result.settings.budget.kind.value} per trial)", highlight=False)
    branch = getattr(result, "from_checkpoint", None)
    if branch and branch.get("path") is None:  # a journal that kept only the checkpoint's key
        out.print(f"trials branched from a checkpoint (sha256 {branch['sha256'][:12]})",
                  highlight=False)
    elif branch:
        out.print(f"trials branched from {escape(branch['path'])} ({branch['format']}"
                  + (f", step {branch['step']}" if branch.get("step") is not None else "")
                  + (", with its optimizer state" if branch["optimizer_state"] else
                     ", fresh optimizer: the file's optimizer state was absent or did not fit")
                  + ")", highlight=False)
        run_lr = branch.get("lr")  # the journal keeps a positive lr or none
        note = checkpoint_lr_note(run_lr if isinstance(run_lr, (int, float)) else None, False,
                                  result.base_lr, result.base_batch_size)
        if note:
            out.print(f"[yellow]note:[/] {escape(note)} (--lr {run_lr:.3g} asks from the run's "
                      "lr)", highlight=False)
    # Compact: no vertical rules, and the status column only when a trial was not ok, so
    # that the table reads at 80 columns.
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    show_status = any(row.status.value != "ok" for row in r.rows)
    cols = ["#", "batch"] + (["status"] if show_status else []) + [
        "lr", "step ms", "loss drop/s", "val loss", "metric", "pred. ×", "range", "tied"]
    for col in cols:
        # the batch and the rank are never elided: at 50 columns the best row's batch read
        # "…" (review)
        table.add_column(col, justify="right", no_wrap=col in ("#", "batch", "range", "step ms",
                                                               "pred. ×"),
                         min_width=len(col) if col in ("#", "batch") else None)
    trials = {t.batch_size: t for t in result.trials}
    best = next((row.predicted_time_s for row in r.rows if row.relative_time == 1.0), None)
    for i, row in enumerate(r.rows):
        t = trials[row.batch_size]
        rank = str(i + 1) if row.status.value == "ok" else ""
        status = row.status.value if row.status.value == "ok" else f"[red]{row.status.value}[/]"
        table.add_row(
            rank, str(t.batch_size), *([status] if show_status else []), f"{t.lr:.3g}",
            "—" if row.step_time_s is None else f"{row.step_time_s * 1e3:.3g}",
            _f(t.loss_drop_per_s), _f(t.val_loss, ".3g"), _f(t.val_metric, ".3g"),
            _f(row.relative_time, ".2f"), _range(row, best), "✓" if row.tied else "",
        )
    out.print(table)
    fit = r.fit_dict()
    interval = fit["b_hat_interval"]
    b_range = "" if not interval or interval[0] == interval[1] else (
        f"{_f(interval[0])}–{'∞' if interval[1] is None else _f(interval[1])}")
    source = fit["b_hat_source"]
    bracket = f" [{interval_label(source)}: {b_range}]" if b_range else ""
    out.print(
        f"step time t(b) = {_f(fit['tau_f_s'])} s + {_f(fit['tau_d_s'])} s·b · "
        f"B_simple {_f(fit['b_simple'])}{bracket if source == 'b_simple' else ''}"
        f" · B_steps {'≥ ' * bool(fit.get('b_steps_lower_bound'))}{_f(fit['b_steps'])}"
        f"{bracket if source == 'b_steps' else ''}"
        f" · B_noise {_f(fit['b_noise'])} · b_opt = √(B·τ_f/τ_d) = {_f(fit['b_opt'])}"
        + (f" (B from {fit['b_hat_source']})" if fit["b_hat_source"] else ""), highlight=False)
    timing = (f"{len(result.timing)} batch sizes timed in interleaved rounds"
              + (", in thread CPU time" if result.timing[0].clock == "thread_cpu" else "")
              if result.timing else (result.timing_note or "trials' own step times"))
    shares = [t.data_s / t.step.mid for t in result.timing if t.data_s is not None and t.step.mid]
    if shares:
        timing += (f" (fetching the batch: {100 * min(shares):.0f}–{100 * max(shares):.0f}% of "
                   "a step, included)")
    if result.timing and result.timing_note:
        timing += f"; {result.timing_note}"
    threads = f"cpu threads {result.threads} · " if result.threads else ""
    shape = f" · {r.shape.note}" if r.shape is not None and r.shape.note else ""
    out.print(f"{threads}{timing}{shape}", highlight=False)
    out.print(f"verdict: {escape(r.verdict)}", highlight=False)
    if result.skipped:
        out.print(f"[yellow]skipped[/] batch sizes {', '.join(map(str, result.skipped))}: larger "
                  f"than the {result.n_train:,} items the trials train on", highlight=False)
    for t in result.trials:
        if t.status.value != "ok":
            out.print(f"[red]batch {t.batch_size} {t.status.value}[/]: {escape(t.error or '')}",
                      highlight=False)
    if result.recommended_batch_size:
        scaling = (f"{result.settings.lr_scaling.value} scaling from lr {result.base_lr:g} "
                   f"at batch {result.base_batch_size}"
                   if result.settings.lr_scaling.value != "none" else
                   # auto gives none for an optimizer of neither family: say it (review)
                   "no lr scaling: the same lr at every batch size; --lr-scaling linear or "
                   "sqrt scales it")
        out.print(f"[bold green]recommended batch size {result.recommended_batch_size}[/] "
                  f"at lr {result.recommended_lr:.3g} ({scaling})" + _ramp_text(result)
                  # in the result itself, not only in a stderr warning: a report redirected
                  # to a file gave an unqualified pick from 1 of 8 planned sizes (review)
                  + (f", among the {len(result.trials)} batch sizes an interrupted sweep "
                     f"finished (not run: {', '.join(map(str, result.not_run))})"
                     if result.not_run else ""))
    acc = result.b_opt_accumulation
    if acc:
        out.print(f"the formula's batch {acc['effective_batch']} exceeds what fits "
                  f"({result.max_batch}): micro-batch {acc['micro_batch']} × "
                  f"{acc['steps']} accumulation steps")
    out.print(f"journal: {result.journal}"
              + (f" (resumed batch sizes {list(result.resumed)})" if result.resumed else ""),
              highlight=False, markup=False)


def _range(row: Any, best: float | None) -> str:
    """``0.91–1.22``: the interval of the predicted time over the best's."""
    if row.relative_time is None or not best:
        return "—"
    lo = f"{row.predicted_lo_s / best:.2f}" if row.predicted_lo_s is not None else "?"
    hi = f"{row.predicted_hi_s / best:.2f}" if row.predicted_hi_s is not None else "∞"
    return f"{lo}–{hi}"


def _check_lines(result: Any) -> tuple[str, str]:
    verdict = "fits" if result.fits else "does NOT fit"
    per = " per device" if getattr(result, "shard_ranks", 1) > 1 else ""
    head = (f"batch {result.batch_size}{per}{_tokens(result, result.batch_size)} of "
            f"{result.task} {verdict}: needs "
            f"{format_bytes(result.required_bytes)} of {format_bytes(result.usable_bytes)} usable "
            f"({format_bytes(result.budget_bytes)} {result.budget_source}, "
            f"{format_percent(result.margin)} margin)")
    room = "headroom" if result.headroom_bytes >= 0 else "over by"
    tail = (f"{room} {format_bytes(abs(result.headroom_bytes))} "
            f"({abs(result.headroom_pct):.1f}%); largest batch that fits: "
            f"{'at least ' if not result.max_batch_exact else ''}{result.max_batch}"
            + _tokens(result, result.max_batch)
            + (f" (power of two: {result.max_batch_pow2})" if result.max_batch else "")
            + (f", checked by simulation: {', '.join(result.max_batch_checked)}"
               if result.max_batch_checked else "")
            + (f" ({result.max_batch_stop}; a larger batch may fit)"
               if getattr(result, "max_batch_stop", None) else ""))
    return head, tail


def _ramp_text(result: Any) -> str:
    """How the trials reached the recommended lr, which the full run should do too."""
    ramp, lr = result.settings.lr_ramp_samples, result.recommended_lr
    if ramp and lr > result.base_lr:
        return f", ramped up linearly from lr {result.base_lr:g} over the first {ramp:,} samples"
    if result.settings.warmup_steps:
        return f", ramped up linearly from 0 over the first {result.settings.warmup_steps} steps"
    return ""


def render_sharding(result: Any, batch: int) -> None:
    """The sharded (or checkpointed) step's plan, its per-rank terms and what checkpointing
    saves; the batch in tokens too for token batches."""
    if not getattr(result, "sharding", ""):
        return
    out.print(f"sharding: {result.sharding}", highlight=False)
    who = _rank_terms(result)
    if result.checkpointing_saves_bytes is not None:
        out.print(f"  activation checkpointing saves {format_bytes(result.checkpointing_saves_bytes)}"
                  f" {who} at batch {batch}", highlight=False)


def _rank_terms(result: Any, suffix: str = "") -> str:
    """Print a sharded result's per-rank terms, one per line; returns "per rank" or "per
    device" (one rank: checkpointing without sharding)."""
    who = "per rank" if result.shard_ranks > 1 else "per device"
    for name, nbytes in result.rank_terms:
        out.print(f"  {name}: {format_bytes(nbytes)} {who}{suffix}", highlight=False)
    return who


def _tokens(result: Any, batch: int) -> str:
    t = getattr(result, "tokens_per_sample", None)
    return f" ({batch * t:,} tokens, {t:,} per sample)" if t and batch else ""


def render_check(result: Any) -> None:
    render_sharding(result, result.batch_size)
    if result.terms:
        out.print(f"required at batch {result.batch_size} on {result.target}")
        table = _terms_table(result.terms, first=("simulated step peak", result.peak_bytes,
                             "params, grads, optimizer state, activations (meta device)"))
        table.add_row("[bold]required[/]", f"[bold]{format_bytes(result.required_bytes)}[/]", "")
        out.print(table)
    head, tail = _check_lines(result)
    colour = "green" if result.fits else "red"
    out.print(f"[bold {colour}]{escape(head)}[/]", highlight=False)
    out.print(tail, highlight=False)
    note = getattr(result, "data_note", None)
    if note:
        out.print(f"note: {note}", highlight=False, markup=False)


def render_check_github(result: Any, file: Any = None) -> None:
    """GitHub Actions workflow commands: an ::error:: when it does not fit, else ::notice::;
    on stdout, or on ``file`` (stderr, beside ``--json``: the runner reads both)."""
    head, tail = _check_lines(result)
    level = "notice" if result.fits else "error"
    note = getattr(result, "data_note", None)
    message = (f"{head}; {tail}" + (f"; note: {note}" if note else "")).replace(
        "%", "%25").replace("\n", "%0A")
    print(f"::{level} title=bsselect check::{message}", file=file or sys.stdout, flush=True)


def render_schedule(result: Any) -> None:
    """Per point: the base run's loss, B_simple, the critical and fastest batch and each
    branch's loss drop; then the stages and the predicted saving."""
    from .selection.schedule import short_names

    s = result.settings
    users = sum(p.checkpoint is not None for p in result.points)
    source = (f"{len(result.points)} points of the base run at batch "
              f"{result.base_batch_size}, lr {result.base_lr:g}" if not s.checkpoint_samples else
              f"{users} checkpoint{'s' * (users != 1)} of your run"
              + (" and initialisation" if users < len(result.points) else "")
              + f", at the task's batch {result.base_batch_size}, lr {result.base_lr:g}, scaled")
    out.print(f"[bold]Schedule — {escape(result.task_name)}[/] (horizon {s.horizon:,} samples; "
              f"branches of {s.branch:,} samples from {source})", highlight=False)
    names = iter(short_names([p.checkpoint for p in result.points if p.checkpoint]))
    table = Table(box=None, pad_edge=False)
    if s.checkpoint_samples:
        table.add_column("checkpoint")
    table.add_column("samples", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("B_simple", justify="right")
    table.add_column("critical b", justify="right")
    table.add_column("fastest b", justify="right")
    for b in result.batch_sizes:
        table.add_column(f"drop b={b}", justify="right")
    for p in result.points:
        js = p.to_json()
        cells = []
        for br in p.branches:
            if br.drop is None:
                cells.append(br.trial.status.value)
            else:
                cells.append(f"{br.drop:.3g}")
        first = ([escape(next(names)) if p.checkpoint else "(initialisation)"]
                 if s.checkpoint_samples else [])
        table.add_row(*first, f"{p.samples:,}", _f(js["train_loss"], ".4g"), _f(js["b_simple"]),
                      _f(p.critical_batch_size, "d"), _f(p.fastest_batch_size, "d"), *cells)
    out.print(table)
    out.print(f"critical b: the largest batch whose loss drop over the branch is within "
              f"{s.tolerance:.0%} of the smallest batch's; fastest b: of the batches whose loss "
              "drop per second ties with the best within the step times' spread, the one with "
              "the largest drop", highlight=False)
    stages = Table(box=None, pad_edge=False)
    for col in ("stage", "from sample", "batch", "lr", "predicted steps", "predicted time"):
        stages.add_column(col, justify="right")
    for i, st in enumerate(result.schedule.stages, start=1):
        finite = math.isfinite(st.steps)
        stages.add_row(str(i), f"{st.start_samples:,.0f}" if math.isfinite(st.start_samples)
                       else "—", str(st.batch_size), f"{st.lr:.4g}",
                       f"{st.steps:,.0f}" if finite else "—",
                       f"{st.time_s:.3g} s" if finite else "—")
    out.print(stages)
    best = result.best_fixed
    base = result.saving(result.base_batch_size)
    vs_best = result.saving(best)
    pred = result.predicted
    out.print((f"predicted for the schedule: {pred.steps:,.0f} steps, {pred.time_s:.3g} s of "
               "training" if math.isfinite(pred.steps) else
               "predicted for the schedule: not finite (see the note)")
              + f"; vs the base batch {result.base_batch_size}: {_x(base['steps'])} the "
              f"steps, {_x(base['time'])} the time; "
              + (f"vs the best fixed batch ({best}): {_x(vs_best['steps'])} the steps, "
                 f"{_x(vs_best['time'])} the time" if best is not None else
                 "no fixed batch has a finite predicted time to compare with"),
              highlight=False)
    for note in result.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    out.print(f"journal {result.journal} · {result.wall_s:.1f} s", highlight=False, markup=False)


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"
