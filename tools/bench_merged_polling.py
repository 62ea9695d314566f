"""Merged vs per-topic polling on one node: statements/s, node CPU, commit -> client latency.

    .venv/bin/python tools/bench_merged_polling.py [--topics 10 1000] [--window 20] [--changes 100]

Each case starts a LocalCluster (embedded PostgreSQL, one `subsys serve` node on the
embedded coordinator) over a table of one row per topic, subscribes one idle client per
topic, and measures over a window: statements/s from pg_stat_database.xact_commit (each
poll statement is one transaction; the pool sends nothing else), the node process's CPU
(psutil), and the PostgreSQL backends' CPU. Then it commits `--changes` row changes to
the topic polled in the *last* batch and times each to the client (interval 100 ms).
Baseline "one query": one topic whose query returns all N rows, one statement per tick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import asyncpg
import psutil

from subsys.bench.single import FEED, TABLE, _match_latencies, _TopicRecorder, items_feed, one_node
from subsys.bench.support import IdleClients, raise_fd_limit, summarize_ms
from subsys.testing.cluster import LocalCluster

INTERVAL = 0.1
PROFILE = ""


async def _xacts(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def _backend_cpu(url: str) -> float:
    conn = await asyncpg.connect(url)
    try:
        pids = [r["pid"] for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'subsys:%'")]
    finally:
        await conn.close()
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def run_case(name: str, topics: int, *, merged: bool, batch: int, window: float, changes: int,
                   one_query: bool = False) -> dict[str, Any]:
    spec = one_node(rows=max(topics, 10), interval=INTERVAL,
                    database={"merged_polling": merged, "batch_size": batch, "max_pool": 10})
    if one_query:  # the baseline: all the rows in one topic, one statement a tick
        spec.feeds = {FEED: {**items_feed(INTERVAL), "sql": f"SELECT id, v, note, changed FROM {TABLE} WHERE id <= $1 ORDER BY id"}}
    async with LocalCluster(spec) as env:
        node = env.nodes["n1"]
        names = [f"{FEED}:{topics}"] if one_query else [f"{FEED}:{i}" for i in range(1, topics + 1)]
        watched = names[-1]
        async with IdleClients(node.ws_url, concurrency=100) as clients:
            await clients.open(names[:-1])
            recorder = _TopicRecorder(node.ws_url, watched, topics)
            ready = asyncio.Event()
            reader = asyncio.create_task(recorder.run(ready))
            await ready.wait()
            await recorder.wait_for_value(0, 60)
            assert not clients.errors, clients.errors[:3]
            await asyncio.sleep(3.0)  # settle
            proc = psutil.Process(node.pid)
            c0, x0, b0, t0 = proc.cpu_times(), await _xacts(env.database_url), await _backend_cpu(env.database_url), time.monotonic()
            spy = None
            if PROFILE:
                spy = await asyncio.create_subprocess_exec(
                    "py-spy", "record", "-p", str(node.pid), "-d", str(int(window)), "-f", "raw", "-o", PROFILE, "-r", "200")
            await asyncio.sleep(window)
            if spy is not None:
                await spy.wait()
            c1, x1, b1, t1 = proc.cpu_times(), await _xacts(env.database_url), await _backend_cpu(env.database_url), time.monotonic()
            elapsed = t1 - t0
            result: dict[str, Any] = {
                "case": name, "topics": topics, "merged": merged, "batch_size": batch,
                "statements_per_s": round((x1 - x0 - 4) / elapsed, 1),  # less this script's own 4 look-ups
                "ideal_per_s": round((1 if one_query else -(-topics // (batch if merged else 1))) / INTERVAL, 1),
                "node_cpu_pct": round(100 * ((c1.user + c1.system) - (c0.user + c0.system)) / elapsed, 1),
                "pg_backends_cpu_pct": round(100 * (b1 - b0) / elapsed, 1),
            }
            if changes:
                writer = await asyncpg.connect(env.database_url)
                commits = []
                rng = random.Random(1)
                try:
                    for _ in range(changes):
                        value = await writer.fetchval(f"UPDATE {TABLE} SET v = v + 1 WHERE id = $1 RETURNING v", topics)
                        commits.append((int(value), time.monotonic()))
                        await asyncio.sleep(rng.uniform(0.5, 1.5) * INTERVAL)
                    await recorder.wait_for_value(commits[-1][0], 10)
                finally:
                    await writer.close()
                latencies, coalesced, lost = _match_latencies(commits, recorder.receipts)
                figures = summarize_ms(latencies)
                result.update({"latency_" + k: v for k, v in figures.items() if k in ("median_ms", "p99_ms", "max_ms")},
                              coalesced=coalesced, lost=lost)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topics", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--cases", nargs="+", default=["merged", "per-topic", "one-query", "merged-1000"])
    parser.add_argument("--profile", default="", help="py-spy the node during the window into this file")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    raise_fd_limit()
    for topics in args.topics:
        for case in args.cases:
            if case == "merged-1000" and topics < 1000:
                continue
            kwargs = dict(merged=case != "per-topic", batch=1000 if case == "merged-1000" else 100)
            result = await run_case(case, topics, window=args.window, changes=args.changes,
                                    one_query=case == "one-query", **kwargs)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
