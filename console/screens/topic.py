"""One topic: who owns it, how its polls go, its ownership history, and its rows, live.

The rows come from the console's own WebSocket subscription (protocol v1),
so the operator sees exactly what a client sees: diffs light the changed
rows up for a moment, a resync after a failover replaces them, and a
failing feed marks them stale (they are still the last good rows).
"""

from __future__ import annotations

import asyncio

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static

from subsys.client.admin import AdminError, NotFound
from subsys.core import admin as api

from ..widgets.rows import LiveRows
from ..widgets.table import Col, InPlaceTable
from .base import ConsoleScreen, while_shown
from .topics import STATE_STYLE

__all__ = ["TopicScreen"]

PRESENCE = [Col("node", "NODE", 12), Col("role", "ROLE", 8), Col("epoch", "EPOCH", 5, right=True),
            Col("seq", "SEQ", 5, right=True), Col("state", "STATE", 5), Col("subs", "SUBS", 4, right=True),
            Col("followers", "FOLLOW", 6, right=True)]  # fmt: skip
HISTORY = [Col("at", "WHEN", 9), Col("node", "NODE", 10), Col("event", "EVENT", 8), Col("epoch", "EPOCH", 9),
           Col("gap", "GAP", 8, right=True, drop=1), Col("reason", "REASON", 16, fill=True)]  # fmt: skip
LIVE_STYLE = {"live": "bold green", "stale": "bold red", "connecting": "yellow", "reconnecting": "yellow",
              "error": "bold red"}  # fmt: skip


