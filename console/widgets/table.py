"""Tables that are updated in place, and one that pages through the server.

A refresh never clears a table: rows are addressed by position and only the
cells whose text changed are rewritten, so the cursor, the scroll position
and the user's eye stay where they were, and a 1 Hz refresh of a full page
costs a few dozen string comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

__all__ = ["Col", "InPlaceTable", "PagedTable"]

Cell = str | Text


@dataclass(frozen=True)
class Col:
    key: str
    label: str
    width: int
    sort: str | None = None  # the API's sort key, when the server can sort by this column
    right: bool = False  # a number (kept left-aligned like k9s: DataTable pads Text cells unevenly)


def _sig(cell: Cell) -> tuple:
    """What a cell looks like: Text compares by its plain text only, but a highlight is a style."""
    if isinstance(cell, Text):
        return (cell.plain, str(cell.style), tuple(cell.spans))
    return (cell,)


class InPlaceTable(DataTable):
    """A DataTable whose rows are replaced positionally by :meth:`set_rows`."""

    def __init__(self, columns: Sequence[Col], **kwargs) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", False)
        super().__init__(**kwargs)
        self.specs = list(columns)
        self.keys: list[str] = []  # the identity (topic, node, ...) shown in each row
        self._cells: list[tuple[Cell, ...]] = []

    def on_mount(self) -> None:
        for col in self.specs:
            self.add_column(self._label(col, ""), width=col.width, key=col.key)

    def reset_columns(self, columns: Sequence[Col]) -> None:
        """New columns (a topic's first snapshot tells which): the only time rows are dropped."""
        self.clear(columns=True)
        self.specs, self.keys, self._cells = list(columns), [], []
        for col in self.specs:
            self.add_column(self._label(col, ""), width=col.width, key=col.key)

    def _label(self, col: Col, mark: str) -> Text:
        return Text(f"{col.label}{mark}", style="bold")

    def mark_sorted(self, key: str | None, descending: bool) -> None:
        """Show the server's sort order in the header (▲/▼ after the column's name)."""
        for col in self.specs:
            mark = ("▼" if descending else "▲") if col.key == key else ""
            column = self.columns.get(col.key)  # type: ignore[call-overload]
            if column is not None:
                column.label = self._label(col, mark)
        self.refresh()

    def plain_rows(self) -> list[list[str]]:
        """What the table shows, as plain text (for tests and for copying)."""
        return [[c.plain if isinstance(c, Text) else str(c) for c in cells] for cells in self._cells]

    @property
    def selected_key(self) -> str | None:
        if not self.keys or not 0 <= self.cursor_row < len(self.keys):
            return None
        return self.keys[self.cursor_row]

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """``rows``: (identity, cells) in display order; only what differs is touched."""
        cols = [c.key for c in self.specs]
        for index, (key, cells) in enumerate(rows):
            cells = tuple(cells)
            if index < len(self._cells):
                old = self._cells[index]
                if list(map(_sig, old)) != list(map(_sig, cells)):
                    for col, before, after in zip(cols, old, cells):
                        if _sig(before) != _sig(after):
                            self.update_cell(str(index), col, after)
                    self._cells[index] = cells
                self.keys[index] = key
            else:
                self.add_row(*cells, key=str(index))
                self._cells.append(cells)
                self.keys.append(key)
        for index in range(len(self._cells) - 1, len(rows) - 1, -1):
            self.remove_row(str(index))
            self._cells.pop()
            self.keys.pop()


class PagedTable(InPlaceTable):
    """Shows one page of a server-side list; moving past an edge asks for the next page."""

    @dataclass
    class Page(Message):
        """Move by ``delta`` pages (or to the first/last page: ``to``); ``row``: where the cursor lands."""

        table: "PagedTable"
        delta: int = 0
        to: str | None = None  # "first" | "last"
        row: str = "keep"  # "top" | "bottom" | "keep"

    def action_cursor_down(self) -> None:
        if self.row_count and self.cursor_row >= self.row_count - 1:
            self.post_message(self.Page(self, delta=1, row="top"))
        else:
            super().action_cursor_down()

    def action_cursor_up(self) -> None:
        if self.cursor_row <= 0:
            self.post_message(self.Page(self, delta=-1, row="bottom"))
        else:
            super().action_cursor_up()

    def action_page_down(self) -> None:
        self.post_message(self.Page(self, delta=1))

    def action_page_up(self) -> None:
        self.post_message(self.Page(self, delta=-1))

    def action_scroll_top(self) -> None:
        self.post_message(self.Page(self, to="first", row="top"))

    def action_scroll_bottom(self) -> None:
        self.post_message(self.Page(self, to="last", row="bottom"))
