"""What the runner measures besides the clients: node resources, zombies, leftovers, the poll log.

Everything here reads; nothing changes the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import psutil

from subsys.chaos.history import sample_inflight
from subsys.client.admin import AdminClient, AdminError
from subsys.coordinator.consul.client import ConsulClient
from subsys.coordinator.consul.keys import KeyLayout
from subsys.coordinator.consul.view import read_records
from subsys.testing.cluster import LocalCluster

__all__ = ["Usage", "usage", "ZombieWatch", "leftovers", "InflightSampler", "poll_log", "wait_for"]


async def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` (sync or async) is true, or None after ``timeout``."""
    started = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        await asyncio.sleep(interval)


# -- CPU and log volume ----------------------------------------------------------------


@dataclass
class Usage:
    at: float
    cpu: dict[tuple[str, int], float]  # (node, pid) -> CPU seconds so far
    log_bytes: dict[str, int]


def usage(cluster: LocalCluster) -> Usage:
    cpu, logs = {}, {}
    for node in cluster.nodes.values():
        if node.running:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(node.pid).cpu_times()
                cpu[(node.name, node.pid)] = times.user + times.system
        if node.log_path is not None:
            with contextlib.suppress(OSError):
                logs[node.name] = node.log_path.stat().st_size
    return Usage(time.monotonic(), cpu, logs)


def usage_between(a: Usage, b: Usage) -> tuple[dict[str, float], dict[str, float]]:
    """Per node: mean CPU percent of one core, log bytes per second (same process at both ends only)."""
    span = max(b.at - a.at, 1e-6)
    cpu = {name: 100.0 * (b.cpu[(name, pid)] - secs) / span
           for (name, pid), secs in a.cpu.items() if (name, pid) in b.cpu}  # fmt: skip
    logs = {name: (b.log_bytes[name] - size) / span for name, size in a.log_bytes.items() if name in b.log_bytes}
    return cpu, logs


# -- zombies -----------------------------------------------------------------------------


@dataclass
class ZombieWatch:
    """Asks a live node's admin API for zombies; remembers every one seen and what janitors reaped."""

    token: str
    seen: dict[str, set[str]] = field(default_factory=dict)  # kind -> zombie ids
    reaped: dict[tuple[str, int], Counter] = field(default_factory=dict)  # (node, pid) -> kind -> count

    async def listing(self, cluster: LocalCluster) -> list[Any] | None:
        urls = [node.url for node in cluster.running()]
        if not urls:
            return None
        try:
            async with AdminClient(urls, token=self.token, timeout=10) as admin:
                answer = await admin.zombies()
        except AdminError:
            return None
        for zombie in answer.zombies:
            self.seen.setdefault(zombie.kind, set()).add(zombie.id)
        return answer.zombies

    async def until_empty(self, cluster: LocalCluster, timeout: float, settle: float) -> tuple[float | None, list[str]]:
        """Seconds until the zombie list became empty and stayed so for ``settle`` seconds
        (long enough for the janitor to confirm a new one: two scans), or None; and the last list."""
        started, last = time.monotonic(), ["(no answer)"]
        empty_since: float | None = None
        while time.monotonic() - started <= timeout:
            zombies = await self.listing(cluster)
            now = time.monotonic()
            if zombies is not None:
                last = [z.id for z in zombies]
                if zombies:
                    empty_since = None
                elif empty_since is None:
                    empty_since = now
            if empty_since is not None and now - empty_since >= settle:
                return empty_since - started, []
            await asyncio.sleep(0.5)
        return None, last

    async def collect_reaped(self, cluster: LocalCluster) -> None:
        for node in cluster.running():
            with contextlib.suppress(AdminError):
                async with AdminClient(node.url, token=self.token, timeout=10) as admin:
                    answer = await admin.zombies()
                self.reaped[(node.name, node.pid)] = Counter(answer.reaped)

    def reaped_by_kind(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.reaped.values():
            total.update(counts)
        return dict(sorted(total.items()))


# -- leftovers: owner and presence keys, sessions, pollers -------------------------------


async def leftovers(cluster: LocalCluster, topics: set[str] | None = None) -> list[str]:
    """What is still there for ``topics`` (None: every topic) once no client wants them.

    Owner and presence keys, sessions other than one per running node, running pollers
    (each node's /health; only when ``topics`` is None, since /health counts all topics).
    """
    found = []
    view = await cluster.view()
    for topic, record in view.owners.items():
        if topics is None or topic in topics:
            found.append(f"owner key {topic} held by {record.node_id}")
    for topic, nodes in view.presence.items():
        if topics is None or topic in topics:
            found.append(f"presence {topic} on {','.join(sorted(nodes))}")
    if topics is None:
        assert cluster.consul is not None
        agent = next(a for a in cluster.consul.agents if a.running)
        client = ConsulClient(address=agent.http_addr)
        await client.open()
        try:
            records = await read_records(client, KeyLayout(cluster.prefix))
        finally:
            await client.close()
        per_node = Counter(s.node for s in records.sessions)
        running = {n.name for n in cluster.running()}
        for node, count in sorted(per_node.items()):
            if node not in running or count > 1:
                found.append(f"{count} session(s) of {node}")
        async with aiohttp.ClientSession() as session:
            for node in cluster.running():
                try:
                    _status, body = await node.health(session)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                    found.append(f"{node.name}: /health did not answer")
                    continue
                if body.get("pollers"):
                    found.append(f"{node.name} runs {body['pollers']} poller(s)")
    return found


# -- the database's side -------------------------------------------------------------------


class InflightSampler:
    """Samples the feed queries running now (their advisory locks), so cancelled polls count too."""

    def __init__(self, url: str, period: float = 0.25) -> None:
        self.url, self.period = url, period
        self.samples: list[tuple[float, str, int]] = []

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.url, timeout=3)
                    at = time.time()
                    self.samples += [(at, app, topic) for app, topic in await sample_inflight(conn)]
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError):
                    if conn is not None:
                        conn.terminate()
                    conn = None
                await asyncio.sleep(self.period)
        finally:
            if conn is not None:
                conn.terminate()


async def poll_log(cluster: LocalCluster, since: float) -> list[tuple[float, str, int]]:
    rows = await cluster.fetch("select at, app, topic from poll_log where at >= to_timestamp($1) order by at", since)
    return [(row["at"].timestamp(), row["app"], row["topic"]) for row in rows]


async def polls_after(cluster: LocalCluster, since: float, topics: set[int] | None = None) -> int:
    rows = await poll_log(cluster, since)
    return sum(1 for _at, _app, topic in rows if topics is None or topic in topics)
