"""The node: topics, pollers, presence and ownership, reconciled in one loop.

Subscribing and unsubscribing only change local facts and kick the loop;
the loop compares local facts with the coordinator's view and acts
(acquire, start/stop pollers, follow the owner, release idle topics). Being
level-triggered, it repairs whatever a race or a failed call left behind on
its next pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable

import asyncpg

from .config import Feed, Settings
from .coordinator import Coordinator
from .errors import CoordinatorError, TopicError
from .poller import Poller
from .registry import Receiver, TopicRegistry, TopicState
from .topics import convert_param, parse_topic

__all__ = ["Node", "Follower"]

log = logging.getLogger(__name__)

_TICK = 0.25
_ORPHAN_TAKEOVER_DELAY = 1.0


class Follower:
    """What the node needs from the peer link (set by the cluster layer)."""

    async def follow(self, state: TopicState, owner_address: str, owner_node: str) -> None: ...
    async def unfollow(self, topic: str) -> None: ...
    def following(self, topic: str) -> str | None: ...


class Node:
    def __init__(self, *, settings: Settings, coordinator: Coordinator) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.coordinator = coordinator
        self.registry = TopicRegistry()
        self.pool: asyncpg.Pool | None = None
        self.follower: Follower | None = None
        self.draining = False
        self.failure: str | None = None  # set if the control loops died
        self.started_at = time.time()
        self._pollers: dict[str, tuple[Poller, asyncio.Task]] = {}
        self._presence_written: dict[str, bool] = {}
        self._orphan_since: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._supervisor: asyncio.Task | None = None
        self._db_checked: tuple[float, bool, str] = (0.0, False, "not checked")

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        options = dict(
            max_size=self.settings.database.max_pool,
            server_settings={"application_name": f"subsys:{self.node_id}"},
            init=_init_connection,
        )
        try:
            self.pool = await asyncpg.create_pool(
                self.settings.database.url, min_size=self.settings.database.min_pool, **options
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Serve anyway (not ready): pollers retry with backoff and /health says why.
            log.warning("database unreachable at start (%s); connecting lazily", exc)
            self.pool = await asyncpg.create_pool(self.settings.database.url, min_size=0, **options)
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

    async def handoff(self) -> None:
        """Release every owned topic so peers take over (drain, and first step of shutdown)."""
        self.draining = True
        for topic in list(self._pollers):
            await self._stop_poller(topic, release=True, why="handoff")
        self.kick()

    async def close(self) -> None:
        await self.handoff()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.coordinator.close()
        finally:
            if self.pool is not None:
                await self.pool.close()

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

    def topic_state(self, topic: str) -> TopicState:
        """Get or create the state of a (valid) topic."""
        state = self.registry.get(topic)
        if state is None:
            name, feed, param = self.resolve(topic)
            state = self.registry.add(TopicState(topic=name, feed=feed, param=param))
        return state

    def subscribe(self, receiver: Receiver, topic: str) -> TopicState:
        state = self.topic_state(topic)
        state.local.add(receiver)
        state.empty_since = None
        self.kick()
        return state

    def unsubscribe(self, receiver: Receiver, topic: str) -> None:
        state = self.registry.get(topic)
        if state is None:
            return
        state.local.discard(receiver)
        if not state.local:
            state.empty_since = time.monotonic()
        self.kick()

    def kick(self) -> None:
        self._kick.set()

    # -- reconcile ---------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        seen = -1
        while True:
            self._kick.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(0.5)
            kick = asyncio.ensure_future(self._kick.wait())
            change = asyncio.ensure_future(self.coordinator.wait_changed(seen, _TICK))
            done, pending = await asyncio.wait({kick, change}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if change in done:
                seen = change.result()

    async def reconcile(self) -> None:
        view = self.coordinator.view
        for topic, owner in list(view.owners.items()):
            if self.coordinator.holds(owner) and self.registry.get(topic) is None:
                try:
                    self.topic_state(topic)  # owned but unknown here: adopt, then decide below
                except TopicError:
                    await self.coordinator.release(topic, owner.epoch)
        for state in self.registry:
            try:
                await self._reconcile_topic(state)
            except CoordinatorError as exc:
                log.debug("reconcile deferred topic=%s: %s", state.topic, exc)
            except Exception:
                log.exception("reconcile failed topic=%s", state.topic)

    async def _reconcile_topic(self, state: TopicState) -> None:
        topic, now = state.topic, time.monotonic()
        grace = self.settings.node.grace_period
        await self._sync_presence(topic, bool(state.local))
        owner = self.coordinator.view.owners.get(topic)
        running = self._pollers.get(topic)

        if self.coordinator.holds(owner):
            self._orphan_since.pop(topic, None)
            if self.draining:
                await self._stop_poller(topic, release=True, why="draining")
                return
            if running is None or running[0].epoch != owner.epoch:
                await self._stop_poller(topic, release=False, why="epoch changed")
                if not self.coordinator.can_publish(topic, owner.epoch):
                    return  # ownership not confirmed recently (coordinator unreachable): wait
                self._start_poller(state, owner.epoch)
            state.role, state.owner_node = "owner", self.node_id
            await self._unfollow(topic)
            if state.local or self.coordinator.view.presence.get(topic):
                state.cluster_empty_since = None
            elif state.cluster_empty_since is None:
                state.cluster_empty_since = now
            elif now - state.cluster_empty_since >= grace:
                log.info("no subscribers anywhere for %.1fs: stopping topic=%s", grace, topic)
                await self._stop_poller(topic, release=True, why="idle")
            return

        if running is not None:
            await self._stop_poller(topic, release=False, why="not the owner any more")

        if owner is not None and owner.node_id == self.node_id:
            # Held by a previous session of this node (before a restart or a lost session):
            # Consul deletes it when that session is invalidated; then we acquire anew.
            state.owner_node, state.role = None, "idle"
            await self._unfollow(topic)
            return
        if owner is not None:
            self._orphan_since.pop(topic, None)
            state.owner_node = owner.node_id
            if state.local or (state.empty_since is not None and now - state.empty_since < grace):
                if self.follower is not None:
                    state.role = "follower"
                    await self.follower.follow(state, owner.address, owner.node_id)
            else:
                await self._unfollow(topic)
                state.role = "idle"
        else:
            state.owner_node = None
            await self._unfollow(topic)
            state.role = "idle"
            wanted = bool(state.local)
            elsewhere = bool(self.coordinator.view.presence.get(topic))
            orphan_since = self._orphan_since.setdefault(topic, now)
            if not self.draining and (
                wanted or (elsewhere and now - orphan_since >= _ORPHAN_TAKEOVER_DELAY)
            ):
                state.role = "acquiring"
                record = await self.coordinator.acquire(topic)
                if record is not None and self.coordinator.holds(record):
                    log.info("acquired topic=%s epoch=%d", topic, record.epoch)
                    self._orphan_since.pop(topic, None)
                    state.role, state.owner_node = "owner", self.node_id
                    state.cluster_empty_since = None
                    self._start_poller(state, record.epoch)
                    return

        if (
            not state.local
            and not state.remote
            and topic not in self._pollers
            and state.role == "idle"
            and (state.empty_since is None or now - state.empty_since >= grace)
            and not self._presence_written.get(topic)
        ):
            self.registry.remove(topic)
            self._presence_written.pop(topic, None)
            self._orphan_since.pop(topic, None)

    async def _sync_presence(self, topic: str, present: bool) -> None:
        if self._presence_written.get(topic, False) is present:
            return  # never written counts as absent: no needless delete
        try:
            await self.coordinator.set_presence(topic, present)
        except Exception as exc:
            log.warning("presence write failed topic=%s: %s (will retry)", topic, exc)
            return
        self._presence_written[topic] = present

    def _start_poller(self, state: TopicState, epoch: int) -> None:
        assert self.pool is not None
        state.reset_epoch(epoch)
        poller = Poller(
            state=state,
            pool=self.pool,
            epoch=epoch,
            database=self.settings.database,
            can_publish=self.coordinator.can_publish,
        )
        task = self.spawn(poller.run(), name=f"poller {state.topic}")
        task.add_done_callback(lambda done, topic=state.topic: self._poller_done(topic, done))
        self._pollers[state.topic] = (poller, task)

    def _poller_done(self, topic: str, task: asyncio.Task) -> None:
        current = self._pollers.get(topic)
        if current is not None and current[1] is task:
            del self._pollers[topic]
            self.kick()
        if not task.cancelled() and task.exception() is not None:
            log.error("poller crashed topic=%s", topic, exc_info=task.exception())

    async def _stop_poller(self, topic: str, *, release: bool, why: str) -> None:
        entry = self._pollers.pop(topic, None)
        if entry is not None:
            poller, task = entry
            log.info("stopping poller topic=%s epoch=%d: %s", topic, poller.epoch, why)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        owner = self.coordinator.view.owners.get(topic)
        if release and self.coordinator.holds(owner):
            try:
                await self.coordinator.release(topic, owner.epoch)
            except Exception as exc:
                log.warning("release failed topic=%s: %s", topic, exc)
        state = self.registry.get(topic)
        if state is not None:
            for receiver in list(state.remote):
                receiver.drop_topic(topic)  # followers look for the next owner
            state.remote.clear()
            if state.role == "owner":
                state.role = "idle"
                state.cluster_empty_since = None

    async def _unfollow(self, topic: str) -> None:
        if self.follower is not None and self.follower.following(topic):
            await self.follower.unfollow(topic)

    # -- reading -----------------------------------------------------------

    def running_pollers(self) -> dict[str, int]:
        return {topic: poller.epoch for topic, (poller, _task) in self._pollers.items()}

    async def database_health(self) -> tuple[bool, str]:
        checked_at, ok, detail = self._db_checked
        if time.monotonic() - checked_at < 1.0:
            return ok, detail
        try:
            assert self.pool is not None
            async with self.pool.acquire(timeout=2.0) as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
            ok, detail = True, "ok"
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._db_checked = (time.monotonic(), ok, detail)
        return ok, detail


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb arrive as JSON values, not strings (see subsys.encoding).
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

