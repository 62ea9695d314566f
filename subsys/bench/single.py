"""The single-node bench ``latency``, and the bench table and one-node spec the others share.

It starts its own :class:`~subsys.testing.cluster.LocalCluster` (an embedded
PostgreSQL and one ``subsys serve`` process on the embedded coordinator),
measures, and stops it.

* ``latency``: time from a committed row change to a subscribed client
  receiving the diff that carries it, over ``changes`` changes, with the
  feed polled every ``interval`` seconds. A change waits on average half an
  interval for the next poll, so expect a median of about interval/2 plus
  the feed query's time plus a few milliseconds of WebSocket delivery.

``memory``, ``fanout`` and ``dbload`` live in their own modules; they use this
module's table (``TABLE``, ``FEED``) and :func:`one_node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any, Awaitable

import asyncpg

from subsys.bench.support import BenchError, IdleClients, progress, summarize_ms
from subsys.client.ws import connect
from subsys.testing.cluster import ClusterSpec, LocalCluster

__all__ = ["bench_latency", "TABLE", "FEED", "schema_sql", "items_feed", "one_node"]

# The table the single-node benches poll: one row per topic parameter.
TABLE = "bench_items"
FEED = "items"


def schema_sql(rows: int) -> tuple[str, ...]:
    return (
        f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, v bigint NOT NULL DEFAULT 0,"
        " note text NOT NULL DEFAULT '', changed timestamptz NOT NULL DEFAULT now())",
        f"INSERT INTO {TABLE} (id, note) SELECT g, 'row ' || g FROM generate_series(1, {int(rows)}) AS g",
    )


def items_feed(interval: float) -> dict[str, Any]:
    return {
        "sql": f"SELECT id, v, note, changed FROM {TABLE} WHERE id = $1",
        "key": ["id"],
        "param": "int",
        "interval": float(interval),
        "statement_timeout": 5.0,
    }


def one_node(*, rows: int, interval: float, grace: float = 2.0, **settings: Any) -> ClusterSpec:
    """A single node on the embedded coordinator over the bench table."""
    sections: dict[str, dict[str, Any]] = {"node": {"grace_period": grace}}
    for name, values in settings.items():
        sections.setdefault(name, {}).update(values)
    return ClusterSpec(
        nodes=1, consul="none", feeds={FEED: items_feed(interval)}, schema=schema_sql(rows), settings=sections,
        log_level="WARNING",
    )  # fmt: skip


# -- latency -------------------------------------------------------------------


async def _time_feed_query(database_url: str, feed: dict[str, Any], param: Any, *, runs: int = 50) -> float:
    """Median wall time (ms) of the feed query as the poller sends it (wrapped in LIMIT)."""
    sql = f"SELECT * FROM ({feed['sql']}) AS subsys_feed LIMIT 10001"
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.fetch(sql, param)  # warm the plan cache
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            await conn.fetch(sql, param, timeout=5)
            timings.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return summarize_ms(timings)["median_ms"]


class _TopicRecorder:
    """Reads one topic through subsys.client and timestamps every frame on arrival."""

    def __init__(self, url: str, topic: str, row_id: int) -> None:
        self.url, self.topic, self.row_id = url, topic, row_id
        self.receipts: list[tuple[float, int, str]] = []  # (monotonic, value of v, frame type)
        self.frames: dict[str, int] = {}
        self.seq_gaps = 0
        self.epochs: set[int] = set()
        self.latest = -1
        self.closed_code: int | None = None
        self._changed = asyncio.Event()
        self._seq: tuple[int, int] | None = None

    async def run(self, ready: asyncio.Event) -> None:
        async with connect(self.url) as client:
            ready.set()
            async for frame in client.subscribe(self.topic):
                now = time.monotonic()
                self._take(now, frame)
            self.closed_code = client.close_code
        self._changed.set()

    def _take(self, now: float, frame: dict[str, Any]) -> None:
        kind = frame.get("type", "?")
        self.frames[kind] = self.frames.get(kind, 0) + 1
        if kind == "error":
            raise BenchError(f"server error on {self.topic}: {frame}")
        if kind not in ("snapshot", "resync", "diff"):
            return
        epoch, seq = int(frame["epoch"]), int(frame["seq"])
        self.epochs.add(epoch)
        if kind == "diff" and self._seq is not None and self._seq != (epoch, seq - 1):
            self.seq_gaps += 1
        self._seq = (epoch, seq)
        rows = frame["rows"] if kind != "diff" else frame["inserted"] + frame["updated"]
        for row in rows:
            if row.get("id") == self.row_id:
                value = int(row["v"])
                self.receipts.append((now, value, kind))
                if value > self.latest:
                    self.latest = value
        self._changed.set()

    async def wait_for_value(self, value: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.latest < value:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True


def _match_latencies(
    commits: list[tuple[int, float]], receipts: list[tuple[float, int, str]]
) -> tuple[list[float], int, int]:
    """For each committed value, the first receipt that carries it or a later value.

    Returns (latencies in s, how many arrived coalesced with a later change, how many never arrived).
    """
    ordered = sorted(receipts)
    latencies: list[float] = []
    coalesced = lost = 0
    index = 0
    for value, committed_at in commits:
        while index < len(ordered) and ordered[index][1] < value:
            index += 1
        if index == len(ordered):
            lost += 1
            continue
        received_at, received_value, _kind = ordered[index]
        latencies.append(received_at - committed_at)
        coalesced += received_value != value
    return latencies, coalesced, lost


async def bench_latency(*, changes: int = 200, interval: float = 0.1, topics: int = 1, **_: Any) -> dict[str, Any]:
    """``topics``: how many topics the node polls; the one timed is the last (in the last batch)."""
    changes, topics = max(1, int(changes)), max(1, int(topics))
    feed = items_feed(interval)
    row_id = topics
    topic = f"{FEED}:{row_id}"
    started = time.monotonic()
    progress("starting PostgreSQL and the node")
    async with LocalCluster(one_node(rows=max(10, topics), interval=interval)) as env, \
            IdleClients(env.nodes["n1"].ws_url, concurrency=100) as others:  # fmt: skip
        node = env.nodes["n1"]
        query_ms = await _time_feed_query(env.database_url, feed, row_id)
        if topics > 1:
            progress(f"subscribing {topics - 1} other topics")
            await others.open([f"{FEED}:{i}" for i in range(1, topics)])
            if others.errors:
                raise BenchError(f"{len(others.errors)} subscriptions failed, e.g. {others.errors[0]}")

        recorder = _TopicRecorder(node.ws_url, topic, row_id)
        connected = asyncio.Event()
        reader = asyncio.create_task(recorder.run(connected), name="bench-latency-reader")
        writer_conn: asyncpg.Connection | None = None
        try:
            await _first(reader, connected.wait(), timeout=15, what="connect to the node")
            if not await _first(reader, recorder.wait_for_value(0, 30), timeout=31, what="first snapshot"):
                raise BenchError(f"no snapshot of {topic} within 30s:\n{node.log_tail()}")
            writer_conn = await asyncpg.connect(env.database_url, timeout=10)
            rng = random.Random()
            commits: list[tuple[int, float]] = []
            progress(f"making {changes} changes, one every ~{interval:g}s")
            for _ in range(changes):
                if reader.done():
                    break
                value = await writer_conn.fetchval(
                    f"UPDATE {TABLE} SET v = v + 1, changed = now() WHERE id = $1 RETURNING v", row_id, timeout=10
                )
                commits.append((int(value), time.monotonic()))  # autocommit: committed when this returns
                # 0.5-1.5 intervals apart: the change lands at a random point of the poll cycle
                await asyncio.sleep(rng.uniform(0.5, 1.5) * interval)
            if commits:
                await recorder.wait_for_value(commits[-1][0], timeout=max(5.0, 50 * interval))
        finally:
            if writer_conn is not None:
                await writer_conn.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise BenchError(f"client failed: {reader.exception()}")

    latencies, coalesced, lost = _match_latencies(commits, recorder.receipts)
    figures = summarize_ms(latencies)
    return {
        "bench": "latency",
        "what": "commit of a row change -> diff carrying it received by a subscribed client",
        "setup": "1 node subprocess (embedded coordinator), embedded PostgreSQL (pgserver, Unix socket),"
        " 1 client via subsys.client on loopback (and one idle client per other topic)",
        "topic": topic,
        "topics": topics,
        "interval_ms": round(interval * 1000, 1),
        "changes": len(commits),
        **figures,
        "coalesced": coalesced,
        "lost": lost,
        "seq_gaps": recorder.seq_gaps,
        "frames": recorder.frames,
        "query_median_ms": query_ms,
        "expected_median_ms": round(interval * 500 + query_ms, 2),
        "note": "a change waits on average interval/2 for the next poll, so the expected median is about"
        " interval/2 + the feed query's time (+ a few ms of WebSocket delivery); 'coalesced' changes"
        " arrived in the same diff as a later change and are timed to that diff",
        "node_exit_code": env.exit_codes.get(node.name),
        "duration_s": round(time.monotonic() - started, 1),
    }


async def _first(task: asyncio.Task, awaitable: Awaitable[Any], *, timeout: float, what: str) -> Any:
    """Await ``awaitable`` unless ``task`` (the client reader) fails first."""
    waiter = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        if task in done:
            exc = None if task.cancelled() else task.exception()
            raise BenchError(f"client stopped while waiting to {what}: {exc!r}")
        raise BenchError(f"timed out after {timeout:g}s waiting to {what}")
    finally:
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
