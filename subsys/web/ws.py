"""The client WebSocket endpoint ``/ws`` (protocol v1, docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from subsys.config import LimitsConfig
from subsys.core.encoding import dumps
from subsys.core.errors import ProtocolError, SubsysError
from subsys.core.protocol import (
    PROTOCOL_VERSION,
    Publication,
    error_frame,
    escape_surrogates,
    parse_client_frame,
)
from subsys.logs import RepeatedLog
from subsys.node.node import Node
from subsys.web.appkeys import NODE
from subsys.web._net import departed, on_admin_listener, open_websocket
from subsys.web.outbox import Outbox, SendFailed

__all__ = [
    "ClientConnection", "websocket_handler", "heartbeats", "close_all", "close_slow", "send_text", "CLOSE_SLOW_CONSUMER",
]  # fmt: skip

log = logging.getLogger(__name__)
_repeats = RepeatedLog(log, every=60.0)

# Application close code (4000-4999 range) for a client that did not read: a write blocked for
# limits.send_timeout, or no answer to the heartbeat ping.
CLOSE_SLOW_CONSUMER = 4008
_ids = itertools.count(1)


async def send_text(ws: web.WebSocketResponse, frame: str) -> None:
    """``ws.send_str``, except that a frame UTF-8 cannot encode is still sent, escaped.

    Client strings with a lone surrogate are refused before anything is queued,
    but data can hold one (a ``json`` column may store ``"\\ud800"``). aiohttp
    encodes before it writes, so on failure nothing was sent yet and the escaped
    frame, which means the same to a JSON parser, can take its place.
    """
    try:
        await ws.send_str(frame)
    except UnicodeEncodeError:
        _repeats.log("surrogate", logging.WARNING, "a frame with a lone UTF-16 surrogate was sent escaped: %.100r",
                     frame)  # fmt: skip
        await ws.send_str(escape_surrogates(frame))


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _SocketWriter:
    """The fast path's way out: frame bytes straight to the connection's transport."""

    __slots__ = ("ws", "transport")
    HIGH_WATER = 64 * 1024  # asyncio's own high-water mark: beyond it, the queue and a writer take over

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws, self.transport = ws, transport

    def writable(self) -> bool:
        transport = self.transport
        return not self.ws.closed and not transport.is_closing() and transport.get_write_buffer_size() < self.HIGH_WATER

    def write(self, data: bytes) -> None:
        self.transport.write(data)


class ClientConnection:
    """One client socket: its subscriptions, its limits and its outbox.

    Lean on purpose (``__slots__``, no task while idle): a node holds thousands.
    """

    __slots__ = (
        "id", "ws", "node", "limits", "peer", "request", "topics", "connected_at", "heard_at", "pinged_at",
        "_bucket", "_rate_limited_told", "outbox", "writer", "closing",
    )  # fmt: skip

    def __init__(
        self, *, ws: web.WebSocketResponse, node: Node, limits: LimitsConfig, peer: str, request: web.Request
    ) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.node = node
        self.limits = limits
        self.peer = peer
        self.request = request
        self.topics: set[str] = set()
        self.connected_at = time.time()
        self.heard_at = time.monotonic()  # the last frame of any kind from the client (heartbeat)
        self.pinged_at: float | None = None  # a heartbeat ping waits for an answer since
        self._bucket = _TokenBucket(limits.messages_per_second, limits.message_burst)
        self._rate_limited_told = 0.0
        self.writer: asyncio.Task | None = None  # only while there is a backlog
        self.closing: asyncio.Task | None = None
        # Compressed sockets have per-connection state: they cannot share frame bytes.
        transport = request.transport
        direct = _SocketWriter(ws, transport) if transport is not None and not ws.compress else None
        self.outbox = Outbox(
            send=functools.partial(send_text, ws),
            current=self._current,
            limit=limits.send_queue,
            send_timeout=limits.send_timeout,
            # Every frame within the rate limit gets its reply, even a full burst sent at once.
            control_limit=max(64, 2 * limits.message_burst),
            direct=direct,
            on_backlog=self._start_writer,
        )

    def _start_writer(self) -> None:
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(_run_writer(self), name=f"ws-writer-{self.id}")

    def _current(self, topic: str) -> tuple[Publication | None, Publication | None]:
        stream = self.node.registry.get(topic)
        return stream.current() if stream is not None else (None, None)

    def deliver(self, publication: Publication) -> None:
        self.outbox.deliver(publication)

    def _error(self, code: str, message: str, *, topic: str | None = None, ref: Any = None) -> None:
        self.outbox.control(error_frame(code, message, topic=topic, ref=ref))

    def _admit(self) -> bool:
        """The rate limit, applied to every client frame (text, binary, oversized)."""
        if self._bucket.take():
            return True
        now = time.monotonic()
        if now - self._rate_limited_told >= 1.0:
            self._rate_limited_told = now
            self._error("rate_limited", f"more than {self.limits.messages_per_second:g} frames/s; frame dropped")
        return False

    def handle_binary(self) -> None:
        if self._admit():
            self._error("unsupported_frame", "binary frames are not part of protocol v1")

    def handle_text(self, text: str) -> None:
        if not self._admit():
            return
        if len(text.encode("utf-8", "surrogatepass")) > self.limits.max_frame_bytes:
            self._error("frame_too_large", f"frame exceeds {self.limits.max_frame_bytes} bytes")
            return
        try:
            frame = parse_client_frame(text)
        except ProtocolError as exc:
            self._error(exc.code, exc.message)
            return
        if frame.type == "ping":
            self.outbox.control(dumps({"type": "pong", "ref": frame.ref} if frame.ref is not None else {"type": "pong"}))
            return
        assert frame.topic is not None
        if frame.type == "subscribe":
            self._subscribe(frame.topic, frame.ref)
        else:
            self._unsubscribe(frame.topic, frame.ref)

    def _subscribe(self, topic: str, ref: Any) -> None:
        node = self.node
        if node.shutting_down or (node.draining and (node.follower is None or not node.coordinator.ready)):
            # Alone (embedded) a draining node serves nothing new; in a cluster it follows the new owner.
            self._error("shutting_down", "node is going away; reconnect to another node", topic=topic, ref=ref)
            return
        try:
            name, _feed, _param = node.resolve(topic)
        except SubsysError as exc:
            self._error(exc.code, exc.message, topic=topic, ref=ref)
            return
        if name in self.topics:
            self._error("already_subscribed", f"already subscribed to {name}", topic=name, ref=ref)
            return
        if len(self.topics) >= self.limits.max_subscriptions:
            self._error(
                "too_many_subscriptions",
                f"at most {self.limits.max_subscriptions} subscriptions per connection",
                topic=name,
                ref=ref,
            )
            return
        self.topics.add(name)
        self.outbox.track(name)
        stream = node.subscribe(self, name)
        snapshot, status = stream.current()
        if ref is not None:
            self.outbox.control(dumps({"type": "subscribed", "topic": name, "ref": ref}))
        if status is not None:
            self.outbox.deliver(status)
        if snapshot is not None:
            self.outbox.deliver(snapshot)

    def _unsubscribe(self, topic: str, ref: Any) -> None:
        if topic not in self.topics:
            self._error("not_subscribed", f"not subscribed to {topic}", topic=topic, ref=ref)
            return
        self.topics.discard(topic)
        self.outbox.untrack(topic)
        self.node.unsubscribe(self, topic)
        frame: dict[str, Any] = {"type": "unsubscribed", "topic": topic}
        if ref is not None:
            frame["ref"] = ref
        self.outbox.control(dumps(frame))

    def detach(self) -> None:
        for topic in list(self.topics):
            self.node.unsubscribe(self, topic)
        self.topics.clear()
        self.outbox.close()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "since": self.connected_at,
            "topics": len(self.topics),
            "queued": self.outbox.queued(),
            "sent": self.outbox.sent,
            "overflows": self.outbox.overflows,
        }


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    if on_admin_listener(request):
        raise web.HTTPNotFound()
    node = request.app[NODE]
    if node.draining or node.shutting_down:
        # The load balancer should have stopped sending clients here (/health is 503): refuse, and say why.
        return web.json_response(
            {"error": {"code": "shutting_down" if node.shutting_down else "draining",
                       "message": "this node takes no new clients; connect to another node"}},
            status=503,
        )  # fmt: skip
    limits = node.settings.limits
    ws = web.WebSocketResponse(
        # The heartbeat is ours (heartbeats): aiohttp's drops an unanswering client without
        # a close frame, and it hides pongs from us (autoping), which our heartbeat must see.
        heartbeat=None,
        autoping=False,
        # permessage-deflate: off unless configured (limits.compression); it costs memory per
        # connection and rules out the shared-frame fast path.
        compress=limits.compression == "deflate",
        # Frames up to 4x the limit are read and answered with frame_too_large; beyond that
        # aiohttp closes with 1009 (message too big). aiohttp refuses a frame of exactly its
        # max_msg_size, hence the +1: a frame of exactly 4x is still answered.
        max_msg_size=limits.max_frame_bytes * 4 + 1,
    )
    if not await open_websocket(ws, request):
        return departed()
    conn = ClientConnection(ws=ws, node=node, limits=limits, peer=request.remote or "?", request=request)
    node.clients.add(conn)
    conn.outbox.control(
        dumps(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "node": node.node_id,
                "limits": {
                    "max_frame_bytes": limits.max_frame_bytes,
                    "max_subscriptions": limits.max_subscriptions,
                    "messages_per_second": limits.messages_per_second,
                },
            }
        )
    )
    try:
        async for msg in ws:
            conn.heard_at = time.monotonic()
            if msg.type == WSMsgType.TEXT:
                conn.handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                conn.handle_binary()
            elif msg.type == WSMsgType.PING:
                with contextlib.suppress(ConnectionError, RuntimeError):  # the socket is going away
                    await ws.pong(msg.data)
            elif msg.type == WSMsgType.ERROR:
                log.info("client %s socket error: %s", conn.peer, ws.exception())
                break
    finally:
        node.clients.discard(conn)
        conn.detach()
        tasks = [task for task in (conn.writer, conn.closing) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not ws.closed:
            await ws.close()
    return ws


async def _run_writer(conn: ClientConnection) -> None:
    """Send a connection's backlog, then end (the fast path takes over); owned by the connection."""
    ws = conn.ws
    try:
        await conn.outbox.flush()
    except SendFailed as exc:
        # A send on a socket that is already closing (the client left, normally or not)
        # is how a connection ends: nothing to report. aiohttp raises ConnectionResetError
        # once the transport is closing, even before ws.closed is set.
        if ws.closed or isinstance(exc.__cause__, ConnectionResetError):
            log.debug("client socket closing; its writer stopped: %s", exc)
        else:
            log.warning("closing slow client socket %s: %s", conn.peer, exc)
            await close_slow(ws, conn.request, grace=conn.limits.send_timeout)
    except Exception:
        log.exception("client writer crashed; closing the socket")
        await ws.close(code=WSCloseCode.INTERNAL_ERROR)


