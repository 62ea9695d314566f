"""A bare WebSocket client protocol for the fan-out bench's client processes (RFC 6455, no extensions).

Why not aiohttp here: at thousands of connections per process the clients
share two cores with the servers they measure, and aiohttp's per-frame path
(parser, queue, task wake-up) costs several times this one. The fewer
microseconds a client spends per frame, the less the instrument delays what
it measures. This one parses frames in ``data_received`` and stamps every
frame of one read with the moment of that read.

Enough of the protocol for the bench: the upgrade, unmasked server frames
(text, continuation, ping -> pong, close), masked client text frames. It is
only ever pointed at the bench's own loopback servers.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Callable

__all__ = ["RawWebSocket", "connect_raw"]

OnText = Callable[[str, float], None]


class RawWebSocket(asyncio.Protocol):
    def __init__(self, host: str, port: int, path: str) -> None:
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[str] = asyncio.Queue()  # text frames until on_text is set
        self.on_text: OnText | None = None
        self.compress = 0  # no extension is ever offered
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._headers_done = False

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"connection lost before the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self._buffer
        buffer += data
        if not self._headers_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(f"upgrade refused: {status.decode(errors='replace')}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self._headers_done = True
            self.upgraded.set_result(None)
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            self._frame(first & 0x80, first & 0x0F, payload, now)

    # -- frames -------------------------------------------------------------------

    def _frame(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        if opcode in (0x1, 0x0):  # text, continuation
            self._fragments.append(payload)
            if not fin:
                return
            text = b"".join(self._fragments).decode()
            self._fragments.clear()
            if self.on_text is not None:
                self.on_text(text, now)
            else:
                self.inbox.put_nowait(text)
        elif opcode == 0x9:  # ping
            self._send(0xA, payload)
        elif opcode == 0x8:  # close: answer and go
            self._send(0x8, payload[:2])
            self.transport.close()  # type: ignore[union-attr]

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(header + mask + masked)

    def send_str(self, text: str) -> None:
        self._send(0x1, text.encode())

    async def receive_str(self) -> str:
        return await self.inbox.get()

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, (1000).to_bytes(2, "big"))
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 2)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            self.transport.close()


async def connect_raw(url: str) -> RawWebSocket:
    """``ws://host:port/path`` -> an upgraded connection (the caller bounds the time)."""
    rest = url.removeprefix("ws://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(lambda: RawWebSocket(host, int(port), "/" + path), host, int(port))
    await protocol.upgraded
    return protocol
