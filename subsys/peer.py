"""The peer link: followers stream a topic from its owner node.

One multiplexed WebSocket per (follower, owner) pair at ``/internal/peer``,
authenticated with the cluster secret (``SUBSYS_CLUSTER_SECRET``; constant-
time compare; failures are rejected with 401 and logged). Frames are JSON:

* follower -> owner: ``follow``, ``unfollow``, ``resync`` (each with ``topic``);
* owner -> follower: the same ``snapshot`` / ``diff`` / ``status`` frames
  clients get, and ``not_owner`` when the owner no longer holds the topic.

The follower applies frames to its own ``TopicState`` (so new local clients
get a snapshot at once) and fans them out. It drops frames of an epoch older
than the owner key it has seen: that is the follower half of fencing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import WSMsgType, web

from .appkeys import NODE
from .encoding import dumps
from .node import Follower, Node
from .protocol import Publication
from .registry import TopicState
from ._outbox import Outbox, SendFailed

__all__ = ["PEER_PATH", "setup_peer_link", "PeerLinks", "peer_headers"]

log = logging.getLogger(__name__)

PEER_PATH = "/internal/peer"
PEER_LINKS: web.AppKey["PeerLinks"] = web.AppKey("subsys_peer_links")


def peer_headers(secret: str, node_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "X-Subsys-Node": node_id}


def _authorised(request: web.Request, secret: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or not secret:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())


def setup_peer_link(app: web.Application, node: Node) -> None:
    links = PeerLinks(node=node)
    node.follower = links
    app[PEER_LINKS] = links
    app.router.add_get(PEER_PATH, peer_handler)

    async def _links_ctx(_app: web.Application) -> AsyncIterator[None]:
        yield
        await links.close()

    app.cleanup_ctx.insert(0, _links_ctx)


# -- owner side ------------------------------------------------------------------


class PeerConnection:
    """A follower node's link, seen from the owner: one receiver for many topics."""

    def __init__(self, *, ws: web.WebSocketResponse, node: Node, peer_node: str) -> None:
        self.ws, self.node, self.peer_node = ws, node, peer_node
        limits = node.settings.limits
        self.outbox = Outbox(
            send=ws.send_str,
            current=self._current,
            limit=limits.send_queue * 10,
            send_timeout=limits.send_timeout,
            resync_type=None,
        )

    def _current(self, topic: str) -> tuple[Publication | None, Publication | None]:
        state = self.node.registry.get(topic)
        return state.current() if state is not None else (None, None)

    def deliver(self, publication: Publication) -> None:
        self.outbox.deliver(publication)

    def drop_topic(self, topic: str) -> None:
        """The owner gave the topic up: tell the follower to look again."""
        self.outbox.untrack(topic)
        self.outbox.control(dumps({"type": "not_owner", "topic": topic}))

    def handle(self, frame: dict[str, Any]) -> None:
        kind, topic = frame.get("type"), frame.get("topic")
        if not isinstance(topic, str):
            return
        if kind == "unfollow":
            self._leave(topic)
            return
        if kind not in ("follow", "resync"):
            return
        owner = self.node.coordinator.view.owners.get(topic)
        if not self.node.coordinator.holds(owner) or self.node.draining:
            self.outbox.control(dumps({"type": "not_owner", "topic": topic}))
            return
        try:
            state = self.node.topic_state(topic)
        except Exception:
            self.outbox.control(dumps({"type": "not_owner", "topic": topic}))
            return
        self.outbox.untrack(topic)  # a resync starts the cursor over
        self.outbox.track(topic)
        state.remote.add(self)
        snapshot, status = state.current()
        if status is not None:
            self.outbox.deliver(status)
        if snapshot is not None:
            self.outbox.deliver(snapshot)

    def _leave(self, topic: str) -> None:
        self.outbox.untrack(topic)
        state = self.node.registry.get(topic)
        if state is not None:
            state.remote.discard(self)
            self.node.kick()

    def detach(self) -> None:
        for topic in self.outbox.topics:
            self._leave(topic)
        self.outbox.close()


