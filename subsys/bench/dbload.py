"""``subsys bench dbload``: what T subscribed topics of one feed cost PostgreSQL and the node.

Three phases in one run, one after the other on the same embedded PostgreSQL
and the same table (T rows, one per topic, nothing changes):

* subsys with ``database.merged_polling = false`` (one query per topic per tick),
* subsys with ``database.merged_polling = true`` (``database.batch_size`` passed
  through): the node is restarted on the rewritten config,
* baseline: a minimal poller process (:mod:`subsys.bench.baselines`) that
  runs one ``WHERE id = ANY($1)`` statement per tick for all T parameters;
  the node is stopped first.

Subsys's T topics are subscribed by a client process (50 topics per
connection), and the window starts once the node reports T pollers and a
settle time has passed.

Statements per second come from PostgreSQL's own counter
``pg_stat_database.xact_commit`` (each autocommit statement is one
transaction). The embedded server (pgserver) ships no contrib modules, so
``pg_stat_statements`` cannot be loaded. Backends publish their counters
lazily: a busy backend at most once a second, an idle one up to 10 s later,
so a plain delta over the window is off by at most about one second of
activity at each end. The bench samples the counter every second and takes
the least-squares slope (``statements_per_s``), which averages that jitter
out; the plain delta is given too. The bench's own sampling statements
(one per sample) are subtracted. Expect a few stray transactions from
autovacuum. Error: about +-1/window of the rate for the delta, less for
the slope.

``feed_statements_per_s`` is the node's own count of the feed statements it
sent (``subsys_statements`` in ``/metrics``), without its zombie scans and
health checks, which ``xact_commit`` includes (one scan statement every
``node.zombie_interval``, 5 s by default).

CPU% (of one core) over the window, from /proc (see ``support.cpu_seconds``):
the node process or the baseline poller process; the PostgreSQL backends
serving it (found by ``application_name`` at the window's start); and all of
PostgreSQL (the postmaster and all its children, the bench's own backend
included).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import aiohttp
import asyncpg
import psutil

from subsys.bench.baselines import POLLER_APP, BaselinePoller
from subsys.bench.clients import ClientFleet, ControlServer
from subsys.bench.single import FEED, TABLE, one_node
from subsys.bench.support import BenchError, cpu_seconds, ols_slope, progress, ratio, reconfigure
from subsys.testing.cluster import LocalCluster
from subsys.testing.nodes import NodeProcess

__all__ = ["bench_dbload"]

_PER_CONNECTION = 50  # topics per client connection: within the default rate limit's burst


async def _backend_pids(conn: asyncpg.Connection, app: str) -> list[int]:
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
    return [row["pid"] for row in rows]


def _postgres_pids(postmaster: int | None) -> list[int]:
    if postmaster is None:
        return []
    try:
        process = psutil.Process(postmaster)
        return [postmaster, *(child.pid for child in process.children(recursive=True))]
    except psutil.Error:
        return []


async def _node_statements(node: NodeProcess | None) -> float | None:
    """The node's own count of the statements it sent (``subsys_statements`` in /metrics)."""
    if node is None:
        return None
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            text = await resp.text()
    return sum(float(m.group(1)) for m in re.finditer(r"^subsys_statements_total\{[^}]*\} (\S+)$", text, re.M))


async def _window(
    conn: asyncpg.Connection, *, seconds: float, process_pid: int, app: str, postmaster: int | None,
    node: NodeProcess | None = None,
) -> dict[str, Any]:
    """Sample xact_commit once a second for ``seconds``; CPU of the process, its backends and PostgreSQL."""
    backends = await _backend_pids(conn, app)
    counted0 = await _node_statements(node)
    pg_all = _postgres_pids(postmaster)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    cpu0 = (cpu_seconds(process_pid), cpu_seconds(*backends), cpu_seconds(*pg_all))
    steps = max(2, int(math.ceil(seconds)))
    for step in range(steps + 1):
        await asyncio.sleep(max(0.0, started + step * seconds / steps - time.monotonic()))
        count = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()", timeout=10
        )
        samples.append((time.monotonic() - started, int(count)))
    wall = time.monotonic() - started
    cpu1 = (cpu_seconds(process_pid), cpu_seconds(*backends), cpu_seconds(*pg_all))
    counted1 = await _node_statements(node)
    per_sample = steps / seconds  # the bench's own sampling statements, per second
    xs, ys = zip(*samples)
    return {
        "statements_per_s": round(ols_slope(xs, ys) - per_sample, 1),
        "statements_per_s_delta": round((ys[-1] - ys[0]) / (xs[-1] - xs[0]) - per_sample, 1),
        # Feed statements only, as the node counts them (xact_commit also has its scans and health checks).
        "feed_statements_per_s": None if counted0 is None or counted1 is None else round((counted1 - counted0) / wall, 2),
        "process_cpu_pct": round((cpu1[0] - cpu0[0]) / wall * 100, 2),
        "pg_backends_cpu_pct": round((cpu1[1] - cpu0[1]) / wall * 100, 2),
        "pg_backends": len(backends),
        "pg_total_cpu_pct": round((cpu1[2] - cpu0[2]) / wall * 100, 2),
        "window_s": round(wall, 1),
    }


