"""A read-only view of one node, for the admin API and zombie detection.

Everything here is a plain, JSON-ready snapshot taken at call time; nothing
holds a reference into the node, and nothing outside the node reaches into
its internals for these facts.
"""

from __future__ import annotations

import time
from typing import Any

from subsys.node.node import Node
from subsys.node.stream import TopicStream

__all__ = ["topic_report", "node_report", "local_state"]


def topic_report(node: Node, stream: TopicStream, *, rows: bool = False) -> dict[str, Any]:
    stats = stream.stats
    report: dict[str, Any] = {
        "topic": stream.topic,
        "feed": stream.feed.name,
        "role": stream.role,
        "owner": stream.owner_node,
        "epoch": stream.epoch,
        "seq": stream.seq,
        "state": stream.state,
        "last_error": stream.last_error,
        "local_subscribers": len(stream.local),
        "followers": len(stream.remote),
        "polling_epoch": node.pollers.epoch_of(stream.topic),
        "following": node.follower.following(stream.topic) if node.follower is not None else None,
        "rows": len(stream.rows),
        "interval": stream.feed.interval,
        "polls": stats.polls,
        "poll_failures": stats.failures,
        "changes": stats.changes,
        "last_poll_at": stats.last_poll_at,
        "last_poll_ms": stats.last_duration_ms,
        "max_poll_ms": stats.max_duration_ms,
        "recent_poll_ms": list(stats.recent_ms),
        "last_change_at": stats.last_change_at,
        "last_data_at": stream.last_data_at,
        "history": list(stream.history),
    }
    if rows:
        report["data"] = list(stream.rows.values())
    return report


def node_report(node: Node) -> dict[str, Any]:
    """This node's own facts: what it runs, follows and serves (not the cluster's view)."""
    coordinator = node.coordinator.health()
    streams = list(node.registry)
    return {
        "node": node.node_id,
        "incarnation": node.incarnation,
        "address": node.settings.advertise_url,
        "started": node.started,
        "uptime": round(time.time() - node.started, 3),
        "draining": node.draining,
        "shutting_down": node.shutting_down,
        "failure": node.failure,
        "coordinator": coordinator,
        "pollers": node.running_pollers(),
        "stuck_queries": node.stuck_queries(),
        "feeds": node.pollers.describe(),  # merged or per-topic polling, and why
        "following": {
            s.topic: s.owner_node for s in streams if node.follower is not None and node.follower.following(s.topic)
        },
        "owned": sorted(s.topic for s in streams if s.role == "owner"),
        "clients": len(node.clients),
        "subscriptions": sum(len(s.local) for s in streams),
        "topics": len(streams),
        "peer_links": node.follower.describe() if node.follower is not None else None,
        "fenced_publications": node.registry.counters.fenced,
    }


def local_state(node: Node, *, topics: bool = True) -> dict[str, Any]:
    """What a node answers when the admin API asks for its own facts."""
    report = node_report(node)
    if topics:
        report["topic_reports"] = [topic_report(node, stream) for stream in node.registry]
    return report
