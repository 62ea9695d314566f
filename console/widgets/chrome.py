"""The frame every screen shares: the top bar (views, node, role) and the connection banner."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

if TYPE_CHECKING:
    from ..app import ConsoleApp

__all__ = ["TopBar", "Banner", "VIEWS"]

# (key, mode, label): the views, in the order of their number keys.
VIEWS = [("1", "overview", "overview"), ("2", "topics", "topics"), ("3", "events", "events"),
         ("4", "zombies", "zombies")]  # fmt: skip


class TopBar(Horizontal):
    """``subsys │ 1 overview  2 topics … │ node-1 http://… operator [READ-ONLY]``"""

    def __init__(self, current: str) -> None:
        super().__init__(id="topbar")
        self.current = current

    def compose(self) -> ComposeResult:
        yield Static(" subsys ", id="brand")
        yield Static(self._tabs(), id="tabs")
        yield Static("", id="conn")
        yield Static(" READ-ONLY ", id="badge")

    def _tabs(self) -> Text:
        text = Text()
        for key, mode, label in VIEWS:
            if mode == self.current:
                text.append(f" {key} {label} ", style="bold reverse")
            else:
                text.append(f" {key}", style="bold")
                text.append(f" {label} ", style="dim")
        return text

    def sync(self) -> None:
        app = cast("ConsoleApp", self.app)
        conn = Text()
        if app.backend is not None and app.backend.connected:
            conn.append("● ", style="green")
            conn.append(app.backend.node or "?", style="bold")
            conn.append(f"  {app.fmt.address(app.backend.url)}  ", style="dim")
            conn.append(app.backend.whoami.role if app.backend.whoami else "", style="cyan")
        elif app.auth_error:
            conn.append("● token refused", style="bold red")
        else:
            conn.append("● connecting…" if app.lost is None else "● reconnecting…", style="yellow")
        self.query_one("#conn", Static).update(conn)
        self.query_one("#badge", Static).display = app.read_only


class Banner(Static):
    """Shown only while the console has lost its node (or its token was refused)."""

    def __init__(self) -> None:
        super().__init__("", id="banner")

    def sync(self) -> None:
        app = cast("ConsoleApp", self.app)
        message = None
        if app.auth_error:
            message = f"token refused by {app.auth_error}: check the operator or read token"
        elif app.lost is not None:
            node, url, reason = app.lost
            urls = ", ".join(app.fmt.address(u) for u in (app.backend.urls if app.backend else []))
            message = f"lost {node or app.fmt.address(url)}: reconnecting… (trying {urls})"
            if reason:
                message += f"  · {app.fmt.text(reason)[:120]}"
        self.display = message is not None
        self.update(message or "")
