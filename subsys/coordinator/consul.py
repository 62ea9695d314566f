"""The Consul coordinator: ownership, presence and membership in Consul KV.

Key layout (under ``consul.prefix``, default ``subsys/``):

* ``owners/<topic>``          acquired with this node's session; value
  ``{"node", "address", "since"}``; epoch = the key's ModifyIndex at
  acquisition (a Raft index: strictly increasing across owners);
* ``presence/<topic>/<node>`` held by this node's session while it has local
  subscribers to the topic; written only when the local count crosses zero;
* ``nodes/<node>``            held by this node's session; address, version.

Each node registers service ``subsys`` (ID ``subsys-<node>``) with a TTL
check it passes every second, and one session bound to that check and
``serfHealth`` with ``Behavior=delete``: a killed process stops passing its
check, Consul invalidates the session within the TTL and deletes its keys.

Fencing: ``can_publish`` is true only while the view says this session holds
the topic at that epoch *and* the session was confirmed alive within
``check_ttl - margin`` seconds on the monotonic clock. A process frozen past
its TTL wakes up fenced until it has re-checked, and by then Consul has
deleted its keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..config import Settings
from ..errors import CoordinatorError, CoordinatorUnavailable
from . import Coordinator, NodeRecord, OwnerRecord
from ._consul_api import ConsulAPI, KVEntry, NotFound

__all__ = ["ConsulCoordinator", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = "subsys"
_HEARTBEAT = 1.0
_FENCE_MARGIN = 1.0


class ConsulCoordinator(Coordinator):
    kind = "consul"

    def __init__(self, *, settings: Settings, version: str = "") -> None:
        super().__init__(node_id=settings.node_id, address=settings.advertise_url)
        self._cfg = settings.consul
        self._version = version
        self.api = ConsulAPI(
            address=settings.consul.address, token=settings.consul_token, datacenter=settings.consul.datacenter
        )
        self.prefix = settings.consul.prefix
        self.service_id = f"{SERVICE_NAME}-{self.node_id}"
        self.check_id = f"{self.service_id}-ttl"
        self.session: str | None = None
        self._confirmed_at = float("-inf")  # monotonic
        self._started = time.time()
        self._presence: set[str] = set()  # topics this node wants presence for
        self._state = "starting"
        self._last_error = ""
        self._closing = False
        self._pending: set[str] = set()  # keys this session still has to write

    # -- keys ------------------------------------------------------------------

    def owner_key(self, topic: str) -> str:
        return f"{self.prefix}owners/{topic}"

    def presence_key(self, topic: str, node_id: str | None = None) -> str:
        return f"{self.prefix}presence/{topic}/{node_id or self.node_id}"

    def node_key(self, node_id: str | None = None) -> str:
        return f"{self.prefix}nodes/{node_id or self.node_id}"

    # -- lifecycle ---------------------------------------------------------------

    @property
    def holder_id(self) -> str:
        return self.session or ""

    @property
    def ready(self) -> bool:
        return self.session is not None and self._fresh()

    def _fresh(self) -> bool:
        return time.monotonic() - self._confirmed_at < self._cfg.check_ttl - _FENCE_MARGIN

    def health(self) -> dict[str, Any]:
        age = time.monotonic() - self._confirmed_at
        return {
            "kind": self.kind,
            "ready": self.ready,
            "state": self._state,
            "address": self.api.base,
            "prefix": self.prefix,
            "session": self.session,
            "confirmed_ago": round(age, 3) if age != float("inf") else None,
            "last_error": self._last_error or None,
            "requests": dict(self.api.requests),
        }

    async def start(self) -> None:
        await self.api.open()
        try:
            await self._register()
            for part in ("owners", "presence", "nodes"):
                entries, _index = await self.api.kv_list(f"{self.prefix}{part}/", consistent=True)
                self._apply(part, entries)
        except CoordinatorUnavailable as exc:
            # Start anyway: the heartbeat loop keeps trying, health says why.
            self._set_state("unreachable", str(exc))
        await self._notify()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeat_loop(), name="consul-heartbeat")
            for part in ("owners", "presence", "nodes"):
                group.create_task(self._watch_loop(part), name=f"consul-watch-{part}")

    async def close(self) -> None:
        self._closing = True
        try:
            if self.session is not None:
                await self.api.destroy_session(self.session)  # Behavior=delete drops our keys
            await self.api.deregister_service(self.service_id)
            log.info("left the cluster: session destroyed, service %s deregistered", self.service_id)
        except CoordinatorError as exc:
            log.warning("could not leave the cluster cleanly: %s", exc)
        finally:
            self.session = None
            await self.api.close()

    async def _register(self) -> None:
        """(Re)register the service and check, then create a fresh session."""
        await self.api.register_service(
            {
                "ID": self.service_id,
                "Name": SERVICE_NAME,
                "Meta": {"node": self.node_id, "address": self.address, "version": self._version},
                "Check": {
                    "CheckID": self.check_id,
                    "Name": f"subsys node {self.node_id} heartbeat",
                    "TTL": f"{self._cfg.check_ttl:g}s",
                    "DeregisterCriticalServiceAfter": "1m",
                },
            }
        )
        await self.api.pass_check(self.check_id)
        checked_at = time.monotonic()
        self.session = await self.api.create_session(
            {
                "Name": f"subsys-{self.node_id}",
                "Behavior": "delete",
                "LockDelay": f"{int(self._cfg.lock_delay * 1000)}ms",
                "NodeChecks": ["serfHealth"],
                "ServiceChecks": [{"ID": self.check_id}],
            }
        )
        self._confirmed_at = checked_at
        self._pending = {self.node_key(), *(self.presence_key(topic) for topic in self._presence)}
        await self._write_pending()
        self._set_state("connected", "")
        log.info("registered with consul at %s: service %s, session %s", self.api.base, self.service_id, self.session)

    def _set_state(self, state: str, error: str) -> None:
        if state != self._state:
            if state == "connected":
                log.info("consul: %s", state)
            else:
                log.warning("consul: %s: %s", state, error)
        self._state, self._last_error = state, error

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            started = time.monotonic()
            try:
                await self._heartbeat(started)
            except Exception as exc:  # never let the heartbeat die: it is what keeps us fenced or alive
                if not isinstance(exc, CoordinatorError):
                    log.exception("consul heartbeat failed unexpectedly")
                self._set_state("unreachable" if isinstance(exc, CoordinatorUnavailable) else "error", str(exc))
                if not self._fresh() and self.owned():
                    log.warning("ownership no longer confirmed: fencing %d topic(s)", len(self.owned()))
                    await self._notify()
            await asyncio.sleep(max(0.0, _HEARTBEAT - (time.monotonic() - started)))

    async def _heartbeat(self, started: float) -> None:
        if self.session is None:
            await self._register()
            await self._notify()
            return
        try:
            await self.api.pass_check(self.check_id)
        except NotFound:
            log.warning("consul lost our check (agent restarted?): registering again")
            await self._session_lost()
            return
        if await self.api.session_info(self.session) is None:
            log.warning("session %s was invalidated (check went critical?): registering again", self.session)
            await self._session_lost()
            return
        self._confirmed_at = started
        self._set_state("connected", "")
        if self._pending:
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Write this session's node record and presence keys; retried each heartbeat.

        A key can refuse us for a moment (lock-delay, or a previous process of
        this node whose session Consul has not invalidated yet).
        """
        assert self.session is not None
        for key in sorted(self._pending):
            if key == self.node_key():
                value: dict[str, Any] = {
                    "node": self.node_id, "address": self.address, "version": self._version, "started": self._started,
                }
            else:
                topic = key[len(f"{self.prefix}presence/"):].rpartition("/")[0]
                if topic not in self._presence:
                    self._pending.discard(key)
                    continue
                value = {"node": self.node_id, "since": time.time()}
            if await self.api.kv_acquire(key, self.session, value):
                self._pending.discard(key)

    async def _session_lost(self) -> None:
        self.session = None
        self._confirmed_at = float("-inf")
        await self._notify()  # every ownership is now fenced; the node stops its pollers
        await self._register()
        await self._notify()

    async def _watch_loop(self, part: str) -> None:
        """One blocking query per key prefix, as Consul's docs describe."""
        prefix = f"{self.prefix}{part}/"
        index, backoff = 0, 0.1
        while not self._closing:
            started = time.monotonic()
            try:
                entries, new_index = await self.api.kv_list(prefix, index=max(index, 1), wait=self._cfg.wait)
            except Exception as exc:
                if not isinstance(exc, CoordinatorError):
                    log.exception("watch %s failed unexpectedly", prefix)
                log.debug("watch %s failed: %s", prefix, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if new_index < index or new_index <= 0:
                index = 0  # the index went backwards (Consul restored or reset): start over
            elif new_index == index:
                # Woke without change (wait expired); avoid a hot loop if Consul answers at once.
                if time.monotonic() - started < 0.05:
                    await asyncio.sleep(0.05)
                continue
            else:
                index = new_index
            if self._apply(part, entries):
                await self._notify()

    def _apply(self, part: str, entries: list[KVEntry]) -> bool:
        """Rebuild one part of the view from a prefix listing; True if it changed."""
        base = f"{self.prefix}{part}/"
        if part == "owners":
            owners: dict[str, OwnerRecord] = {}
            for entry in entries:
                if entry.session is None:
                    continue  # released, not yet deleted: nobody owns it
                value = entry.json() or {}
                topic = entry.key[len(base):]
                owners[topic] = OwnerRecord(
                    topic=topic,
                    node_id=str(value.get("node", "?")),
                    address=str(value.get("address", "")),
                    epoch=entry.modify_index,
                    since=float(value.get("since", 0) or 0),
                    holder=entry.session,
                )
            changed = owners != self.view.owners
            self.view.owners = owners
            return changed
        if part == "presence":
            presence: dict[str, set[str]] = {}
            for entry in entries:
                rest = entry.key[len(base):]
                topic, _, node = rest.rpartition("/")
                if topic and node and entry.session is not None:
                    presence.setdefault(topic, set()).add(node)
            changed = presence != self.view.presence
            self.view.presence = presence
            return changed
        nodes: dict[str, NodeRecord] = {}
        for entry in entries:
            value = entry.json() or {}
            node_id = entry.key[len(base):]
            if entry.session is None:
                continue
            nodes[node_id] = NodeRecord(
                node_id=node_id,
                address=str(value.get("address", "")),
                version=str(value.get("version", "")),
                started=float(value.get("started", 0) or 0),
            )
        changed = nodes != self.view.nodes
        self.view.nodes = nodes
        return changed

    # -- ownership -----------------------------------------------------------------

    async def acquire(self, topic: str) -> OwnerRecord | None:
        if self.session is None or not self._fresh():
            return None
        session = self.session
        value = {"node": self.node_id, "address": self.address, "since": time.time()}
        if not await self.api.kv_acquire(self.owner_key(topic), session, value):
            return None  # someone holds it, or lock-delay after a dead owner
        entry = await self.api.kv_get(self.owner_key(topic), consistent=True)
        if entry is None or entry.session != session:
            return None
        record = OwnerRecord(
            topic=topic,
            node_id=self.node_id,
            address=self.address,
            epoch=entry.modify_index,
            since=value["since"],
            holder=session,
        )
        current = self.view.owners.get(topic)
        if current is None or current.epoch <= record.epoch:
            self.view.owners[topic] = record
            await self._notify()
        return record

    async def release(self, topic: str, epoch: int) -> None:
        # Delete only the acquisition we made (cas=epoch): never someone else's.
        # An explicit delete imposes no lock-delay, so a peer takes over at once.
        await self.api.kv_delete(self.owner_key(topic), cas=epoch)
        current = self.view.owners.get(topic)
        if current is not None and current.epoch == epoch and self.holds(current):
            del self.view.owners[topic]
            await self._notify()

    def can_publish(self, topic: str, epoch: int) -> bool:
        owner = self.view.owners.get(topic)
        return self.holds(owner) and owner.epoch == epoch and self._fresh()

    # -- presence -------------------------------------------------------------------

    async def set_presence(self, topic: str, present: bool) -> None:
        if present:
            self._presence.add(topic)
            if self.session is None:
                raise CoordinatorUnavailable("no consul session yet")
            await self._write_presence(topic)
        else:
            self._presence.discard(topic)
            await self.api.kv_delete(self.presence_key(topic))

    async def _write_presence(self, topic: str) -> None:
        assert self.session is not None
        key = self.presence_key(topic)
        if not await self.api.kv_acquire(key, self.session, {"node": self.node_id, "since": time.time()}):
            self._pending.add(key)  # the heartbeat retries it
