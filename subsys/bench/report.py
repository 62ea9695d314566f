"""Printing a bench's result for people: rich tables (``--json`` prints the dict itself).

Generic over the result's shape, so a new figure needs no printing code:
scalars go in one key/value table; a dict of dicts (``results``: one row
per system or mode, ``ratio*`` rows last) becomes a table with a column per
key; a dict of scalars becomes a small key/value table of its own.
"""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

__all__ = ["render"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _rows_table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> Table:
    columns: list[str] = []
    for row in rows.values():
        columns += [key for key in row if key not in columns and not isinstance(row[key], Mapping)]
    if len(columns) > len(rows):  # few systems, many figures: a column per system reads better
        table = Table(title=title, title_justify="left")
        table.add_column("", style="bold")
        for name in rows:
            table.add_column(name, justify="right", style="cyan" if name.startswith("ratio") else None)
        for column in columns:
            table.add_row(column, *(_cell(row.get(column)) for row in rows.values()))
        return table
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("", style="bold")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows.items():
        style = "cyan" if name.startswith("ratio") else None
        table.add_row(name, *(_cell(row.get(column)) for column in columns), style=style)
    return table


def _pairs_table(title: str, pairs: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in pairs.items():
        table.add_row(key, _cell(value))
    return table


def render(result: Mapping[str, Any], console: Console) -> None:
    scalars = {k: v for k, v in result.items() if not isinstance(v, Mapping)}
    console.print(_pairs_table(f"subsys bench {result.get('bench', '')}", scalars))
    for key, value in result.items():
        if not isinstance(value, Mapping) or not value:
            continue
        if all(isinstance(row, Mapping) for row in value.values()):
            console.print(_rows_table(key, value))
        else:
            console.print(_pairs_table(key, value))
