"""A bounded, self-healing send queue for one receiver (client socket or peer link).

Why: a receiver that reads slowly must never stall the poller or other
receivers, and must never lose the final state. Data messages queue up to
``limit``; past that the queue is dropped whole and replaced by one marker
that, when the writer reaches it, sends a fresh snapshot of every topic the
receiver follows (a ``resync`` if the epoch moved). Memory stays bounded,
and the receiver converges on the latest state.

The writer also enforces ordering: within a topic it never sends a data
message of an older epoch after a newer one, nor a diff that does not
follow the last sent seq (it fetches a snapshot instead).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from subsys.core.protocol import Publication

__all__ = ["Outbox", "SendFailed"]

log = logging.getLogger(__name__)

_RESYNC = object()


class SendFailed(Exception):
    """The transport failed or timed out; the receiver is being closed."""


@dataclass(slots=True)
class _Cursor:
    epoch: int = 0
    seq: int = -1
    synced: bool = False


class Outbox:
    def __init__(
        self,
        *,
        send: Callable[[str], Awaitable[None]],
        current: Callable[[str], tuple[Publication | None, Publication | None]],
        limit: int,
        send_timeout: float,
        resync_type: str | None = "resync",
        control_limit: int = 64,
    ) -> None:
        self._send = send
        self._current = current  # topic -> (snapshot publication, status publication)
        self._limit = limit
        self._send_timeout = send_timeout
        self._resync_type = resync_type
        self._data: collections.deque = collections.deque()
        # Replies (pong, error, acks). Bounded; past the bound the oldest are dropped, so it
        # must hold at least what the receiver may legitimately send in one burst.
        self._control: collections.deque[str] = collections.deque(maxlen=control_limit)
        self._wakeup = asyncio.Event()
        self._cursors: dict[str, _Cursor] = {}
        self.overflows = 0
        self.sent = 0
        self.closed = False

    # -- producer side (never blocks) --------------------------------------

    def track(self, topic: str) -> None:
        self._cursors.setdefault(topic, _Cursor())

    def untrack(self, topic: str) -> None:
        self._cursors.pop(topic, None)

    @property
    def topics(self) -> list[str]:
        return list(self._cursors)

    def deliver(self, publication: Publication) -> None:
        if self.closed or publication.topic not in self._cursors:
            return
        if len(self._data) >= self._limit:
            self.overflows += 1
            self._data.clear()
            self._data.append(_RESYNC)
            log.warning("send queue overflow (limit %d): dropping queued messages, will resync", self._limit)
        self._data.append(publication)
        self._wakeup.set()

    def control(self, frame: str) -> None:
        if not self.closed:
            self._control.append(frame)
            self._wakeup.set()

    def queued(self) -> int:
        return len(self._data) + len(self._control)

    # -- writer side --------------------------------------------------------

    async def run(self) -> None:
        """Send until closed; raises SendFailed when the transport gives up."""
        while not self.closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while (self._control or self._data) and not self.closed:
                if self._control:
                    await self._write(self._control.popleft())
                    continue
                item = self._data.popleft()
                if item is _RESYNC:
                    await self._resync_all()
                else:
                    await self._write_publication(item)

    def close(self) -> None:
        self.closed = True
        self._data.clear()
        self._wakeup.set()

    async def _write(self, frame: str) -> None:
        try:
            await asyncio.wait_for(self._send(frame), self._send_timeout)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
            self.close()
            raise SendFailed(f"send failed: {exc!r}") from exc
        self.sent += 1

    async def _write_publication(self, pub: Publication) -> None:
        cursor = self._cursors.get(pub.topic)
        if cursor is None:
            return
        if pub.kind == "status":
            if pub.epoch >= cursor.epoch:
                await self._write(pub.wire())
            return
        if pub.epoch < cursor.epoch:
            return  # fenced: never an older epoch after a newer one
        if pub.kind == "snapshot":
            if cursor.synced and pub.epoch == cursor.epoch and pub.seq <= cursor.seq:
                return  # the receiver already has this state (or a later one): never send it twice
            await self._write_snapshot(pub, cursor)
            return
        # diff
        if cursor.synced and pub.epoch == cursor.epoch and pub.seq == cursor.seq + 1:
            await self._write(pub.wire())
            cursor.seq = pub.seq
        elif cursor.synced and pub.epoch == cursor.epoch and pub.seq <= cursor.seq:
            return  # already covered by a later snapshot
        else:
            await self._resync_topic(pub.topic, cursor)

    async def _write_snapshot(self, pub: Publication, cursor: _Cursor) -> None:
        as_type = None
        if cursor.synced and pub.epoch > cursor.epoch and self._resync_type:
            as_type = self._resync_type
        await self._write(pub.wire(as_type))
        cursor.epoch, cursor.seq, cursor.synced = pub.epoch, pub.seq, True

    async def _resync_topic(self, topic: str, cursor: _Cursor) -> None:
        snapshot, status = self._current(topic)
        if status is not None and status.epoch >= cursor.epoch:
            await self._write(status.wire())
        if snapshot is not None and snapshot.epoch >= cursor.epoch:
            if not (cursor.synced and snapshot.epoch == cursor.epoch and snapshot.seq <= cursor.seq):
                await self._write_snapshot(snapshot, cursor)

    async def _resync_all(self) -> None:
        for topic, cursor in list(self._cursors.items()):
            await self._resync_topic(topic, cursor)
