"""Cluster events (the admin SSE stream) as one line each, newest first."""

from __future__ import annotations

from typing import Iterable

from rich.text import Text

from subsys.core import admin as api

from ..fmt import Formatter
from .table import Col, InPlaceTable

__all__ = ["describe", "EventTable", "KIND_STYLE"]

KIND_STYLE = {"owner": "bold cyan", "presence": "blue", "node": "bold magenta", "health": "bold yellow",
              "console": "bold red"}  # fmt: skip


def _owner(side: dict | None, fmt: Formatter) -> str:
    return f"{side['node']} (epoch {fmt.epoch(side.get('epoch'))})" if side else "nobody"


def describe(event: api.Event, fmt: Formatter) -> tuple[str, str]:
    """(subject, what happened) in an operator's words."""
    data = event.data
    if event.type == "owner":
        before, after = data.get("from"), data.get("to")
        text = f"{_owner(before, fmt)} → {_owner(after, fmt)}"
        reason = (after or {}).get("reason")
        if reason:
            text += f"  ({fmt.text(reason)})"
        return data.get("topic", ""), text
    if event.type == "presence":
        nodes = data.get("nodes") or []
        return data.get("topic", ""), ("wanted on " + ", ".join(nodes)) if nodes else "no subscribers left"
    if event.type == "node":
        before, after = data.get("before"), data.get("after")
        if before is None:
            text = f"joined at {fmt.address((after or {}).get('address'))}"
        elif after is None:
            text = "left the cluster"
        elif before.get("draining") != after.get("draining"):
            text = "draining" if after.get("draining") else "undrained"
        elif before.get("incarnation") != after.get("incarnation"):
            text = "restarted"
        else:
            text = "changed"
        return data.get("node", ""), text
    if event.type == "health":
        ready = data.get("ready")
        text = "ready" if ready else "not ready" + (" (draining)" if data.get("draining") else "")
        return data.get("node", ""), text
    return "", fmt.text(str(data.get("message", data)))


class EventTable(InPlaceTable):
    COLUMNS = [Col("at", "WHEN", 9), Col("type", "TYPE", 9), Col("subject", "SUBJECT", 22), Col("what", "WHAT", 30, fill=True)]

    def __init__(self, **kwargs) -> None:
        super().__init__(self.COLUMNS, **kwargs)

    def show(self, events: Iterable[api.Event], fmt: Formatter, *, text: str = "", limit: int = 500) -> int:
        """Newest first, ``text`` (any part of the line, case-insensitive) filtering; returns the count."""
        needle = text.lower()
        rows = []
        for event in reversed(list(events)):
            subject, what = describe(event, fmt)
            if needle and needle not in f"{event.type} {subject} {what}".lower():
                continue
            kind = Text(event.type, style=KIND_STYLE.get(event.type, ""))
            rows.append((event.id or f"console-{event.at}", (fmt.ago(event.at), kind, subject, what)))
            if len(rows) >= limit:
                break
        self.set_rows(rows)
        return len(rows)
