"""The node: executes reconcile decisions for every topic it knows.

Subscribing and unsubscribing only change local facts and kick the loop;
the loop asks :func:`subsys.node.reconcile.decide` what to do about each
topic given the coordinator's view, and does it (write presence, acquire,
start or stop pollers, follow the owner, release idle topics). Being
level-triggered, it repairs whatever a race or a failed call left behind on
its next pass. Topic facts live in the topic's stream; the read-only view
for the admin API is :mod:`subsys.node.inspect`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Protocol

from subsys.config import Feed, Settings
from subsys.coordinator.base import Coordinator, OwnerRecord
from subsys.core.errors import CoordinatorError, FencedError, TopicError
from subsys.core.topics import convert_param, parse_topic
from subsys.node import reconcile
from subsys.node.database import Database
from subsys.node.pollers import PollerSet
from subsys.node.stream import Receiver, TopicRegistry, TopicStream

__all__ = ["Node", "Follower"]

log = logging.getLogger(__name__)

_TICK = 0.25
# Timed passes skip steady topics; a full pass decides all of them at least this often anyway
# (events already trigger one: this bounds what a missed event could cost).
_FULL_PASS_EVERY = 5.0
_ORPHAN_TAKEOVER_DELAY = 1.0


class Follower(Protocol):
    """What the node needs from the peer link (set by the web layer in a cluster)."""

    async def follow(self, stream: TopicStream, owner: OwnerRecord) -> None: ...
    async def unfollow(self, topic: str) -> None: ...
    def following(self, topic: str) -> str | None: ...
    def describe(self) -> dict[str, Any]: ...


class Node:
    def __init__(self, *, settings: Settings, coordinator: Coordinator, incarnation: str) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.incarnation = incarnation
        self.coordinator = coordinator
        self.registry = TopicRegistry()
        self.database = Database(config=settings.database, application_name=f"subsys:{self.node_id}")
        self.follower: Follower | None = None
        self.clients: set[Any] = set()  # client connections (the web layer adds and removes them)
        self.draining = False
        self.shutting_down = False
        self.failure: str | None = None  # set if the control loops died
        self.started = time.time()
        self._timing = reconcile.Timing(grace=settings.node.grace_period, orphan_delay=_ORPHAN_TAKEOVER_DELAY)
        self._tasks: set[asyncio.Task] = set()
        # What this node polls, merged per feed or per topic, and its stuck database calls.
        self.pollers = PollerSet(settings=settings, database=self.database, can_publish=coordinator.can_publish,
                                 spawn=self.spawn, kick=self.kick)  # fmt: skip
        self._acquire_reasons: dict[str, str] = {}  # an operator's reason for the next acquisition
        self._acquire_retry: dict[str, float] = {}  # topic -> the delay before the next attempt
        self._kick = asyncio.Event()
        # One actor at a time on ownership: a reconcile pass, a handoff, a forced hand-over.
        self._acting = asyncio.Lock()
        self._steady: set[str] = set()  # topics a timed pass skips (reconcile.steady), until the next full pass
        self._supervisor: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await self.database.open()
        await self.pollers.start()  # says how each feed is polled, and why not merged
        await self.coordinator.start()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"node-{self.node_id}")

    async def _supervise(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.coordinator.run(), name="coordinator")
                group.create_task(self._reconcile_loop(), name="reconcile")
        except Exception as exc:  # a bug: say so loudly, and stop claiming readiness
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("node control loops failed; the node is not ready", exc_info=True)

    async def handoff(self, *, why: str = "handoff") -> int:
        """Hand every owned topic to another node (drain, and the first step of shutdown).

        Each topic is released *for* a chosen node (one with subscribers to it
        if there is one), so it lands there at once instead of being raced for.
        """
        self.draining = True
        try:
            await self.coordinator.set_draining(True)
        except CoordinatorError as exc:
            log.warning("could not announce the drain: %s", exc)
        moved = 0
        async with self._acting:
            for topic, owner in list(self.coordinator.owned().items()):
                target = self.handoff_target(topic)
                if await self._hand_over(topic, owner.epoch, to=target, reason=why):
                    moved += 1
            for topic in list(self.pollers.running()):  # anything still polling without a key (fenced, lost)
                await self._stop_poller(topic, release=False, why=why)
        self.kick()
        return moved

    async def undrain(self) -> None:
        self.draining = False
        try:
            await self.coordinator.set_draining(False)
        except CoordinatorError as exc:
            log.warning("could not announce the end of the drain: %s", exc)
        self.kick()

    def handoff_target(self, topic: str, *, exclude: frozenset[str] = frozenset()) -> str | None:
        """Where a topic should go: a node with subscribers to it, else the least loaded live node."""
        view = self.coordinator.view
        excluded = {self.node_id, *exclude}
        eligible = [n for n, rec in view.nodes.items() if n not in excluded and not rec.draining]
        wanting = sorted(n for n in view.presence.get(topic, set()) if n in eligible)
        if wanting:
            return wanting[0]
        if not eligible:
            return None
        load = {n: 0 for n in eligible}
        for record in view.owners.values():
            if record.node_id in load:
                load[record.node_id] += 1
        return min(sorted(load), key=load.__getitem__)

    async def hand_over(self, topic: str, epoch: int, *, to: str | None, reason: str) -> bool:
        """Stop polling ``topic`` and release it (at ``epoch`` only), kept for node ``to`` if given."""
        async with self._acting:
            return await self._hand_over(topic, epoch, to=to, reason=reason)

    async def _hand_over(self, topic: str, epoch: int, *, to: str | None, reason: str) -> bool:
        stream = self.registry.get(topic)
        if self.pollers.epoch_of(topic) is not None:
            log.info("handing over topic=%s epoch=%d to %s: %s", topic, epoch, to or "anyone", reason)
            await self.pollers.stop(topic)
        try:
            released = await self.coordinator.release(topic, epoch, to=to, reason=reason)
        except CoordinatorError as exc:
            log.warning("release failed topic=%s: %s", topic, exc)
            released = False
        if not released:
            log.warning("could not release topic=%s at epoch %d (the key changed meanwhile)", topic, epoch)
        if stream is not None:
            if released:
                stream.record("released", node=self.node_id, epoch=epoch, reason=reason, to=to)
            self._drop_followers(stream, reason)
        self.kick()
        return released

    async def close(self) -> None:
        self.shutting_down = True
        if self.coordinator.owned() or self.pollers.running():
            await self.handoff(why="shutdown")
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.coordinator.close()
        finally:
            await self.database.close()

    def spawn(self, coro: Awaitable[Any], *, name: str) -> asyncio.Task:
        """Run a background task owned by the node (cancelled and awaited on close)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- topics ------------------------------------------------------------

    def resolve(self, topic: str) -> tuple[str, Feed, Any]:
        parsed = parse_topic(topic)
        feed = self.settings.feeds.get(parsed.feed)
        if feed is None:
            raise TopicError(f"unknown feed {parsed.feed!r}", code="unknown_feed")
        return str(parsed), feed, convert_param(parsed.param, feed.param)

    def stream(self, topic: str) -> TopicStream:
        """Get or open the stream of a (valid) topic."""
        stream = self.registry.get(topic)
        if stream is None:
            name, feed, param = self.resolve(topic)
            stream = self.registry.open(name, feed, param)
        return stream

    def subscribe(self, receiver: Receiver, topic: str) -> TopicStream:
        stream = self.stream(topic)
        stream.local.add(receiver)
        stream.empty_since = None
        self.kick()
        return stream

    def unsubscribe(self, receiver: Receiver, topic: str) -> None:
        stream = self.registry.get(topic)
        if stream is None:
            return
        stream.local.discard(receiver)
        if not stream.local:
            stream.empty_since = time.monotonic()
        self.kick()

    def kick(self) -> None:
        self._kick.set()

    def want_acquire(self, topic: str, reason: str) -> None:
        """An operator asked for this node to take ``topic``: record why, for the next acquisition."""
        self._acquire_reasons[topic] = reason
        self.stream(topic)
        self.kick()

    # -- reconcile ---------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        seen = -1
        full, last_full = True, 0.0
        while True:
            self._kick.clear()
            if time.monotonic() - last_full >= _FULL_PASS_EVERY:
                full = True
            try:
                await self.reconcile(full=full)
                if full:
                    last_full = time.monotonic()
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(0.5)
            kick = asyncio.ensure_future(self._kick.wait())
            change = asyncio.ensure_future(self.coordinator.wait_changed(seen, _TICK))
            done, pending = set(), {kick, change}
            try:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Cancelled here (the node stops), the waits must end too: a task left pending on
                # the node's event is destroyed pending when the node is collected, and logs so.
                for task in pending:
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            full = kick in done
            if change in done:
                full = full or change.result() != seen
                seen = change.result()

    async def reconcile(self, *, full: bool = True) -> None:
        """Decide every topic again (``full``), or only those in transition (a timed pass)."""
        async with self._acting:
            await self._reconcile(full)

    async def _reconcile(self, full: bool = True) -> None:
        view = self.coordinator.view
        for topic, owner in list(view.owners.items()):
            if self.coordinator.holds(owner) and self.registry.get(topic) is None:
                try:
                    self.stream(topic)  # owned but unknown here: adopt, then decide below
                except TopicError:
                    await self.coordinator.release(topic, owner.epoch)
        # Topics this node may have to take without a subscriber of its own: handed over to
        # it, or wanted elsewhere with no owner (say, their only node is draining).
        now = time.time()
        adopt = {t for t, r in view.reservations.items() if r.for_node == self.node_id and r.active(now)}
        if not self.draining:
            adopt |= {t for t, nodes in view.presence.items() if t not in view.owners and nodes - {self.node_id}}
        for topic in adopt:
            if self.registry.get(topic) is None:
                try:
                    self.stream(topic)
                except TopicError:
                    log.debug("not adopting %s: not a topic of this node's feeds", topic)
        if full:
            self._steady.clear()
        for stream in self.registry:
            if stream.topic in self._steady:
                continue
            try:
                await self.reconcile_topic(stream)
            except CoordinatorError as exc:
                log.debug("reconcile deferred topic=%s: %s", stream.topic, exc)
            except Exception:
                log.exception("reconcile failed topic=%s", stream.topic)

    def facts(self, stream: TopicStream) -> tuple[reconcile.TopicFacts, reconcile.ClusterFacts]:
        topic = stream.topic
        owner = self.coordinator.view.owners.get(topic)
        holds = self.coordinator.holds(owner)
        present = self.coordinator.view.presence.get(topic, set())
        facts = reconcile.TopicFacts(
            local=bool(stream.local),
            followers=bool(stream.remote),
            polling_epoch=self.pollers.epoch_of(topic),
            following=self.follower.following(topic) if self.follower is not None else None,
            presence_written=stream.presence_written,
            empty_since=stream.empty_since,
            cluster_empty_since=stream.cluster_empty_since,
            orphan_since=stream.orphan_since,
        )
        cluster = reconcile.ClusterFacts(
            node_id=self.node_id,
            owner=owner,
            holds=holds,
            can_publish=holds and owner is not None and self.coordinator.can_publish(topic, owner.epoch),
            presence_elsewhere=bool(present - {self.node_id}),
            draining=self.draining,
            reserved_for=self._reserved_for(topic),
        )
        return facts, cluster

    def _reserved_for(self, topic: str) -> str | None:
        reservation = self.coordinator.view.reservations.get(topic)
        if reservation is None or not reservation.active(time.time()):
            return None
        return reservation.for_node

    async def reconcile_topic(self, stream: TopicStream) -> None:
        for _attempt in range(2):  # a second pass right after a successful acquisition starts the poller
            facts, cluster = self.facts(stream)
            if stream.epoch and (cluster.owner is None or cluster.owner.epoch != stream.epoch):
                stream.epoch_ended(stream.epoch)
            decision = reconcile.decide(facts, cluster, time.monotonic(), self._timing)
            stream.role, stream.owner_node = decision.role, decision.owner_node
            if decision.owner_node is not None:
                stream.last_owner = decision.owner_node
            stream.cluster_empty_since, stream.orphan_since = decision.cluster_empty_since, decision.orphan_since
            if reconcile.steady(facts, cluster, decision) and (
                decision.role == "owner" or (self.follower is not None and self.follower.follows(stream.topic, cluster.owner))
            ):
                self._steady.add(stream.topic)
            acquired = False
            for action in decision.actions:
                acquired = await self._execute(stream, action, cluster) or acquired
            if not acquired:
                return

    async def _execute(self, stream: TopicStream, action: reconcile.Action, cluster: reconcile.ClusterFacts) -> bool:
        """Do one action; True if it acquired the topic (the decision is then taken again)."""
        topic = stream.topic
        if isinstance(action, reconcile.SetPresence):
            try:
                await self.coordinator.set_presence(topic, action.present)
            except CoordinatorError as exc:
                log.debug("presence write deferred topic=%s: %s", topic, exc)
            else:
                stream.presence_written = action.present
        elif isinstance(action, reconcile.StopPoller):
            owner = cluster.owner
            if action.release and cluster.draining and owner is not None and cluster.holds:
                # Draining: hand it to a chosen node rather than leave it to a race.
                await self._hand_over(topic, owner.epoch, to=self.handoff_target(topic), reason=action.why)
            else:
                await self._stop_poller(topic, release=action.release, why=action.why)
        elif isinstance(action, reconcile.StartPoller):
            self._start_poller(stream, action.epoch)
        elif isinstance(action, reconcile.DropFollowers):
            self._drop_followers(stream, action.why)
        elif isinstance(action, reconcile.Acquire):
            reservation = self.coordinator.view.reservations.get(topic)
            if cluster.reserved_for == self.node_id and reservation is not None:
                why = reservation.reason or action.why
                reason = f"{why} (from {reservation.from_node})" if reservation.from_node else why
            else:
                reason = self._acquire_reasons.pop(topic, None) or self._acquire_reason(action.why, stream)
            record = await self.coordinator.acquire(topic, reason=reason)
            if record is not None and self.coordinator.holds(record):
                log.info("acquired topic=%s epoch=%d (%s)", topic, record.epoch, reason)
                stream.record("acquired", node=self.node_id, epoch=record.epoch, reason=reason)
                self._acquire_retry.pop(topic, None)
                return True
            # Refused: held meanwhile, or the lock-delay after a dead owner. Try again soon
            # (sooner than the reconcile tick): the lock-delay ends at a time we cannot see.
            delay = min(self._acquire_retry.get(topic, 0.025) * 2, _TICK)
            self._acquire_retry[topic] = delay
            asyncio.get_running_loop().call_later(delay, self.kick)
        elif isinstance(action, reconcile.Follow):
            if self.follower is not None:
                await self.follower.follow(stream, action.owner)
        elif isinstance(action, reconcile.Unfollow):
            if self.follower is not None:
                await self.follower.unfollow(topic)
        elif isinstance(action, reconcile.Forget):
            self.registry.remove(topic)
            self._acquire_reasons.pop(topic, None)
            self._acquire_retry.pop(topic, None)
        return False

    def _acquire_reason(self, why: str, stream: TopicStream) -> str:
        """Name the previous owner when there was one: a takeover, not a first acquisition."""
        if stream.last_owner and stream.last_owner != self.node_id:
            return f"owner gone (was {stream.last_owner})"
        return why

    def _start_poller(self, stream: TopicStream, epoch: int) -> None:
        try:
            stream.begin_epoch(epoch)
        except FencedError as exc:
            log.warning("not polling: %s", exc)
            return
        self.pollers.start_topic(stream, epoch)

    async def _stop_poller(self, topic: str, *, release: bool, why: str) -> None:
        stream = self.registry.get(topic)
        polled = self.pollers.epoch_of(topic)
        if polled is not None:
            log.info("stopping poller topic=%s epoch=%d: %s", topic, polled, why)
            await self.pollers.stop(topic)
        owner = self.coordinator.view.owners.get(topic)
        if release and self.coordinator.holds(owner):
            try:
                released = await self.coordinator.release(topic, owner.epoch, reason=why)
            except CoordinatorError as exc:
                log.warning("release failed topic=%s: %s", topic, exc)
            else:
                if released and stream is not None:
                    stream.record("released", node=self.node_id, epoch=owner.epoch, reason=why)
        elif polled is not None and stream is not None:
            stream.record("stopped", node=self.node_id, epoch=polled, reason=why)

    async def reap_poller(self, topic: str, epoch: int) -> bool:
        """Stop a poller the zombie scan found, if it still does not hold the key at its epoch."""
        owner = self.coordinator.view.owners.get(topic)
        if self.pollers.epoch_of(topic) != epoch:
            return False
        if self.coordinator.holds(owner) and owner is not None and owner.epoch == epoch:
            return False  # it is the rightful poller (the evidence no longer holds)
        return await self.pollers.force_stop(topic, epoch)

    async def reap_query(self, query_id: str) -> bool:
        """End a stuck database call the zombie scan found (terminates its connection)."""
        return await self.pollers.reap_query(query_id)

    async def release_idle(self, topic: str, epoch: int) -> bool:
        """Release a topic the zombie scan found idle, if it still is: held at ``epoch``, wanted nowhere."""
        owner = self.coordinator.view.owners.get(topic)
        stream = self.registry.get(topic)
        if not self.coordinator.holds(owner) or owner is None or owner.epoch != epoch:
            return False
        if self.coordinator.view.presence.get(topic) or (stream is not None and stream.local):
            return False
        return await self.hand_over(topic, epoch, to=None, reason="reaped: idle owner")

    def stuck_queries(self) -> list[dict[str, Any]]:
        """Database calls that did not end when they should have (zombies until reaped)."""
        return self.pollers.stuck()

    def _drop_followers(self, stream: TopicStream, why: str) -> None:
        if stream.remote:
            log.info("dropping %d follower(s) topic=%s: %s", len(stream.remote), stream.topic, why)
        for receiver in list(stream.remote):
            receiver.drop_topic(stream.topic)  # followers look for the next owner
        stream.remote.clear()

    # -- reading -----------------------------------------------------------

    def running_pollers(self) -> dict[str, int]:
        """Topic -> epoch of every topic this node polls (merged or alone)."""
        return self.pollers.running()

    async def database_health(self) -> tuple[bool, str]:
        return await self.database.health()
