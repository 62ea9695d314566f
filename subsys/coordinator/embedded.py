"""In-process coordinator: one node, no Consul. Epoch is always 1."""

from __future__ import annotations

import asyncio
import time

from . import Coordinator, NodeRecord, OwnerRecord

__all__ = ["EmbeddedCoordinator"]


class EmbeddedCoordinator(Coordinator):
    kind = "embedded"

    def __init__(self, *, node_id: str, address: str, version: str = "") -> None:
        super().__init__(node_id=node_id, address=address)
        self._version = version
        self._ready = False

    async def start(self) -> None:
        self.view.nodes[self.node_id] = NodeRecord(self.node_id, self.address, self._version, time.time())
        self._ready = True
        await self._notify()

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.view.owners.clear()
        self.view.presence.clear()
        self._ready = False
        await self._notify()

    @property
    def ready(self) -> bool:
        return self._ready

    async def acquire(self, topic: str) -> OwnerRecord | None:
        current = self.view.owners.get(topic)
        if current is not None:
            return current if current.node_id == self.node_id else None
        record = OwnerRecord(topic, self.node_id, self.address, epoch=1, since=time.time(), holder=self.node_id)
        self.view.owners[topic] = record
        await self._notify()
        return record

    async def release(self, topic: str, epoch: int) -> None:
        current = self.view.owners.get(topic)
        if current is not None and current.epoch == epoch and current.node_id == self.node_id:
            del self.view.owners[topic]
            await self._notify()

    def can_publish(self, topic: str, epoch: int) -> bool:
        current = self.view.owners.get(topic)
        return current is not None and current.node_id == self.node_id and current.epoch == epoch

    async def set_presence(self, topic: str, present: bool) -> None:
        nodes = self.view.presence.setdefault(topic, set())
        if present:
            nodes.add(self.node_id)
        else:
            nodes.discard(self.node_id)
            if not nodes:
                del self.view.presence[topic]
        await self._notify()
