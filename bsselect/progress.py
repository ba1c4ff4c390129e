"""The command line's live display of long work: the rich progress bars on stderr that a
sweep and a schedule drive through their hooks (``SweepHooks``, ``ScheduleHooks``), transient,
so that they are gone when the results print. (The probe's and noise's one bar is
``run_options.progress_bar``, which the API uses too.)
"""

from __future__ import annotations

from typing import Optional


class SweepProgress:
    """Two rich bars: trials overall (with ETA) and steps of the current trial."""

    def __init__(self, console, n_trials: int) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console
        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=True,
                            disable=not console.is_terminal)
        self.overall = self.bar.add_task("trials", total=n_trials)
        self.current = self.bar.add_task("trial", total=None, visible=False)

    def __enter__(self):
        from rich.markup import escape  # the warning's text prints literally: brackets kept

        from .selection.sweep import SweepHooks

        self.bar.start()
        return SweepHooks(trial_start=self._start, step=self._step, trial_end=self._end,
                          warn=lambda w: self.console.print(f"[yellow]warning:[/] {escape(w)}",
                                                            highlight=False),
                          timing_start=self._timing_start, timing_step=self._timing_step)

    def _timing_start(self, units: int) -> None:
        self.bar.update(self.current, description="timing rounds", completed=0, total=units,
                        visible=True)

    def _timing_step(self) -> None:
        self.bar.advance(self.current)

    def _start(self, b: int, index: int, steps: Optional[int]) -> None:
        what = f"warm start (batch {b})" if index < 0 else f"batch {b}"
        self.bar.update(self.current, description=what, completed=0, total=steps,
                        visible=True)

    def _step(self, done: int, total: Optional[int]) -> None:
        self.bar.update(self.current, completed=done)

    def _end(self, result) -> None:
        self.bar.advance(self.overall)
        if result.status.value == "ok" and result.wall_s < 1.0:
            return  # the bar shows it; a line per sub-second trial is noise
        note = "" if result.status.value == "ok" else f" ({result.error})"
        self.console.print(f"batch {result.batch_size}: {result.status.value} in "
                           f"{result.wall_s:.1f} s{note}", highlight=False, markup=False)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


class ScheduleProgress:
    """One transient rich bar for the current phase (timing rounds, base run, a branch)."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # markup=False: descriptions are plain text (a checkpoint's name may hold brackets)
        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                            TimeElapsedColumn(), console=console, transient=True,
                            disable=not console.is_terminal)
        self.current = self.bar.add_task("schedule", total=None)

    def __enter__(self):
        from .selection.schedule import ScheduleHooks

        self.bar.start()
        return ScheduleHooks(
            phase=lambda what, total: self.bar.update(self.current, description=what,
                                                      completed=0, total=total),
            advance=lambda: self.bar.advance(self.current),
            start=lambda line: self.bar.console.print(line, highlight=False, markup=False))

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
