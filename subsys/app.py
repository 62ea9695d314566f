"""The node's aiohttp application and its process lifecycle.

``make_app`` wires routes and ties the node to the app's life
(``cleanup_ctx``); ``async_run`` serves until SIGTERM/SIGINT or a stop
event, then shuts down in order: hand off owned topics, flush and close
client sockets with 1001, leave the cluster, close the database pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

from . import __version__
from .appkeys import CONNECTIONS, NODE
from .config import Settings
from .coordinator import Coordinator
from .coordinator.embedded import EmbeddedCoordinator
from .node import Node
from .web_ws import close_all, websocket_handler

__all__ = ["make_app", "make_coordinator", "async_run"]

log = logging.getLogger(__name__)


def make_coordinator(settings: Settings) -> Coordinator:
    if settings.uses_consul:
        from .coordinator.consul import ConsulCoordinator

        return ConsulCoordinator(settings=settings, version=__version__)
    return EmbeddedCoordinator(node_id=settings.node_id, address=settings.advertise_url, version=__version__)


def make_app(settings: Settings, *, coordinator: Coordinator | None = None) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    node = Node(settings=settings, coordinator=coordinator or make_coordinator(settings))
    app[NODE] = node
    app[CONNECTIONS] = set()
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/metrics", metrics)
    if settings.uses_consul:
        from .peer import setup_peer_link

        setup_peer_link(app, node)
    app.cleanup_ctx.append(_node_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    log.info(
        "node %s up: coordinator=%s feeds=%s", node.node_id, node.coordinator.kind, ", ".join(node.settings.feeds)
    )
    try:
        yield
    finally:
        await node.close()
        log.info("node %s stopped", node.node_id)


async def _on_shutdown(app: web.Application) -> None:
    node = app[NODE]
    await node.handoff()
    await close_all(app[CONNECTIONS])


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    db_ok, db_detail = await node.database_health()
    coordinator = node.coordinator.health()
    ready = db_ok and coordinator.get("ready", False) and not node.draining and node.failure is None
    body = {
        "status": "ok" if ready else "unavailable",
        "live": True,
        "ready": ready,
        "node": node.node_id,
        "version": __version__,
        "draining": node.draining,
        "failure": node.failure,
        "database": {"ok": db_ok, "detail": db_detail},
        "coordinator": coordinator,
        "topics": len(node.registry),
        "pollers": len(node.running_pollers()),
        "clients": len(request.app[CONNECTIONS]),
    }
    return web.json_response(body, status=200 if ready else 503)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True, "node": request.app[NODE].node_id})


class _NodeCollector:
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self):
        node = self._app[NODE]
        labels = ["node"]
        yield _gauge("subsys_clients", "Connected client sockets", labels, node.node_id, len(self._app[CONNECTIONS]))
        yield _gauge("subsys_topics", "Topics known on this node", labels, node.node_id, len(node.registry))
        yield _gauge("subsys_pollers", "Pollers running on this node", labels, node.node_id, len(node.running_pollers()))
        polls = CounterMetricFamily("subsys_polls", "Feed queries run", labels=["node", "topic"])
        failures = CounterMetricFamily("subsys_poll_failures", "Feed queries failed", labels=["node", "topic"])
        for state in node.registry:
            polls.add_metric([node.node_id, state.topic], state.stats.polls)
            failures.add_metric([node.node_id, state.topic], state.stats.failures)
        yield polls
        yield failures


def _gauge(name: str, doc: str, labels: list[str], node_id: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric([node_id], value)
    return family


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(_NodeCollector(request.app))
    return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")


async def async_run(settings: Settings, *, stop: asyncio.Event | None = None, install_signals: bool = True) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly."""
    stop = stop or asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.node.host, settings.node.port, reuse_address=True)
        await site.start()
        log.info("listening on http://%s:%d (ws /ws, health /health)", settings.node.host, settings.node.port)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
