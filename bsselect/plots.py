"""``--plot``: loss vs. wall time and vs. samples per batch size, step time vs. batch with the
fit, and the ranking. matplotlib is an optional extra, imported only here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bsselect[plot]'") from None
    return plt


def check_plot_target(path: Path) -> None:
    """Before any work: matplotlib importable and ``path`` writable (its folder exists and
    takes a file; missing folders are created here, as ``--journal``'s are), so that a sweep
    does not fail after its trials for want of either."""
    import os

    _pyplot()
    try:
        is_dir = path.is_dir()
        folder = next((p for p in path.parents if p.exists()), Path("."))
    except OSError as exc:  # a name too long for the file system, say
        raise UsageError(f"--plot {str(path)!r}: {exc.strerror or exc}") from None
    if is_dir:
        raise UsageError(f"--plot {str(path)!r} is a directory; give a file name like plot.png")
    if not folder.is_dir():
        raise UsageError(f"--plot {str(path)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--plot {str(path)!r} is not writable")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix and suffix not in kinds:
        raise UsageError(f"--plot {str(path)!r}: matplotlib cannot write .{suffix} files; use "
                         f"one of {', '.join('.' + k for k in sorted(kinds))} (e.g. plot.png)")
    try:  # last, so that a refused path leaves no folders behind
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--plot {str(path)!r}: cannot create folder {str(path.parent)!r} "
                         f"({exc.strerror or exc})") from None


def save(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path``, creating its missing folders (a caller of the plot
    functions that did not call ``check_plot_target`` first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_sweep(result: Any, path: Path) -> None:
    """Six panels in one PNG at ``path``: training loss against wall time and samples, step
    times with the physical fit and the line, validation loss and metric per batch size, the
    predicted time to target with its interval and the tied set, and the verdict."""
    import textwrap

    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ok = [t for t in result.trials if t.status.value == "ok"]
    for t in result.trials:
        curve = [p for p in t.loss_curve if p.loss is not None]
        if not curve:
            continue
        label = f"b={t.batch_size}" + ("" if t.status.value == "ok" else f" ({t.status.value})")
        axes[0, 0].plot([p.wall_s for p in curve], [p.loss for p in curve], label=label, lw=1)
        axes[0, 1].plot([p.samples for p in curve], [p.loss for p in curve], label=label, lw=1)
    for ax, xlabel in ((axes[0, 0], "wall time (s)"), (axes[0, 1], "samples")):
        ax.set(xlabel=xlabel, ylabel="training loss (mini-batch)")
        _loss_axis(ax)
        ax.legend(fontsize=7)
    _step_time_panel(axes[0, 2], ok, result.ranking, {t.batch_size for t in result.timing})
    _validation_panel(axes[1, 0], ok)
    _ranking_panel(axes[1, 1], result.ranking)
    axes[1, 2].axis("off")
    axes[1, 2].text(0, 1, "\n".join(textwrap.wrap("verdict: " + result.ranking.verdict, 60)),
                    va="top", ha="left", fontsize=8, family="monospace")
    fig.suptitle(f"bsselect sweep — {result.task}: recommended batch "
                 f"{result.recommended_batch_size}")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def _loss_axis(ax: Any) -> None:
    """Log scale with readable ticks when the loss spans a decade or more, else linear."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo >= 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=6)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _step_time_panel(ax: Any, ok: list, ranking: Any, rounds: set[int]) -> None:
    fit, shape = ranking.step_fit, ranking.shape
    measured = [t for t in ok if t.step_time_s is not None]
    sizes = [t.batch_size for t in measured]
    for label, marker, group in (("step time (interleaved rounds)", "o",
                                  [t for t in measured if t.batch_size in rounds]),
                                 ("step time (its own trial)", "x",
                                  [t for t in measured if t.batch_size not in rounds])):
        if group:
            ax.plot([t.batch_size for t in group], [t.step_time_s * 1e3 for t in group],
                    marker, label=label)
    if shape is not None and shape.batch_sizes:
        ax.plot(shape.batch_sizes, [t * 1e3 for t in shape.fitted_s], "-", lw=2,
                label="physical fit (ranking)")
    if fit.tau_f_s is not None and fit.tau_d_s is not None and sizes:
        xs = sorted(sizes)
        ax.plot(xs, [(fit.tau_f_s + fit.tau_d_s * b) * 1e3 for b in xs], "--",
                label=f"line {_ms(fit.tau_f_s)} + {_ms(fit.tau_d_s)}·b (b_opt)")
    ax.set(xlabel="batch size", ylabel="step time (ms)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)


def _validation_panel(ax: Any, ok: list) -> None:
    sizes = [t.batch_size for t in ok if t.val_loss is not None]
    ax.plot(sizes, [t.val_loss for t in ok if t.val_loss is not None], "o-",
            label="validation loss")
    ax.set(xlabel="batch size (equal-sample trials)", ylabel="validation loss")
    ax.set_xscale("log", base=2)
    metric = [(t.batch_size, t.val_metric) for t in ok if t.val_metric is not None]
    if metric:
        twin = ax.twinx()
        twin.plot([b for b, _ in metric], [m for _, m in metric], "s--", color="tab:green",
                  label="validation metric")
        twin.set_ylabel("validation metric")
        twin.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="lower left")


def _ranking_panel(ax: Any, ranking: Any) -> None:
    rows = [r for r in ranking.rows if r.relative_time is not None]
    if not rows:
        ax.text(0.5, 0.5, "no noise-scale estimate:\nranked by measured loss speed",
                ha="center", va="center")
        return
    best = rows[0].predicted_time_s / rows[0].relative_time
    labels = [str(r.batch_size) for r in rows][::-1]
    mids = [r.relative_time for r in rows][::-1]
    lo = [m - (r.predicted_lo_s / best if r.predicted_lo_s is not None else m)
          for m, r in zip(mids, rows[::-1])]
    hi = [((r.predicted_hi_s / best) if r.predicted_hi_s is not None else m) - m
          for m, r in zip(mids, rows[::-1])]
    colors = ["tab:green" if r.tied else "tab:gray" for r in rows][::-1]
    ax.barh(labels, mids, xerr=[lo, hi], color=colors, capsize=3)
    ax.axvline(1.0, color="k", lw=0.5)
    ax.set(xlabel="predicted time to target / best (90% interval; green: tied)",
           ylabel="batch size (ranked)")


def plot_schedule(result: Any, path: Path) -> None:
    """Batch size over the run (log-log): B_simple with its interval, the critical and the
    fastest batch at each point, and the schedule as a step line over samples seen."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [max(p.samples, 1) for p in result.points]
    noise = [(x, p.noise) for x, p in zip(xs, result.points) if p.noise and p.noise.get("b_simple")]
    if noise:
        ax.plot([x for x, _ in noise], [n["b_simple"] for _, n in noise], "o-", label="B_simple")
        for x, n in noise:
            if n.get("b_simple_ci"):
                ax.vlines(x, *n["b_simple_ci"], color="C0", alpha=0.4)
    for attr, style, label in (("critical_batch_size", "s--", "critical batch"),
                               ("fastest_batch_size", "^--", "fastest batch")):
        pts = [(x, getattr(p, attr)) for x, p in zip(xs, result.points) if getattr(p, attr)]
        if pts:
            ax.plot([x for x, _ in pts], [v for _, v in pts], style, label=label)
    stages = result.schedule.stages
    edges = [max(s.start_samples, 1) for s in stages] + [max(result.predicted.samples, xs[-1])]
    for st, lo, hi in zip(stages, edges, edges[1:]):
        ax.hlines(st.batch_size, lo, hi, colors="k", lw=2.5)
    ax.plot([], [], "k-", lw=2.5, label="schedule (samples of the scheduled run)")
    ax.set(xscale="log", yscale="log", xlabel="samples seen (0 drawn at 1)", ylabel="batch size",
           title=f"bsselect schedule — {result.task_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
