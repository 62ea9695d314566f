"""Cluster benches: Consul writes (``subsys bench consul-writes``), and what the cluster benches share.

Each run is a :class:`~subsys.testing.cluster.LocalCluster`: its own embedded
PostgreSQL, a loopback Consul server agent (consul/install.sh) and
``subsys serve`` processes, all stopped at the end. ``failover`` lives in
:mod:`subsys.bench.failover`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from subsys.bench.support import BenchError, IdleClients, progress
from subsys.testing.cluster import ClusterSpec, LocalCluster
from subsys.testing.consul import ConsulAgent
from subsys.testing.nodes import NodeProcess

__all__ = ["bench_consul_writes", "cluster_spec", "wait_for", "LOCK_DELAY"]

LOCK_DELAY = 0.5
_SCHEMA = (
    "create table if not exists items (id int primary key, grp int not null, v int not null)",
    "insert into items select g, g, 0 from generate_series(1, 200) g on conflict do nothing",
)


def cluster_spec(*, nodes: int, interval: float, check_ttl: float, lock_delay: float = LOCK_DELAY,
                 log_level: str = "WARNING", **settings: dict[str, Any]) -> ClusterSpec:  # fmt: skip
    """``nodes`` nodes on a loopback Consul server; ``settings`` sections come on top (e.g. ``consul=...``)."""
    sections: dict[str, dict[str, Any]] = {
        "node": {"grace_period": 5.0},
        "consul": {"check_ttl": float(check_ttl), "lock_delay": float(lock_delay)},
    }
    for name, values in settings.items():
        sections.setdefault(name, {}).update(values)
    return ClusterSpec(
        nodes=nodes,
        feeds={"items": {"sql": "select id, v from items where grp = $1", "key": ["id"], "param": "int",
                         "interval": float(interval)}},
        schema=_SCHEMA,
        settings=sections,
        node_names=tuple(f"b{i + 1}" for i in range(nodes)),
        log_level=log_level,
    )  # fmt: skip


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


# -- Consul writes ---------------------------------------------------------------


async def bench_consul_writes(*, topics: int = 100, interval: float = 0.1, window: float = 60.0) -> dict[str, Any]:
    """Consul requests one node makes per minute at steady state with ``topics`` subscribed topics."""
    topics = max(1, int(topics))
    async with LocalCluster(cluster_spec(nodes=1, interval=interval, check_ttl=3.0)) as cluster:
        agent = cluster.consul.servers[0]
        node = cluster.nodes["b1"]
        async with IdleClients(node.ws_url) as pool:
            await pool.open([f"items:{i}" for i in range(1, topics + 1)])
            if pool.errors:
                raise BenchError(f"{len(pool.errors)} clients could not subscribe: {pool.errors[:3]}")
            await wait_for(lambda: _pollers(node, topics), timeout=120, what=f"{topics} running pollers")
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
