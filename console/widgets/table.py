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
    fill: bool = False  # takes the width left over (at least ``width``): the table spans the screen
    drop: int = 0  # 0: always shown; on a narrow screen the highest goes first (then the next ...)


def _sig(cell: Cell) -> tuple:
    """What a cell looks like: Text compares by its plain text only, but a highlight is a style."""
    if isinstance(cell, Text):
        return (cell.plain, str(cell.style), tuple(cell.spans))
    return (cell,)


class InPlaceTable(DataTable):
    """A DataTable whose rows are replaced positionally by :meth:`set_rows`.

    Its columns fit the width it has, like k9s: on a narrow screen the
    least useful ones (``Col.drop``) are hidden, on a wide one the ``fill``
    column takes what is left, so no table needs a horizontal scroll bar.
    Rows are always given (and kept) with every column.
    """

    def __init__(self, columns: Sequence[Col], **kwargs) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", False)
        super().__init__(**kwargs)
        self.specs = list(columns)
        self.keys: list[str] = []  # the identity (topic, node, ...) shown in each row
        self._cells: list[tuple[Cell, ...]] = []  # every column's cell, shown or not
        self._shown: list[int] = list(range(len(self.specs)))  # indexes into specs
        self._marks: dict[str, str] = {}  # column key -> sort mark in its header

    def on_mount(self) -> None:
        self._build_columns()

    def on_resize(self) -> None:
        self._fit()

    def reset_columns(self, columns: Sequence[Col]) -> None:
        """New columns (a topic's first snapshot tells which): the only time rows are dropped."""
        self.clear(columns=True)
        self.specs, self.keys, self._cells = list(columns), [], []
        self._shown = list(range(len(self.specs)))
        self._fit(rebuild=True)

    # -- fitting the width ---------------------------------------------------------------

    def _layout(self, width: int) -> tuple[list[int], dict[int, int]]:
        """Which columns fit ``width`` cells, and each one's width."""
        pad = 2 * self.cell_padding
        shown = list(range(len(self.specs)))

        def needed(indexes: list[int]) -> int:
            return sum(self.specs[i].width + pad for i in indexes)

        while needed(shown) > width:
            droppable = [i for i in shown if self.specs[i].drop]
            if not droppable:
                break
            shown.remove(max(droppable, key=lambda i: (self.specs[i].drop, i)))
        widths = {i: self.specs[i].width for i in shown}
        fill = next((i for i in shown if self.specs[i].fill), None)
        if fill is not None:
            widths[fill] += max(0, width - needed(shown))
        return shown, widths

    def _fit(self, rebuild: bool = False) -> None:
        if not self.size.width:
            return
        available = self.size.width - self.styles.scrollbar_size_vertical  # room for a scroll bar
        shown, widths = self._layout(available)
        if rebuild or shown != self._shown:
            self._shown = shown
            self._build_columns(widths)
            return
        changed = False
        for index, width in widths.items():
            column = self.columns.get(self.specs[index].key)  # type: ignore[call-overload]
            if column is not None and column.width != width:
                column.width, changed = width, True
        if changed:
            # DataTable has no public way to resize a column: recompute its layout as add_column does.
            self._require_update_dimensions = True
            self.refresh()

    def _build_columns(self, widths: dict[int, int] | None = None) -> None:
        cursor = self.cursor_row
        self.clear(columns=True)
        for index in self._shown:
            col = self.specs[index]
            width = (widths or {}).get(index, col.width)
            self.add_column(self._label(col, self._marks.get(col.key, "")), width=width, key=col.key)
        for row, cells in enumerate(self._cells):
            self.add_row(*self._visible(cells), key=str(row))
        if self._cells:
            self.move_cursor(row=min(cursor, len(self._cells) - 1), animate=False)

    def _visible(self, cells: Sequence[Cell]) -> list[Cell]:
        return [cells[i] for i in self._shown if i < len(cells)]

    # -- headers and rows ----------------------------------------------------------------

    def _label(self, col: Col, mark: str) -> Text:
        return Text(f"{col.label}{mark}", style="bold")

    def mark_sorted(self, key: str | None, descending: bool) -> None:
        """Show the server's sort order in the header (▲/▼ after the column's name)."""
        self._marks = {key: "▼" if descending else "▲"} if key else {}
        for col in self.specs:
            column = self.columns.get(col.key)  # type: ignore[call-overload]
            if column is not None:
                column.label = self._label(col, self._marks.get(col.key, ""))
        self.refresh()

    @property
    def shown_columns(self) -> list[str]:
        return [self.specs[i].key for i in self._shown]

    def plain_rows(self) -> list[list[str]]:
        """The rows, every column (shown or not), as plain text (for tests and for copying)."""
        return [[c.plain if isinstance(c, Text) else str(c) for c in cells] for cells in self._cells]

    @property
    def selected_key(self) -> str | None:
        if not self.keys or not 0 <= self.cursor_row < len(self.keys):
            return None
        return self.keys[self.cursor_row]

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """``rows``: (identity, every column's cells) in display order; only what differs is touched."""
        shown = [(i, self.specs[i].key) for i in self._shown]
        for index, (key, cells) in enumerate(rows):
            cells = tuple(cells)
            if index < len(self._cells):
                old = self._cells[index]
                if list(map(_sig, old)) != list(map(_sig, cells)):
                    for i, col in shown:
                        if i < len(cells) and (i >= len(old) or _sig(old[i]) != _sig(cells[i])):
                            self.update_cell(str(index), col, cells[i])
                    self._cells[index] = cells
                self.keys[index] = key
            else:
                self.add_row(*self._visible(cells), key=str(index))
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
