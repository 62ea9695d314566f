"""``subsys bench fanout``: one topic, N subscribers, K publishes; subsys against a plain broadcast server.

Setup (one invocation, one machine state for both systems):

* subsys: one ``subsys serve`` process on the embedded coordinator, polling
  one row (``items:1``) every ``interval`` seconds; ``node.event_loop``
  passed through its settings;
* baseline: a plain ``websockets`` broadcast server in its own process
  (:mod:`subsys.bench.baselines`, always on asyncio: a fixed yardstick);
* N subscribers on each, in ``client_procs`` client processes
  (:mod:`subsys.bench.loadclient` with the bare client of
  :mod:`subsys.bench.rawws`: a few microseconds per frame), so neither
  server nor the bench is charged for the clients' CPU.

Rounds alternate which system goes first (S B, B S, S B, ...) so slow drifts
of the machine (another job, thermal) hit both alike. A round waits until
every subscriber has its frame (or a bounded timeout) before the next one.

What "publish" is, for each (both: the moment the data is about to go on a
local socket towards the server):

* subsys: the node exposes no publish stamp, and a commit waits up to one
  poll interval for the next poll, which is not fan-out time. So the bench
  watches ``pg_stat_activity`` (the node's backends: ``application_name =
  'subsys:n1'``). It commits the change right after a poll cycle ended
  (the node's last statement idle and unchanged for 4 ms; today a cycle is
  the feed query and then asyncpg's reset query on release, before the
  rows are published), then, from just before the next cycle is due,
  looks every 2 ms for the first statement that started after the commit,
  and takes the ``state_change`` of that cycle's last statement:
  PostgreSQL sets it just before it sends the result (and ReadyForQuery)
  to the node. So subsys's figures include receiving the rows, diffing,
  encoding and the fan-out; not the wait for the poll. Committing just
  after a cycle leaves about an interval before the next one, so the cycle
  that saw the change is not in doubt; a round whose anchor does not start
  one interval (+-1/4) after the previous cycle, or that a subscriber got
  before the anchor, is dropped and counted as ``unanchored_rounds`` (at
  large N the bench's 2 ms look-ups compete for the CPU with the fan-out).
* baseline: the bench's wall clock just before it writes the payload to the
  server's control socket; the server ``broadcast``s it as it arrives.

Error of "publish": both stamps precede a loopback socket hop to the server
(Unix socket from PostgreSQL, TCP from the bench), tens of microseconds,
so publish->first is good to about +-0.1 ms. The clients stamp arrivals
with the wall clock of the socket read that brought the frame; the client
processes share the two cores with the servers, so under load a read comes
late, and publish->last and the high percentiles include the clients' own
reading time (for both systems alike: ``client_cpu_us_per_frame`` shows
its size).
PostgreSQL's timestamps are microseconds of the same clock (CLOCK_REALTIME).

Figures per system: publish->first and publish->last subscriber (median
over the rounds), per-subscriber latency p50/p99 (all arrivals of all
rounds), delivered frames per second (N / publish->last) and time per
frame per subscriber (publish->last / N), each the median over the rounds,
and the server process's CPU per delivered frame (/proc schedstat, all
threads; for subsys it includes the few idle polls of the round, well
under a millisecond each): it does not depend on the clients, the
steadiest figure on a small machine. ``ratio``
is subsys / baseline for every figure (for frames/s: below 1 is slower).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Any

import asyncpg

from subsys.bench.baselines import BroadcastServer
from subsys.bench.clients import ClientFleet, ControlServer
from subsys.bench.single import FEED, TABLE, one_node
from subsys.bench.support import (
    BenchError,
    cpu_seconds,
    installed,
    module_loaded,
    percentile,
    progress,
    raise_fd_limit,
    ratio,
)
from subsys.testing.cluster import LocalCluster

__all__ = ["bench_fanout"]

# The node's last finished statement: its backends are named by application_name. Not filtered by
# query text: a poll cycle may be more than the feed's query (today asyncpg's reset query follows it
# on release, before the rows are published), and its last statement is what ends the cycle.
_LAST_POLL = """
SELECT extract(epoch FROM query_start)::float8 AS started, extract(epoch FROM state_change)::float8 AS ended
FROM pg_stat_activity
WHERE application_name = $1 AND state = 'idle'
ORDER BY query_start DESC LIMIT 1
"""
_VALUE = re.compile(r'"v":"?\d+"?')


async def _poll_after(
    conn: asyncpg.Connection,
    app: str,
    after: float,
    *,
    first_check: float,
    timeout: float,
    settle: float = 0.003,
    cycle: float = 0.01,
) -> tuple[float, float]:
    """(start, end) of the first finished poll cycle that started after ``after`` (wall clock, s).

    End: of the cycle's last statement; seen ``settle`` later, when any statement that
    follows the query in the same cycle has run too.
    """
    await asyncio.sleep(max(0.0, first_check - time.time()))
    deadline = time.monotonic() + timeout
    while True:
        row = await conn.fetchrow(_LAST_POLL, app, timeout=5)
        if row is not None and row["started"] > after:
            started = row["started"]
            await asyncio.sleep(settle)
            again = await conn.fetchrow(_LAST_POLL, app, timeout=5)
            ended = again["ended"] if again is not None and again["started"] - started < cycle else row["ended"]
            return started, ended
        if time.monotonic() > deadline:
            raise BenchError(f"no poll of the node seen in pg_stat_activity within {timeout:g}s")
        await asyncio.sleep(0.002)


async def _cycle_ended(conn: asyncpg.Connection, app: str, *, timeout: float, quiet: float = 0.004) -> float:
    """Wait until a fresh poll cycle has ended; returns the start of its last statement.

    Ended: the node's last statement is idle and stays the same for ``quiet`` seconds,
    so a statement that follows the query in the same cycle (the pool's reset) has run.
    """
    deadline = time.monotonic() + timeout
    first = await conn.fetchrow(_LAST_POLL, app, timeout=5)
    seen = first["started"] if first is not None else 0.0
    while True:
        row = await conn.fetchrow(_LAST_POLL, app, timeout=5)
        if row is not None and row["started"] > seen:
            await asyncio.sleep(quiet)
            again = await conn.fetchrow(_LAST_POLL, app, timeout=5)
            if again is not None and again["started"] == row["started"]:
                return row["started"]
            seen = row["started"]
            continue
        if time.monotonic() > deadline:
            raise BenchError(f"no poll cycle of the node ended within {timeout:g}s (pg_stat_activity)")
        await asyncio.sleep(0.002)


def _figures(rounds: list[tuple[float, list[float], float]], subscribers: int) -> dict[str, Any]:
    """Figures of one system from its rounds: (publish stamp, arrival times, server CPU seconds)."""
    usable = [(stamp, times, cpu) for stamp, times, cpu in rounds if times]
    if not usable:
        return {"rounds": 0}
    firsts = [min(times) - stamp for stamp, times, _ in usable]
    lasts = [max(times) - stamp for stamp, times, _ in usable]
    pooled = sorted(t - stamp for stamp, times, _ in usable for t in times)
    frames = sum(len(times) for _, times, _ in usable)
    return {
        "rounds": len(usable),
        "first_ms": round(statistics.median(firsts) * 1000, 2),
        "last_ms": round(statistics.median(lasts) * 1000, 2),
        "p50_ms": round(percentile(pooled, 50) * 1000, 2),
        "p99_ms": round(percentile(pooled, 99) * 1000, 2),
        "frames_per_s": round(statistics.median(len(t) / max(last, 1e-6) for (_, t, _), last in zip(usable, lasts))),
        "us_per_frame": round(statistics.median(last / len(t) for (_, t, _), last in zip(usable, lasts)) * 1e6, 2),
        "cpu_us_per_frame": round(sum(cpu for _, _, cpu in usable) / frames * 1e6, 2),
        "lost": sum(subscribers - len(times) for _, times, _ in rounds),
    }


async def bench_fanout(
    *,
    subscribers: int = 1000,
    rounds: int = 20,
    client_procs: int = 4,
    interval: float = 0.1,
    event_loop: str = "asyncio",
    **_: Any,
) -> dict[str, Any]:
    subscribers, rounds = max(1, int(subscribers)), max(1, int(rounds))
    if event_loop not in ("asyncio", "uvloop"):
        raise BenchError("event_loop must be asyncio or uvloop")
    if event_loop == "uvloop" and not installed("uvloop"):
        raise BenchError("uvloop is not installed (pip install 'subsys[fast]'): cannot run the node on it")
    fd_limit = raise_fd_limit()
    started = time.monotonic()
    topic = f"{FEED}:1"
    wait_round = 15.0 + subscribers / 500  # bounded: a lost frame costs this once
    progress("starting PostgreSQL and the node")
    spec = one_node(rows=1, interval=interval, grace=5.0, node={"event_loop": event_loop})
    async with LocalCluster(spec) as env, ControlServer() as control:
        node = env.nodes["n1"]
        app = f"subsys:{node.name}"
        baseline = await BroadcastServer.start(control)
        try:
            async with ClientFleet(control, client_procs) as fleet:
                progress(f"opening {subscribers} subscribers on each server ({client_procs} client processes)")
                opened = {
                    "subsys": await fleet.open("subsys", node.ws_url, [[topic]] * subscribers, raw=True),
                    "baseline": await fleet.open("baseline", baseline.ws_url, [[]] * subscribers, raw=True),
                }
                for system, result in opened.items():
                    if result["connected"] < subscribers:
                        raise BenchError(
                            f"{system}: only {result['connected']} of {subscribers} subscribers connected"
                            f" ({result['first_error']})"
                        )
                conn = await asyncpg.connect(env.database_url, timeout=10)
                try:
                    measured, unanchored, payload, client_cpu = await _run_rounds(
                        conn, fleet, baseline, node.pid, app,
                        rounds=rounds, interval=interval, wait_round=wait_round, subscribers=subscribers,
                    )  # fmt: skip
                finally:
                    await conn.close()
                uvloop_in_node = module_loaded(node.pid, "uvloop")
        finally:
            await baseline.stop()

    subsys = _figures(measured["subsys"], subscribers)
    base = _figures(measured["baseline"], subscribers)
    frames = sum(len(times) for system in measured.values() for _, times, _ in system)
    keys = ("first_ms", "last_ms", "p50_ms", "p99_ms", "frames_per_s", "us_per_frame", "cpu_us_per_frame")
    result: dict[str, Any] = {
        "bench": "fanout",
        "what": "one published change -> N subscribers of one topic: subsys vs a plain websockets broadcast server",
        "setup": "1 node subprocess (embedded coordinator), embedded PostgreSQL; baseline server subprocess;"
        f" {client_procs} client subprocesses (aiohttp) holding N connections to each server",
        "method": "publish = subsys: pg_stat_activity.state_change of the poll that saw the commit;"
        " baseline: bench stamp before handing over the payload. Rounds alternate the order. +-0.1 ms",
        "subscribers": subscribers,
        "rounds": rounds,
        "client_procs": client_procs,
        "interval_ms": round(interval * 1000, 1),
        "payload_bytes": len(payload.encode()) if payload else 0,
        "event_loop": event_loop,
        "uvloop_installed": installed("uvloop"),
        "uvloop_in_node": uvloop_in_node,
        "results": {"subsys": subsys, "baseline": base, "ratio": {k: ratio(subsys.get(k), base.get(k)) for k in keys}},
        "unanchored_rounds": unanchored,
        "client_cpu_us_per_frame": round(client_cpu / frames * 1e6, 2) if frames else None,
        "fd_limit": fd_limit,
        "node_exit_code": env.exit_codes.get(node.name),
        "duration_s": round(time.monotonic() - started, 1),
    }
    if event_loop == "uvloop" and not uvloop_in_node:
        result["note"] = "node.event_loop = uvloop was set, but the node has not loaded uvloop (not implemented yet?)"
    return result


async def _run_rounds(
    conn: asyncpg.Connection,
    fleet: ClientFleet,
    baseline: BroadcastServer,
    node_pid: int,
    app: str,
    *,
    rounds: int,
    interval: float,
    wait_round: float,
    subscribers: int,
) -> tuple[dict[str, list], int, str | None, float]:
    measured: dict[str, list[tuple[float, list[float], float]]] = {"subsys": [], "baseline": []}
    unanchored = 0
    payload: str | None = None
    client_cpu0 = await fleet.cpu_seconds()
    for value in range(1, rounds + 1):
        progress(f"round {value} of {rounds}")
        order = ("subsys", "baseline") if value % 2 else ("baseline", "subsys")
        for system in order:
            if system == "subsys":
                # Commit just after a poll cycle ended, so that the next cycle is the one that sees it.
                last_start = await _cycle_ended(conn, app, timeout=10 + 2 * interval)
                cpu0 = cpu_seconds(node_pid)
                await conn.execute(f"UPDATE {TABLE} SET v = $1, changed = now() WHERE id = 1", value, timeout=10)
                committed = time.time()
                # Watch closely from just before the next cycle is due: at large N the node's loop
                # is busy fanning out and starts the cycle after it as soon as it can.
                poll_start, stamp = await _poll_after(
                    conn, app, committed, first_check=last_start + 0.9 * interval, timeout=10 + 2 * interval
                )
                times = await fleet.arrivals("subsys", value, timeout=wait_round)
                cpu = cpu_seconds(node_pid) - cpu0
                if payload is None:
                    payload = await fleet.sample("subsys")
                    if payload is None:
                        raise BenchError("no subscriber received the first change")
                # the anchor must be the cycle due one interval after the last one (the poller's cadence)
                if times and (abs(poll_start - last_start - interval) > interval / 4 or min(times) < stamp):
                    unanchored += 1  # the anchor poll is in doubt: drop the round
                    continue
            else:
                assert payload is not None  # the first round runs subsys first
                text = _VALUE.sub(f'"v":{value}', payload, count=1)
                cpu0 = cpu_seconds(baseline.pid)
                stamp = baseline.publish(text)
                times = await fleet.arrivals("baseline", value, timeout=wait_round)
                cpu = cpu_seconds(baseline.pid) - cpu0
            measured[system].append((stamp, times, cpu))
            await asyncio.sleep(0.05)  # let the clients' event lines and the last writes settle
    client_cpu = await fleet.cpu_seconds() - client_cpu0
    return measured, unanchored, payload, client_cpu
