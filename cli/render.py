"""Rich renderings of the admin API's models, for people (``--json`` is for scripts).

Everything here is pure: a model in, a renderable out, so the tables can be
read (and tested) without a node. Tables are sized for an 80-column terminal:
few columns, short headers, relative times ("3s ago"), node addresses
without their scheme; long text (reasons, errors) wraps in the last column.
"""

from __future__ import annotations

import re
import time
from typing import Iterable

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from subsys.core import admin as api

__all__ = [
    "ago",
    "duration",
    "millis",
    "state_text",
    "health_text",
    "partial_note",
    "cluster_view",
    "nodes_table",
    "topics_table",
    "topic_view",
    "history_rows",
]

STATE_STYLE = {"ok": "green", "error": "bold red", "starting": "yellow", "unowned": "magenta"}
HEALTH_STYLE = {"ok": "green", "unavailable": "yellow", "unreachable": "bold red"}
DASH = Text("-", style="dim")


def ago(at: float | None, now: float | None = None) -> str:
    """A past moment as "3s ago" / "5m ago" / "2h ago" / "4d ago" ("-" when unknown)."""
    if at is None:
        return "-"
    delta = (time.time() if now is None else now) - at
    if delta < 0:  # another node's clock is ahead of ours: do not print "in 2s" for the past
        return "just now" if delta > -2 else "in " + _span(-delta)
    if delta < 1:
        return "just now"
    return _span(delta) + " ago"


def duration(seconds: float | None) -> str:
    """An elapsed time as "42s" / "7m" / "3h12m" / "2d4h"."""
    return "-" if seconds is None else _span(seconds, precise=True)


def _span(seconds: float, precise: bool = False) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if precise and s < 600 else "")
    if s < 86400:
        return f"{s // 3600}h" + (f"{s % 3600 // 60:02d}m" if precise else "")
    return f"{s // 86400}d" + (f"{s % 86400 // 3600}h" if precise else "")


