"""The adapter between the console's UI and the cluster.

It owns the :class:`~subsys.client.admin.AdminClient` (requests, and the SSE
event stream resumed with its cursor after a reconnect) and the console's own
WebSocket subscriptions (:mod:`subsys.client.ws`) for the live rows of a topic.
It never touches a widget: it keeps state and *posts messages* to the app
(:mod:`.messages`), so the UI stays free of aiohttp and of waiting.

Connection loss is normal operation here: every loop retries (trying each
URL in the order given, which AdminClient does for us) and says so with a
:class:`~.messages.Lost` message; nothing it raises reaches the app's loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
from textual.message import Message

from subsys.client import ws
from subsys.client.admin import AdminClient, AdminError, Unauthorized, Unreachable
from subsys.core import admin as api

from .messages import AuthFailed, ClusterChanged, Connected, EventsArrived, Lost, RowsChanged

__all__ = ["Backend", "LiveTopic", "AdminError"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Generous: with 10,000 topics a node takes seconds to answer /topics (it gathers every node's
# facts); a slow answer is not a lost node (the event stream tells that within a second).
REQUEST_TIMEOUT = 20.0
RETRY_FIRST, RETRY_MAX = 0.25, 2.0
EVENT_LOG = 2000
HIGHLIGHT_SECONDS = 2.0


class LiveTopic:
    """One topic's rows as the console's own subscription sees them, with what changed when."""

    def __init__(self, topic: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.topic = topic
        self.view = ws.TopicView()
        self.clock = clock
        self.changed: dict[str, float] = {}  # row key -> when it last changed (for the highlight)
        self.state = "connecting"  # connecting | live | stale | reconnecting | error
        self.error: str | None = None
        self.frames = 0
        self.last_kind: str | None = None
        self.had_data = False

    def apply(self, frame: dict[str, Any]) -> bool:
        """Apply one frame; False when a diff does not follow on (the caller resubscribes)."""
        kind = frame.get("type")
        now = self.clock()
        self.frames += 1
        if kind in ("snapshot", "resync"):
            before = dict(self.view.rows)
            self.view.apply(frame)
            if self.had_data:  # a later snapshot (recovery, resync): highlight what differs
                for key, row in self.view.rows.items():
                    if before.get(key) != row:
                        self.changed[key] = now
            self.had_data = True
            self.state, self.error = "live", None
        elif kind == "diff":
            view = self.view
            if frame.get("epoch") != view.epoch or frame.get("seq") != view.seq + 1:
                return False
            view.apply(frame)
            for row in frame["inserted"] + frame["updated"]:
                self.changed[view._key(row)] = now
            for key_obj in frame["deleted"]:
                self.changed.pop(json.dumps([key_obj[k] for k in view.key]), None)
            self.state, self.error = "live", None
        elif kind == "status":
            self.view.apply(frame)
            if frame.get("state") == "error":
                # The rows stay valid but stale: the poller keeps retrying (protocol.md, status).
                self.state, self.error = "stale", f"{frame.get('code')}: {frame.get('message')}"
            else:
                self.state, self.error = "live", None
        elif kind == "error":
            self.state, self.error = "error", f"{frame.get('code')}: {frame.get('message')}"
        self.last_kind = kind
        return True

    def highlighted(self) -> set[str]:
        cutoff = self.clock() - HIGHLIGHT_SECONDS
        for key in [k for k, at in self.changed.items() if at < cutoff]:
            del self.changed[key]
        return set(self.changed)


class Backend:
    def __init__(
        self,
        urls: list[str],
        token: str,
        post: Callable[[Message], Any],
        *,
        connect: Callable[..., Any] = ws.connect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.admin = AdminClient(urls, token=token, timeout=REQUEST_TIMEOUT)
        self.post = post
        self._connect = connect
        self._client_ws: str | None = None  # learnt behind a separate admin listener (ws_url)
        self.clock = clock
        self.node: str | None = None  # the node the console is talking to
        self.url = self.admin.url
        self.connected = False
        self.whoami: api.WhoAmI | None = None
        self.cursor: str | None = None
        self.log: collections.deque[api.Event] = collections.deque(maxlen=EVENT_LOG)
        self.owners: dict[str, dict[str, Any]] = {}
        self.presence: dict[str, list[str]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.live: dict[str, LiveTopic] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()

    @property
    def urls(self) -> list[str]:
        return list(self.admin.urls)

    def start(self) -> None:
        self._spawn(self._follow_events(), "subsys console: events")

    async def close(self) -> None:
        tasks = [*self._tasks, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.admin.close()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connection state -------------------------------------------------------------

    def _set_connected(self, me: api.WhoAmI) -> None:
        changed = not self.connected or self.node != me.node or self.url != self.admin.url
        self.whoami, self.node, self.url, self.connected = me, me.node, self.admin.url, True
        if changed:
            self._note("console", f"connected to {me.node} at {self.url} ({me.role})")
            self.post(Connected(node=me.node, url=self.url, role=me.role, read_only=me.read_only))

    def _set_lost(self, reason: str) -> None:
        if self.connected:
            self._note("console", f"lost {self.node or self.url}: {reason}")
        self.connected = False
        self.post(Lost(node=self.node, url=self.url, reason=reason))

    def _note(self, kind: str, message: str) -> None:
        """The console's own happenings go into the event log beside the cluster's."""
        self.log.append(api.Event(id="", type=kind, at=time.time(), data={"message": message}))
        self.post(EventsArrived())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """One admin request; an unreachable cluster also flips the console to "lost"."""
        try:
            result = await fn(*args, **kwargs)
        except Unreachable as exc:
            self._set_lost(exc.message)
            raise
        if not self.connected and self.whoami is not None and self.admin.url == self.url:
            self._set_connected(self.whoami)  # the same node answers again before the stream noticed
        return result

    # -- the API, as the screens use it ----------------------------------------------------

    async def cluster(self) -> api.ClusterSummary:
        return await self.call(self.admin.cluster)

    async def node_list(self) -> api.NodeList:
        return await self.call(self.admin.nodes)

    async def topics(self, **query: Any) -> api.TopicPage:
        return await self.call(self.admin.topics, **query)

    async def topic(self, name: str) -> api.TopicDetail:
        return await self.call(self.admin.topic, name)

    async def failover(self, topic: str, to: str | None = None) -> api.FailoverResult:
        return await self.call(self.admin.failover, topic, to=to)

    async def drain(self, node: str) -> api.DrainResult:
        return await self.call(self.admin.drain, node)

    async def undrain(self, node: str) -> api.DrainResult:
        return await self.call(self.admin.undrain, node)

    async def zombies(self) -> api.ZombieList:
        """A scan on the node: ~0.1 s after a recent one, 1-2 s otherwise (it scans twice to confirm)."""
        return await self.call(self.admin.zombies)

    async def reap(self, ids: list[str], *, dry_run: bool = False) -> api.ReapResult:
        return await self.call(self.admin.reap, ids=ids, dry_run=dry_run)

    # -- the event stream ---------------------------------------------------------------------

    async def _follow_events(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                me = await self.admin.whoami()  # tries every URL in order until one answers
                self._set_connected(me)
                delay = RETRY_FIRST
                async for event in self.admin.events(cursor=self.cursor):
                    self._on_event(event)
                raise Unreachable(f"{self.url} closed the event stream", code="unreachable")
            except asyncio.CancelledError:
                raise
            except Unauthorized as exc:
                self.connected = False
                self.post(AuthFailed(url=self.admin.url, reason=exc.message))
                await asyncio.sleep(5.0)
                continue
            except AdminError as exc:
                self._set_lost(exc.message)
            except Exception as exc:  # a torn stream surfaces as whatever aiohttp raises: still "lost"
                self._set_lost(repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _on_event(self, event: api.Event) -> None:
        if event.id:
            self.cursor = event.id
        data = event.data
        if event.type == "snapshot":
            self.owners = dict(data.get("owners") or {})
            self.presence = dict(data.get("presence") or {})
            self.nodes = dict(data.get("nodes") or {})
        elif event.type == "owner":
            if data.get("to"):
                self.owners[data["topic"]] = data["to"]
            else:
                self.owners.pop(data.get("topic", ""), None)
            self.log.append(event)
        elif event.type == "presence":
            if data.get("nodes"):
                self.presence[data["topic"]] = data["nodes"]
            else:
                self.presence.pop(data.get("topic", ""), None)
            self.log.append(event)
        elif event.type == "node":
            if data.get("after"):
                self.nodes[data["node"]] = data["after"]
            else:
                self.nodes.pop(data.get("node", ""), None)
            self.log.append(event)
        else:
            self.log.append(event)
        self.post(ClusterChanged())
        if event.type != "snapshot":
            self.post(EventsArrived())

    # -- live rows ------------------------------------------------------------------------------

    def ws_url(self) -> str:
        """Where the console subscribes like a client: the admin URL's node, on its client port.

        Usually the admin API and /ws share that port. Behind a separate admin listener
        (``node.admin_port``) /ws is refused there (404): then the node's own address, as
        its peers reach it (learnt by :meth:`_client_address`), is the client port.
        """
        return self._client_ws or ws.ws_url(self.admin.url)

    async def _client_address(self) -> None:
        """After a 404 on the admin URL's /ws: use the answering node's advertised address."""
        nodes = await self.admin.nodes()
        mine = next((n for n in nodes.nodes if n.node == nodes.answered_by), None)
        if mine is not None and mine.address:
            self._client_ws = ws.ws_url(mine.address)

    def watch(self, topic: str) -> LiveTopic:
        """Subscribe to ``topic`` like any client (it counts as a subscriber) until :meth:`unwatch`."""
        live = self.live.get(topic)
        if live is None:
            live = self.live[topic] = LiveTopic(topic, self.clock)
            self._watchers[topic] = self._spawn(self._watch(live), f"subsys console: rows of {topic}")
        return live

    def unwatch(self, topic: str) -> None:
        self.live.pop(topic, None)
        task = self._watchers.pop(topic, None)
        if task is not None:
            task.cancel()

    async def _watch(self, live: LiveTopic) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                async with self._connect(self.ws_url(), timeout=REQUEST_TIMEOUT) as client:
                    async for frame in client.subscribe(live.topic):
                        if not live.apply(frame):
                            live.error = f"diff out of order at seq {frame.get('seq')}: resubscribing"
                            break  # protocol.md §4: unsubscribe and subscribe again
                        delay = RETRY_FIRST
                        self.post(RowsChanged(live.topic))
            except asyncio.CancelledError:
                raise
            except aiohttp.WSServerHandshakeError as exc:
                live.error = f"connection: {exc!r}"
                if exc.status == 404 and self._client_ws is None:
                    with contextlib.suppress(AdminError):
                        await self._client_address()
                    if self._client_ws is not None:
                        continue  # at once, through the client port
            except Exception as exc:
                live.error = f"connection: {exc!r}"
                self._client_ws = None  # that node may be gone: learn again from the admin URL in use
            if live.state != "error":
                live.state = "reconnecting"
            self.post(RowsChanged(live.topic))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
