"""Clients that stop reading, and a node that shuts down while one is stalled.

docs/protocol.md, sections 10-12. A stalled client here is a bare aiohttp
WebSocket with a tiny receive buffer that stops reading; the node's end of
its socket gets a tiny send buffer too, so the node's writer really blocks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket

import aiohttp
import pytest

import subsys.web.app as subsys_app
import subsys.web.ws as subsys_ws
from subsys.web.ws import CLOSE_SLOW_CONSUMER

from support import SMALL_BUFFER, RawClient, db_execute, eventually, small_buffer_socket

pytestmark = pytest.mark.timeout(120)

SCHEMA = """
CREATE TABLE big (id int PRIMARY KEY, grp int NOT NULL, rev int NOT NULL, payload text NOT NULL);
INSERT INTO big SELECT g, 1, 0, repeat(md5(g::text), 512) FROM generate_series(1, 8) AS g;
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL);
INSERT INTO items VALUES (1, 1), (2, 1);
"""
# ~128 KiB per change: a stalled client's buffers fill after a few changes.
WRITE = "UPDATE big SET rev = $1, payload = repeat(md5(random()::text), 512) WHERE grp = 1"
FEEDS = {
    "big": {"sql": "SELECT id, rev, payload FROM big WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05},
    "items": {"sql": "SELECT id FROM items WHERE grp = $1", "key": "id", "param": "int", "interval": 0.5},
}
RATE = {"messages_per_second": 1000.0, "message_burst": 1000}


class Stalled:
    """A client that subscribes, reads up to the snapshot, then reads nothing until told to."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, conn) -> None:
        self.session, self.ws, self.conn = session, ws, conn
        self.frames: list[dict] = []
        self.bytes = 0

    @classmethod
    async def open(cls, node, topic: str = "big:1") -> "Stalled":
        before = set(node.connections)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_buffer_socket))
        # autoping off: a stalled client answers no ping (and pongs would fail once the node closed).
        ws = await session.ws_connect(node.ws_url, max_msg_size=0, autoping=False)
        (conn,) = await eventually(lambda: set(node.connections) - before, message="server side of the stalled client")
        sock = conn.ws._req.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        stalled = cls(session, ws, conn)
        await ws.send_str(json.dumps({"type": "subscribe", "topic": topic}))
        while not any(f["type"] == "snapshot" for f in stalled.frames):
            await stalled.read_one()
        return stalled

    async def read_one(self, timeout: float = 15) -> aiohttp.WSMessage:
        msg = await self.ws.receive(timeout=timeout)
        while msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
            msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            self.frames.append(json.loads(msg.data))
            self.bytes += len(msg.data.encode())
        return msg

    async def read_to_end(self) -> int:
        """Resume reading: every frame still on its way; returns the close code (1006: no close frame)."""
        while True:
            msg = await self.read_one()
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        if msg.type == aiohttp.WSMsgType.CLOSE:
            # The code sent by the node (ws.close_code may say 1006 if our close reply found the socket gone).
            return msg.data
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def _write_until(url: str, condition, limit: int = 300) -> int:
    rev = 0
    while not condition():
        assert rev < limit, "condition not reached while writing"
        rev += 1
        await db_execute(url, WRITE, rev)
        await asyncio.sleep(0.02)
    return rev


@pytest.fixture
async def schema(database_url):
    await db_execute(database_url, SCHEMA)
    return database_url


# -- the writer gives up (send_timeout) -------------------------------------------------------------


async def test_client_stalled_past_twice_send_timeout_is_cut_without_close_frame(start_node, schema):
    """Section 11: after send_timeout the node stops queueing and puts 4008 behind the frames in
    flight; if the client reads nothing for another send_timeout, the node aborts the connection:
    a client that resumes later reads what its OS still holds, then the end without a close frame."""
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "send_queue": 8, "send_timeout": 1.0})
    stalled = await Stalled.open(node)
    try:
        await _write_until(schema, lambda: stalled.conn.outbox.closed)
        # Released at once, though the client has not read anything: no subscription lingers.
        await eventually(lambda: stalled.conn not in node.connections, message="connection released")
        assert not node.node.registry.get("big:1").local
        await eventually(lambda: stalled.conn.ws._req.transport is None, message="connection cut")
        assert await stalled.read_to_end() == aiohttp.WSCloseCode.ABNORMAL_CLOSURE
    finally:
        await stalled.close()


# -- the heartbeat ---------------------------------------------------------------------------------