def millis(ms: float | None) -> str:
    """A time taken: "0.8ms", "42ms", "1.3s"."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s"


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def health_text(info: api.NodeInfo) -> Text:
    # A draining node reports health "unavailable" (it refuses new clients on purpose); say why.
    if info.draining and info.health != "unreachable":
        return Text("draining", style="yellow")
    if info.health == "ok" and info.ready is False:
        return Text("not ready", style="yellow")
    return Text(info.health, style=HEALTH_STYLE.get(info.health, ""))


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rstrip("/") or "-"


def _table(*columns: str, right: Iterable[str] = ()) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold", show_edge=False)
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return table


def _num(value: int | None, warn: bool = False, style: str = "red") -> Text:
    if value is None:
        return DASH
    return Text(str(value), style=style if warn and value else "")


def partial_note(answer: api.NodeList | api.TopicPage | api.ClusterSummary | api.TopicDetail) -> Text | None:
    """Which nodes did not answer (their part of the answer is missing), or None."""
    if not answer.partial:
        return None
    text = Text("partial answer: ", style="yellow")
    text.append("; ".join(f"{p.node} did not answer ({p.reason})" for p in answer.unavailable) or "some node did not answer")
    return text


# -- cluster ---------------------------------------------------------------------------


def cluster_view(summary: api.ClusterSummary) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    nodes = Text(f"{summary.nodes}")
    nodes.append(f"  ({summary.nodes_ready} ready", style="green" if summary.nodes_ready == summary.nodes else "yellow")
    nodes.append(f", {summary.nodes_draining} draining)", style="yellow" if summary.nodes_draining else "")
    topics = Text(f"{summary.topics}  ({summary.owned} owned, ")
    topics.append(f"{summary.unowned} unowned", style="magenta" if summary.unowned else "")
    topics.append(", ")
    topics.append(f"{summary.failing} failing", style="bold red" if summary.failing else "")
    topics.append(")")
    grid.add_row("coordinator", summary.coordinator)
    grid.add_row("version", summary.version)
    grid.add_row("nodes", nodes)
    grid.add_row("topics", topics)
    grid.add_row("clients", f"{summary.clients}  ({summary.subscriptions} subscriptions)")
    grid.add_row("answered by", summary.answered_by)
    return grid


# -- nodes -------------------------------------------------------------------------------


def nodes_table(nodes: api.NodeList, now: float | None = None) -> RenderableType:
    table = _table("NODE", "HEALTH", "OWNED", "FOLLOWS", "CLIENTS", "SUBS", "UP", "ADDRESS",
                   right=("OWNED", "FOLLOWS", "CLIENTS", "SUBS", "UP"))  # fmt: skip
    notes: list[Text] = []
    for info in nodes.nodes:
        name = Text(info.node, style="bold" if info.node == nodes.answered_by else "")
        table.add_row(
            name, health_text(info), str(info.owned), str(info.followed), str(info.clients),
            str(info.subscriptions), duration(info.uptime), _host(info.address),
        )  # fmt: skip
        why = info.error or info.failure
        if why:
            notes.append(Text(f"{info.node}: {why}", style="red" if info.health == "unreachable" else "yellow"))
    if not nodes.nodes:
        return Text("no nodes", style="dim")
    return Group(table, *notes) if notes else table


# -- topics -------------------------------------------------------------------------------


def topics_table(page: api.TopicPage, now: float | None = None) -> RenderableType:
    if not page.topics:
        return Text(f"no topics match ({page.total} in all)" if page.total else "no topics", style="dim")
    table = _table("TOPIC", "STATE", "OWNER", "EPOCH", "SUBS", "POLL", "CHANGED", "FAILS",
                   right=("EPOCH", "SUBS", "POLL", "CHANGED", "FAILS"))  # fmt: skip
    notes: list[Text] = []
    for topic in page.topics:
        table.add_row(
            topic.topic, state_text(topic.state), topic.owner or DASH, _num(topic.epoch), str(topic.subscribers),
            millis(topic.last_poll_ms), ago(topic.last_change_at, now), _num(topic.failures, warn=True),
        )  # fmt: skip
        if topic.last_error is not None and topic.state == "error":
            notes.append(Text(f"{topic.topic}: {topic.last_error.code}: {topic.last_error.message}", style="red"))
    shown = len(page.topics)
    if shown < page.total:
        first = page.offset + 1
        footer = Text(f"{first}-{page.offset + shown} of {page.total} (--offset/--limit for more, --all for every one)",
                      style="dim")  # fmt: skip
    else:
        footer = Text(f"{page.total} topic{'s' if page.total != 1 else ''}", style="dim")
    return Group(table, *notes[:10], footer)


# -- one topic -----------------------------------------------------------------------------


def topic_view(detail: api.TopicDetail, now: float | None = None) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    owner = Text(detail.owner or "none", style="" if detail.owner else "magenta")
    if detail.owner_since is not None:
        owner.append(f"  since {ago(detail.owner_since, now)}", style="dim")
    grid.add_row("topic", Text(detail.topic, style="bold"))
    grid.add_row("state", state_text(detail.state))
    grid.add_row("owner", owner)
    if detail.owner_reason:
        grid.add_row("why", detail.owner_reason)
    if detail.reserved_for:
        grid.add_row("reserved for", Text(detail.reserved_for, style="yellow"))
    grid.add_row("epoch / seq", f"{_dash(detail.epoch)} / {_dash(detail.seq)}")
    presence = ", ".join(f"{n}: {_dash(c)}" for n, c in sorted(detail.presence.items())) or "-"
    grid.add_row("subscribers", f"{detail.subscribers}  ({presence})")
    polls = Text(f"{detail.polls} polls, ")
    polls.append(f"{detail.failures} failed", style="red" if detail.failures else "")
    polls.append(f", every {detail.interval:g}s" if detail.interval is not None else "")
    grid.add_row("polling", polls)
    grid.add_row("poll time", f"last {millis(detail.last_poll_ms)}, max {millis(detail.max_poll_ms)}"
                              f" (last {len(detail.recent_poll_ms)})")  # fmt: skip
    grid.add_row("last poll", ago(detail.last_poll_at, now))
    grid.add_row("last change", ago(detail.last_change_at, now))
    if detail.rows is not None:
        grid.add_row("rows", str(detail.rows))
    if detail.last_error is not None:
        grid.add_row("last error", Text(f"{detail.last_error.code}: {detail.last_error.message} "
                                        f"({ago(detail.last_error.at, now)})", style="red"))  # fmt: skip
    parts: list[RenderableType] = [grid]
    if detail.nodes:
        nodes = _table("NODE", "ROLE", "EPOCH", "SEQ", "STATE", "SUBS", "FOLLOWERS",
                       right=("EPOCH", "SEQ", "SUBS", "FOLLOWERS"))  # fmt: skip
        for n in detail.nodes:
            # (`following` is the owner's address, which --json has; the owner's name is above.)
            nodes.add_row(n.node, n.role, str(n.epoch), str(n.seq), state_text(n.state), str(n.local_subscribers),
                          str(n.followers))  # fmt: skip
        parts += [Text("\nnodes", style="bold"), nodes]
    parts.append(Text("\nownership history", style="bold"))
    rows = history_rows(detail.history)
    if rows:
        history = _table("WHEN", "EVENT", "FROM", "TO", "EPOCH", "GAP", "REASON", right=("EPOCH", "GAP"))
        for row in rows:
            history.add_row(ago(row["at"], now), *(row[k] or DASH for k in ("event", "from", "to", "epoch", "gap",
                                                                               "reason")))  # fmt: skip
        parts.append(history)
    else:
        parts.append(Text("none recorded", style="dim"))
    return Group(*parts)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def history_rows(history: list[api.HistoryEntry]) -> list[dict[str, object]]:
    """The history as rows of when / event / from / to / epoch / gap / reason.

    Nodes record events separately, and only nodes that still serve the
    topic report theirs: ``acquired``, ``released`` and ``stopped`` name only
    the recording node, and every serving node records an ``epoch`` change
    (with the publishing gap it saw). So "from" and "to" are filled in from
    the owner of each epoch where some entry shows it, and an acquisition's
    "from" is the owner of the epoch just before it, only when that epoch is
    known (else the "(from NODE)" a handed-over topic's reason ends with).
    An epoch change is shown once, as its new owner measured it if it did.
    """
    owner_of: dict[int, str] = {}
    epochs: set[int] = set()
    for e in history:
        if e.event in ("acquired", "released", "stopped") and e.epoch is not None:
            owner_of.setdefault(e.epoch, e.node)
        epochs.update(x for x in (e.epoch, e.from_epoch, e.to_epoch) if x is not None)
    shown_epoch: dict[tuple, api.HistoryEntry] = {}
    for e in history:
        if e.event == "epoch":
            key = (e.from_epoch, e.to_epoch)
            if key not in shown_epoch or e.node == owner_of.get(e.to_epoch or -1):
                shown_epoch[key] = e
    rows: list[dict[str, object]] = []
    for entry in history:
        row: dict[str, object] = {"at": entry.at, "event": entry.event, "from": entry.node, "to": None,
                                  "epoch": _dash(entry.epoch) if entry.epoch is not None else None,
                                  "gap": None, "reason": entry.reason}  # fmt: skip
        if entry.event == "acquired":
            earlier = [x for x in epochs if entry.epoch is not None and x < entry.epoch]
            said = _FROM.search(entry.reason or "")
            row["from"] = owner_of.get(max(earlier)) if earlier else None
            row["from"] = row["from"] or (said.group(1) if said else None)
            row["to"] = entry.node
        elif entry.event in ("released", "stopped"):
            row["to"] = entry.to
        elif entry.event == "epoch":
            if shown_epoch.get((entry.from_epoch, entry.to_epoch)) is not entry:
                continue
            row["from"] = owner_of.get(entry.from_epoch) if entry.from_epoch is not None else None
            row["to"] = owner_of.get(entry.to_epoch) if entry.to_epoch is not None else None
            row["epoch"] = f"{_dash(entry.from_epoch)}→{_dash(entry.to_epoch)}"
            row["gap"] = millis(entry.gap_ms) if entry.gap_ms is not None else None
            row["reason"] = row["reason"] or f"seen by {entry.node}"
        rows.append(row)
    return rows


_FROM = re.compile(r"\(from ([^()\s]+)\)\s*$")  # a handed-over topic's reason (node.py)
