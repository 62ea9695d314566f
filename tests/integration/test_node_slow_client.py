"""A slow client never delays a fast one, and still converges on the final state.

The slow client is a bare aiohttp WebSocket that stops reading, with tiny
socket buffers on both ends of its TCP connection, so the node's writer for
it really blocks. Each write of the test changes every row of a topic with
large rows; the fast client must get the diff of every write, in order,
while the slow one is stalled.

What the node does (subsys/web/outbox.py, subsys/web/ws.py): the stalled client's queue holds at
most ``limits.send_queue`` messages; on overflow it is dropped and replaced
by a marker that makes the writer send a fresh ``snapshot`` when the client
drains. If a single send stays blocked for ``limits.send_timeout``, the
node closes the socket with code 4008 (slow consumer) instead (see
docs/protocol.md, section 11, for what such a client sees).
"""

from __future__ import annotations

import json
import socket

import aiohttp
import pytest

from subsys.client.ws import TopicView, connect
from subsys.web.ws import CLOSE_SLOW_CONSUMER

from support import SMALL_BUFFER, Subscription, db_execute, db_fetch, eventually, small_buffer_socket

pytestmark = pytest.mark.timeout(120)

ROWS = 8
SCHEMA = f"""
CREATE TABLE big (id int PRIMARY KEY, grp int NOT NULL, rev int NOT NULL, payload text NOT NULL);
INSERT INTO big SELECT g, 1, 0, repeat(md5(g::text), 512) FROM generate_series(1, {ROWS}) AS g;
"""
# Every write rewrites every row with 16 KiB of fresh payload: ~128 KiB per diff (about 1 MiB
# sits in socket and client buffers before the node's writer blocks).
WRITE = "UPDATE big SET rev = $1, payload = repeat(md5(random()::text), 512) WHERE grp = 1"
FEED = {"sql": "SELECT id, rev, payload FROM big WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05}
WRITES = 30


class StalledClient:
    """A client that subscribes, reads the snapshot, then stops reading until told to resume."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self.frames: list[dict] = []
        self.view = TopicView()

    @classmethod
    async def open(cls, url: str, topic: str) -> "StalledClient":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_buffer_socket))
        ws = await session.ws_connect(url, max_msg_size=64 * 1024 * 1024, heartbeat=None, autoping=True)
        client = cls(session, ws)
        await ws.send_str(json.dumps({"type": "subscribe", "topic": topic}))
        while not any(f["type"] == "snapshot" for f in client.frames):
            await client.read_one(timeout=15)
        return client

    async def read_one(self, timeout: float) -> aiohttp.WSMessage:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            self.frames.append(frame)
            self.view.apply(frame)
        return msg

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


def _server_side(node, exclude: set) -> object:
    """The node's ClientConnection of the stalled client (the one not in ``exclude``)."""
    (conn,) = [c for c in node.connections if c not in exclude]
    return conn


def _shrink_send_buffer(conn) -> None:
    sock = conn.ws._req.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


async def _db_state(url: str) -> dict[int, dict]:
    rows = await db_fetch(url, "SELECT id, rev, payload FROM big WHERE grp = 1")
    return {r["id"]: dict(r) for r in rows}


async def _write_and_follow(url: str, fast: Subscription, start_seq: int, revs=range(1, WRITES + 1)) -> int:
    """Make a change per rev; the fast client must see each one, in order, while the slow one is stalled."""
    seq = start_seq
    for rev in revs:
        await db_execute(url, WRITE, rev)
        diff = await fast.next(timeout=15)
        assert diff["type"] == "diff", diff
        assert diff["seq"] == seq + 1, "the fast client gets every diff, in order"
        seq = diff["seq"]
        assert {row["rev"] for row in diff["updated"]} == {rev} and len(diff["updated"]) == ROWS
    return seq


async def test_slow_client_is_resynced_and_never_delays_a_fast_one(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node(
        {"big": FEED}, database_url=database_url, limits={"send_queue": 8, "send_timeout": 60.0}
    )
    async with connect(node.ws_url) as fast_client:
        fast = Subscription(fast_client, "big:1")
        first = await fast.next()
        assert first["type"] == "snapshot"
        await eventually(lambda: len(node.connections) == 1)
        fast_conn = next(iter(node.connections))

        slow = await StalledClient.open(node.ws_url, "big:1")
        slow_conn = _server_side(node, {fast_conn})
        _shrink_send_buffer(slow_conn)
        slow_snapshot = [f for f in slow.frames if f["type"] == "snapshot"][0]
        try:
            # The slow client now reads nothing at all.
            final_seq = await _write_and_follow(database_url, fast, first["seq"])

            # The node gave up queueing for the slow client instead of buffering without bound.
            assert slow_conn.outbox.overflows >= 1, "the slow client's queue never overflowed: not stalled?"
            assert slow_conn.outbox.queued() <= 8 + 1
            assert not slow_conn.outbox.closed

            # The slow client resumes and catches up on the final state.
            final = await _db_state(database_url)
            while slow.view.seq < final_seq:
                msg = await slow.read_one(timeout=15)
                assert msg.type == aiohttp.WSMsgType.TEXT, f"slow client closed: {msg}"
            assert {row["id"]: row for row in slow.view.rows.values()} == final
            assert slow.view.seq == final_seq and slow.view.epoch == 1

            data = [f for f in slow.frames if f["type"] in ("snapshot", "resync", "diff")]
            resyncs = [f for f in data[1:] if f["type"] != "diff"]
            assert resyncs and resyncs[0]["type"] == "snapshot", "the overflow is repaired by a fresh snapshot"
            # Never out of order: a diff always follows the previous seq; only snapshots jump.
            previous = slow_snapshot["seq"]
            for frame in data[1:]:
                if frame["type"] == "diff":
                    assert frame["seq"] == previous + 1, frame["seq"]
                else:
                    assert frame["seq"] > previous
                previous = frame["seq"]
            skipped = final_seq - slow_snapshot["seq"] - sum(f["type"] == "diff" for f in data[1:])
            assert skipped > 0, "some diffs were replaced by the snapshot"

            # Both keep working afterwards.
            await db_execute(database_url, WRITE, WRITES + 1)
            assert (await fast.next())["seq"] == final_seq + 1
            msg = await slow.read_one(timeout=15)
            assert msg.type == aiohttp.WSMsgType.TEXT and slow.frames[-1]["seq"] == final_seq + 1
        finally:
            await slow.close()
        await fast.stop()


async def test_client_stalled_past_send_timeout_is_closed_with_4008(start_node, database_url):
    """A write blocked for send_timeout: the node stops queueing, puts 4008 behind the frames in
    flight and releases the subscriptions at once; a client that reads again within another
    send_timeout gets those frames, then the close frame."""
    await db_execute(database_url, SCHEMA)
    node = await start_node(
        {"big": FEED}, database_url=database_url, limits={"send_queue": 8, "send_timeout": 3.0}
    )
    async with connect(node.ws_url) as fast_client:
        fast = Subscription(fast_client, "big:1")
        first = await fast.next()
        await eventually(lambda: len(node.connections) == 1)
        fast_conn = next(iter(node.connections))
        slow = await StalledClient.open(node.ws_url, "big:1")
        slow_conn = _server_side(node, {fast_conn})
        _shrink_send_buffer(slow_conn)
        try:
            seq, rev = first["seq"], 0
            while not slow_conn.outbox.closed:
                assert rev < 10 * WRITES, "the node never gave up on the stalled client"
                rev += 1
                seq = await _write_and_follow(database_url, fast, seq, revs=[rev])
            final_seq = seq
            # Released without the client reading a byte: no subscription lingers for it.
            await eventually(lambda: slow_conn not in node.connections, message="connection released")
            assert not slow_conn.topics

            # On resuming, the client reads what was already on the wire, then the 4008 close.
            while True:
                msg = await slow.read_one(timeout=15)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert slow.ws.close_code == CLOSE_SLOW_CONSUMER
            assert slow.view.seq < final_seq
        finally:
            await slow.close()

        # Reconnecting gives the final state; the fast client was never disturbed.
        async with connect(node.ws_url) as again:
            sub = Subscription(again, "big:1")
            snap = await sub.next()
            assert snap["type"] == "snapshot" and snap["seq"] == final_seq
            assert {r["id"]: r for r in snap["rows"]} == await _db_state(database_url)
            await sub.stop()
        assert fast.view.seq == final_seq
        await fast.stop()
