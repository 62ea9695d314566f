"""Async Python client for protocol v1.

    async with connect("ws://127.0.0.1:8080/ws") as client:
        async for message in client.subscribe("orders:42"):
            print(message["type"], message.get("seq"))

``subscribe`` yields every message about the topic (snapshot, diff, resync,
status, error) as dicts; ``TopicView`` keeps the current rows for you.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from typing import Any, AsyncIterator

import aiohttp

__all__ = ["connect", "Client", "TopicView"]


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
