"""Showing results: a table on a terminal, plain lines when piped, JSON on request."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

__all__ = ["emit_json", "emit_table", "is_terminal"]


def is_terminal() -> bool:
    return sys.stdout.isatty()


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def emit_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]
) -> None:
    """``columns`` are (key, heading) pairs; a rich table on a terminal, else tab-separated."""
    if is_terminal():
        table = Table(title=title, title_justify="left")
        for _, heading in columns:
            table.add_column(heading)
        for row in rows:
            table.add_row(*(str(row.get(key, "")) for key, _ in columns))
        Console().print(table)
        return
    # Piped: tab-separated with a header line, easy for cut/awk and stable for scripts.
    click.echo("\t".join(heading for _, heading in columns))
    for row in rows:
        click.echo("\t".join(str(row.get(key, "")) for key, _ in columns))