_PING = b"\x89\x00"  # an unmasked WebSocket ping with no payload


async def heartbeats(node: Node) -> None:
    """One loop for every client socket (not a task per socket): ping a client quiet for
    ``limits.heartbeat``; close one that does not answer within half of it.

    Whether it is gone or merely stopped reading cannot be told apart, so it is
    closed like a slow consumer: 4008 behind the data in flight, which a client
    that only paused still gets.
    """
    limits = node.settings.limits
    interval, answer_within = limits.heartbeat, limits.heartbeat / 2
    while True:
        await asyncio.sleep(min(1.0, answer_within / 4))
        now = time.monotonic()
        for conn in list(node.clients):
            if conn.closing is not None or conn.ws.closed:
                continue
            if conn.pinged_at is not None:
                if conn.heard_at >= conn.pinged_at:
                    conn.pinged_at = None
                elif now - conn.pinged_at >= answer_within:
                    log.info("client %s did not answer a ping within %gs; closing it", conn.peer, answer_within)
                    conn.closing = asyncio.create_task(close_slow(conn.ws, conn.request, grace=limits.send_timeout))
                continue
            if now - conn.heard_at >= interval:
                transport = conn.request.transport
                if transport is not None and not transport.is_closing():
                    transport.write(_PING)  # a control frame may go ahead of any queued data
                conn.pinged_at = now


