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

__all__ = ["topic_summary", "topic_report", "node_report", "local_state"]


def topic_summary(stream: TopicStream, polling_epoch: int | None) -> dict[str, Any]:
    """The few facts a list of topics needs (and the zombie scan): small, so 10,000 travel fast."""
    stats = stream.stats
    return {
        "topic": stream.topic,
        "feed": stream.feed.name,
        "role": stream.role,
        "epoch": stream.epoch,
        "seq": stream.seq,
        "state": stream.state,
        "last_error": stream.last_error,
        "local_subscribers": len(stream.local),
        "polling_epoch": polling_epoch,
        "interval": stream.feed.interval,
        "polls": stats.polls,
        "poll_failures": stats.failures,
        "last_poll_at": stats.last_poll_at,
        "last_poll_ms": stats.last_duration_ms,
        "last_change_at": stats.last_change_at,
    }


def topic_report(stream: TopicStream, polling_epoch: int | None, following: str | None) -> dict[str, Any]:
    """Everything this node knows of one topic (its detail page)."""
    stats = stream.stats
    return {
        **topic_summary(stream, polling_epoch),
        "owner": stream.owner_node,
        "followers": len(stream.remote),
        "following": following,
        "rows": len(stream.rows),
        "changes": stats.changes,
        "max_poll_ms": stats.max_duration_ms,
        "recent_poll_ms": list(stats.recent_ms),
        "last_data_at": stream.last_data_at,
        "history": list(stream.history),
    }


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


def local_state(node: Node, *, topics: str = "summary", topic: str | None = None) -> dict[str, Any]:
    """What a node answers when the admin API asks for its own facts.

    ``topics``: ``"none"``, ``"summary"`` (every topic, compact) or ``"full"`` (every topic, or
    only ``topic``, with history and timings).
    """
    report = node_report(node)
    if topics == "none":
        return report
    pollers = node.running_pollers()
    if topics == "full":
        streams = [node.registry.get(topic)] if topic is not None else list(node.registry)
        follower = node.follower
        report["topic_reports"] = [
            topic_report(s, pollers.get(s.topic), follower.following(s.topic) if follower else None)
            for s in streams if s is not None
        ]  # fmt: skip
    else:
        report["topic_reports"] = [topic_summary(s, pollers.get(s.topic)) for s in node.registry]
    return report
