"""The peer link: followers stream a topic from its owner node.

One multiplexed WebSocket per (follower, owner) pair at ``/internal/peer``,
authenticated with the cluster secret (``SUBSYS_CLUSTER_SECRET``; constant-
time compare; failures are rejected with 401 and logged). Frames are JSON:

* follower -> owner: ``follow``, ``unfollow``, ``resync`` (each with ``topic``);
* owner -> follower: the same ``snapshot`` / ``diff`` / ``status`` frames
  clients get, and ``not_owner`` when the owner does not serve the topic.

The follower applies frames to its own stream (so new local clients get a
snapshot at once) and fans them out. It drops frames of an epoch older than
the owner key it has seen: that is the follower half of fencing.

An owner that answers ``not_owner`` for a topic it holds (a stale key, or an
owner fenced while Consul is away) is asked again with exponential backoff
and jitter, not in a loop; the condition is logged once per owner with a
count. A new owner record (another node or epoch) is followed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import WSMsgType, web

from subsys.coordinator.base import OwnerRecord
from subsys.core.encoding import dumps
from subsys.core.protocol import Publication
from subsys.logs import RepeatedLog
from subsys.node.node import Node
from subsys.node.stream import TopicStream
from subsys.web.appkeys import NODE, PEERS
from subsys.web._net import authorised, departed, on_admin_listener, open_websocket, peer_headers, refuses
from subsys.web.outbox import Outbox, SendFailed
from subsys.web.ws import send_text

__all__ = ["PEER_PATH", "setup_peer_link", "PeerLinks", "peer_headers", "authorised"]

log = logging.getLogger(__name__)

PEER_PATH = "/internal/peer"
FOLLOW_RETRY_INITIAL = 0.2
FOLLOW_RETRY_MAX = 5.0


def setup_peer_link(app: web.Application, node: Node) -> None:
    links = PeerLinks(node=node)
    node.follower = links
    app[PEERS] = links
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
            send=functools.partial(send_text, ws),
            current=self._current,
            limit=limits.send_queue * 10,
            send_timeout=limits.send_timeout,
            resync_type=None,
        )

    def _current(self, topic: str) -> tuple[Publication | None, Publication | None]:
        stream = self.node.registry.get(topic)
        return stream.current() if stream is not None else (None, None)

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
            stream = self.node.stream(topic)
        except Exception:
            self.outbox.control(dumps({"type": "not_owner", "topic": topic}))
            return
        self.outbox.untrack(topic)  # a resync starts the cursor over
        self.outbox.track(topic)
        stream.remote.add(self)
        snapshot, status = stream.current()
        if status is not None:
            self.outbox.deliver(status)
        if snapshot is not None:
            self.outbox.deliver(snapshot)

    def _leave(self, topic: str) -> None:
        self.outbox.untrack(topic)
        stream = self.node.registry.get(topic)
        if stream is not None:
            stream.remote.discard(self)
            self.node.kick()

    def detach(self) -> None:
        for topic in self.outbox.topics:
            self._leave(topic)
        self.outbox.close()


async def peer_handler(request: web.Request) -> web.StreamResponse:
    if on_admin_listener(request):
        raise web.HTTPNotFound()
    node = request.app[NODE]
    peer_node = request.headers.get("X-Subsys-Node", "?")
    if not authorised(request, node.settings.cluster_secret):
        log.warning("rejected peer link from %s (node %r): missing or wrong cluster secret", request.remote, peer_node)
        return web.json_response(
            {"error": {"code": "unauthorized", "message": "peer link needs the cluster secret"}}, status=401
        )
    ws = web.WebSocketResponse(heartbeat=5.0, max_msg_size=1024 * 1024)
    if not await open_websocket(ws, request):
        log.info("peer link from %s closed during its handshake", peer_node)
        return departed()
    links = request.app[PEERS]
    conn = PeerConnection(ws=ws, node=node, peer_node=peer_node)
    links.inbound.add(conn)
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
        links.inbound.discard(conn)
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


@dataclass(slots=True)
class _Following:
    """This node follows ``topic`` at an owner; ``retry_at`` set while the owner refuses it."""

    address: str
    owner_node: str
    epoch: int
    active: bool = True
    retry_at: float = 0.0
    backoff: float = FOLLOW_RETRY_INITIAL
    refusals: int = 0


class _Link:
    """This node's connection to one owner; reconnects while it has topics."""

    def __init__(self, *, links: "PeerLinks", address: str, owner_node: str) -> None:
        self.links, self.address, self.owner_node = links, address, owner_node
        self.topics: set[str] = set()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connected_at: float | None = None
        self.task = links.node.spawn(self._run(), name=f"peer-link {address}")

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self.ws.send_str(dumps(frame))

    async def _run(self) -> None:
        node = self.links.node
        headers = peer_headers(node.settings.cluster_secret, node.node_id)
        backoff = 0.0  # the first retry after a drop is immediate: a dead owner shows at once
        while self.topics:
            refused = False
            try:
                async with self.links.session.ws_connect(
                    self.address + PEER_PATH, headers=headers, heartbeat=5.0, max_msg_size=0
                ) as ws:
                    self.ws, backoff, self.connected_at = ws, 0.0, time.time()
                    self.links.repeats.clear(f"link:{self.address}", "peer link to %s is back", self.address)
                    for topic in list(self.topics):
                        if self.links.should_send(topic):
                            await self.send({"type": "follow", "topic": topic})
                    async for msg in ws:
                        if msg.type == WSMsgType.TEXT:
                            await self.links.dispatch(self, json.loads(msg.data))
                        elif msg.type == WSMsgType.ERROR:
                            break
            except aiohttp.WSServerHandshakeError as exc:
                self.links.repeats.log(
                    f"link:{self.address}", logging.WARNING, "peer link to %s refused: HTTP %s", self.address, exc.status
                )
            except aiohttp.ClientConnectorError as exc:
                refused = isinstance(exc.os_error, ConnectionRefusedError)
                self.links.repeats.log(
                    f"link:{self.address}", logging.INFO, "peer link to %s failed: %s", self.address, exc.os_error
                )
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.links.repeats.log(
                    f"link:{self.address}", logging.INFO, "peer link to %s failed: %r", self.address, exc
                )
            finally:
                self.ws, self.connected_at = None, None
            if not self.topics:
                break
            if refused:
                # Nothing listens at the owner's address: maybe a dead process. Check, and if
                # it is, end its session now rather than wait out its check TTL.
                await self.links.certify(self.address)
            node.kick()  # the owner may be gone: let reconcile look at the view
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(max(backoff * 2, 0.1), 2.0)


