"""In-process coordinator: one node, no Consul.

Epochs come from a counter that lives as long as the process, so they
strictly increase across acquisitions of a topic (a topic released after
its grace and taken again starts a new epoch, and its clients see a
``resync``), as the interface promises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

from subsys.coordinator.base import (
    HANDOFF_HOLD, Coordinator, KeyFact, NodeRecord, OwnerRecord, Records, Reservation,
)  # fmt: skip

__all__ = ["EmbeddedCoordinator"]


class EmbeddedCoordinator(Coordinator):
    kind = "embedded"

    def __init__(self, *, node_id: str, address: str, incarnation: str = "", version: str = "") -> None:
        super().__init__(node_id=node_id, address=address, incarnation=incarnation)
        self._version = version
        self._ready = False
        self._epochs = itertools.count(1)

    async def start(self) -> None:
        self.view.nodes[self.node_id] = NodeRecord(
            self.node_id, self.address, self._version, time.time(), self.incarnation, self.holder_id
        )
        self._ready = True
        await self._notify()

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.view.owners.clear()
        self.view.presence.clear()
        self.view.nodes.clear()
        self._ready = False
        await self._notify()

    @property
    def ready(self) -> bool:
        return self._ready

    async def acquire(self, topic: str, *, reason: str = "") -> OwnerRecord | None:
        if not self._ready:
            return None
        current = self.view.owners.get(topic)
        if current is not None:
            return current if self.holds(current) else None
        reservation = self.view.reservations.get(topic)
        if reservation is not None and reservation.active(time.time()) and reservation.for_node != self.node_id:
            return None
        record = OwnerRecord(
            topic, self.node_id, self.address, epoch=next(self._epochs), since=time.time(),
            holder=self.holder_id, incarnation=self.incarnation, reason=reason,
        )  # fmt: skip
        self.view.owners[topic] = record
        self.view.reservations.pop(topic, None)
        await self._notify()
        return record

    async def release(self, topic: str, epoch: int, *, to: str | None = None, reason: str = "") -> bool:
        current = self.view.owners.get(topic)
        if current is None or current.epoch != epoch or not self.holds(current):
            return False
        del self.view.owners[topic]
        if to is not None:
            self.view.reservations[topic] = Reservation(
                topic, to, time.time() + HANDOFF_HOLD, reason, self.node_id, epoch
            )
        await self._notify()
        return True

    async def set_draining(self, draining: bool) -> None:
        record = self.view.nodes.get(self.node_id)
        if record is not None:
            self.view.nodes[self.node_id] = dataclasses.replace(record, draining=draining)
            await self._notify()

    def can_publish(self, topic: str, epoch: int) -> bool:
        current = self.view.owners.get(topic)
        return self._ready and self.holds(current) and current.epoch == epoch

    async def set_presence(self, topic: str, present: bool) -> None:
        nodes = self.view.presence.setdefault(topic, set())
        if present:
            nodes.add(self.node_id)
        else:
            nodes.discard(self.node_id)
        if not nodes:
            del self.view.presence[topic]
        await self._notify()

    async def records(self) -> Records:
        keys = [KeyFact("owner", t, r.node_id, r.holder, r.epoch, {"node": r.node_id}) for t, r in self.view.owners.items()]
        keys += [KeyFact("presence", t, n, self.holder_id, 0) for t, nodes in self.view.presence.items() for n in nodes]
        keys += [KeyFact("node", "", n, r.holder, 0) for n, r in self.view.nodes.items()]
        return Records(keys=keys)

    async def delete_key_at(self, fact: KeyFact) -> bool:
        if fact.kind == "owner":
            current = self.view.owners.get(fact.topic)
            if current is not None and current.epoch == fact.index:
                del self.view.owners[fact.topic]
                await self._notify()
                return True
        elif fact.kind == "presence" and fact.node in self.view.presence.get(fact.topic, set()):
            await self.set_presence(fact.topic, False)
            return True
        return False