async def close_slow(ws: web.WebSocketResponse, request: web.Request, *, grace: float) -> None:
    """Close with 4008 behind what is already in flight; cut the connection once it goes unread for ``grace``.

    The frames already handed to the socket cannot be taken back, so the close
    frame follows them, and the transport is closed gracefully: it keeps
    flushing. A client that reads again within ``grace``, and keeps reading,
    gets those frames and then 4008. The close does not wait for the client
    (``drain=False``), so the handler ends and the subscriptions are released
    now; only the socket lingers while it is being read, so a client that never
    reads again cannot hold it.
    """
    transport = request.transport
    if transport is not None:
        asyncio.get_running_loop().call_later(grace, _cut_if_unread, request, grace, transport.get_write_buffer_size())
    try:
        await asyncio.wait_for(ws.close(code=CLOSE_SLOW_CONSUMER, message=b"slow consumer", drain=False), grace)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        pass


def _cut_if_unread(request: web.Request, grace: float, unsent_before: int) -> None:
    transport = request.transport  # None once everything was flushed and the connection is gone
    if transport is None:
        return
    unsent = transport.get_write_buffer_size()
    if unsent < unsent_before:  # the client reads again: give it another grace period
        asyncio.get_running_loop().call_later(grace, _cut_if_unread, request, grace, unsent)
    else:
        transport.abort()


async def close_all(connections: set[ClientConnection], *, timeout: float = 2.0) -> None:
    """Flush what is queued (still answering client frames), then close every client with 1001.

    The close frame follows what is in flight without waiting for the client to
    read it (``drain=False``): a client that does not read cannot hold up the
    shutdown. The transports keep flushing while the node finishes stopping.
    """
    deadline = time.monotonic() + timeout
    while any(conn.outbox.queued() for conn in connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.gather(*(_close_going_away(conn.ws, timeout) for conn in list(connections)), return_exceptions=True)


async def _close_going_away(ws: web.WebSocketResponse, timeout: float) -> None:
    # Bounded too: a close that finds its handler busy waits for the client's close reply.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down", drain=False), timeout
        )
