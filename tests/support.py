"""Helpers shared by the node tests (no fixtures here: see conftest.py).

Everything waits on conditions with generous timeouts; nothing asserts on
how long something took, except lower bounds that a correct node cannot
undercut (e.g. a grace period).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import struct
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web

from subsys.client.ws import Client, TopicView
from subsys.testing.nodes import to_toml  # noqa: F401  (conftest imports it from here)
from subsys.testing.procs import free_port  # noqa: F401

DEFAULT_TIMEOUT = 15.0


# -- waiting ---------------------------------------------------------------


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.05,
    message: str = "",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_exc = None
        except AssertionError as exc:  # predicates may assert to explain themselves
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last: {last_exc})" if last_exc else ""
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}{detail}")
        await asyncio.sleep(interval)


# -- addresses and databases -------------------------------------------------


def with_database(url: str, database: str) -> str:
    """The same server URI naming another database (works for pgserver's unix-socket URIs)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def create_database(admin_url: str) -> str:
    name = f"subsys_t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.PostgresSyntaxError:  # PostgreSQL < 13
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def db_execute(url: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(url)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


async def db_fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def db_fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


# -- WebSocket clients -------------------------------------------------------


async def read_until(
    read: Callable[[float], Awaitable[dict[str, Any]]],
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
    seen: list[dict[str, Any]],
    where: str = "",
) -> dict[str, Any]:
    """Read frames until one matches ``predicate``; fail naming the last frames seen."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching frame {where}within {timeout}s; got {seen[-5:]}")
        frame = await read(remaining)
        if predicate(frame):
            return frame


class Subscription:
    """Reads one topic of a ``subsys.client.Client`` in the background and keeps every frame."""

    def __init__(self, client: Client, topic: str) -> None:
        self.client = client
        self.topic = topic
        self.frames: list[dict[str, Any]] = []
        self.view = TopicView()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name=f"sub {topic}")

    async def _run(self) -> None:
        try:
            async for frame in self.client.subscribe(self.topic):
                self.frames.append(frame)
                self.view.apply(frame)
                self._queue.put_nowait(frame)
        finally:
            self._queue.put_nowait(None)

    async def next(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        frame = await asyncio.wait_for(self._queue.get(), timeout)
        if frame is None:
            raise AssertionError(f"subscription {self.topic} ended (close code {self.client.close_code})")
        return frame

    async def next_data(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next snapshot / resync / diff, skipping status frames."""
        while True:
            frame = await self.next(timeout)
            if frame["type"] in ("snapshot", "resync", "diff"):
                return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT) -> dict:
        return await read_until(self.next, predicate, timeout, self.frames, f"on {self.topic} ")

    def drain_nowait(self) -> list[dict[str, Any]]:
        frames = []
        while not self._queue.empty():
            frame = self._queue.get_nowait()
            if frame is not None:
                frames.append(frame)
        return frames

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class RawClient:
    """A bare aiohttp WebSocket: for frames the library client would never send."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> "RawClient":
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, **kwargs)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, frame: Any) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}")
        frame = json.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT) -> dict:
        return await read_until(self.recv, predicate, timeout, self.frames)

    async def error(self, code: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next error frame; it must carry ``code``."""
        frame = await self.until(lambda f: f.get("type") == "error", timeout)
        assert frame["code"] == code, frame
        assert frame.get("message"), frame
        return frame

    async def ping(self, ref: Any) -> None:
        """Round trip a ping: proves the connection is open and the server still reads it."""
        await self.send({"type": "ping", "ref": ref})
        await self.until(lambda f: f.get("type") == "pong" and f.get("ref") == ref)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


SMALL_BUFFER = 4096  # bytes: a socket buffer this small fills after a few frames


def small_buffer_socket(addr_info) -> socket.socket:
    """An aiohttp ``socket_factory``: a client socket whose receive buffer holds little (a stalled reader's)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setblocking(False)
    return sock


def rows_by_key(rows: list[dict[str, Any]], key: str = "id") -> dict[Any, dict[str, Any]]:
    return {row[key]: row for row in rows}


# -- clusters of node processes ----------------------------------------------------


class Watcher:
    """A client on one node that records every frame and checks epochs never go back."""

    def __init__(self, url: str, topic: str = "items:1", *, name: str = "") -> None:
        self.url, self.topic, self.name = url, topic, name or url
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.epoch_regressions: list[tuple[int, int]] = []
        self.duplicate_snapshots: list[tuple[int, int]] = []
        self._max_epoch = 0
        self._last: tuple[int, int] | None = None
        self._ready = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"watch {topic} on {self.name}")

    async def _run(self) -> None:
        from subsys.client.ws import connect

        async with connect(self.url) as client:
            async for frame in client.subscribe(self.topic):
                kind, epoch = frame.get("type"), frame.get("epoch")
                if kind in ("snapshot", "resync", "diff") and epoch is not None:
                    if epoch < self._max_epoch:
                        self.epoch_regressions.append((epoch, self._max_epoch))
                    if kind in ("snapshot", "resync") and self._last == (epoch, frame["seq"]):
                        self.duplicate_snapshots.append(self._last)
                    self._max_epoch = max(self._max_epoch, epoch)
                    self._last = (epoch, frame["seq"])
                    self._ready.set()
                self.frames.append((time.monotonic(), frame))

    async def ready(self, timeout: float = 30) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    def data(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [f for t, f in self.frames if t >= since and f.get("type") in ("snapshot", "resync", "diff")]

    def rows(self) -> dict[int, dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        for frame in self.data():
            if frame["type"] in ("snapshot", "resync"):
                rows = {row["id"]: row for row in frame["rows"]}
            else:
                for key in frame["deleted"]:
                    rows.pop(key["id"], None)
                for row in frame["inserted"] + frame["updated"]:
                    rows[row["id"]] = row
        return rows

    def value_of(self, row_id: int, column: str = "v") -> Any:
        row = self.rows().get(row_id)
        return row[column] if row else None

    @property
    def max_epoch(self) -> int:
        return self._max_epoch

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# -- the subsys command, as a subprocess -------------------------------------------


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def said(self) -> str:
        """stderr with rich's line wrapping undone."""
        return " ".join(self.err.split())

    @property
    def shown(self) -> str:
        """stdout with rich's line wrapping undone."""
        return " ".join(self.out.split())


def cli_env(url: str | None, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of a ``subsys`` subprocess: ours without SUBSYS_*, 80 columns, no colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSYS_")}
    env.update(COLUMNS="80", NO_COLOR="1", TERM="dumb")
    if url is not None:
        env["SUBSYS_URL"] = url
    if token is not None:
        env["SUBSYS_TOKEN"] = token
    env.update(extra)
    return env


async def run_cli(*args: str, url: str | None, token: str | None, stdin: int | bytes | None = None,
                  timeout: float = 90, **env: str) -> CliResult:  # fmt: skip
    """Run ``python -m subsys ARGS`` without blocking the loop (the node under test runs in it).

    ``stdin``: bytes to pipe in, a file descriptor (a pty), or nothing (/dev/null).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "subsys", *args, env=cli_env(url, token, **env),
        stdin=asyncio.subprocess.PIPE if isinstance(stdin, bytes) else (stdin if stdin is not None else
                                                                        asyncio.subprocess.DEVNULL),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin if isinstance(stdin, bytes) else None), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return CliResult(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())


# -- a real stuck query: a poll hung in a frozen PostgreSQL backend -----------------------------


@asynccontextmanager
async def frozen_poll_backend(node: Any, polls: Callable[[], Awaitable[int]]) -> AsyncIterator[int]:
    """SIGSTOP the backend ``node``'s next poll will use and wait until ``polls()`` stops counting: yields its pid.

    That backend is the one that ran the node's latest query (asyncpg hands out the most recently
    released connection first), so nothing else may use the node's pool meanwhile (a zombie scan
    does). The backend is continued (SIGCONT) on the way out, whatever happened.
    """
    rows = await db_fetch(node.extra["database_url"], "select pid from pg_stat_activity where application_name = $1 "
                                                      "order by query_start desc nulls last limit 1",
                          node.application_name)  # fmt: skip
    assert rows, f"no PostgreSQL backend with application_name {node.application_name}"
    pid = rows[0]["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
    except PermissionError:
        import pytest

        pytest.skip("cannot signal the PostgreSQL backend (another user's server)")
    try:

        async def stalled() -> bool:
            before = await polls()
            await asyncio.sleep(1.0)
            return await polls() == before

        await eventually(stalled, timeout=20, message=f"the poll hangs on backend {pid}")
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


async def stuck_call(node: Any, topic: str, epoch: int) -> dict[str, Any]:
    """The node's record of the hung poll of ``topic`` at ``epoch``, once its owner moved on: a stuck query."""

    def the_call() -> dict[str, Any] | None:
        return next((q for q in node.node.stuck_queries() if q["topics"] == {topic: epoch}), None)

    return await eventually(the_call, timeout=20, message="the hung call kept as a stuck query")


def still_stuck(node: Any, call: dict[str, Any]) -> bool:
    return any(q["id"] == call["id"] for q in node.node.stuck_queries())


async def leave_mid_handshake(monkeypatch, port: int, path: str, headers: dict[str, str] | None = None) -> None:
    """Start a WebSocket handshake on an in-process node and reset the connection mid-way.

    The node's side of the handshake (``WebSocketResponse.prepare``, the real one) is held
    until the reset has reached it: the order a busy node sees it in, made certain.
    Returns once the node has finished with that request.
    """
    original = web.WebSocketResponse.prepare
    done: list[str] = []

    async def prepare_after_the_client_left(self, request):
        await eventually(lambda: request.transport is None or request.transport.is_closing(), timeout=10)
        try:
            return await original(self, request)
        finally:
            done.append(request.path)

    monkeypatch.setattr(web.WebSocketResponse, "prepare", prepare_after_the_client_left)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()
    )  # fmt: skip
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    writer.transport.abort()
    await eventually(lambda: done == [path], timeout=10)
    await asyncio.sleep(0.2)  # aiohttp finishes the response after the handler returns
    monkeypatch.setattr(web.WebSocketResponse, "prepare", original)
