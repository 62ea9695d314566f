"""Rich renderings of the admin API's models, for people (``--json`` is for scripts).

Everything here is pure: a model in, a renderable out, so the tables can be
read (and tested) without a node. Tables are sized for an 80-column terminal:
few columns, short headers, relative times ("3s ago"), node addresses
without their scheme; long text (reasons, errors) wraps in the last column.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Iterable

from rich import box
from rich.console import Group, RenderableType
from rich.padding import Padding
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
    "short_id",
    "action_text",
    "evidence_value",
    "zombie_details",
    "zombies_view",
    "reap_question",
    "reap_view",
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


def partial_note(answer: api.NodeList | api.TopicPage | api.ClusterSummary | api.TopicDetail | api.ZombieList
                 ) -> Text | None:  # fmt: skip
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


# -- zombies ---------------------------------------------------------------------------------

def short_id(value: str, full: bool = False) -> str:
    """A Consul session id (a UUID) as its first 8 characters and "…"; anything else as it is."""
    return value if full or not api.is_session_id(value) else value[:8] + "…"


def action_text(action: dict[str, Any], full: bool = False) -> str:
    """What one reap action does, in words (``full``: session ids unshortened)."""
    do = action.get("do")
    try:
        if do == "destroy_session":
            return (f"destroy session {short_id(str(action['session']), full)} of {action['node']} "
                    "(Consul deletes its keys)")  # fmt: skip
        if do == "delete_key":
            key = action["key"]
            what = f"{key['topic']}@{key['node']}" if key["kind"] == "presence" else key.get("topic") or key.get("node")
            return f"delete the {key['kind']} key of {what} (at index {key['index']}, if unchanged since)"
        if do == "stop_poller":
            return (f"stop {action['node']}'s poller of {action['topic']} (epoch {action['epoch']}), "
                    "closing its database connection if it hangs")  # fmt: skip
        if do == "terminate_query":
            return (f"end {action['node']}'s stuck database call {action['query']} by terminating its "
                    f"connection (backend pid {action.get('pid')})")  # fmt: skip
        if do == "release":
            return f"make {action['node']} release {action['topic']} (epoch {action['epoch']}): nobody subscribes"
        if do == "deregister":
            return f"deregister {action['service_id']} from {action['node']}'s Consul agent"
    except (KeyError, TypeError):
        pass
    return json.dumps(action, sort_keys=True)  # an action this CLI does not know (a newer node's): as it is


def _action_short(action: dict[str, Any]) -> str:
    do = str(action.get("do"))
    return {"stop_poller": "stop poller", "delete_key": "delete key", "destroy_session": "destroy session",
            "release": "release", "deregister": "deregister", "terminate_query": "terminate query"}.get(do, do)  # fmt: skip


def _reap_cell(zombie: api.Zombie) -> Text:
    actions = [_action_short(a) for a in zombie.actions]
    text = Text("; ".join(dict.fromkeys(actions)) or "-")
    if not zombie.auto:
        text.append(" (manual)", style="yellow")
    return text


def _key_text(key: Any, full: bool) -> str:
    if not isinstance(key, dict):
        return "none"
    holder, node = key.get("holder"), key.get("node")
    held = f"held by {short_id(str(holder), full)}" if holder else "released (held by nobody)"
    return f"{held} at index {key.get('index')}" + (f", for {node}" if node and node != holder else "")


def evidence_value(name: str, value: Any, full: bool = False) -> str:
    """One piece of evidence, readably, with its values."""
    if value is None:
        return "unknown" if name == "db_connections" else "none"
    if name == "pollers" and isinstance(value, list):
        return "; ".join(f"{p.get('node')} epoch {p.get('epoch')}" for p in value)
    if name in ("owner_key", "presence_key"):
        return _key_text(value, full)
    if name == "sessions" and isinstance(value, dict):
        return ", ".join(f"{n} runs with {short_id(str(s), full) if s else 'no session'}" for n, s in value.items())
    if name == "db_connections":
        if isinstance(value, dict):
            return ", ".join(f"{n}: {'?' if c is None else c} open" for n, c in value.items()) or "none"
        return f"{value} open"
    if name == "session" and isinstance(value, str):
        return short_id(value, full)
    if name == "checks" and isinstance(value, dict):
        return ", ".join(f"{c}: {s}" for c, s in value.items()) or "none"
    if name == "holds" and isinstance(value, list):
        return ", ".join(map(str, value)) or "no keys"
    if name == "presence" and isinstance(value, list):
        return ", ".join(map(str, value)) or "no node has subscribers"
    if name in ("hold_ended_ago", "last_poll_ago") and isinstance(value, (int, float)):
        return f"{value:g}s ago"
    if name == "grace" and isinstance(value, (int, float)):
        return f"{value:g}s"
    if name == "topics" and isinstance(value, list):
        return "; ".join(f"{t.get('topic')} epoch {t.get('epoch')}"
                         + ("" if t.get("held_by_node") else " (no longer owned there)") for t in value) or "none"  # fmt: skip
    if name == "age" and isinstance(value, (int, float)):
        return f"{value:g}s"
    if name == "since" and isinstance(value, (int, float)):
        return time.strftime("%H:%M:%S", time.localtime(value))
    if name == "registration" and isinstance(value, dict):
        return (f"{value.get('service_id')} of {value.get('node')}"
                + (f" (incarnation {value['incarnation']})" if value.get("incarnation") else ""))  # fmt: skip
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def zombie_details(zombie: api.Zombie, kinds: dict[str, str], auto_reap: bool = True,
                   now: float | None = None) -> RenderableType:  # fmt: skip
    """Under a zombie's row (``-v``): what its kind means, its evidence source by source, and the reap."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True, min_width=14)
    grid.add_column(overflow="fold")
    if zombie.kind in kinds:
        grid.add_row("what", kinds[zombie.kind])
    evidence = dict(zombie.evidence)
    if "why" in evidence:  # the conclusion first, then the facts it rests on
        grid.add_row("why", Text(str(evidence.pop("why")), style="yellow"))
    for name, value in evidence.items():
        label, source = api.evidence_label(name)
        text = Text(evidence_value(name, value, full=True))
        if source:
            text.append(f"  ({source})", style="dim")
        grid.add_row(label, text)
    for action in zombie.actions:
        grid.add_row("reap", Text(action_text(action, full=True), style="bold"))
    seen = f"first seen {ago(zombie.first_seen, now)}, on {zombie.scans} consecutive scans; "
    if not zombie.auto:
        seen += "only an operator's reap fixes it"
    elif auto_reap:
        seen += "the janitor reaps it on its own"
    else:
        seen += "safe for the janitor to reap, but the janitor is off"
    grid.add_row("seen", seen)
    return Padding(grid, (0, 0, 1, 4))


