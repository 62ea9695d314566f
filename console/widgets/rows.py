"""The live rows of one topic, from the console's own subscription: changed rows light up."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text

from ..backend import LiveTopic
from ..fmt import Formatter
from .table import Col, InPlaceTable

__all__ = ["LiveRows", "cell_text"]

MAX_ROWS = 2000  # a feed may return many rows; the view shows the first ones in key order
CHANGED = "bold on #1f5f2a"
STALE = "dim"


def cell_text(value: Any) -> str:
    if value is None:
        return "∅"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _sort_key(key: str) -> tuple:
    values = json.loads(key)
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)


class LiveRows(InPlaceTable):
    def __init__(self, **kwargs) -> None:
        super().__init__([Col("mark", " ", 1)], **kwargs)
        self.columns_of: tuple[str, ...] = ()
        self.highlighted: set[str] = set()

    def show(self, live: LiveTopic, fmt: Formatter) -> None:
        view = live.view
        if not view.rows and not self.columns_of:
            return
        names = tuple(view.key) + tuple(
            c for c in (next(iter(view.rows.values())) if view.rows else {}) if c not in view.key
        )
        if names and names != self.columns_of:
            self.columns_of = names
            self.reset_columns([Col("mark", " ", 1)] + [
                Col(name, name.upper() + ("*" if name in view.key else ""), self._width(name, view.rows))
                for name in names
            ])  # fmt: skip
        self.highlighted = live.highlighted()
        stale = live.state != "live"
        rows = []
        for key in sorted(view.rows, key=_sort_key)[:MAX_ROWS]:
            row = view.rows[key]
            hot = key in self.highlighted
            style = CHANGED if hot else (STALE if stale else "")
            cells = [Text("▌" if hot else " ", style="bold green")]
            cells += [Text(fmt.text(cell_text(row.get(n))), style=style) for n in self.columns_of]
            rows.append((key, cells))
        self.set_rows(rows)

    @staticmethod
    def _width(name: str, rows: dict[str, dict[str, Any]]) -> int:
        sample = [len(cell_text(r.get(name))) for r in list(rows.values())[:200]]
        return max(len(name) + 3, min(32, max(sample, default=4)))