async def peer_handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    peer_node = request.headers.get("X-Subsys-Node", "?")
    if not _authorised(request, node.settings.cluster_secret):
        log.warning("rejected peer link from %s (node %r): missing or wrong cluster secret", request.remote, peer_node)
        return web.json_response(
            {"error": {"code": "unauthorized", "message": "peer link needs the cluster secret"}}, status=401
        )
    ws = web.WebSocketResponse(heartbeat=5.0, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    conn = PeerConnection(ws=ws, node=node, peer_node=peer_node)
    writer = asyncio.create_task(_run_writer(conn), name=f"peer-writer-{peer_node}")
    log.info("peer link from %s open", peer_node)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    conn.handle(json.loads(msg.data))
                except ValueError:
                    log.warning("malformed peer frame from %s", peer_node)
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        conn.detach()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        log.info("peer link from %s closed", peer_node)
    return ws


async def _run_writer(conn: PeerConnection) -> None:
    """Owned by the link's handler. A stuck follower is cut off: it reconnects and resyncs."""
    try:
        await conn.outbox.run()
    except SendFailed as exc:
        if not conn.ws.closed:
            log.warning("closing peer link from %s: %s", conn.peer_node, exc)
            await conn.ws.close()


# -- follower side ----------------------------------------------------------------


class _Link:
    """This node's connection to one owner; reconnects while it has topics."""

    def __init__(self, *, links: "PeerLinks", address: str) -> None:
        self.links, self.address = links, address
        self.topics: set[str] = set()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.task = links.node.spawn(self._run(), name=f"peer-link {address}")

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self.ws.send_str(dumps(frame))

    async def _run(self) -> None:
        node = self.links.node
        headers = peer_headers(node.settings.cluster_secret, node.node_id)
        backoff = 0.1
        while self.topics:
            try:
                async with self.links.session.ws_connect(
                    self.address + PEER_PATH, headers=headers, heartbeat=5.0, max_msg_size=0
                ) as ws:
                    self.ws, backoff = ws, 0.1
                    for topic in list(self.topics):
                        await self.send({"type": "follow", "topic": topic})
                    async for msg in ws:
                        if msg.type == WSMsgType.TEXT:
                            await self.links.dispatch(self, json.loads(msg.data))
                        elif msg.type == WSMsgType.ERROR:
                            break
            except aiohttp.WSServerHandshakeError as exc:
                log.warning("peer link to %s refused: %s", self.address, exc.status)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                log.debug("peer link to %s failed: %r", self.address, exc)
            finally:
                self.ws = None
            if self.topics:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                node.kick()  # the owner may be gone: let reconcile look at the view


class PeerLinks(Follower):
    def __init__(self, *, node: Node) -> None:
        self.node = node
        self._links: dict[str, _Link] = {}
        self._topics: dict[str, str] = {}  # topic -> owner address
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def following(self, topic: str) -> str | None:
        return self._topics.get(topic)

    async def follow(self, state: TopicState, owner_address: str, owner_node: str) -> None:
        current = self._topics.get(state.topic)
        if current == owner_address:
            return
        if current is not None:
            await self.unfollow(state.topic)
        link = self._links.get(owner_address)
        if link is None or link.task.done():
            link = self._links[owner_address] = _Link(links=self, address=owner_address)
        link.topics.add(state.topic)
        self._topics[state.topic] = owner_address
        log.info("following topic=%s on %s (%s)", state.topic, owner_node, owner_address)
        await link.send({"type": "follow", "topic": state.topic})

    async def unfollow(self, topic: str) -> None:
        address = self._topics.pop(topic, None)
        link = self._links.get(address) if address else None
        if link is None:
            return
        link.topics.discard(topic)
        await link.send({"type": "unfollow", "topic": topic})
        if not link.topics:
            self._links.pop(address, None)
            if link.ws is not None:
                await link.ws.close()
            link.task.cancel()

    async def dispatch(self, link: _Link, frame: dict[str, Any]) -> None:
        topic = frame.get("topic")
        if not isinstance(topic, str) or self._topics.get(topic) != link.address:
            return
        if frame.get("type") == "not_owner":
            self._topics.pop(topic, None)
            link.topics.discard(topic)
            self.node.kick()
            return
        state = self.node.registry.get(topic)
        if state is None:
            return
        owner = self.node.coordinator.view.owners.get(topic)
        epoch = int(frame.get("epoch", 0))
        if owner is not None and epoch < owner.epoch:
            log.debug("dropped a frame of epoch %d < %d topic=%s (fenced)", epoch, owner.epoch, topic)
            return
        if not state.apply_remote(frame) and frame.get("type") == "diff" and epoch >= state.epoch:
            await link.send({"type": "resync", "topic": topic})

    async def close(self) -> None:
        for link in list(self._links.values()):
            link.topics.clear()
            if link.ws is not None:
                await link.ws.close()
            link.task.cancel()
        self._links.clear()
        self._topics.clear()
        if self._session is not None:
            await self._session.close()
