"""Cluster benchmarks: failover time and Consul writes (``subsys bench failover|consul-writes``).

Each run is a :class:`~subsys.testing.cluster.LocalCluster`: its own embedded
PostgreSQL, a loopback Consul server agent (consul/install.sh) and
``subsys serve`` processes, all stopped at the end.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Awaitable, Callable

from subsys.bench.support import BenchError, IdleClients, progress
from subsys.client.ws import connect
from subsys.testing.cluster import ClusterSpec, LocalCluster
from subsys.testing.consul import ConsulAgent
from subsys.testing.nodes import NodeProcess

__all__ = ["bench_failover", "bench_consul_writes"]

LOCK_DELAY = 0.5
_SCHEMA = (
    "create table if not exists items (id int primary key, grp int not null, v int not null)",
    "insert into items select g, g, 0 from generate_series(1, 200) g on conflict do nothing",
)


def _spec(*, nodes: int, interval: float, check_ttl: float) -> ClusterSpec:
    return ClusterSpec(
        nodes=nodes,
        feeds={"items": {"sql": "select id, v from items where grp = $1", "key": ["id"], "param": "int",
                         "interval": float(interval)}},
        schema=_SCHEMA,
        settings={"node": {"grace_period": 5.0}, "consul": {"check_ttl": float(check_ttl), "lock_delay": LOCK_DELAY}},
        node_names=tuple(f"b{i + 1}" for i in range(nodes)),
        log_level="WARNING",
    )  # fmt: skip


async def _owner(cluster: LocalCluster, topic: str) -> tuple[str, int] | None:
    owner = await cluster.owner_of(topic)
    return (owner.node_id, owner.epoch) if owner else None


async def _wait(predicate: Callable[[], Awaitable[Any]], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


# -- failover ------------------------------------------------------------------


async def bench_failover(*, kills: int = 20, interval: float = 0.1, check_ttl: float = 3.0) -> dict[str, Any]:
    """SIGKILL the owner ``kills`` times; time to the first resync on another node."""
    topic = "items:1"
    kills = max(1, int(kills))
    started = time.monotonic()
    progress("starting PostgreSQL, Consul and three nodes")
    async with LocalCluster(_spec(nodes=3, interval=interval, check_ttl=check_ttl)) as cluster:
        times: list[float] = []
        for round_ in range(kills):
            progress(f"kill {round_ + 1} of {kills}")
            times.append(await _one_failover(cluster, topic))
    return {
        "bench": "failover",
        "what": "SIGKILL of a topic's owner -> first resync (higher epoch) at a client on another node",
        "setup": "3 node subprocesses on a loopback Consul server, embedded PostgreSQL; a client per node",
        "kills": len(times),
        "median_s": round(statistics.median(times), 3),
        "worst_s": round(max(times), 3),
        "best_s": round(min(times), 3),
        "check_ttl_s": float(check_ttl),
        "lock_delay_s": LOCK_DELAY,
        "interval_s": interval,
        "duration_s": round(time.monotonic() - started, 1),
    }


async def _one_failover(cluster: LocalCluster, topic: str) -> float:
    nodes = cluster.nodes
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

    async def any_resync() -> bool:
        return bool(resynced)

    tasks = [asyncio.create_task(watch(node)) for node in nodes.values()]
    try:
        try:
            await asyncio.wait_for(ready.wait(), 60)
        except asyncio.TimeoutError:
            raise BenchError("not every node's client got a snapshot within 60s") from None
        owner_name, _epoch = await _wait(lambda: _owner(cluster, topic), what=f"an owner of {topic}")
        await asyncio.sleep(0.5)  # a settled cluster, like production
        victim = nodes[owner_name]
        killed_at = time.monotonic()
        victim.kill()
        await _wait(any_resync, what="a resync on a surviving node")
        elapsed = min(resynced.values()) - killed_at
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await victim.wait()
    await victim.start()  # the same node comes back for the next round
    await victim.wait_ready()
    return elapsed


# -- Consul writes ---------------------------------------------------------------


async def bench_consul_writes(*, topics: int = 100, interval: float = 0.1, window: float = 60.0) -> dict[str, Any]:
    """Consul requests one node makes per minute at steady state with ``topics`` subscribed topics."""
    topics = max(1, int(topics))
    async with LocalCluster(_spec(nodes=1, interval=interval, check_ttl=3.0)) as cluster:
        agent = cluster.consul.servers[0]
        node = cluster.nodes["b1"]
        async with IdleClients(node.ws_url) as pool:
            await pool.open([f"items:{i}" for i in range(1, topics + 1)])
            if pool.errors:
                raise BenchError(f"{len(pool.errors)} clients could not subscribe: {pool.errors[:3]}")
            await _wait(lambda: _pollers(node, topics), timeout=120, what=f"{topics} running pollers")
            await asyncio.sleep(3.0)  # settle
            progress(f"counting for {window:g}s")
            before_node, before_raft = await _requests(node), await _raft_index(agent)
            await asyncio.sleep(window)
            after_node, after_raft = await _requests(node), await _raft_index(agent)
    per_minute = 60.0 / window
    delta = {k: round((after_node.get(k, 0) - before_node.get(k, 0)) * per_minute, 1) for k in after_node}
    writes = sum(v for k, v in delta.items() if k.split()[0] in ("PUT", "DELETE"))
    return {
        "bench": "consul-writes",
        "what": "Consul requests one node makes per minute at steady state with N subscribed topics",
        "topics": topics,
        "window_s": window,
        "node_write_requests_per_min": writes,
        "by_endpoint_per_min": {k: v for k, v in sorted(delta.items()) if v},
        "raft_log_entries_per_min": round((after_raft - before_raft) * per_minute, 1),
    }


async def _pollers(node: NodeProcess, expected: int) -> bool:
    _status, body = await node.health()
    return body.get("pollers") == expected


async def _requests(node: NodeProcess) -> dict[str, int]:
    _status, body = await node.health()
    return body["coordinator"].get("requests", {})


async def _raft_index(agent: ConsulAgent) -> float:
    """The server's Raft last_log_index: every KV, session or catalog write adds one."""
    body = await agent.get_json("agent/self")
    return float(body["Stats"]["raft"]["last_log_index"])
