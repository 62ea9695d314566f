"""The node's aiohttp application and its process lifecycle.

``make_app`` wires routes and ties the node to the app's life
(``cleanup_ctx``); ``async_run`` serves until SIGTERM/SIGINT or a stop
event, then shuts down in order (docs/cluster.md, "Shutdown and drain"):
stop listening, hand owned topics off, keep answering client frames while
queued data flushes (subscribes get ``shutting_down``, pings a ``pong``),
close clients with 1001 and peer links, leave the cluster, close the
database pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
from typing import AsyncIterator

from aiohttp import web

from subsys import __version__
from subsys.config import Settings
from subsys.coordinator.base import Coordinator
from subsys.coordinator.embedded import EmbeddedCoordinator
from subsys.node.node import Node
from subsys.web.appkeys import NODE, PEERS
from subsys.web.admin import setup_admin
from subsys.web.health import EXTRA_COLLECTORS, add_health_routes
from subsys.web.internal import setup_internal
from subsys.web.ws import close_all, heartbeats, websocket_handler

__all__ = ["make_app", "make_coordinator", "async_run", "run_node", "new_incarnation", "graceful_stop"]

log = logging.getLogger(__name__)


def new_incarnation() -> str:
    """Names this process among all processes that ever ran as this node id."""
    return secrets.token_hex(6)


def make_coordinator(settings: Settings, *, incarnation: str) -> Coordinator:
    if settings.uses_consul:
        from subsys.coordinator.consul.coordinator import ConsulCoordinator

        return ConsulCoordinator(settings=settings, incarnation=incarnation, version=__version__)
    return EmbeddedCoordinator(
        node_id=settings.node_id, address=settings.advertise_url, incarnation=incarnation, version=__version__
    )


def make_app(settings: Settings, *, coordinator: Coordinator | None = None) -> web.Application:
    incarnation = coordinator.incarnation if coordinator is not None else new_incarnation()
    app = web.Application(client_max_size=1024 * 1024)
    node = Node(
        settings=settings,
        coordinator=coordinator or make_coordinator(settings, incarnation=incarnation),
        incarnation=incarnation,
    )
    app[NODE] = node
    app[EXTRA_COLLECTORS] = []
    app.router.add_get("/ws", websocket_handler)
    add_health_routes(app)
    if settings.uses_consul:
        from subsys.web.peer import setup_peer_link

        setup_peer_link(app, node)
    setup_internal(app)
    setup_admin(app)
    app.cleanup_ctx.append(_node_ctx)
    app.on_shutdown.append(graceful_stop)
    return app


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    node.spawn(heartbeats(node), name="client-heartbeats")
    log.info(
        "node %s up (incarnation %s): coordinator=%s feeds=%s",
        node.node_id, node.incarnation, node.coordinator.kind, ", ".join(node.settings.feeds),
    )  # fmt: skip
    try:
        yield
    finally:
        await node.close()
        log.info("node %s stopped", node.node_id)


async def graceful_stop(app: web.Application) -> None:
    """Hand off, flush and close clients (1001) and peer links. Idempotent.

    Runs before aiohttp's own shutdown, which stops reading every connection:
    until then, clients still get answers.
    """
    node = app[NODE]
    if node.shutting_down and not node.clients and (PEERS not in app or not app[PEERS].inbound):
        return
    node.shutting_down = True
    released = await node.handoff(why="shutdown")
    if released:
        log.info("handed off %d topic(s)", released)
    await close_all(set(node.clients))
    if PEERS in app:
        await app[PEERS].close_inbound()


def run_node(settings: Settings) -> None:
    """Run a node in this process until SIGTERM/SIGINT, on the configured event loop."""
    if settings.node.event_loop == "uvloop":
        import uvloop  # optional: pip install 'subsys[fast]'

        uvloop.run(async_run(settings))
    else:
        asyncio.run(async_run(settings))


def settle_garbage_collector() -> None:
    """After start-up: freeze what exists (config, code, pools) out of the collector's sight,
    and collect the young generation less often.

    A node's objects are long-lived (connections, streams); a full collection walks them
    all, and with thousands of sockets that walk dominated the fan-out of a change
    (issue: 10 full collections in 12 changes at 5,000 subscribers). Frozen objects are
    still freed by reference counting.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 10_000), gen1, gen2)


async def async_run(settings: Settings, *, stop: asyncio.Event | None = None, install_signals: bool = True) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly."""
    stop = stop or asyncio.Event()
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        sites = [web.TCPSite(runner, settings.node.host, settings.node.port, reuse_address=True)]
        if settings.node.admin_port:
            admin_host = settings.node.admin_host or settings.node.host
            sites.append(web.TCPSite(runner, admin_host, settings.node.admin_port, reuse_address=True))
        for site in sites:
            await site.start()
        if install_signals:  # a process of its own (not a node inside a test's event loop)
            settle_garbage_collector()
        log.info("listening on http://%s:%d (ws /ws, health /health, admin %s)", settings.node.host,
                 settings.node.port, f"on port {settings.node.admin_port}" if settings.node.admin_port else "/admin/v1")
        await stop.wait()
        log.info("shutting down")
        for site in sites:
            await site.stop()  # no new connections; the open ones are still served
        await graceful_stop(app)
    finally:
        await runner.cleanup()
