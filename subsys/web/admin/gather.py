"""Any node answers for the whole cluster: gather every node's own facts and merge them.

Ownership and presence come from the coordinator's view (the source of
truth); per-node facts (pollers, followed topics, connections, poll timings,
last errors, peer links) from each node itself, over the authenticated
internal call, concurrently and with a short timeout. A node that does not
answer is reported (``partial``, which node, why), never hidden, never fatal.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from subsys import __version__
from subsys.core import admin as api
from subsys.web.appkeys import NODE
from subsys.web.internal import PeerClient, PeerUnavailable, own_state

__all__ = ["Gathered", "gather", "forget", "merge_topics", "node_infos", "summary", "topic_detail"]

PEER_TIMEOUT = 1.5
CACHE_SECONDS = 0.75  # several callers within this share one round of peer calls


@dataclass
class Gathered:
    answered_by: str
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> its local_state
    problems: list[api.PeerProblem] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)  # nodes whose address refused the connection

    def partial(self) -> dict[str, Any]:
        return {"answered_by": self.answered_by, "partial": bool(self.problems), "unavailable": self.problems}


GATHERS: web.AppKey[dict] = web.AppKey("subsys_admin_gathers", dict)


async def gather(app: web.Application, *, topics: str = "summary", topic: str | None = None,
                 only: str | None = None, fresh: bool = False) -> Gathered:  # fmt: skip
    """Every node's own facts (``topics``: none | summary | full; ``topic``: only that one in full).

    Concurrent and recent callers share one round of calls (``CACHE_SECONDS``): the console
    refreshing at 1 Hz and an operator's CLI must not each make every node list 10,000 topics.
    ``fresh``: a round of its own (the zombie scan compares two rounds).
    """
    cache = app[GATHERS]
    key = (topics, topic, only)
    now = time.monotonic()
    entry = cache.get(key)
    if not fresh and entry is not None and now - entry[0] < CACHE_SECONDS:
        return await asyncio.shield(entry[1])
    future = asyncio.ensure_future(_gather(app, topics=topics, topic=topic, only=only))
    cache[key] = (now, future)
    return await asyncio.shield(future)


def forget(app: web.Application) -> None:
    """Drop cached rounds: after an operator acted, the next answer must show the result."""
    app[GATHERS].clear()


async def _gather(app: web.Application, *, topics: str, topic: str | None, only: str | None) -> Gathered:
    node = app[NODE]
    result = Gathered(answered_by=node.node_id)
    view = node.coordinator.view
    peers = {nid: rec.address for nid, rec in view.nodes.items() if nid != node.node_id and (only in (None, nid))}
    if only in (None, node.node_id):
        result.reports[node.node_id] = await own_state(app, topics=topics, topic=topic)
    client = PeerClient(app)
    query = f"/internal/state?topics={topics}" + (f"&topic={quote(topic, safe='')}" if topic else "")

    async def ask(nid: str, address: str) -> None:
        try:
            result.reports[nid] = await client.call(address, "GET", query, timeout=PEER_TIMEOUT)
        except PeerUnavailable as exc:
            result.problems.append(api.PeerProblem(node=nid, reason=str(exc)))
            if exc.refused:
                result.refused.add(nid)

    await asyncio.gather(*(ask(nid, address) for nid, address in sorted(peers.items())))
    return result


def node_infos(app: web.Application, gathered: Gathered) -> list[api.NodeInfo]:
    view = app[NODE].coordinator.view
    infos = []
    for nid in sorted(set(view.nodes) | set(gathered.reports)):
        record = view.nodes.get(nid)
        report = gathered.reports.get(nid)
        if report is None:
            problem = next((p.reason for p in gathered.problems if p.node == nid), "no answer")
            infos.append(api.NodeInfo(
                node=nid, address=record.address if record else "", version=record.version if record else "",
                incarnation=record.incarnation if record else "", started=record.started if record else None,
                reachable=False, health="unreachable", draining=bool(record and record.draining),
                owned=sum(1 for o in view.owners.values() if o.node_id == nid),
                session=record.holder if record else None, error=problem,
            ))  # fmt: skip
            continue
        coordinator = report.get("coordinator") or {}
        ready = bool(coordinator.get("ready")) and not report.get("draining") and not report.get("failure")
        infos.append(api.NodeInfo(
            node=nid, address=report.get("address", ""), version=record.version if record else __version__,
            incarnation=report.get("incarnation", ""), started=report.get("started"), uptime=report.get("uptime"),
            reachable=True, health="ok" if ready else "unavailable", ready=ready,
            draining=bool(report.get("draining")), failure=report.get("failure"),
            owned=len(report.get("owned", [])), followed=len(report.get("following", {})),
            pollers=len(report.get("pollers", {})), clients=int(report.get("clients", 0)),
            subscriptions=int(report.get("subscriptions", 0)), session=coordinator.get("session"),
            coordinator=coordinator, peer_links=report.get("peer_links"), feeds=report.get("feeds"),
        ))  # fmt: skip
    return infos


def _error(value: Any) -> api.TopicError | None:
    if not value:
        return None
    return api.TopicError(code=str(value.get("code") or ""), message=str(value.get("message") or ""), at=value.get("at"))


def merge_topics(app: web.Application, gathered: Gathered, only: str | None = None) -> dict[str, dict[str, Any]]:
    """Every topic the cluster knows of (owned, wanted, or known to some node), as plain rows.

    Rows are TopicSummary's fields as a dict: 10,000 of them are built on every listing, and
    only the page returned becomes a model.
    """
    node = app[NODE]
    view = node.coordinator.view
    per_node: dict[str, dict[str, dict[str, Any]]] = {}  # topic -> node -> its topic report
    for nid, report in gathered.reports.items():
        for item in report.get("topic_reports", ()):
            per_node.setdefault(item["topic"], {})[nid] = item
    merged: dict[str, dict[str, Any]] = {}
    names = set(view.owners) | set(view.presence) | set(per_node) if only is None else {only}
    for name in names:
        if only is not None and name not in view.owners and name not in view.presence and name not in per_node:
            continue
        owner = view.owners.get(name)
        reports = per_node.get(name, {})
        source = (reports.get(owner.node_id) if owner is not None else None) or {}
        presence: dict[str, int | None] = {}
        for nid in view.presence.get(name, ()):
            presence[nid] = None if nid not in gathered.reports else 0
        for nid, item in reports.items():
            if item.get("local_subscribers"):
                presence[nid] = int(item["local_subscribers"])
        any_report = source or next(iter(reports.values()), None) or {}
        if owner is None:
            state = "unowned"
        else:
            state = source.get("state", "starting")
            if state not in ("ok", "error", "starting"):
                state = "starting"
        error = source.get("last_error")
        merged[name] = {
            "topic": name,
            "feed": any_report.get("feed", name.split(":", 1)[0]),
            "owner": owner.node_id if owner else None,
            "epoch": owner.epoch if owner else None,
            "seq": source.get("seq"),
            "state": state,
            "presence": presence,
            "subscribers": sum(v for v in presence.values() if v),
            "interval": any_report.get("interval"),
            "polls": int(source.get("polls", 0)),
            "failures": int(source.get("poll_failures", 0)),
            "last_poll_ms": source.get("last_poll_ms"),
            "last_poll_at": source.get("last_poll_at"),
            "last_change_at": source.get("last_change_at"),
            "last_error": {"code": str(error.get("code") or ""), "message": str(error.get("message") or ""),
                           "at": error.get("at")} if error else None,  # fmt: skip
        }
    return merged


def filter_sort_page(
    topics: dict[str, dict[str, Any]],
    *,
    feed: str | None,
    node: str | None,
    owner: str | None,
    state: str | None,
    text: str | None,
    sort: str,
    descending: bool,
    offset: int,
    limit: int,
) -> tuple[list[api.TopicSummary], int]:
    needle = text.lower() if text else None
    selected = [
        t for t in topics.values()
        if (feed is None or t["feed"] == feed)
        and (owner is None or t["owner"] == owner)
        and (node is None or t["owner"] == node or node in t["presence"])
        and (state is None or t["state"] == state)
        and (needle is None or needle in t["topic"].lower())
    ]  # fmt: skip
    present = [t for t in selected if t[sort] is not None]
    absent = [t for t in selected if t[sort] is None]  # "no value" stays last either way
    present.sort(key=lambda t: (t[sort], t["topic"]), reverse=descending)
    absent.sort(key=lambda t: t["topic"])
    ordered = present + absent
    return [api.TopicSummary.model_validate(t) for t in ordered[offset : offset + limit]], len(ordered)


def summary(app: web.Application, gathered: Gathered) -> api.ClusterSummary:
    node = app[NODE]
    infos = node_infos(app, gathered)
    topics = merge_topics(app, gathered)
    return api.ClusterSummary(
        **gathered.partial(),
        coordinator=node.coordinator.kind,
        version=__version__,
        nodes=len(infos),
        nodes_ready=sum(1 for i in infos if i.ready),
        nodes_draining=sum(1 for i in infos if i.draining),
        topics=len(topics),
        owned=sum(1 for t in topics.values() if t["owner"]),
        unowned=sum(1 for t in topics.values() if t["owner"] is None and t["presence"]),
        failing=sum(1 for t in topics.values() if t["state"] == "error"),
        clients=sum(i.clients for i in infos),
        subscriptions=sum(i.subscriptions for i in infos),
    )


def topic_detail(app: web.Application, gathered: Gathered, name: str) -> api.TopicDetail | None:
    node = app[NODE]
    view = node.coordinator.view
    merged = merge_topics(app, gathered, only=name).get(name)
    if merged is None:
        return None
    owner = view.owners.get(name)
    reservation = view.reservations.get(name)
    nodes: list[api.NodeTopicState] = []
    history: list[api.HistoryEntry] = []
    owner_report: dict[str, Any] = {}
    for nid, report in sorted(gathered.reports.items()):
        item = next((i for i in report.get("topic_reports", []) if i["topic"] == name), None)
        if item is None:
            continue
        if owner is not None and nid == owner.node_id:
            owner_report = item
        nodes.append(api.NodeTopicState(
            node=nid, role=item["role"], epoch=item["epoch"], seq=item["seq"], state=item["state"],
            local_subscribers=item["local_subscribers"], followers=item["followers"],
            polling_epoch=item.get("polling_epoch"), following=item.get("following"),
        ))  # fmt: skip
        for entry in item.get("history", []):
            history.append(api.HistoryEntry(node=nid, **{k: v for k, v in entry.items() if k != "node"}))
    history.sort(key=lambda e: e.at)
    return api.TopicDetail(
        **merged,
        **gathered.partial(),
        recent_poll_ms=owner_report.get("recent_poll_ms", []),
        max_poll_ms=owner_report.get("max_poll_ms"),
        rows=owner_report.get("rows"),
        owner_since=owner.since if owner else None,
        owner_reason=owner.reason if owner else None,
        reserved_for=reservation.for_node if reservation is not None and reservation.active(time.time()) else None,
        nodes=nodes,
        history=history,
    )
