"""Rich rendering of results for people (stderr-safe); JSON goes through ``emit_json``."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from .units import format_bytes

console = Console(stderr=True)      # progress, logs and human tables
out = Console()                     # results for people when not --json


def emit_json(data: Any) -> None:
    """Machine-readable results: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def render_probe(result: Any) -> None:
    table = Table(title=f"Peak memory of one training step — {result.task}", title_justify="left")
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
        terms = Table(title=f"{result.target} terms at batch {result.max_batch}",
                      title_justify="left")
        terms.add_column("term")
        terms.add_column("bytes", justify="right")
        terms.add_column("why")
        for t in result.terms:
            terms.add_row(t.name, format_bytes(t.bytes), t.note)
        out.print(terms)
    usable = result.budget_bytes * (1 - result.margin)
    out.print(
        f"method [bold]{result.method}[/] on {result.device} · fixed "
        f"{format_bytes(result.fixed_bytes)} + {format_bytes(result.per_sample_bytes)}/sample "
        f"(fit residual {format_bytes(result.fit_residual_bytes)})"
    )
    out.print(
        f"budget {format_bytes(result.budget_bytes)} ({result.budget_source}), "
        f"{result.margin:.0%} margin → {format_bytes(usable)} usable"
    )
    if result.confirmation:
        path = " → ".join(f"{s['batch_size']} {s['outcome']}" for s in result.confirmation)
        out.print(f"confirmed with real steps: {path}")
    out.print(
        f"[bold green]max batch {result.max_batch}[/] · largest power of two "
        f"[bold green]{result.max_batch_pow2}[/]"
    )