async def test_heartbeat_pings_a_quiet_client_and_its_pongs_keep_it(start_node, schema):
    """Section 10: a quiet client is pinged every `heartbeat` seconds; answering keeps it open.
    The node answers the client's protocol pings as well."""
    # Long enough for a busy machine to answer within heartbeat / 2.
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "heartbeat": 1.0})
    client = await RawClient.connect(node.ws_url, autoping=False)
    try:
        pings, pong, protocol_pongs = 0, None, []
        await client.ws.ping(b"from the client")  # the node answers protocol pings too
        while pong is None:
            msg = await client.ws.receive(timeout=15)
            if msg.type == aiohttp.WSMsgType.PONG:
                protocol_pongs.append(msg.data)
            elif msg.type == aiohttp.WSMsgType.PING:
                pings += 1
                await client.ws.pong(msg.data)
                if pings == 3:
                    await client.send({"type": "ping", "ref": "still open"})
            else:
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                if json.loads(msg.data)["type"] == "pong":
                    pong = json.loads(msg.data)
        assert pong == {"type": "pong", "ref": "still open"}
        assert protocol_pongs == [b"from the client"]
    finally:
        await client.close()


async def test_an_unanswered_heartbeat_closes_with_4008(start_node, schema):
    """A client that reads but does not answer the ping within heartbeat / 2 is closed with 4008."""
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "heartbeat": 0.3})
    client = await RawClient.connect(node.ws_url, autoping=False)
    try:
        kinds = []
        while True:
            msg = await client.ws.receive(timeout=15)
            kinds.append(msg.type)
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING):
                break
        assert aiohttp.WSMsgType.PING in kinds and msg.type == aiohttp.WSMsgType.CLOSE, kinds
        assert msg.data == CLOSE_SLOW_CONSUMER
    finally:
        await client.close()


async def test_a_stalled_client_caught_by_the_heartbeat_gets_4008_when_it_reads_again(start_node, schema):
    """Stalled where little data flows, the writer never blocks: the heartbeat notices first, and
    the close frame still follows everything sent before it."""
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "heartbeat": 0.3, "send_timeout": 30.0})
    stalled = await Stalled.open(node, "items:1")
    try:
        await eventually(lambda: stalled.conn not in node.connections, message="closed by the heartbeat")
        assert await stalled.read_to_end() == CLOSE_SLOW_CONSUMER
    finally:
        await stalled.close()


# -- shutdown while a client is stalled --------------------------------------------------------------


async def test_frames_are_answered_while_a_shutting_down_node_flushes(start_node, schema, monkeypatch):
    """Sections 8 and 12: during the flush before 1001 every ping gets its pong and every
    subscribe `shutting_down`. The flush window is held open by a stalled client's backlog
    (with a flush timeout longer than the test) until the test lets that client read."""
    monkeypatch.setattr(subsys_app, "close_all", functools.partial(subsys_ws.close_all, timeout=60.0))
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "send_timeout": 60.0, "heartbeat": 60.0})
    probe = await RawClient.connect(node.ws_url)
    stalled = await Stalled.open(node)
    try:
        assert (await probe.recv())["type"] == "hello"
        await _write_until(schema, lambda: stalled.conn.outbox.queued() > 0)

        node.stop_event.set()  # what SIGTERM does; node.stop() would also wait for the end
        await eventually(lambda: node.node.shutting_down, message="shutdown started")
        with pytest.raises(aiohttp.ClientConnectionError):
            await RawClient.connect(node.ws_url)  # no longer listening

        refs = []
        for n in range(20):
            await probe.send({"type": "ping", "ref": f"p{n}"})
            await probe.send({"type": "subscribe", "topic": f"items:{n}", "ref": f"s{n}"})
            refs += [f"p{n}", f"s{n}"]
        replies = [await probe.recv() for _ in refs]
        assert [r["ref"] for r in replies] == refs
        for r in replies:
            if r["ref"].startswith("p"):
                assert r == {"type": "pong", "ref": r["ref"]}
            else:
                assert r["type"] == "error" and r["code"] == "shutting_down", r
                assert r["topic"] == f"items:{r['ref'][1:]}"
        assert not node.task.done() and stalled.conn.outbox.queued() > 0, "the flush window was still open"

        # Its backlog flushes, then the node closes everyone.
        assert await stalled.read_to_end() == aiohttp.WSCloseCode.GOING_AWAY
        msg = await probe.ws.receive(timeout=15)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY, msg
        await node.stop()
    finally:
        await stalled.close()
        await probe.close()


async def test_a_client_that_never_reads_does_not_hold_up_shutdown(start_node, schema):
    node = await start_node(FEEDS, database_url=schema, limits={**RATE, "send_timeout": 60.0, "heartbeat": 60.0})
    stalled = await Stalled.open(node)
    try:
        await _write_until(schema, lambda: stalled.conn.outbox.queued() > 0)
        await asyncio.wait_for(node.stop(), 15)
    finally:
        await stalled.close()
