"""A bench client process: many WebSocket connections, driven by the bench over one control socket.

``python -m subsys.bench.loadclient HOST PORT NAME`` connects back to the
bench's control server (:mod:`subsys.bench.clients`) on loopback and obeys
JSON lines:

* ``open``: open connections (aiohttp, where ``compress=15`` offers
  permessage-deflate as browsers do; or ``raw``: the bare client of
  :mod:`subsys.bench.rawws`, cheaper per frame), wait for each one's first frame
  (subsys's ``hello``, the baseline's greeting), subscribe to its topics and
  wait for their snapshots; then a reader task per connection records
  every text frame that carries a row value ``"v":N`` with the wall-clock
  time it arrived;
* when every connection of a tag has received value N, the process sends a
  ``round`` event with all the arrival times;
* ``collect`` (what arrived of a value so far), ``sample`` (the last frame
  text of a tag), ``close``, ``cpu``, ``exit``.

Why a separate process: the clients' CPU must not be counted to the node,
to the baseline server or to the bench, and must not delay the bench's own
timing. Why wall-clock times (``time.time()``, CLOCK_REALTIME): the
publish moment of subsys is read from PostgreSQL's ``pg_stat_activity``,
whose timestamps are the same clock on the same machine.

The process exits when the control socket closes (the bench ended, also
on Ctrl-C or a crash), besides the parent-death signal its spawner sets.
Only loopback addresses are dialled: the bench hands over its own URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from typing import Any

import aiohttp

from subsys.bench.rawws import RawWebSocket, connect_raw

# The row value a bench frame carries (subsys's diff row, or the baseline's copy of it).
_VALUE = re.compile(r'"v":"?(\d+)')


class _Conn:
    __slots__ = ("ws", "tag", "reader", "seen")

    def __init__(self, ws: Any, tag: str) -> None:  # aiohttp's ClientWebSocketResponse or a RawWebSocket
        self.ws = ws
        self.tag = tag
        self.reader: asyncio.Task | None = None
        self.seen = -1  # the highest value this connection has received


class LoadClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ctl_reader, self.ctl_writer = reader, writer
        self.session: aiohttp.ClientSession | None = None
        self.conns: dict[str, list[_Conn]] = {}
        # tag -> value -> arrival times; tag -> values already reported
        self.times: dict[str, dict[int, list[float]]] = {}
        self.reported: dict[str, set[int]] = {}
        self.samples: dict[str, str] = {}

    # -- control -----------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.ctl_writer.write(json.dumps(message).encode() + b"\n")

    async def serve(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            while True:
                line = await self.ctl_reader.readline()
                if not line:
                    return  # the bench is gone
                request = json.loads(line)
                if request.get("cmd") == "exit":
                    self.send({"id": request.get("id"), "ok": True})
                    return
                # Each command runs on its own so that a slow ``open`` does not block ``cpu``.
                asyncio.create_task(self._answer(request))
        finally:
            await self.close_all()
            await self.session.close()

    async def _answer(self, request: dict[str, Any]) -> None:
        try:
            reply = await getattr(self, "cmd_" + request["cmd"])(**request.get("args", {}))
        except Exception as exc:  # reported to the bench, which turns it into a BenchError
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = request.get("id")
        self.send(reply)
        with contextlib.suppress(ConnectionError):
            await self.ctl_writer.drain()

    # -- commands -----------------------------------------------------------

    async def cmd_open(
        self,
        *,
        tag: str,
        url: str,
        subscriptions: list[list[str]],
        compress: int = 0,
        raw: bool = False,
        concurrency: int = 50,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """``raw``: the bare client of :mod:`subsys.bench.rawws` (cheaper per frame; no extensions)."""
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        opened: list[_Conn] = []

        async def one(topics: list[str]) -> None:
            async with sem:
                ws: Any = None
                try:
                    async with asyncio.timeout(timeout):
                        ws = await (connect_raw(url) if raw else self._connect(url, compress))
                        await self._receive(ws)  # the greeting: subsys's hello, the baseline's
                        for topic in topics:
                            await self._send(ws, json.dumps({"type": "subscribe", "topic": topic}))
                        pending = set(topics)
                        while pending:
                            frame = json.loads(await self._receive(ws))
                            if frame.get("type") == "error":
                                raise RuntimeError(f"{frame.get('code')}: {frame.get('message')}")
                            if frame.get("type") in ("snapshot", "resync"):
                                pending.discard(frame.get("topic"))
                except Exception as exc:  # counted and reported; the bench decides
                    errors.append(f"{type(exc).__name__}: {exc}")
                    if ws is not None:
                        with contextlib.suppress(Exception):
                            await ws.close()
                    return
                conn = _Conn(ws, tag)
                if raw:
                    ws.on_text = lambda text, now, conn=conn: self._take(conn, text, now)
                else:
                    conn.reader = asyncio.create_task(self._read(conn))
                opened.append(conn)

        await asyncio.gather(*(one(list(topics)) for topics in subscriptions))
        self.conns.setdefault(tag, []).extend(opened)
        return {
            "connected": len(opened),
            "failed": len(errors),
            "errors": errors[:3],
            # the negotiated window bits (aiohttp's ClientWebSocketResponse.compress), 0 if none
            "deflate": sum(1 for conn in opened if conn.ws.compress),
        }

    async def _connect(self, url: str, compress: int) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        return await self.session.ws_connect(url, compress=compress, autoping=True, max_msg_size=0)

    @staticmethod
    async def _receive(ws: Any) -> str:
        if isinstance(ws, RawWebSocket):
            return await ws.receive_str()
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"socket {msg.type.name} while subscribing")
        return msg.data

    @staticmethod
    async def _send(ws: Any, text: str) -> None:
        if isinstance(ws, RawWebSocket):
            ws.send_str(text)
        else:
            await ws.send_str(text)

    async def _read(self, conn: _Conn) -> None:
        async for msg in conn.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._take(conn, msg.data, time.time())

    def _take(self, conn: _Conn, text: str, now: float) -> None:
        match = _VALUE.search(text)
        if match is None:
            return
        value = int(match.group(1))
        if value <= conn.seen:
            return  # a later snapshot repeating a value already counted
        conn.seen = value
        tag = conn.tag
        self.samples[tag] = text
        arrivals = self.times.setdefault(tag, {}).setdefault(value, [])
        arrivals.append(now)
        if len(arrivals) == len(self.conns.get(tag, ())) and value not in self.reported.setdefault(tag, set()):
            self.reported[tag].add(value)
            self.send({"event": "round", "tag": tag, "value": value, "times": arrivals})

    async def cmd_collect(self, *, tag: str, value: int) -> dict[str, Any]:
        """What arrived of ``value`` so far (the bench gave up waiting for the rest)."""
        self.reported.setdefault(tag, set()).add(value)
        return {"times": self.times.get(tag, {}).get(value, []), "expected": len(self.conns.get(tag, ()))}

    async def cmd_forget(self, *, tag: str) -> dict[str, Any]:
        self.times.pop(tag, None)
        return {"ok": True}

    async def cmd_sample(self, *, tag: str) -> dict[str, Any]:
        return {"text": self.samples.get(tag)}

    async def cmd_close(self, *, tag: str) -> dict[str, Any]:
        conns = self.conns.pop(tag, [])
        await self._close(conns)
        self.times.pop(tag, None)
        self.reported.pop(tag, None)
        return {"closed": len(conns)}

    async def cmd_cpu(self) -> dict[str, Any]:
        return {"cpu_s": time.process_time()}

    async def _close(self, conns: list[_Conn]) -> None:
        for conn in conns:
            if conn.reader is not None:
                conn.reader.cancel()
        await asyncio.gather(*(c.reader for c in conns if c.reader is not None), return_exceptions=True)
        for start in range(0, len(conns), 500):
            batch = conns[start : start + 500]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c.ws.close() for c in batch), return_exceptions=True), 10)

    async def close_all(self) -> None:
        for tag in list(self.conns):
            await self._close(self.conns.pop(tag))


async def main(host: str, port: int, name: str) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**26), 30)
    writer.write(json.dumps({"hello": name}).encode() + b"\n")
    client = LoadClient(reader, writer)
    try:
        await client.serve()
    finally:
        writer.close()


if __name__ == "__main__":
    from subsys.bench.support import raise_fd_limit

    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
