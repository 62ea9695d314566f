"""``subsys bench memory``: RSS per idle subscriber, subsys against a plain websockets server.

Six measurements in one run, each on a fresh server process (a node is
restarted on its rewritten config, the baseline server started anew), the
clients always in separate client processes (:mod:`subsys.bench.loadclient`):

| row | server | clients |
| --- | --- | --- |
| ``subsys_plain`` | node, ``limits.compression = "off"`` | plain (no extension offered) |
| ``subsys_browser`` | node, ``limits.compression = "off"`` | browser-like: offer permessage-deflate (aiohttp ``compress=15``) |
| ``subsys_deflate`` | node, ``limits.compression = "deflate"`` | browser-like |
| ``baseline_plain`` | websockets, ``compression=None`` | plain |
| ``baseline_browser`` | websockets, ``compression=None`` | browser-like |
| ``baseline_deflate`` | websockets, ``compression="deflate"`` (its default) | browser-like |

``deflate_negotiated`` counts the connections on which the client saw the
extension accepted: it tells whether a row measured what its name says
(until the node implements ``limits.compression``, ``subsys_deflate``
negotiates nothing).

Method: RSS of the server process (settled: the last of a few samples)
with no client, after ``spread`` warm-up clients (subsys: one per topic,
so every poller runs before the bulk; the baseline gets as many), and
with all N. ``per_client_kib`` = (RSS with N - RSS warm) / (N - warm).
Error: RSS moves in pages and with the allocator's arenas; at N = 1000
the per-client figure is good to a few percent, at tiny N it is noise.
Each subsys client subscribes to one of ``spread`` topics (round-robin)
and has read its snapshot; each baseline client has read the greeting.
"""

from __future__ import annotations

import time
from typing import Any

from subsys.bench.baselines import BroadcastServer
from subsys.bench.clients import ClientFleet, ControlServer
from subsys.bench.single import FEED, one_node
from subsys.bench.support import BenchError, progress, raise_fd_limit, ratio, reconfigure, settled_rss
from subsys.testing.cluster import LocalCluster

__all__ = ["bench_memory", "MODES"]

MIB = 1024 * 1024
# name -> (server compression setting, client compress window bits: 0 = offer nothing)
MODES: dict[str, tuple[str, int]] = {"plain": ("off", 0), "browser": ("off", 15), "deflate": ("deflate", 15)}


async def _measure(
    fleet: ClientFleet, tag: str, url: str, pid: int, subscriptions: list[list[str]], *, warm: int, compress: int,
    settle: float,
) -> dict[str, Any]:  # fmt: skip
    rss_empty = await settled_rss(pid, seconds=settle)
    first = await fleet.open(tag, url, subscriptions[:warm], compress=compress)
    rss_warm = await settled_rss(pid, seconds=settle)
    progress(f"{tag}: opening {len(subscriptions) - warm} more clients")
    rest = await fleet.open(tag, url, subscriptions[warm:], compress=compress, timeout=120 + len(subscriptions) / 50)
    rss_full = await settled_rss(pid, seconds=2 * settle, samples=6)
    connected = first["connected"] + rest["connected"]
    if connected == 0:
        raise BenchError(f"{tag}: no client could connect: {first['first_error'] or rest['first_error']}")
    extra = max(1, connected - first["connected"])
    return {
        "connected": connected,
        "failed": first["failed"] + rest["failed"],
        "first_error": first["first_error"] or rest["first_error"],
        "deflate_negotiated": first["deflate"] + rest["deflate"],
        "rss_empty_mib": round(rss_empty / MIB, 1),
        "rss_warm_mib": round(rss_warm / MIB, 1),
        "rss_mib": round(rss_full / MIB, 1),
        "per_client_kib": round((rss_full - rss_warm) / extra / 1024, 2),
    }


async def bench_memory(
    *, clients: int = 1000, interval: float = 0.1, spread: int = 10, client_procs: int = 2, settle: float = 1.5,
    **_: Any,
) -> dict[str, Any]:  # fmt: skip
    clients = max(1, int(clients))
    spread = max(1, min(spread, clients))
    fd_limit = raise_fd_limit()
    topics = [[f"{FEED}:{i % spread + 1}"] for i in range(clients)]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    node_clients: dict[str, Any] = {}
    progress("starting PostgreSQL and the node")
    spec = one_node(rows=spread, interval=interval, grace=5.0, limits={"compression": "off"})
    async with LocalCluster(spec) as env, ControlServer() as control, ClientFleet(control, client_procs) as fleet:
        node = env.nodes["n1"]
        for index, (mode, (compression, compress)) in enumerate(MODES.items()):
            tag = f"subsys_{mode}"
            if index:  # a fresh node for every row: RSS does not shrink when clients leave
                await reconfigure(env, limits={"compression": compression})
            results[tag] = await _measure(
                fleet, tag, node.ws_url, node.pid, topics, warm=spread, compress=compress, settle=settle
            )
            _status, health = await node.health()
            node_clients[tag] = health.get("clients")
            await fleet.close(tag)
        for mode, (compression, compress) in MODES.items():
            tag = f"baseline_{mode}"
            server = await BroadcastServer.start(control, compression=compression, name=tag)
            try:
                results[tag] = await _measure(
                    fleet, tag, server.ws_url, server.pid, [[]] * clients, warm=spread, compress=compress,
                    settle=settle,
                )  # fmt: skip
                await fleet.close(tag)
            finally:
                await server.stop()

    for mode in MODES:
        s, b = results[f"subsys_{mode}"], results[f"baseline_{mode}"]
        results[f"ratio_{mode}"] = {key: ratio(s[key], b[key]) for key in ("rss_empty_mib", "rss_mib", "per_client_kib")}
    plain = results["subsys_plain"]
    return {
        "bench": "memory",
        "what": "RSS per idle subscribed WebSocket client: subsys (plain, browser-like, deflate) vs a plain"
        " websockets server",
        "setup": "1 node subprocess (embedded coordinator), embedded PostgreSQL; a websockets server subprocess;"
        f" clients in {client_procs} client subprocesses (aiohttp; browser-like: compress=15)",
        "method": "per_client_kib = (settled RSS with N clients - with the warm-up clients) / the rest;"
        " a fresh server process for every row",
        "clients": clients,
        "topics": spread,
        "distribution": f"round-robin over {FEED}:1..{FEED}:{spread}, one row per topic",
        "results": results,
        # as before this bench compared modes: the plain subsys row's figures
        "connected": plain["connected"],
        "failed": plain["failed"],
        "node_reports_clients": node_clients.get("subsys_plain"),
        "node_reports_clients_by_row": node_clients,
        "rss_baseline_mib": plain["rss_empty_mib"],
        "rss_mib": plain["rss_mib"],
        "per_client_kib": plain["per_client_kib"],
        "fd_limit": fd_limit,
        "interval_ms": round(interval * 1000, 1),
        "node_exit_code": env.exit_codes.get(node.name),
        "duration_s": round(time.monotonic() - started, 1),
    }
