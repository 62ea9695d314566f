"""A bounded, self-healing send queue for one receiver (client socket or peer link), with a fast path.

Why a queue: a receiver that reads slowly must never stall the poller or
other receivers, and must never lose the final state. Data messages queue up
to ``limit``; past that the queue is dropped whole and replaced by one marker
that, when the writer reaches it, sends a fresh snapshot of every topic the
receiver follows (a ``resync`` if the epoch moved). Memory stays bounded, and
the receiver converges on the latest state.

Why a fast path: most receivers read at once. For them a publication is
written straight to the socket, synchronously, as WebSocket frame bytes
built once per publication and shared by every receiver: no task, timer or
future per receiver per frame (``direct``). Only a receiver whose socket
buffer is full, or that already has a backlog, goes through the queue and a
writer task; ordering holds because the fast path is taken only when the
queue is empty and no write is in flight.

Ordering rules, on both paths: within a topic never a data message of an
older epoch after a newer one, never a diff that does not follow the last
sent seq (a snapshot is sent instead), never the same snapshot twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from typing import Awaitable, Callable, Protocol

from subsys.core.protocol import Publication, escape_surrogates

__all__ = ["Outbox", "SendFailed", "DirectWriter", "text_frame", "frame_of"]

log = logging.getLogger(__name__)

_RESYNC = object()


class SendFailed(Exception):
    """The transport failed or timed out; the receiver is being closed."""


class DirectWriter(Protocol):
    def writable(self) -> bool:
        """True when a write now would go out without piling up (socket buffer below its mark)."""

    def write(self, data: bytes) -> None: ...


def text_frame(text: str) -> bytes:
    """A complete unmasked WebSocket text frame (RFC 6455; servers do not mask)."""
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from the data (a json column): its escape means the same
        payload = escape_surrogates(text).encode("utf-8")
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def frame_of(pub: Publication, as_type: str | None = None) -> bytes:
    """The publication as frame bytes, built once and shared by every receiver."""
    key = as_type or pub.kind
    frame = pub.frames.get(key)
    if frame is None:
        frame = pub.frames[key] = text_frame(pub.wire(as_type))
    return frame


class _Cursor:
    __slots__ = ("epoch", "seq", "synced")

    def __init__(self) -> None:
        self.epoch, self.seq, self.synced = 0, -1, False


class Outbox:
    __slots__ = (
        "_send", "_current", "_limit", "_send_timeout", "_resync_type", "_control_limit", "_direct",
        "_on_backlog", "_data", "_control", "_wakeup", "_cursors", "_writing", "overflows", "sent", "closed",
    )  # fmt: skip

    def __init__(
        self,
        *,
        send: Callable[[str], Awaitable[None]],
        current: Callable[[str], tuple[Publication | None, Publication | None]],
        limit: int,
        send_timeout: float,
        resync_type: str | None = "resync",
        control_limit: int = 64,
        direct: DirectWriter | None = None,
        on_backlog: Callable[[], None] | None = None,
    ) -> None:
        """``direct``: the fast path (None: always queue). ``on_backlog``: called when the queue
        goes from empty to not, so the owner can start a writer (``flush``); without it, run
        ``run()`` as a long-lived writer."""
        self._send = send
        self._current = current  # topic -> (snapshot publication, status publication)
        self._limit = limit
        self._send_timeout = send_timeout
        self._resync_type = resync_type
        # Replies (pong, error, acks). Bounded; past the bound the oldest are dropped, so it
        # must hold at least what the receiver may legitimately send in one burst.
        self._control_limit = control_limit
        self._direct = direct
        self._on_backlog = on_backlog
        self._data: collections.deque | None = None  # created on first use: most never need one
        self._control: collections.deque[str] | None = None
        self._wakeup: asyncio.Event | None = None
        self._cursors: dict[str, _Cursor] = {}
        self._writing = False
        self.overflows = 0
        self.sent = 0
        self.closed = False

    # -- producer side (never blocks) --------------------------------------

    def track(self, topic: str) -> None:
        if topic not in self._cursors:
            self._cursors[topic] = _Cursor()

    def untrack(self, topic: str) -> None:
        self._cursors.pop(topic, None)

    @property
    def topics(self) -> list[str]:
        return list(self._cursors)

    def _idle(self) -> bool:
        return not self._writing and not self._data and not self._control

    def deliver(self, publication: Publication) -> None:
        if self.closed or publication.topic not in self._cursors:
            return
        direct = self._direct
        if direct is not None and self._idle() and direct.writable():
            for item, as_type in self._plan(publication):
                direct.write(frame_of(item, as_type))
                self.sent += 1
            return
        data = self._data
        if data is None:
            data = self._data = collections.deque()
        if len(data) >= self._limit:
            self.overflows += 1
            data.clear()
            data.append(_RESYNC)
            log.warning("send queue overflow (limit %d): dropping queued messages, will resync", self._limit)
        data.append(publication)
        self._backlog()

    def control(self, frame: str) -> None:
        if self.closed:
            return
        direct = self._direct
        if direct is not None and self._idle() and direct.writable():
            direct.write(text_frame(frame))
            self.sent += 1
            return
        if self._control is None:
            self._control = collections.deque(maxlen=self._control_limit)
        self._control.append(frame)
        self._backlog()

    def _backlog(self) -> None:
        if self._on_backlog is not None:
            self._on_backlog()
        else:
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._wakeup.set()

    def queued(self) -> int:
        return len(self._data or ()) + len(self._control or ())

    # -- planning: what to send for a publication (both paths) --------------------------

    def _plan(self, pub: Publication) -> list[tuple[Publication, str | None]]:
        cursor = self._cursors.get(pub.topic)
        if cursor is None:
            return []
        if pub.kind == "status":
            return [(pub, None)] if pub.epoch >= cursor.epoch else []
        if pub.epoch < cursor.epoch:
            return []  # fenced: never an older epoch after a newer one
        if pub.kind == "snapshot":
            if cursor.synced and pub.epoch == cursor.epoch and pub.seq <= cursor.seq:
                return []  # the receiver already has this state (or a later one): never send it twice
            return [self._snapshot(pub, cursor)]
        if cursor.synced and pub.epoch == cursor.epoch:
            if pub.seq == cursor.seq + 1:
                cursor.seq = pub.seq
                return [(pub, None)]
            if pub.seq <= cursor.seq:
                return []  # already covered by a later snapshot
        return self._plan_resync(pub.topic, cursor)

    def _snapshot(self, pub: Publication, cursor: _Cursor) -> tuple[Publication, str | None]:
        as_type = None
        if cursor.synced and pub.epoch > cursor.epoch and self._resync_type:
            as_type = self._resync_type
        cursor.epoch, cursor.seq, cursor.synced = pub.epoch, pub.seq, True
        return pub, as_type

    def _plan_resync(self, topic: str, cursor: _Cursor) -> list[tuple[Publication, str | None]]:
        snapshot, status = self._current(topic)
        plan = []
        if status is not None and status.epoch >= cursor.epoch:
            plan.append((status, None))
        if snapshot is not None and snapshot.epoch >= cursor.epoch:
            if not (cursor.synced and snapshot.epoch == cursor.epoch and snapshot.seq <= cursor.seq):
                plan.append(self._snapshot(snapshot, cursor))
        return plan

    # -- writer side --------------------------------------------------------

    async def run(self) -> None:
        """A long-lived writer: send until closed; raises SendFailed when the transport gives up."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        while not self.closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send the backlog, then return (the fast path takes over again)."""
        self._writing = True
        try:
            while not self.closed:
                if self._control:
                    await self._write(self._control.popleft())
                    continue
                if not self._data:
                    break
                item = self._data.popleft()
                plan = (
                    [pair for topic, cursor in list(self._cursors.items()) for pair in self._plan_resync(topic, cursor)]
                    if item is _RESYNC else self._plan(item)
                )  # fmt: skip
                for pub, as_type in plan:
                    await self._write(pub.wire(as_type))
        finally:
            self._writing = False

    def close(self) -> None:
        self.closed = True
        if self._data:
            self._data.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    async def _write(self, frame: str) -> None:
        try:
            await asyncio.wait_for(self._send(frame), self._send_timeout)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
            self.close()
            raise SendFailed(f"send failed: {exc!r}") from exc
        self.sent += 1
