"""``/health`` (readiness), ``/health/live`` and ``/metrics`` (Prometheus).

Metric labels are bounded by the configuration (node id, feed name, role),
never by topic: topics are unbounded and may be sensitive, and ``/metrics``
needs no token. Per-topic detail lives in the admin API.
"""

from __future__ import annotations

import collections
from typing import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from subsys import __version__
from subsys.web.appkeys import NODE

__all__ = ["health", "live", "metrics", "add_health_routes"]


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/metrics", metrics)


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    db_ok, db_detail = await node.database_health()
    coordinator = node.coordinator.health()
    ready = (
        db_ok
        and coordinator.get("ready", False)
        and not node.draining
        and not node.shutting_down
        and node.failure is None
    )
    body = {
        "status": "ok" if ready else "unavailable",
        "live": True,
        "ready": ready,
        "node": node.node_id,
        "incarnation": node.incarnation,
        "version": __version__,
        "draining": node.draining,
        "failure": node.failure,
        "database": {"ok": db_ok, "detail": db_detail},
        "coordinator": coordinator,
        "topics": len(node.registry),
        "pollers": len(node.running_pollers()),
        "polling": node.pollers.modes(),  # feed -> merged | per-topic (why: the admin node report)
        "clients": len(node.clients),
    }
    return web.json_response(body, status=200 if ready else 503)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True, "node": request.app[NODE].node_id})


class _NodeCollector:
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterable:
        node = self._app[NODE]
        nid = node.node_id
        yield _gauge("subsys_clients", "Connected client sockets", nid, len(node.clients))
        yield _gauge("subsys_pollers", "Pollers running on this node", nid, len(node.running_pollers()))
        roles = GaugeMetricFamily("subsys_topics", "Topics known on this node, by role", labels=["node", "role"])
        by_role = collections.Counter(stream.role for stream in node.registry)
        for role in ("owner", "follower", "acquiring", "idle"):
            roles.add_metric([nid, role], by_role.get(role, 0))
        yield roles
        polls = CounterMetricFamily("subsys_polls", "Feed queries run, by feed", labels=["node", "feed"])
        failures = CounterMetricFamily("subsys_poll_failures", "Feed queries failed, by feed", labels=["node", "feed"])
        changes = CounterMetricFamily("subsys_changes", "Changes published, by feed", labels=["node", "feed"])
        totals: dict[str, list[int]] = {name: [0, 0, 0] for name in node.settings.feeds}
        for stream in node.registry:
            entry = totals.setdefault(stream.feed.name, [0, 0, 0])
            entry[0] += stream.stats.polls
            entry[1] += stream.stats.failures
            entry[2] += stream.stats.changes
        for feed, (n_polls, n_failures, n_changes) in sorted(totals.items()):
            polls.add_metric([nid, feed], n_polls)
            failures.add_metric([nid, feed], n_failures)
            changes.add_metric([nid, feed], n_changes)
        yield polls
        yield failures
        yield changes
        statements = CounterMetricFamily(
            "subsys_statements", "Feed statements sent to the database, by feed and kind (merged, alone, topic)",
            labels=["node", "feed", "kind"],
        )
        for (feed, kind), count in sorted(node.pollers.statements.items()):
            statements.add_metric([nid, feed, kind], count)
        yield statements
        fenced = CounterMetricFamily(
            "subsys_fenced_publications", "Publications refused for an older epoch (fencing)", labels=["node"]
        )
        fenced.add_metric([nid], node.registry.counters.fenced)
        yield fenced
        yield from node.registry.counters.failover.collect()


def _gauge(name: str, doc: str, node_id: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["node"])
    family.add_metric([node_id], value)
    return family


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(_NodeCollector(request.app))
    for extra in request.app.get(EXTRA_COLLECTORS, ()):
        registry.register(extra)
    return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")


EXTRA_COLLECTORS: web.AppKey[list] = web.AppKey("subsys_extra_collectors")