class PeerLinks:
    """The follower side of every peer link of this node (the node's ``Follower``)."""

    def __init__(self, *, node: Node) -> None:
        self.node = node
        self.inbound: set[PeerConnection] = set()  # links other nodes opened to follow us
        self._links: dict[str, _Link] = {}
        self._topics: dict[str, _Following] = {}
        self._session: aiohttp.ClientSession | None = None
        self.repeats = RepeatedLog(log)
        self.follow_requests = 0  # follow frames sent (a storm shows here first)
        self.certificates = 0  # sessions of dead owners this node ended early
        self._certifying: set[str] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def following(self, topic: str) -> str | None:
        entry = self._topics.get(topic)
        return entry.address if entry is not None else None

    def follows(self, topic: str, owner: OwnerRecord) -> bool:
        """Following ``owner`` for ``topic`` now (not backing off after a refusal)."""
        entry = self._topics.get(topic)
        return entry is not None and entry.active and entry.address == owner.address and entry.epoch == owner.epoch

    def should_send(self, topic: str) -> bool:
        entry = self._topics.get(topic)
        return entry is not None and (entry.active or time.monotonic() >= entry.retry_at)

    async def follow(self, stream: TopicStream, owner: OwnerRecord) -> None:
        topic = stream.topic
        entry = self._topics.get(topic)
        if entry is not None and entry.address == owner.address and entry.epoch == owner.epoch:
            if entry.active or time.monotonic() < entry.retry_at:
                return  # following already, or backing off after a refusal
            entry.active = True
            log.debug("following topic=%s on %s again (attempt %d)", topic, owner.node_id, entry.refusals + 1)
        else:
            if entry is not None and entry.address != owner.address:
                await self.unfollow(topic)
            self._topics[topic] = _Following(owner.address, owner.node_id, owner.epoch)
            log.info("following topic=%s on %s (%s) epoch=%d", topic, owner.node_id, owner.address, owner.epoch)
        link = self._links.get(owner.address)
        if link is None or link.task.done():
            link = self._links[owner.address] = _Link(links=self, address=owner.address, owner_node=owner.node_id)
        link.topics.add(topic)
        self.follow_requests += 1
        await link.send({"type": "follow", "topic": topic})

    async def unfollow(self, topic: str) -> None:
        entry = self._topics.pop(topic, None)
        link = self._links.get(entry.address) if entry is not None else None
        if link is None:
            return
        link.topics.discard(topic)
        await link.send({"type": "unfollow", "topic": topic})
        if not link.topics:
            self._links.pop(link.address, None)
            if link.ws is not None:
                await link.ws.close()
            link.task.cancel()

    async def dispatch(self, link: _Link, frame: dict[str, Any]) -> None:
        topic = frame.get("topic")
        entry = self._topics.get(topic) if isinstance(topic, str) else None
        if entry is None or entry.address != link.address:
            return
        if frame.get("type") == "not_owner":
            self._refused(topic, entry)
            return
        stream = self.node.registry.get(topic)
        if stream is None:
            return
        owner = self.node.coordinator.view.owners.get(topic)
        epoch = int(frame.get("epoch", 0))
        if owner is not None and epoch < owner.epoch:
            stream.counters.fenced += 1
            log.debug("dropped a frame of epoch %d < %d topic=%s (fenced)", epoch, owner.epoch, topic)
            return
        if entry.refusals:
            self.repeats.clear(f"refused:{entry.address}", "%s serves its topics again", entry.owner_node)
        entry.backoff, entry.refusals = FOLLOW_RETRY_INITIAL, 0
        if not stream.apply_remote(frame) and frame.get("type") == "diff" and epoch >= stream.epoch:
            await link.send({"type": "resync", "topic": topic})

    def _refused(self, topic: str, entry: _Following) -> None:
        """The owner does not serve the topic (yet): ask again later, with backoff and jitter."""
        entry.active = False
        entry.refusals += 1
        entry.retry_at = time.monotonic() + entry.backoff * random.uniform(0.5, 1.0)
        entry.backoff = min(entry.backoff * 2, FOLLOW_RETRY_MAX)
        self.repeats.log(
            f"refused:{entry.address}", logging.WARNING,
            "%s does not serve topics it holds (first: %s); following again with backoff", entry.owner_node, topic,
        )  # fmt: skip
        self.node.kick()

    async def certify(self, address: str) -> None:
        """A death certificate for the process at ``address``, and the end of its session.

        The certificate is two refused connections a short interval apart (nothing listens
        there: a SIGSTOPped, slow or partitioned process accepts or times out instead). Its
        session is destroyed only if the owner records still name it, so a node restarted
        meanwhile (a new session) is never touched. Safety does not rest on it: a process
        wrongly judged dead loses its keys, fences itself, and clients refuse its older epoch.
        """
        node = self.node
        if not node.settings.consul.fast_failover or address in self._certifying:
            return
        view = node.coordinator.view
        held = {rec.holder: rec.node_id for rec in view.owners.values() if rec.address == address and rec.holder}
        if not held:
            return
        self._certifying.add(address)
        try:
            if not await refuses(address, attempts=2, gap=0.1):
                return
            for session, owner_node in held.items():

                def still_named(_info: dict[str, Any], _status: dict[str, str], session: str = session) -> bool:
                    return any(r.holder == session and r.address == address for r in view.owners.values())

                try:
                    if await node.coordinator.destroy_session_if(session, still_dead=still_named):
                        self.certificates += 1
                        log.warning("death certificate: %s (%s) refuses connections; destroyed its session %s",
                                    owner_node, address, session)  # fmt: skip
                except Exception as exc:  # the check TTL still ends it, only later
                    log.warning("could not end the session of dead %s: %s", owner_node, exc)
        finally:
            self._certifying.discard(address)

    def describe(self) -> dict[str, Any]:
        return {
            "outbound": [
                {"owner": link.owner_node, "address": link.address, "connected": link.ws is not None,
                 "since": link.connected_at, "topics": len(link.topics)}
                for link in self._links.values()
            ],  # fmt: skip
            "inbound": [{"node": conn.peer_node, "topics": len(conn.outbox.topics)} for conn in self.inbound],
            "follow_requests": self.follow_requests,
            "death_certificates": self.certificates,
        }

    async def close_inbound(self) -> None:
        """Close the links other nodes opened to us (shutdown: they must not hold it up)."""
        conns = list(self.inbound)
        await asyncio.gather(*(conn.ws.close() for conn in conns), return_exceptions=True)

    async def close(self) -> None:
        for link in list(self._links.values()):
            link.topics.clear()
            if link.ws is not None:
                with contextlib.suppress(Exception):
                    await link.ws.close()
            link.task.cancel()
        self._links.clear()
        self._topics.clear()
        await self.close_inbound()
        if self._session is not None:
            await self._session.close()
