"""Every topic of the cluster: one server-side page at a time, sorted and filtered by the API.

With 10,000 topics the console never holds them all: it asks for the page
the table can show (``offset``/``limit`` = the table's height), the server
sorts and filters, and the rows are updated in place once a second.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Static

from subsys.client.admin import AdminError
from subsys.core import admin as api

from ..widgets.table import Col, PagedTable
from .base import ConsoleScreen, while_shown

__all__ = ["TopicsScreen", "Filters", "STATE_STYLE"]

STATE_STYLE = {"ok": "green", "error": "bold red", "starting": "yellow", "unowned": "bold magenta"}
COLUMNS = [  # drop: the order in which a narrow screen hides them (highest first)
    Col("topic", "TOPIC", 24, "topic"), Col("feed", "FEED", 9, "feed", drop=3), Col("owner", "OWNER", 10, "owner"),
    Col("epoch", "EPOCH", 6, "epoch", True), Col("seq", "SEQ", 6, "seq", True, drop=5),
    Col("state", "STATE", 8, "state"), Col("subscribers", "SUBS", 5, "subscribers", True),
    Col("last_poll_ms", "POLL", 8, "last_poll_ms", True, drop=4),
    Col("last_poll_at", "POLLED", 9, "last_poll_at", True, drop=2),
    Col("last_change_at", "CHANGED", 9, "last_change_at", True), Col("polls", "POLLS", 6, "polls", True, drop=7),
    Col("failures", "FAILS", 5, "failures", True, drop=1), Col("interval", "EVERY", 5, "interval", True, drop=6),
    Col("error", "LAST ERROR", 12, fill=True),
]  # fmt: skip
SORTABLE = [c.key for c in COLUMNS if c.sort]
FILTER_KEYS = ("feed", "state", "node", "owner")


@dataclass
class Filters:
    """``/`` accepts free text plus ``feed:`` ``state:`` ``node:`` ``owner:`` terms (like k9s' filter)."""

    text: str = ""
    feed: str | None = None
    state: str | None = None
    node: str | None = None
    owner: str | None = None

    @classmethod
    def parse(cls, line: str) -> "Filters":
        found, words = cls(), []
        for word in line.split():
            name, sep, value = word.partition(":")
            if sep and name in FILTER_KEYS and value:
                setattr(found, name, value)
            else:
                words.append(word)  # topics contain ':' too ("orders:42"): only known terms are filters
        found.text = " ".join(words)
        return found

    def query(self) -> dict[str, str | None]:
        return {"q": self.text or None, "feed": self.feed, "state": self.state, "node": self.node, "owner": self.owner}

    def describe(self) -> str:
        parts = [f'"{self.text}"'] if self.text else []
        parts += [f"{k}:{getattr(self, k)}" for k in FILTER_KEYS if getattr(self, k)]
        return " ".join(parts)


class TopicsScreen(ConsoleScreen):
    VIEW = "topics"
    HELP = "Every topic, a page at a time, sorted and filtered by the server."
    BINDINGS = [
        Binding("enter", "open", "Open"),
        Binding("slash", "filter", "Filter"),
        Binding("g", "goto", "Go to"),
        Binding("less_than_sign", "sort(-1)", "Sort ◀", key_display="<"),
        Binding("greater_than_sign", "sort(1)", "Sort ▶", key_display=">"),
        Binding("s", "reverse", "Asc/desc"),
        Binding("escape", "clear", "Clear filter", show=False),
        Binding("f", "failover", "Failover"),
        Binding("F", "failover_to", "Failover to…", key_display="F"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filters = Filters()
        self.sort, self.descending = "topic", False
        self.start = 0
        self.total = 0
        self.page: list[api.TopicSummary] = []
        self._land: str = "keep"  # where the cursor goes after a page move
        self._input_mode = "filter"  # what the bottom input is for: "filter" | "goto"
        self.took_ms = 0.0

    def compose_body(self) -> ComposeResult:
        with Vertical(id="body"):
            yield PagedTable(COLUMNS, id="topics")
            yield Static(id="topics-empty", classes="panel")
            yield Input(id="prompt", classes="prompt")

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).display = False
        self.query_one("#topics-empty", Static).display = False
        self.table.mark_sorted(self.sort, self.descending)
        self.table.border_title = "topics"

    @property
    def table(self) -> PagedTable:
        return self.query_one("#topics", PagedTable)

    @property
    def page_size(self) -> int:
        # Exactly what fits: fetching more than is visible is what makes 10,000 topics slow.
        return max(5, self.table.size.height - 1) if self.table.size.height else 40

    def on_resize(self) -> None:
        self.refresh_data(force=True)

    # -- data --------------------------------------------------------------------------------

    @work(exclusive=True, group="topics")
    @while_shown
    async def load(self) -> None:
        asked = time.monotonic()
        try:
            page = await self.backend.topics(
                sort=self.sort, order="desc" if self.descending else "asc",
                offset=self.start, limit=self.page_size, **self.filters.query(),
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except AdminError:
            self.loaded()  # keep showing the last page; the banner says why
            return
        if page.total and self.start >= page.total:  # the list shrank under us: show its end
            self.start = max(0, (page.total - 1) // self.page_size * self.page_size)
            self.loaded()
            self.refresh_data(force=True)
            return
        self.took_ms = (time.monotonic() - asked) * 1000
        self.show(page)
        self.loaded()

    def show(self, page: api.TopicPage) -> None:
        fmt = self.fmt
        self.page, self.total = page.topics, page.total
        rows = []
        for t in page.topics:
            error = f"{t.last_error.code}" if t.last_error else ""
            rows.append((t.topic, (
                t.topic, t.feed, t.owner or Text("—", style="dim"), fmt.epoch(t.epoch), fmt.seq(t.seq),
                Text(t.state, style=STATE_STYLE.get(t.state, "")), fmt.count(t.subscribers),
                fmt.ms(t.last_poll_ms), fmt.ago(t.last_poll_at), fmt.ago(t.last_change_at),
                fmt.volatile_count(t.polls), Text(fmt.count(t.failures), style="red" if t.failures else ""),
                fmt.interval(t.interval), Text(error, style="red"),
            )))  # fmt: skip
        table = self.table
        table.set_rows(rows)
        if self._land == "top":
            table.move_cursor(row=0)
        elif self._land == "bottom":
            table.move_cursor(row=max(0, table.row_count - 1))
        self._land = "keep"
        first = self.start + 1 if page.topics else 0
        sub = f"{first:,}–{self.start + len(page.topics):,} of {page.total:,}"
        if self.filters.describe():
            sub += f" · filter {self.filters.describe()}"
        # How long the server took: with thousands of topics it sets the pace, not the console.
        sub += f" · answered in {self.fmt.took(self.took_ms)}"
        if page.partial:
            sub += f" · partial: {', '.join(p.node for p in page.unavailable)} did not answer"
        table.border_subtitle = sub
        self._show_empty(page.total == 0, sub)

    def _show_empty(self, empty: bool, subtitle: str) -> None:
        """In place of an empty table, say why it is empty and what to do (the table keeps the keys)."""
        hint = self.query_one("#topics-empty", Static)
        table = self.table
        if empty:
            if self.filters.describe():
                text = Text.assemble(("No topic matches ", "bold"), (self.filters.describe(), "bold"),
                                     "\n\nesc clears the filter, / edits it.")  # fmt: skip
            else:
                text = Text.assemble(
                    ("No topics.", "bold"),
                    "\n\nA topic exists while some client subscribes to it, on any node. Subscribe to one,"
                    "\nfor example with ", ("subsys sub FEED:PARAM", "bold"), " in another terminal,"
                    " and it appears here at once.",
                )
            hint.update(text)
            hint.border_title, hint.border_subtitle = "topics", subtitle
        hint.display, table.display = empty, not empty
        if not empty and self.focused is None:
            table.focus()

    @property
    def selected(self) -> api.TopicSummary | None:
        key = self.table.selected_key
        return next((t for t in self.page if t.topic == key), None)

    # -- paging and sorting ----------------------------------------------------------------

    @on(PagedTable.Page)
    def page_moved(self, event: PagedTable.Page) -> None:
        size = self.page_size
        last = max(0, (self.total - 1) // size * size)
        if event.to == "first":
            offset = 0
        elif event.to == "last":
            offset = last
        else:
            offset = min(last, max(0, self.start + event.delta * size))
        if offset == self.start and event.to is None:
            return
        self.start, self._land = offset, event.row
        self.refresh_data(force=True)

    def action_sort(self, step: int) -> None:
        index = SORTABLE.index(self.sort) if self.sort in SORTABLE else 0
        self.sort = SORTABLE[(index + step) % len(SORTABLE)]
        self._resort()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self._resort()

    @on(PagedTable.HeaderSelected)
    def header_clicked(self, event: PagedTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key not in SORTABLE:
            return
        self.descending = not self.descending if key == self.sort else False
        self.sort = key or "topic"
        self._resort()

    def _resort(self) -> None:
        self.start = 0
        self.table.mark_sorted(self.sort, self.descending)
        self.refresh_data(force=True)

    # -- filter and go-to ----------------------------------------------------------------------

    def action_filter(self) -> None:
        self._open_prompt("filter", "filter: text  feed:orders  state:error|ok|starting|unowned  node:…  owner:…",
                          self.filters_line())  # fmt: skip

    def action_goto(self) -> None:
        self._open_prompt("goto", "go to topic: feed:param (enter opens it)", "")

    def filters_line(self) -> str:
        parts = [self.filters.text] if self.filters.text else []
        parts += [f"{k}:{getattr(self.filters, k)}" for k in FILTER_KEYS if getattr(self.filters, k)]
        return " ".join(parts)

    def _open_prompt(self, mode: str, placeholder: str, value: str) -> None:
        self._input_mode = mode
        prompt = self.query_one("#prompt", Input)
        prompt.placeholder, prompt.value = placeholder, value
        prompt.border_title = "/" if mode == "filter" else "go to"
        prompt.display = True
        prompt.focus()

    def apply_filter(self, line: str) -> None:
        self.filters = Filters.parse(line)
        self.start = 0
        self.refresh_data(force=True)

    @on(Input.Changed, "#prompt")
    def prompt_changed(self, event: Input.Changed) -> None:
        if self._input_mode == "filter":  # filter as you type: each key cancels the previous request
            self.apply_filter(event.value)

    @on(Input.Submitted, "#prompt")
    def prompt_submitted(self, event: Input.Submitted) -> None:
        self._close_prompt()
        if self._input_mode == "goto" and event.value.strip():
            self.console.open_topic(event.value.strip())

    def _close_prompt(self) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.display = False
        self.table.focus()

    def action_clear(self) -> None:
        prompt = self.query_one("#prompt", Input)
        if prompt.display:
            if self._input_mode == "filter":
                self.apply_filter("")
            self._close_prompt()
        elif self.filters.describe():
            self.apply_filter("")

    # -- actions ----------------------------------------------------------------------------------

    def action_open(self) -> None:
        topic = self.selected
        if topic is not None:
            self.console.open_topic(topic.topic)

    @on(PagedTable.RowSelected, "#topics")
    def row_selected(self) -> None:
        self.action_open()

    def action_failover(self) -> None:
        if self.selected is not None:
            self.console.confirm_failover(self.selected.topic)

    def action_failover_to(self) -> None:
        if self.selected is not None:
            self.console.choose_failover_target(self.selected.topic)
