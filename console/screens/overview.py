"""The cluster at a glance: totals, every node with its health and load, the latest events."""

from __future__ import annotations

import asyncio

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Static

from subsys.client.admin import AdminError
from subsys.core import admin as api

from ..widgets.events import EventTable
from ..widgets.table import Col, InPlaceTable
from .base import ConsoleScreen, while_shown

__all__ = ["OverviewScreen"]

NODES = [  # drop: the order in which a narrow screen hides them (highest first)
    Col("node", "NODE", 12), Col("health", "HEALTH", 11), Col("owned", "OWNED", 6, right=True),
    Col("followed", "FOLLOWS", 7, right=True, drop=2), Col("pollers", "POLLERS", 7, right=True, drop=4),
    Col("clients", "CLIENTS", 7, right=True), Col("subs", "SUBS", 6, right=True, drop=1),
    Col("coord", "CONSUL", 10), Col("session", "SESSION", 9, drop=5), Col("confirmed", "CONFIRMED", 9, drop=3),
    Col("uptime", "UPTIME", 7, right=True, drop=6), Col("address", "ADDRESS", 22, drop=7),
    Col("problem", "PROBLEM", 12, fill=True),
]  # fmt: skip
HEALTH_STYLE = {"ok": "bold green", "unavailable": "bold yellow", "unreachable": "bold red"}
RECENT = 12


class OverviewScreen(ConsoleScreen):
    VIEW = "overview"
    HELP = "The cluster: totals, nodes (health, load, Consul session), recent events."
    BINDINGS = [
        Binding("enter", "node_topics", "Node's topics"),
        Binding("d", "drain", "Drain"),
        Binding("u", "undrain", "Undrain"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[api.NodeInfo] = []

    def compose_body(self) -> ComposeResult:
        with Vertical(id="body"):
            yield Static(id="summary")
            yield InPlaceTable(NODES, id="nodes", classes="panel")
            yield EventTable(id="recent", classes="panel")

    def on_mount(self) -> None:
        self.query_one("#nodes").border_title = "nodes"
        self.query_one("#recent").border_title = "recent events"
        self.query_one("#nodes").focus()
        self.events_arrived()

    @work(exclusive=True, group="overview")
    @while_shown
    async def load(self) -> None:
        try:
            summary, nodes = await asyncio.gather(self.backend.cluster(), self.backend.node_list())
        except asyncio.CancelledError:
            raise
        except AdminError:
            self.loaded()
            return
        self.show(summary, nodes)
        self.loaded()

    def show(self, s: api.ClusterSummary, nodes: api.NodeList) -> None:
        fmt = self.fmt
        line = Text()

        def stat(label: str, value: str, style: str = "bold") -> None:
            line.append(f" {label} ", style="dim")
            line.append(value, style=style)
            line.append("  ")

        stat("nodes", f"{s.nodes_ready}/{s.nodes} ready", "bold green" if s.nodes_ready == s.nodes else "bold yellow")
        if s.nodes_draining:
            stat("draining", str(s.nodes_draining), "bold yellow")
        stat("topics", fmt.count(s.topics))
        stat("owned", fmt.count(s.owned))
        stat("unowned", fmt.count(s.unowned), "bold magenta" if s.unowned else "bold")
        stat("failing", fmt.count(s.failing), "bold red" if s.failing else "bold")
        stat("clients", fmt.count(s.clients))
        stat("subs", fmt.count(s.subscriptions))
        stat("on", s.coordinator, "cyan")
        stat("version", fmt.version(s.version), "dim")
        if s.partial:
            stat("partial", ", ".join(p.node for p in s.unavailable) + " did not answer", "bold yellow")
        self.query_one("#summary", Static).update(line)
        self.nodes = nodes.nodes
        rows = []
        for n in nodes.nodes:
            coord = n.coordinator or {}
            health = n.health + (" drain" if n.draining else "")
            problem = n.error or n.failure or coord.get("last_error") or ""
            rows.append((n.node, (
                Text(n.node, style="bold"), Text(health, style=HEALTH_STYLE.get(n.health, "")),
                fmt.count(n.owned), fmt.count(n.followed), fmt.count(n.pollers), fmt.count(n.clients),
                fmt.count(n.subscriptions), str(coord.get("state") or coord.get("kind") or "—"),
                fmt.ident(n.session), fmt.confirmed(coord.get("confirmed_ago")), fmt.age(n.uptime),
                fmt.address(n.address), Text(fmt.text(str(problem)), style="red"),
            )))  # fmt: skip
        table = self.query_one("#nodes", InPlaceTable)
        table.set_rows(rows)
        table.border_subtitle = f"answered by {nodes.answered_by}"
        self.events_arrived()  # the relative times move on

    def events_arrived(self) -> None:
        if self.console.backend is not None:
            self.query_one("#recent", EventTable).show(self.backend.log, self.fmt, limit=RECENT)

    # -- actions ---------------------------------------------------------------------------------

    @property
    def selected(self) -> api.NodeInfo | None:
        key = self.query_one("#nodes", InPlaceTable).selected_key
        return next((n for n in self.nodes if n.node == key), None)

    def action_node_topics(self) -> None:
        node = self.selected
        if node is not None:
            self.console.show_topics(f"node:{node.node}")

    @on(InPlaceTable.RowSelected, "#nodes")
    def row_selected(self) -> None:
        self.action_node_topics()

    def action_drain(self) -> None:
        if self.selected is not None:
            self.console.confirm_drain(self.selected, drain=True)

    def action_undrain(self) -> None:
        if self.selected is not None:
            self.console.confirm_drain(self.selected, drain=False)