class TopicScreen(ConsoleScreen):
    VIEW = "topics"
    HELP = "One topic: owner, polls, history, and its rows live over /ws."
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("f", "failover", "Failover"),
        Binding("F", "failover_to", "Failover to…", key_display="F"),
    ]

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic
        self.detail: api.TopicDetail | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="detail"):
            with Vertical(id="detail-left"):
                yield Static(id="facts", classes="panel")
                with Vertical(id="polls", classes="panel"):
                    yield Sparkline([], id="spark")
                    yield Static(id="spark-legend")
                yield InPlaceTable(PRESENCE, id="presence", classes="panel", show_cursor=False)
            with Vertical(id="detail-right"):
                yield Static(id="live-status")
                yield LiveRows(id="rows", classes="panel")
                yield InPlaceTable(HISTORY, id="history", classes="panel", show_cursor=False)

    def on_mount(self) -> None:
        self.query_one("#facts").border_title = self.topic
        self.query_one("#polls").border_title = "poll duration"
        self.query_one("#presence").border_title = "per node"
        self.query_one("#rows").border_title = "rows · live"
        self.query_one("#rows").border_subtitle = "* key · changed rows light up"
        self.query_one("#history").border_title = "ownership history"
        self.live = self.backend.watch(self.topic)
        self.set_interval(0.25, self._fade)  # highlights last HIGHLIGHT_SECONDS, then go
        self.query_one("#rows", LiveRows).focus()

    def on_unmount(self) -> None:
        if self.console.backend is not None:
            self.console.backend.unwatch(self.topic)

    # -- the API's view ---------------------------------------------------------------------

    @work(exclusive=True, group="topic")
    @while_shown
    async def load(self) -> None:
        try:
            detail = await self.backend.topic(self.topic)
        except asyncio.CancelledError:
            raise
        except NotFound:
            self.query_one("#facts", Static).update(Text(f"no node has or wants {self.topic} (yet)", style="yellow"))
            self.loaded()
            return
        except AdminError:
            self.loaded()
            return
        self.detail = detail
        self.show(detail)
        self.loaded()

    def show(self, d: api.TopicDetail) -> None:
        fmt = self.fmt
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("owner", Text(d.owner or "none", style="bold" if d.owner else "bold magenta"))
        grid.add_row("state", Text(d.state, style=STATE_STYLE.get(d.state, "")))
        grid.add_row("epoch · seq", f"{fmt.epoch(d.epoch)} · {fmt.seq(d.seq)}")
        grid.add_row("owner since", fmt.ago(d.owner_since) + (f" · why: {fmt.text(d.owner_reason)}" if d.owner_reason else ""))
        if d.reserved_for:
            grid.add_row("reserved for", d.reserved_for)
        grid.add_row("subscribers", ", ".join(f"{n} {c if c is not None else '?'}" for n, c in sorted(d.presence.items()))
                     or "none")  # fmt: skip
        grid.add_row("rows", fmt.count(d.rows))
        grid.add_row("interval", fmt.interval(d.interval))
        grid.add_row("polls", f"{fmt.volatile_count(d.polls)}  failures {fmt.count(d.failures)}")
        grid.add_row("last poll", f"{fmt.ago(d.last_poll_at)}  ({fmt.ms(d.last_poll_ms)})")
        grid.add_row("last change", fmt.ago(d.last_change_at))
        if d.last_error:
            grid.add_row("last error", Text(f"{d.last_error.code}: {fmt.text(d.last_error.message)}", style="red"))
        if d.partial:
            grid.add_row("partial", Text(", ".join(p.node for p in d.unavailable) + " did not answer", style="yellow"))
        self.query_one("#facts", Static).update(grid)
        series = fmt.series(d.recent_poll_ms)
        self.query_one("#spark", Sparkline).data = series or [0]
        legend = f"last {fmt.volatile_count(len(d.recent_poll_ms))} · max {fmt.ms(d.max_poll_ms)} · now {fmt.ms(d.last_poll_ms)}"
        self.query_one("#spark-legend", Static).update(Text(legend, style="dim"))
        self.query_one("#presence", InPlaceTable).set_rows([
            (n.node, (n.node, n.role, fmt.epoch(n.epoch), fmt.seq(n.seq), Text(n.state, style=STATE_STYLE.get(n.state, "")),
                      fmt.count(n.local_subscribers), fmt.count(n.followers)))
            for n in d.nodes
        ])  # fmt: skip
        rows = []
        for i, h in enumerate(reversed(d.history)):  # newest first, like every log here
            epochs = fmt.epoch(h.epoch) if h.epoch is not None else f"{fmt.epoch(h.from_epoch)}→{fmt.epoch(h.to_epoch)}"
            gap = fmt.ms(h.gap_ms) if h.gap_ms is not None else ""
            reason = fmt.text(h.reason or "") + (f" → {h.to}" if h.to else "")
            style = "bold cyan" if h.event == "acquired" else ("yellow" if h.event in ("released", "stopped") else "")
            rows.append((str(i), (fmt.ago(h.at), h.node, Text(h.event, style=style), epochs, gap, reason)))
        self.query_one("#history", InPlaceTable).set_rows(rows)

    # -- the rows, live -----------------------------------------------------------------------

    def rows_changed(self) -> None:
        live = self.live
        table = self.query_one("#rows", LiveRows)
        table.show(live, self.fmt)
        status = Text()
        status.append(f" {live.state.upper()} ", style="reverse " + LIVE_STYLE.get(live.state, ""))
        view = live.view
        if view.epoch:
            status.append(f"  epoch {self.fmt.epoch(view.epoch)} · seq {self.fmt.seq(view.seq)} · "
                          f"{len(view.rows):,} rows", style="dim")  # fmt: skip
        if live.state == "stale":
            status.append("  rows are the last good ones: ", style="red")
        if live.error:
            status.append(f"  {self.fmt.text(live.error)}", style="red")
        self.query_one("#live-status", Static).update(status)

    def _fade(self) -> None:
        table = self.query_one("#rows", LiveRows)
        if table.highlighted:
            table.show(self.live, self.fmt)

    # -- actions -----------------------------------------------------------------------------

    def action_back(self) -> None:
        self.dismiss()

    def action_failover(self) -> None:
        self.console.confirm_failover(self.topic)

    def action_failover_to(self) -> None:
        self.console.choose_failover_target(self.topic)
