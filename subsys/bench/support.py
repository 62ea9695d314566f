"""Building blocks for ``subsys bench``: the figures' arithmetic, idle clients, progress.

Every bench runs inside one :class:`~subsys.testing.cluster.LocalCluster`
(the harness ``subsys dev``, the tests and chaos runs use too): leaving its
block stops everything it started, also on error or Ctrl-C. Everything
listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import sys
from typing import Any, Iterable, Sequence

import aiohttp
import psutil


__all__ = [
    "BenchError",
    "IdleClients",
    "progress",
    "raise_fd_limit",
    "summarize_ms",
    "summarize_s",
    "percentile",
    "ratio",
    "ols_slope",
    "cpu_seconds",
    "settled_rss",
    "module_loaded",
    "installed",
    "reconfigure",
]

log = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """The bench could not set up or run what it measures."""


def raise_fd_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- figures -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: Iterable[float]) -> dict[str, Any]:
    values = sorted(value * 1000 for value in seconds)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min_ms": round(values[0], 2),
        "median_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(values[-1], 2),
        "mean_ms": round(sum(values) / len(values), 2),
    }


def summarize_s(seconds: Iterable[float]) -> dict[str, Any]:
    """Distribution of durations in seconds: n, median, p95, p99, max (and min)."""
    values = sorted(seconds)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median_s": round(percentile(values, 50), 3),
        "p95_s": round(percentile(values, 95), 3),
        "p99_s": round(percentile(values, 99), 3),
        "max_s": round(values[-1], 3),
        "min_s": round(values[0], 3),
    }


def ratio(value: float | None, baseline: float | None, digits: int = 2) -> float | None:
    """``value / baseline`` (None when either is missing or the baseline is 0)."""
    if value is None or not baseline:
        return None
    return round(value / baseline, digits)


def ols_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs: a counter's rate, robust to its jittery flushes."""
    n = len(xs)
    if n < 2:
        raise ValueError("need two points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def cpu_seconds(*pids: int) -> float:
    """CPU time of these processes, all their threads (a process that is gone counts 0).

    From /proc/PID/task/*/schedstat (nanoseconds on the CPU) where the kernel has it:
    psutil's user + system time only moves in clock ticks (10 ms), too coarse for
    one round of a small bench.
    """
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            ns = 0
            for task in tasks:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as stat:
                        ns += int(stat.read().split()[0])
            total += ns / 1e9
            continue
        except OSError:
            pass
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


async def settled_rss(pid: int, *, seconds: float = 1.5, samples: int = 4) -> int:
    """A process's RSS after letting it settle: the last of a few samples."""
    process = psutil.Process(pid)
    rss = process.memory_info().rss
    for _ in range(samples):
        await asyncio.sleep(seconds / samples)
        rss = process.memory_info().rss
    return rss


def module_loaded(pid: int, name: str) -> bool:
    """Whether a process has a file of ``name`` (e.g. uvloop's extension) mapped: it imported it."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            return any(f"/{name}/" in line for line in maps)
    except OSError:
        return False


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


async def reconfigure(cluster: Any, **sections: dict[str, Any]) -> None:
    """Rewrite the cluster's config with these settings and restart every running node on it.

    One harness, several modes in one run: the nodes come back with the same
    ids and ports, the database (and Consul) stay up.
    """
    import dataclasses

    settings = {name: dict(values) for name, values in cluster.spec.settings.items()}
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    cluster.spec = dataclasses.replace(cluster.spec, settings=settings)
    cluster.write_config()
    running = cluster.running()
    await asyncio.gather(*(node.stop() for node in running))
    for node in running:
        await node.start()
    await asyncio.gather(*(node.wait_ready() for node in running))


def progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"bench: {message}", file=sys.stderr, flush=True)


class IdleClients:
    """Raw aiohttp WebSocket clients, each subscribed to one topic, then left idle.

    A drain task per socket keeps reading so that aiohttp answers the server's
    heartbeat pings (an unread socket would be closed after limits.heartbeat * 1.5).
    """

    def __init__(self, url: str, *, concurrency: int = 50, timeout: float = 30.0) -> None:
        self.url = url
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.errors: list[str] = []
        self._drains: list[asyncio.Task] = []
        self._sem = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "IdleClients":
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def open(self, topics: list[str]) -> None:
        await asyncio.gather(*(self._open_one(topic) for topic in topics))

    async def _open_one(self, topic: str) -> None:
        assert self._session is not None
        async with self._sem:
            ws: aiohttp.ClientWebSocketResponse | None = None
            try:
                async with asyncio.timeout(self._timeout):
                    ws = await self._session.ws_connect(
                        self.url, autoping=True, timeout=aiohttp.ClientWSTimeout(ws_close=5)
                    )
                    hello = await ws.receive_json()
                    if hello.get("type") != "hello":
                        raise BenchError(f"expected hello, got {hello}")
                    await ws.send_json({"type": "subscribe", "topic": topic})
                    while True:
                        frame = await ws.receive_json()
                        if frame.get("type") == "error":
                            raise BenchError(f"subscribe {topic}: {frame}")
                        if frame.get("type") == "snapshot" and frame.get("topic") == topic:
                            break
            except Exception as exc:  # counted and reported, the bench goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
                return
        self.sockets.append(ws)
        self._drains.append(asyncio.create_task(self._drain(ws)))

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _msg in ws:
            pass

    async def close(self) -> None:
        for task in self._drains:
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._drains.clear()
        sockets, self.sockets = self.sockets, []
        for start in range(0, len(sockets), 200):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(ws.close() for ws in sockets[start : start + 200]), return_exceptions=True),
                    10,
                )
        if self._session is not None:
            await self._session.close()
            self._session = None