def zombies_view(listing: api.ZombieList, *, verbose: bool = False, now: float | None = None) -> RenderableType:
    """A row per zombie (kind, subject, nodes, first seen, what a reap does); ``verbose``: details under each."""
    footer = _zombies_footer(listing, now)
    if not listing.zombies:
        return Group(Text("no zombies", style="green"), footer)
    headers = ("KIND", "SUBJECT", "NODES", "SINCE", "REAP")
    rows = [(z.kind, short_id(z.subject), ", ".join(z.nodes) or "-", ago(z.first_seen, now), _reap_cell(z))
            for z in listing.zombies]  # fmt: skip
    if not verbose:
        table = _table(*headers)
        for z, row in zip(listing.zombies, rows):
            table.add_row(Text(row[0], style="bold red"), *row[1:])
        return Group(table, footer)
    # One table per zombie with the same column widths, so the rows line up with the details between them
    # (the last column takes what is left, and wraps if it must).
    widths = [max(len(h), *(len(c if isinstance(c, str) else c.plain) for c in col))
              for h, col in zip(headers[:-1], zip(*rows))]  # fmt: skip
    parts: list[RenderableType] = []
    for index, (z, row) in enumerate(zip(listing.zombies, rows)):
        table = _table(*headers)
        table.show_header = index == 0
        for column, width in zip(table.columns, widths):
            column.width = width
        table.add_row(Text(row[0], style="bold red"), *row[1:])
        parts += [table, zombie_details(z, listing.kinds, listing.auto_reap and bool(listing.janitor), now)]
    return Group(*parts, footer)


