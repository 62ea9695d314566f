"""The admin event stream (``GET /admin/v1/events``, server-sent events).

Each node keeps a bounded ring of cluster events, derived from its
coordinator view (ownership, presence, nodes) and its own readiness. A
client starts with a ``snapshot`` event (the whole picture, carrying the
current cursor) and then gets deltas; on reconnect it sends the last id it
saw (``Last-Event-ID`` or ``?cursor=``) and resumes from there if the ring
still has it, else it gets a fresh snapshot. Ids are ``<incarnation>-<n>``:
a restarted node never confuses a cursor of its previous life with its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, AsyncIterator

from subsys.core import admin as api
from subsys.core.changes import ChangeSignal
from subsys.node.node import Node

__all__ = ["EventHub"]

log = logging.getLogger(__name__)

RING = 5000


def _owners(node: Node) -> dict[str, dict[str, Any]]:
    return {
        topic: {"node": r.node_id, "epoch": r.epoch, "since": r.since, "reason": r.reason}
        for topic, r in node.coordinator.view.owners.items()
    }


def _presence(node: Node) -> dict[str, list[str]]:
    return {topic: sorted(nodes) for topic, nodes in node.coordinator.view.presence.items()}


def _nodes(node: Node) -> dict[str, dict[str, Any]]:
    return {
        nid: {"address": r.address, "incarnation": r.incarnation, "draining": r.draining, "started": r.started}
        for nid, r in node.coordinator.view.nodes.items()
    }


class EventHub:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._ring: collections.deque[api.Event] = collections.deque(maxlen=RING)
        self._count = 0
        self._changed = ChangeSignal()
        self._closed = False
        self.streams = 0  # open event streams (clients reading)
        self._owners = _owners(node)
        self._presence = _presence(node)
        self._nodes = _nodes(node)
        self._ready: bool | None = None

    @property
    def cursor(self) -> str:
        return f"{self.node.incarnation}-{self._count}"

    def snapshot(self) -> api.Event:
        data = {"owners": self._owners, "presence": self._presence, "nodes": self._nodes,
                "node": self.node.node_id, "ready": self._ready}  # fmt: skip
        return api.Event(id=self.cursor, type="snapshot", at=time.time(), data=data)

    async def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self._count += 1
        self._ring.append(api.Event(id=self.cursor, type=kind, at=time.time(), data=data))
        self._changed.notify()

    async def run(self) -> None:
        """Turn view changes into events until cancelled."""
        seen = -1
        while not self._closed:
            try:
                generation = await self.node.coordinator.wait_changed(seen, 1.0)
                if generation != seen:  # the view moved: compare it (O(topics)); else readiness only
                    seen = generation
                    await self._diff()
                await self._check_ready()
            except Exception:  # the stream must outlive any one bad comparison
                log.exception("event hub pass failed")
                await asyncio.sleep(1.0)

    async def _diff(self) -> None:
        owners, presence, nodes = _owners(self.node), _presence(self.node), _nodes(self.node)
        for topic in sorted(set(owners) | set(self._owners)):
            before, after = self._owners.get(topic), owners.get(topic)
            if before != after and (before or {}).get("epoch") != (after or {}).get("epoch"):
                await self._emit("owner", {"topic": topic, "from": before, "to": after})
        for topic in sorted(set(presence) | set(self._presence)):
            if presence.get(topic) != self._presence.get(topic):
                await self._emit("presence", {"topic": topic, "nodes": presence.get(topic, [])})
        for nid in sorted(set(nodes) | set(self._nodes)):
            if nodes.get(nid) != self._nodes.get(nid):
                await self._emit("node", {"node": nid, "before": self._nodes.get(nid), "after": nodes.get(nid)})
        self._owners, self._presence, self._nodes = owners, presence, nodes

    async def _check_ready(self) -> None:
        ready = self.node.coordinator.ready and not self.node.draining and self.node.failure is None
        if ready != self._ready:
            self._ready = ready
            await self._emit("health", {"node": self.node.node_id, "ready": ready, "draining": self.node.draining})

    async def close(self) -> None:
        self._closed = True
        self._changed.notify()

    async def stream(self, after: str | None) -> AsyncIterator[api.Event]:
        """Events after cursor ``after`` (replayed from the ring), or a snapshot first."""
        self.streams += 1
        try:
            async for event in self._stream(after):
                yield event
        finally:
            self.streams -= 1

    async def _stream(self, after: str | None) -> AsyncIterator[api.Event]:
        # ``position``: the number of the last event this stream has (a snapshot has them all). It is
        # taken before each yield: events emitted while the reader is busy come in the next pass.
        position = self._position(after)
        if position is None:
            position = self._count
            yield self.snapshot()
        while not self._closed:
            seen = self._changed.count
            first = self._count - len(self._ring) + 1  # the number of the oldest event in the ring
            if position + 1 < first:  # fell behind the ring: start over
                position = self._count
                yield self.snapshot()
                continue
            for event in list(self._ring)[max(0, position + 1 - first):]:
                position += 1
                yield event
            if position == self._count and not self._closed:
                await self._changed.wait(seen, 15.0)

    def _position(self, after: str | None) -> int | None:
        if not after:
            return None
        incarnation, _, number = after.rpartition("-")
        if incarnation != self.node.incarnation or not number.isdigit():
            return None
        position = int(number)
        first = self._count - len(self._ring) + 1
        if position > self._count or position + 1 < first:
            return None
        return position
