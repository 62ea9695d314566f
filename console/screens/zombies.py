"""Zombies: pollers that run without owning their topic. The detector is another issue's work.

This screen already has the shape the detector will fill, with the same
conventions as the others: a table of suspects (``#zombies``), an evidence
panel for the selected one (``#evidence``) and a mutating action slot
(``x`` reap, hidden in read-only mode like every mutating action).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Static

from ..widgets.table import Col, InPlaceTable
from .base import ConsoleScreen

__all__ = ["ZombiesScreen", "COLUMNS"]

COLUMNS = [Col("topic", "TOPIC", 26), Col("node", "NODE", 14), Col("epoch", "EPOCH", 7, right=True),
           Col("owner", "OWNER", 14), Col("since", "SINCE", 9), Col("evidence", "EVIDENCE", 30)]  # fmt: skip

PLACEHOLDER = """\
[b]The zombie detector is coming.[/b]

A zombie is a poller still running on a node that no longer owns its topic
(a paused or partitioned node that has not noticed yet). Fencing already
drops what it publishes; the detector will list them here:

  • the table: each suspect poller, its node and epoch, the real owner;
  • this panel: the evidence (epochs seen, fenced publications, last contact);
  • [b]x[/b] reap: stop the suspect poller (operator token, with confirmation).
"""


class ZombiesScreen(ConsoleScreen):
    VIEW = "zombies"
    HELP = "Pollers running without ownership (coming with the zombie detector)."
    BINDINGS = [Binding("x", "reap", "Reap")]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield InPlaceTable(COLUMNS, id="zombies", classes="panel")
            yield Static(PLACEHOLDER, id="evidence", classes="panel")

    def on_mount(self) -> None:
        table = self.query_one("#zombies", InPlaceTable)
        table.border_title = "zombies"
        table.border_subtitle = "detector not available yet"
        self.query_one("#evidence").border_title = "evidence"
        table.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if action == "reap" and allowed:
            return None  # shown, greyed out: the slot exists, the detector does not (yet)
        return allowed

    def action_reap(self) -> None:
        self.notify(Text("Nothing to reap: the zombie detector is not there yet."), severity="warning")
