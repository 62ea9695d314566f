"""The event stream (admin SSE) as a log, newest first, filterable with ``/``."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input

from ..widgets.events import EventTable
from .base import ConsoleScreen

__all__ = ["EventsScreen"]


class EventsScreen(ConsoleScreen):
    VIEW = "events"
    HELP = "Ownership, presence, node and health events as they happen (and the console's own)."
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear", "Clear filter", show=False),
        Binding("p", "pause", "Pause/follow"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self.paused = False

    def compose_body(self) -> ComposeResult:
        with Vertical(id="body"):
            yield EventTable(id="events")
            yield Input(placeholder="filter: any text (type, topic, node, reason)", id="prompt", classes="prompt")

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).display = False
        self.query_one("#events").border_title = "events"
        self.query_one("#events").focus()
        self.events_arrived()

    def events_arrived(self) -> None:
        if self.paused or self.console.backend is None:
            return
        table = self.query_one("#events", EventTable)
        shown = table.show(self.backend.log, self.fmt, text=self.text)
        sub = f"{shown:,} shown of {len(self.backend.log):,}"
        table.border_subtitle = sub + (f' · filter "{self.text}"' if self.text else "")

    def refresh_data(self, force: bool = False) -> None:
        self.events_arrived()  # relative times move on even when nothing new arrives

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.query_one("#events").border_title = "events · PAUSED (p follows again)" if self.paused else "events"
        self.events_arrived()

    def action_filter(self) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.value = self.text
        prompt.display = True
        prompt.focus()

    @on(Input.Changed, "#prompt")
    def changed(self, event: Input.Changed) -> None:
        self.text = event.value.strip()
        self.events_arrived()

    @on(Input.Submitted, "#prompt")
    def submitted(self) -> None:
        self.query_one("#prompt", Input).display = False
        self.query_one("#events").focus()

    def action_clear(self) -> None:
        self.text = ""
        self.submitted()
        self.events_arrived()