def _zombies_footer(listing: api.ZombieList, now: float | None) -> Text:
    n = len(listing.zombies)
    text = Text(f"{n} zombie{'s' if n != 1 else ''}; " if n else "", style="dim")
    text.append(f"scanned by {listing.answered_by} {ago(listing.scanned_at, now)}; ", style="dim")
    if listing.auto_reap and listing.janitor:
        text.append(f"{listing.janitor} (the janitor) reaps what is safe on its own", style="dim")
    else:
        text.append("nothing reaps them on its own (the janitor is off)", style="dim")
    if listing.reaped:
        text.append(f"; reaped by {listing.answered_by} so far: "
                    f"{', '.join(f'{c} {k}' for k, c in sorted(listing.reaped.items()))}", style="dim")  # fmt: skip
    return text


def reap_question(zombies: list[api.Zombie]) -> str:
    """The confirmation of a reap: every action, in words."""
    n = len(zombies)
    lines = [f"Reap {n} zombie{'s' if n != 1 else ''} (each action is carried out only if its evidence still "
             "holds then):"]  # fmt: skip
    for z in zombies:
        lines += [f"  - {z.kind} {short_id(z.subject)}: {action_text(a)}" for a in z.actions]
    return "\n".join(lines) + "\n"


def _outcomes_grid(outcomes: list[api.ReapOutcome], dry_run: bool) -> Table:
    """One line per action (wrapped lines indented under it): a mark, the zombie, the action, why not done."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for outcome in outcomes:
        if dry_run:
            mark, style = "-", ""
        elif outcome.done:
            mark, style = "✓", "green"
        elif outcome.detail.startswith("failed"):
            mark, style = "✗", "bold red"
        else:
            mark, style = "·", "yellow"
        text = Text(f"{outcome.kind} {short_id(outcome.subject)}: ", style="bold")
        text.append(action_text(outcome.action))
        if not dry_run and not outcome.done:
            text.append(f"\n{'failed' if mark == '✗' else 'not done'}: ", style=style)
            text.append(outcome.detail.removeprefix("failed: "))
        grid.add_row(Text(mark, style=style), text)
    return grid


def reap_view(result: api.ReapResult) -> RenderableType:
    """A reap's summary: what was done, what failed and why, what was not needed any more."""
    if result.dry_run:
        if not result.outcomes:
            return Text("Dry run: nothing to reap.", style="green")
        head = Text("\nDry run, nothing changed. A reap would:", style="bold")
        return Group(head, _outcomes_grid(result.outcomes, True))
    if not result.outcomes:
        return Text("no zombies: nothing to reap.", style="green")
    ids = list(dict.fromkeys(o.id for o in result.outcomes))
    reaped = sum(1 for i in ids if any(o.done for o in result.outcomes if o.id == i))
    head = Text(f"Reaped {reaped} of {len(ids)} zombie{'s' if len(ids) != 1 else ''}: ",
                style="bold red" if result.failed else "bold")  # fmt: skip
    head.append(f"{result.reaped} action{'s' if result.reaped != 1 else ''} done, {result.failed} failed, "
                f"{result.skipped} not needed any more.")  # fmt: skip
    return Group(_outcomes_grid(result.outcomes, False), head)
