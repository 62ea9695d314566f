"""The Consul coordinator: ownership, presence and membership in Consul KV.

Registration (see docs/cluster.md): each node registers service ``subsys``
with ID ``subsys-<node>`` (re-registered, never duplicated, by a restarted
process: ``replace-existing-checks``) and a TTL check whose ID is unique to
this *process incarnation*. Its one session is bound to that check and
``serfHealth``, ``Behavior=delete``. A killed process stops passing its
check: Consul invalidates the session within the TTL and deletes its keys.
A restarted process replaces the check, which invalidates the dead
incarnation's session at once, and destroys any earlier session of its node
id whose check is not passing anywhere.

Two loops keep it alive, independently:

* the **check loop** passes the TTL check every second. It is a call to the
  local agent only, answered even while the Consul servers have no leader,
  so a leader election never lets the check go critical;
* the **session loop** verifies the session with a ``consistent`` read (it
  needs a leader) and is the only thing that moves ``confirmed_at``. When it
  cannot confirm, the node fences itself (``can_publish`` turns false after
  ``check_ttl - 1 s``) but keeps passing its check, so ownership survives an
  election with nothing worse than a pause in publishing.

Fencing: ``can_publish`` is true only while the view says this session holds
the topic at that epoch *and* the session was confirmed within
``check_ttl - margin`` seconds on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable

from subsys.config import Settings
from subsys.coordinator.base import HANDOFF_HOLD, Coordinator, KeyFact, OwnerRecord, Records, RegistrationFact, Reservation
from subsys.coordinator.consul import keys
from subsys.coordinator.consul.client import ConsulClient, KVEntry, NotFound
from subsys.coordinator.consul.view import apply_listing, read_records, registrations
from subsys.core.errors import CoordinatorError, CoordinatorUnavailable
from subsys.logs import RepeatedLog

__all__ = ["ConsulCoordinator"]

log = logging.getLogger(__name__)

_HEARTBEAT = 1.0
_FENCE_MARGIN = 1.0


class ConsulCoordinator(Coordinator):
    kind = "consul"

    def __init__(self, *, settings: Settings, incarnation: str, version: str = "") -> None:
        super().__init__(node_id=settings.node_id, address=settings.advertise_url, incarnation=incarnation)
        self._cfg = settings.consul
        self._version = version
        self.client = ConsulClient(
            address=settings.consul.address, token=settings.consul_token, datacenter=settings.consul.datacenter
        )
        self.keys = keys.KeyLayout(settings.consul.prefix)
        self.service_id = self.keys.service_id(self.node_id)
        self.check_id = self.keys.check_id(self.node_id, incarnation)
        self.session: str | None = None
        self._confirmed_at = float("-inf")  # monotonic
        self._started = time.time()
        self._presence: set[str] = set()  # topics this node wants presence for
        self._pending: set[str] = set()  # keys this session still has to write
        self._released: dict[str, int] = {}  # topic -> epoch this process deleted (see _apply)
        self._state = "starting"
        self._last_error = ""
        self._closing = False
        self._registered = False  # service and check are on the agent
        self._reregister = asyncio.Event()
        self._repeats = RepeatedLog(log)
        self._draining = False
        self.sessions_reaped = 0  # predecessor sessions this process destroyed

    # -- state -----------------------------------------------------------------

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
            "address": self.client.base,
            "prefix": self.keys.prefix,
            "session": self.session,
            "check": self.check_id,
            "incarnation": self.incarnation,
            "confirmed_ago": round(age, 3) if age != float("inf") else None,
            "last_error": self._last_error or None,
            "requests": dict(self.client.requests),
        }

    def _set_state(self, state: str, error: str) -> None:
        if state != self._state:
            if state == "connected":
                self._repeats.clear("consul-state", "consul: connected")
            else:
                self._repeats.log("consul-state", logging.WARNING, "consul: %s: %s", state, error)
        elif state != "connected":
            self._repeats.log("consul-state", logging.WARNING, "consul: %s: %s", state, error)
        self._state, self._last_error = state, error

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.client.open()
        try:
            await self._register()
            for part in keys.PARTS:
                entries, _index = await self.client.kv_list(self.keys.part(part), consistent=True)
                self._apply(part, entries)
        except CoordinatorError as exc:
            # Start anyway: the loops keep trying, /health says why.
            self._set_state("unreachable" if isinstance(exc, CoordinatorUnavailable) else "error", str(exc))
        await self._notify()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._check_loop(), name="consul-check")
            group.create_task(self._session_loop(), name="consul-session")
            for part in keys.PARTS:
                group.create_task(self._watch_loop(part), name=f"consul-watch-{part}")

    async def close(self) -> None:
        self._closing = True
        try:
            if self.session is not None:
                await self.client.destroy_session(self.session)  # Behavior=delete drops our keys
            await self.client.deregister_service(self.service_id)
            log.info("left the cluster: session destroyed, service %s deregistered", self.service_id)
        except CoordinatorError as exc:
            log.warning("could not leave the cluster cleanly: %s", exc)
        finally:
            self.session = None
            await self.client.close()

    async def _register(self) -> None:
        """(Re)register the service and this incarnation's check, then create a fresh session."""
        ttl = self._cfg.check_ttl
        await self.client.register_service(
            service_id=self.service_id,
            name=keys.SERVICE_NAME,
            meta={"node": self.node_id, "address": self.address, "version": self._version,
                  "incarnation": self.incarnation},  # fmt: skip
            check={
                "CheckID": self.check_id,
                "Name": f"subsys node {self.node_id} heartbeat",
                "TTL": f"{ttl:g}s",
                "DeregisterCriticalServiceAfter": "1m",
            },
        )
        self._registered = True
        await self.client.pass_check(self.check_id)
        await self._reap_predecessors()
        checked_at = time.monotonic()
        self.session = await self.client.create_session(
            name=self.keys.session_name(self.node_id),
            service_checks=[self.check_id],
            node_checks=["serfHealth"],
            lock_delay=self._cfg.lock_delay,
            behavior="delete",
        )
        self._confirmed_at = checked_at
        self._pending = {self.keys.node(self.node_id), *(self.keys.presence(t, self.node_id) for t in self._presence)}
        await self._write_pending()
        self._set_state("connected", "")
        log.info(
            "registered with consul at %s: service %s, check %s, session %s",
            self.client.base, self.service_id, self.check_id, self.session,
        )  # fmt: skip

    async def _reap_predecessors(self) -> None:
        """Destroy sessions an earlier incarnation of this node id left behind.

        A node id is unique in a cluster, so another session of this name
        belongs to a process that is gone, unless its check still passes
        somewhere: then another live process uses this node id (a
        misconfiguration), which is logged and left alone.
        """
        name = self.keys.session_name(self.node_id)
        sessions = [s for s in await self.client.list_sessions() if s.get("Name") == name and s.get("ID") != self.session]
        if not sessions:
            return
        passing = await self._passing_checks()
        for session in sessions:
            checks = [c.get("ID", "") for c in session.get("ServiceChecks") or []] + list(session.get("Checks") or [])
            theirs = [c for c in checks if self.keys.incarnation_of_check(self.node_id, c)]
            alive = [c for c in theirs if c in passing and c != self.check_id]
            if alive:
                log.error(
                    "node id %s is also used by another live process (session %s, check %s passing): "
                    "node ids must be unique in a cluster", self.node_id, session["ID"], alive[0],
                )  # fmt: skip
                continue
            try:
                await self.client.destroy_session(session["ID"])
            except CoordinatorError as exc:
                log.warning("could not destroy session %s of an earlier incarnation: %s", session["ID"], exc)
                continue
            self.sessions_reaped += 1
            log.info("destroyed session %s of an earlier incarnation of node %s", session["ID"], self.node_id)

    async def _passing_checks(self) -> set[str]:
        checks = await self.client.service_checks(keys.SERVICE_NAME)
        return {c["CheckID"] for c in checks if c.get("Status") == "passing"}

    # -- keeping alive -------------------------------------------------------------

    async def _check_loop(self) -> None:
        """Pass the TTL check every second: agent-local, never behind a call that needs a leader."""
        while not self._closing:
            started = time.monotonic()
            if self._registered:
                try:
                    await self.client.pass_check(self.check_id, timeout=_HEARTBEAT * 1.5)
                    self._repeats.clear("check-pass", "consul agent accepts check passes again")
                except NotFound:
                    log.warning("consul agent lost our check %s (agent restarted?): registering again", self.check_id)
                    self._registered = False
                    self._reregister.set()
                except CoordinatorError as exc:
                    self._repeats.log("check-pass", logging.WARNING, "cannot pass check %s: %s", self.check_id, exc)
                except Exception:  # never let this loop die: it is what keeps the session alive
                    log.exception("check pass failed unexpectedly")
            await asyncio.sleep(max(0.0, _HEARTBEAT - (time.monotonic() - started)))

    async def _session_loop(self) -> None:
        """Confirm the session (fencing), re-register when it is gone, retry pending writes."""
        while not self._closing:
            started = time.monotonic()
            try:
                await self._confirm(started)
            except Exception as exc:  # fencing covers the gap; the next pass retries
                if not isinstance(exc, CoordinatorError):
                    log.exception("consul session check failed unexpectedly")
                self._set_state("unreachable" if isinstance(exc, CoordinatorUnavailable) else "error", str(exc))
                if not self._fresh() and self.owned():
                    self._repeats.log(
                        "fenced", logging.WARNING, "ownership no longer confirmed: fencing %d topic(s)", len(self.owned())
                    )
                    await self._notify()
            else:
                self._repeats.clear("fenced")
            delay = _HEARTBEAT - (time.monotonic() - started)
            if delay > 0:
                # asyncio.timeout, not wait_for: on 3.11, wait_for can lose a cancellation that
                # arrives as the wait ends, and this loop would then outlive the node's shutdown.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._reregister.wait()

    async def _confirm(self, started: float) -> None:
        if self.session is None or self._reregister.is_set():
            self._reregister.clear()
            if self.session is not None:
                await self._session_lost("our check is gone from the agent")
            else:
                await self._register()
                await self._notify()
            return
        timeout = max(0.5, self._cfg.check_ttl - _FENCE_MARGIN)
        if await self.client.session_info(self.session, timeout=timeout) is None:
            await self._session_lost("invalidated (check critical, or destroyed)")
            return
        self._confirmed_at = started
        self._set_state("connected", "")
        if self._pending:
            await self._write_pending()

    async def _session_lost(self, why: str) -> None:
        log.warning("session %s lost: %s; registering again", self.session, why)
        self.session = None
        self._confirmed_at = float("-inf")
        await self._notify()  # every ownership is now fenced; the node stops its pollers
        await self._register()
        await self._notify()

    async def _write_pending(self) -> None:
        """Write this session's node record and presence keys; retried each pass.

        A key can refuse us for a moment (the lock-delay of a session that died).
        """
        assert self.session is not None
        for key in sorted(self._pending):
            if key == self.keys.node(self.node_id):
                value: dict[str, Any] = {
                    "node": self.node_id, "address": self.address, "version": self._version,
                    "started": self._started, "incarnation": self.incarnation, "draining": self._draining,
                }  # fmt: skip
            else:
                topic, _node = self.keys.presence_parts(key)
                if topic not in self._presence:
                    self._pending.discard(key)
                    continue
                value = {"node": self.node_id, "since": time.time()}
            if await self.client.kv_acquire(key, self.session, value):
                self._pending.discard(key)

    # -- watching ------------------------------------------------------------------

    async def _watch_loop(self, part: str) -> None:
        """One blocking query per key prefix, as Consul's docs describe."""
        prefix = self.keys.part(part)
        index, backoff = 0, 0.1
        while not self._closing:
            started = time.monotonic()
            try:
                entries, new_index = await self.client.kv_list(prefix, index=max(index, 1), wait=self._cfg.wait)
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
                self._released.clear()  # epochs may repeat after a restore: forget what we released
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
        if part != "owners" or not self._released:
            return apply_listing(self.view, self.keys, part, entries)
        before = self.view.owners
        apply_listing(self.view, self.keys, part, entries)
        # A listing answered between an acquisition and its release can arrive after
        # release() dropped the record from the view: it would put the released key
        # back, held by us, and can_publish() would say yes again until the next
        # listing (a poller could start and publish at an epoch another node may
        # already have superseded). A key deleted at an epoch never comes back with
        # it (a new acquisition has a higher ModifyIndex), so such a record is stale.
        for topic, epoch in list(self._released.items()):
            current = self.view.owners.get(topic)
            if current is not None and current.epoch <= epoch:
                del self.view.owners[topic]
            else:
                # The watch is one sequential loop: this listing was processed after the
                # release, so every later one was asked for after the delete.
                del self._released[topic]
        return self.view.owners != before

    # -- ownership -----------------------------------------------------------------

    async def acquire(self, topic: str, *, reason: str = "") -> OwnerRecord | None:
        if self.session is None or not self._fresh():
            return None
        session = self.session
        value = {
            "node": self.node_id, "address": self.address, "since": time.time(),
            "incarnation": self.incarnation, "reason": reason,
        }  # fmt: skip
        if not await self.client.kv_acquire(self.keys.owner(topic), session, value):
            return None  # someone holds it, or lock-delay after a dead owner
        entry = await self.client.kv_get(self.keys.owner(topic), consistent=True)
        if entry is None or entry.session != session:
            return None
        record = OwnerRecord(
            topic=topic,
            node_id=self.node_id,
            address=self.address,
            epoch=entry.modify_index,
            since=value["since"],
            holder=session,
            incarnation=self.incarnation,
            reason=reason,
        )
        current = self.view.owners.get(topic)
        if current is None or current.epoch <= record.epoch:
            self.view.owners[topic] = record
            await self._notify()
        return record

    async def release(self, topic: str, epoch: int, *, to: str | None = None, reason: str = "") -> bool:
        # Only the acquisition we made (checked at index=epoch): never someone else's.
        # An explicit release imposes no lock-delay, so a peer takes over at once.
        key = self.keys.owner(topic)
        if to is None:
            done = await self.client.kv_delete(key, cas=epoch)
        elif self.session is None:
            return False
        else:
            reserved = {
                "node": self.node_id, "reserved_for": to, "until": time.time() + HANDOFF_HOLD,
                "reason": reason, "from_epoch": epoch,
            }  # fmt: skip
            done = await self.client.kv_release_at(key, session=self.session, index=epoch, value=reserved)
        if done:
            self._released[topic] = max(epoch, self._released.get(topic, 0))
            if to is not None:
                # Known here before the watch says so: this node's own reconcile must not take
                # straight back what it has just handed over.
                self.view.reservations[topic] = Reservation(
                    topic=topic, for_node=to, until=reserved["until"], reason=reason,
                    from_node=self.node_id, from_epoch=epoch,
                )  # fmt: skip
        current = self.view.owners.get(topic)
        if done and current is not None and current.epoch == epoch and self.holds(current):
            del self.view.owners[topic]
            await self._notify()
        return done

    async def set_draining(self, draining: bool) -> None:
        self._draining = draining
        self._pending.add(self.keys.node(self.node_id))
        if self.session is not None:
            await self._write_pending()

    def can_publish(self, topic: str, epoch: int) -> bool:
        owner = self.view.owners.get(topic)
        return self.holds(owner) and owner.epoch == epoch and self._fresh()

    # -- zombies ------------------------------------------------------------------------

    async def records(self) -> Records:
        return await read_records(self.client, self.keys)

    async def local_registrations(self) -> list[RegistrationFact]:
        return await registrations(self.client, self.keys)

    async def destroy_session_if(self, session: str, *, still_dead: Callable[[dict[str, Any], dict[str, str]], bool]) -> bool:
        info = await self.client.session_info(session)
        if info is None:
            return False  # gone already: nothing to do
        status = {c["CheckID"]: c.get("Status", "") for c in await self.client.service_checks(keys.SERVICE_NAME)}
        if not still_dead(info, status):
            return False
        await self.client.destroy_session(session)
        return True

    async def delete_key_at(self, fact: KeyFact) -> bool:
        key = {"owner": self.keys.owner(fact.topic), "presence": self.keys.presence(fact.topic, fact.node),
               "node": self.keys.node(fact.node)}[fact.kind]  # fmt: skip
        return await self.client.kv_delete(key, cas=fact.index)

    async def deregister_if(self, service_id: str, *, still_dead: Callable[[RegistrationFact], bool]) -> bool:
        current = {r.service_id: r for r in await registrations(self.client, self.keys)}.get(service_id)
        if current is None or not still_dead(current):
            return False
        await self.client.deregister_service(service_id)
        return True

    # -- presence -------------------------------------------------------------------

    async def set_presence(self, topic: str, present: bool) -> None:
        key = self.keys.presence(topic, self.node_id)
        if present:
            self._presence.add(topic)
            if self.session is None:
                raise CoordinatorUnavailable("no consul session yet")
            if not await self.client.kv_acquire(key, self.session, {"node": self.node_id, "since": time.time()}):
                self._pending.add(key)  # the session loop retries it
        else:
            self._presence.discard(topic)
            self._pending.discard(key)
            await self.client.kv_delete(key)
