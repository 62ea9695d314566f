"""Async Python client for protocol v1.

    async with connect("ws://127.0.0.1:8080/ws") as client:
        async for message in client.subscribe("orders:42"):
            print(message["type"], message.get("seq"))

``subscribe`` yields every message about the topic (snapshot, diff, resync,
status, error) as dicts; ``TopicView`` keeps the current rows for you.

``follow`` does the same over a list of nodes and carries on through the next
one when a connection is lost (a node stopped, drained, died), as
docs/protocol.md section 12 asks of a client::

    async for message in follow(["http://web-1:8080", "http://web-2:8080"], "orders:42"):
        view.apply(message)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
from typing import Any, AsyncIterator, Callable, Sequence

import aiohttp

__all__ = ["connect", "follow", "ws_url", "Client", "TopicView"]

# What a lost or refused connection raises; anything else is a bug, not a reason to reconnect.
_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
# A connection that lasted this long (seconds) was healthy: the backoff starts again from its first step.
_HEALTHY_AFTER = 5.0


class Client:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.hello: dict[str, Any] | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        # Frames of no subscribed topic (hello, pong, errors about a frame), the latest few.
        self.general: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._reader: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if frame.get("type") == "hello":
                    self.hello = frame
                topic = frame.get("topic")
                queue = self._queues.get(topic) if topic else None
                if queue is not None:
                    queue.put_nowait(frame)
                else:
                    self.general.append(frame)
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            for queue in self._queues.values():
                queue.put_nowait(None)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def subscribe(self, topic: str) -> AsyncIterator[dict[str, Any]]:
        queue = self._queues.setdefault(topic, asyncio.Queue())
        await self.send({"type": "subscribe", "topic": topic})
        try:
            while True:
                frame = await queue.get()
                if frame is None:
                    return
                yield frame
        finally:
            self._queues.pop(topic, None)
            if not self.ws.closed:
                with contextlib.suppress(Exception):
                    await self.send({"type": "unsubscribe", "topic": topic})

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def connect(url: str, *, timeout: float = 10.0, max_msg_size: int = 0) -> AsyncIterator[Client]:
    """``max_msg_size``: largest frame accepted, 0 for no limit (the default: a snapshot is
    as large as the feed's result, up to its max_rows, and aiohttp's 4 MiB default would
    close the socket with 1009 instead)."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            url, timeout=aiohttp.ClientWSTimeout(ws_close=timeout), heartbeat=20, max_msg_size=max_msg_size
        )
        client = Client(ws)
        client._reader = asyncio.create_task(client._read())
        try:
            yield client
        finally:
            if not ws.closed:
                await ws.close()
            client._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client._reader


def ws_url(url: str) -> str:
    """A node's WebSocket URL from any way of naming the node.

    ``ws://host:port/ws`` stays as it is; ``http://host:port`` (what the admin
    commands take, and ``$SUBSYS_URL`` holds) becomes ``ws://host:port/ws``,
    ``https://`` becomes ``wss://``, and a bare ``host:port`` is ``ws://``.
    """
    url = url.strip().rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif "://" not in url:
        url = "ws://" + url
    return url if "/" in url.partition("://")[2] else url + "/ws"


async def follow(
    urls: Sequence[str],
    topic: str,
    *,
    on_event: Callable[[str, str], None] | None = None,
    retry_max: float = 5.0,
    timeout: float = 10.0,
) -> AsyncIterator[dict[str, Any]]:
    """Every message about ``topic``, through the first of ``urls`` that answers, then the next.

    When a connection is lost, ``follow`` tries the next node at once, then
    each in turn with a backoff (0.5 s doubling up to ``retry_max``, with
    jitter), until one answers; its first message is the topic's new
    ``snapshot``, the whole truth (epoch and seq do not carry over between
    connections: docs/protocol.md section 12). ``on_event(kind, detail)``
    hears of it: ``"lost"``, ``"waiting"``, ``"connected"``.

    Raises ``ConnectionError`` when no node answers at the start: a wrong
    address should fail at once, not wait forever. After that it never
    gives up on its own; stop iterating to stop (an ``error`` message, such
    as ``unknown_feed``, is yielded like any other: the caller decides).
    """
    targets = [ws_url(url) for url in urls]
    if not targets:
        raise ValueError("follow() needs at least one node URL")
    tell = on_event or (lambda kind, detail: None)
    loop = asyncio.get_running_loop()
    index, failures, connected_once = 0, 0, False
    while True:
        url = targets[index]
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(timeout):  # a frozen node accepts, and never answers the handshake
                    client = await stack.enter_async_context(connect(url, timeout=timeout))
                if connected_once:
                    tell("connected", url)
                connected_once, since = True, loop.time()
                async for message in client.subscribe(topic):
                    yield message
            # A connection that ends at once (a node closing everyone) counts as a failure: no tight loop.
            failures = 0 if loop.time() - since >= _HEALTHY_AFTER else failures + 1
            lost = f"{url} closed the connection (code {client.close_code})"
        except _CONNECTION_ERRORS as exc:
            failures += 1
            if not connected_once and failures >= len(targets):
                raise ConnectionError(f"cannot connect to {', '.join(targets)}: {exc or type(exc).__name__}") from exc
            lost = f"cannot connect to {url}: {exc or type(exc).__name__}"
        index = (index + 1) % len(targets)
        tell("lost", f"{lost}; trying {targets[index]}")
        if failures and failures % len(targets) == 0:  # every node failed once more: back off
            delay = min(retry_max, 0.5 * 2 ** (failures // len(targets) - 1)) * random.uniform(0.8, 1.2)
            tell("waiting", f"no node answers; trying again in {delay:.1f}s")
            await asyncio.sleep(delay)


class TopicView:
    """Current rows of one topic, maintained from its messages."""

    def __init__(self) -> None:
        self.key: list[str] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self.epoch = 0
        self.seq = 0
        self.status: dict[str, Any] | None = None

    def _key(self, row: dict[str, Any]) -> str:
        return json.dumps([row[k] for k in self.key])

    def apply(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("snapshot", "resync"):
            self.key = frame["key"]
            self.rows = {self._key(row): row for row in frame["rows"]}
            self.epoch, self.seq = frame["epoch"], frame["seq"]
        elif kind == "diff":
            for key_obj in frame["deleted"]:
                self.rows.pop(self._key(key_obj), None)
            for row in frame["inserted"] + frame["updated"]:
                self.rows[self._key(row)] = row
            self.epoch, self.seq = frame["epoch"], frame["seq"]
        elif kind == "status":
            self.status = frame