async def _wait_pollers(node: NodeProcess, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        _status, body = await node.health()
        last = body.get("pollers")
        if last == expected:
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"the node runs {last} pollers, not {expected}, after {timeout:g}s")


async def bench_dbload(
    *,
    topics: int = 1000,
    interval: float = 1.0,
    window: float = 30.0,
    settle: float = 3.0,
    batch_size: int = 100,
    **_: Any,
) -> dict[str, Any]:
    topics = max(1, int(topics))
    window = max(2.0, float(window))
    started = time.monotonic()
    names = [f"{FEED}:{i}" for i in range(1, topics + 1)]
    subscriptions = [names[i : i + _PER_CONNECTION] for i in range(0, topics, _PER_CONNECTION)]
    phases: dict[str, dict[str, Any]] = {}
    progress("starting PostgreSQL and the node")
    spec = one_node(rows=topics, interval=interval, database={"merged_polling": False, "batch_size": int(batch_size)})
    async with LocalCluster(spec) as env, ControlServer() as control:
        node = env.nodes["n1"]
        app = f"subsys:{node.name}"
        postmaster = env.pg.pid if env.pg is not None else None
        conn = await asyncpg.connect(env.database_url, timeout=10)
        try:
            async with ClientFleet(control, 1) as fleet:
                for merged in (False, True):
                    name = "subsys_merged" if merged else "subsys_per_topic"
                    if merged:
                        await reconfigure(env, database={"merged_polling": True})
                    progress(f"{name}: subscribing {topics} topics")
                    opened = await fleet.open(name, node.ws_url, subscriptions, timeout=120 + topics / 20)
                    if opened["connected"] < len(subscriptions):
                        raise BenchError(f"{name}: subscribing failed: {opened['first_error']}")
                    await _wait_pollers(node, topics, timeout=60 + topics / 20)
                    await asyncio.sleep(settle)
                    progress(f"{name}: measuring for {window:g}s")
                    phases[name] = await _window(
                        conn, seconds=window, process_pid=node.pid, app=app, postmaster=postmaster, node=node
                    )
                    await fleet.close(name)
            await node.stop()  # no pollers of the node's in the baseline's window
            progress("baseline: one = ANY($1) statement per tick")
            poller = await BaselinePoller.start(
                control, database_url=env.database_url, table=TABLE, topics=topics, interval=interval
            )
            try:
                deadline = time.monotonic() + 30
                while await poller.ticks() < 1:
                    if time.monotonic() > deadline:
                        raise BenchError(f"the baseline poller did not poll within 30s:\n{poller.helper.proc.log_tail()}")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(settle)
                progress(f"baseline: measuring for {window:g}s")
                phases["baseline"] = await _window(
                    conn, seconds=window, process_pid=poller.pid, app=POLLER_APP, postmaster=postmaster
                )
            finally:
                await poller.stop()
        finally:
            await conn.close()

    base = phases["baseline"]
    keys = ("statements_per_s", "process_cpu_pct", "pg_backends_cpu_pct", "pg_total_cpu_pct")
    results: dict[str, Any] = dict(phases)
    for name in ("subsys_per_topic", "subsys_merged"):
        results[f"ratio_{name}"] = {key: ratio(phases[name][key], base[key]) for key in keys}
    return {
        "bench": "dbload",
        "what": "PostgreSQL statements/s and CPU with T subscribed topics of one feed, nothing changing",
        "setup": "1 node subprocess (embedded coordinator), embedded PostgreSQL; T topics subscribed by a client"
        " subprocess; baseline: one poller subprocess, one = ANY($1) statement per tick",
        "method": "statements/s: slope of pg_stat_database.xact_commit sampled each second (the bench's own"
        " samples subtracted); CPU% of one core from /proc over the same window",
        "topics": topics,
        "interval_s": interval,
        "batch_size": int(batch_size),
        "expected_per_topic_per_s": round(topics / interval, 1),
        "results": results,
        "node_exit_code": env.exit_codes.get(node.name),
        "duration_s": round(time.monotonic() - started, 1),
    }
