"""Cluster benchmarks: failover time and Consul writes (``subsys bench failover|consul-writes``).

Each run starts its own embedded PostgreSQL, a loopback Consul server agent
(consul/install.sh) and ``subsys serve`` processes, and stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import asyncpg

from .client import connect
from .localcluster import ConsulAgent, NodeProcess

__all__ = ["bench_failover", "bench_consul_writes"]

_SCHEMA = """
create table if not exists items (id int primary key, grp int not null, v int not null);
insert into items select g, g, 0 from generate_series(1, 200) g on conflict do nothing;
"""


@contextlib.asynccontextmanager
async def _cluster(workdir: Path, *, interval: float, check_ttl: float = 3.0) -> AsyncIterator[dict[str, Any]]:
    import pgserver

    pg = pgserver.get_server(str(workdir / "pg"), cleanup_mode="stop")
    agent = ConsulAgent(workdir / "consul")
    (workdir / "consul").mkdir()
    try:
        url = pg.get_uri()
        conn = await asyncpg.connect(url)
        await conn.execute(_SCHEMA)
        await conn.close()
        config = workdir / "subsys.toml"
        config.write_text(
            f"""
[node]
grace_period = 5.0
[consul]
check_ttl = {check_ttl}
lock_delay = 0.5
[feeds.items]
sql = "select id, v from items where grp = $1"
key = ["id"]
param = "int"
interval = {interval}
"""
        )
        agent.start()
        await agent.wait_ready()
        env = {
            "DATABASE_URL": url,
            "CONSUL_HTTP_ADDR": agent.http_addr,
            "SUBSYS_CLUSTER_SECRET": secrets.token_urlsafe(24),
            "SUBSYS_CONSUL_PREFIX": "bench/",
            "SUBSYS_LOG_LEVEL": "WARNING",
        }
        yield {"config": config, "env": env, "agent": agent, "db": url, "workdir": workdir}
    finally:
        agent.stop()
        pg.cleanup()


async def _owner(agent: ConsulAgent, topic: str) -> tuple[str, int] | None:
    import base64
    import json

    for entry in await agent.kv(f"bench/owners/{topic}"):
        if entry.get("Session"):
            return json.loads(base64.b64decode(entry["Value"]))["node"], entry["ModifyIndex"]
    return None


async def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")


async def bench_failover(*, kills: int, interval: float) -> dict[str, Any]:
    """SIGKILL the owner ``kills`` times; time to the first resync on another node."""
    topic = "items:1"
    with tempfile.TemporaryDirectory(prefix="subsys-bench-") as tmp:
        async with _cluster(Path(tmp), interval=interval) as ctx:
            nodes = {
                name: NodeProcess(name=name, config=ctx["config"], env=ctx["env"], workdir=Path(tmp))
                for name in ("b1", "b2", "b3")
            }
            for node in nodes.values():
                node.start()
            await asyncio.gather(*(node.wait_ready() for node in nodes.values()))
            times: list[float] = []
            try:
                for _ in range(kills):
                    times.append(await _one_failover(nodes, ctx, topic))
            finally:
                for node in nodes.values():
                    node.stop()
    return {
        "kills": len(times),
        "median_s": round(statistics.median(times), 3),
        "worst_s": round(max(times), 3),
        "best_s": round(min(times), 3),
        "check_ttl_s": 3.0,
        "lock_delay_s": 0.5,
        "interval_s": interval,
    }


async def _one_failover(nodes: dict[str, NodeProcess], ctx: dict[str, Any], topic: str) -> float:
    resynced: dict[str, float] = {}
    base_epoch: dict[str, int] = {}
    ready = asyncio.Event()

    async def watch(node: NodeProcess) -> None:
        async with connect(node.ws_url) as client:
            async for frame in client.subscribe(topic):
                if frame["type"] in ("snapshot", "resync") and node.name not in base_epoch:
                    base_epoch[node.name] = frame["epoch"]
                    if len(base_epoch) == len(nodes):
                        ready.set()
                elif frame["type"] == "resync" and frame["epoch"] > base_epoch.get(node.name, 0):
                    resynced.setdefault(node.name, time.monotonic())

    tasks = [asyncio.create_task(watch(node)) for node in nodes.values()]
    try:
        await asyncio.wait_for(ready.wait(), 60)
        owner_name, _epoch = await _wait(lambda: _owner(ctx["agent"], topic))
        await asyncio.sleep(0.5)  # a settled cluster, like production
        victim = nodes[owner_name]
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        await _wait(lambda: _any_resync(resynced), timeout=60)
        elapsed = min(resynced.values()) - killed_at
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    victim.proc.wait()
    victim.start()  # the same node comes back for the next round
    await victim.wait_ready()
    return elapsed


async def _any_resync(resynced: dict[str, float]) -> bool:
    return bool(resynced)


async def bench_consul_writes(*, topics: int, interval: float, window: float = 60.0) -> dict[str, Any]:
    """Consul requests one node makes per minute at steady state with ``topics`` subscribed topics."""
    with tempfile.TemporaryDirectory(prefix="subsys-bench-") as tmp:
        async with _cluster(Path(tmp), interval=interval) as ctx:
            node = NodeProcess(name="w1", config=ctx["config"], env=ctx["env"], workdir=Path(tmp))
            node.start()
            try:
                await node.wait_ready()
                clients, readers = [], []
                async with aiohttp.ClientSession() as session:
                    for i in range(1, topics + 1):
                        ws = await session.ws_connect(node.ws_url)
                        await ws.send_json({"type": "subscribe", "topic": f"items:{i}"})
                        clients.append(ws)
                        # Keep reading: aiohttp answers the node's heartbeat pings only while receiving.
                        readers.append(asyncio.create_task(_drain(ws)))
                    await _wait(lambda: _pollers(node, topics), timeout=120)
                    await asyncio.sleep(3.0)  # settle
                    before_node = await _requests(node)
                    before_raft = await _raft_applies(ctx["agent"])
                    await asyncio.sleep(window)
                    after_node = await _requests(node)
                    after_raft = await _raft_applies(ctx["agent"])
                    for ws in clients:
                        await ws.close()
                    for reader in readers:
                        reader.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)
            finally:
                node.stop()
    per_minute = 60.0 / window
    delta = {k: round((after_node.get(k, 0) - before_node.get(k, 0)) * per_minute, 1) for k in after_node}
    writes = sum(v for k, v in delta.items() if k.split()[0] in ("PUT", "DELETE"))
    return {
        "topics": topics,
        "window_s": window,
        "node_write_requests_per_min": writes,
        "by_endpoint_per_min": {k: v for k, v in sorted(delta.items()) if v},
        "raft_log_entries_per_min": round((after_raft - before_raft) * per_minute, 1),
    }


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _msg in ws:
        pass


async def _pollers(node: NodeProcess, expected: int) -> bool:
    _status, body = await node.health()
    return body.get("pollers") == expected


async def _requests(node: NodeProcess) -> dict[str, int]:
    _status, body = await node.health()
    return body["coordinator"].get("requests", {})


async def _raft_applies(agent: ConsulAgent) -> float:
    """The server's Raft last_log_index: every KV, session or catalog write adds one."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{agent.http_addr}/v1/agent/self") as resp:
            body = await resp.json()
    return float(body["Stats"]["raft"]["last_log_index"])
