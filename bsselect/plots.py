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
    takes a file), so that a sweep does not fail after its trials for want of either."""
    import os

    _pyplot()
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--plot {str(path)!r} is a directory; give a file name like sweep.png")
    if not folder.is_dir():
        raise UsageError(f"--plot {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--plot {str(path)!r} is not writable")


def plot_sweep(result: Any, path: Path) -> None:
    """Four panels in one PNG at ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ok = [t for t in result.trials if t.status.value == "ok"]
    for t in result.trials:
        curve = [p for p in t.loss_curve if p.loss is not None]
        if not curve:
            continue
        label = f"b={t.batch_size}" + ("" if t.status.value == "ok" else f" ({t.status.value})")
        axes[0, 0].plot([p.wall_s for p in curve], [p.loss for p in curve], label=label, lw=1)
        axes[0, 1].plot([p.samples for p in curve], [p.loss for p in curve], label=label, lw=1)
    for ax, xlabel in ((axes[0, 0], "wall time (s)"), (axes[0, 1], "samples")):
        ax.set(xlabel=xlabel, ylabel="training loss (batch)", yscale="log")
        ax.legend(fontsize=7)
    _step_time_panel(axes[1, 0], ok, result.ranking.step_fit)
    _ranking_panel(axes[1, 1], result.ranking)
    fig.suptitle(f"bsselect sweep — {result.task}: recommended batch "
                 f"{result.recommended_batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _step_time_panel(ax: Any, ok: list, fit: Any) -> None:
    sizes = [t.batch_size for t in ok if t.step_time_s is not None]
    times = [t.step_time_s * 1e3 for t in ok if t.step_time_s is not None]
    ax.plot(sizes, times, "o", label="median step time")
    if fit.tau_f_s is not None and fit.tau_d_s is not None and sizes:
        xs = sorted(sizes)
        ax.plot(xs, [(fit.tau_f_s + fit.tau_d_s * b) * 1e3 for b in xs], "-",
                label=f"fit {fit.tau_f_s * 1e3:.3g} ms + {fit.tau_d_s * 1e6:.3g} µs·b")
    ax.set(xscale="log", xlabel="batch size", ylabel="step time (ms)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)


def _ranking_panel(ax: Any, ranking: Any) -> None:
    rows = [r for r in ranking.rows if r.relative_time is not None]
    if rows:
        ax.barh([str(r.batch_size) for r in rows][::-1], [r.relative_time for r in rows][::-1])
        ax.set(xlabel="predicted time to target, relative to best", ylabel="batch size")
    else:
        ax.text(0.5, 0.5, "no noise-scale estimate:\nranked by measured loss speed",
                ha="center", va="center")
    ax.set_title(ranking.verdict[:90], fontsize=8)
