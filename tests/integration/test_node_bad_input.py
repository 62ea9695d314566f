"""Every bad input gets its documented error code; the connection and other clients carry on."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from subsys.client.ws import connect
from subsys.core.protocol import ERROR_CODES

from support import RawClient, Subscription, db_execute, db_fetch, eventually

pytestmark = pytest.mark.timeout(90)

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items SELECT g, g % 3, 0 FROM generate_series(1, 6) AS g;
CREATE TABLE things (id uuid PRIMARY KEY, label text NOT NULL);
"""
FEEDS = {
    "items": {"sql": "SELECT id, qty FROM items WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05},
    "things": {"sql": "SELECT id, label FROM things WHERE id = $1", "key": "id", "param": "uuid", "interval": 0.5},
    "labels": {"sql": "SELECT id, label FROM things WHERE label = $1", "key": "id", "interval": 0.5},
}
LIMITS = {"max_subscriptions": 3, "max_frame_bytes": 1024, "messages_per_second": 20.0, "message_burst": 80}


@pytest.fixture
async def node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    return await start_node(FEEDS, database_url=database_url, limits=LIMITS)


@pytest.fixture
async def watcher(node, database_url):
    """Another client on the same node whose diffs keep flowing while bad inputs arrive."""
    stop = asyncio.Event()
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        assert (await sub.next())["type"] == "snapshot"

        async def write() -> int:
            n = 0
            while not stop.is_set():
                n += 1
                await db_execute(database_url, "UPDATE items SET qty = $1 WHERE grp = 1", n)
                await asyncio.sleep(0.1)
            return n

        writer = asyncio.create_task(write())
        yield sub
        stop.set()
        writes = await writer
        expected = {r["id"]: dict(r) for r in await db_fetch(database_url, "SELECT id, qty FROM items WHERE grp = 1")}
        await eventually(lambda: {r["id"]: r for r in sub.view.rows.values()} == expected, message="watcher in sync")
        data = [f for f in sub.frames if f["type"] in ("snapshot", "diff")]
        assert all(f["type"] == "diff" for f in data[1:]), "the watcher only ever needed diffs"
        assert [f["seq"] for f in data] == list(range(data[0]["seq"], data[0]["seq"] + len(data)))
        assert len(data) - 1 >= min(writes, 5), "diffs kept arriving during the bad inputs"
        await sub.stop()


async def test_every_bad_input_has_its_error_code(node, watcher):
    client = await RawClient.connect(node.ws_url)
    try:
        hello = await client.recv()
        assert hello["type"] == "hello" and hello["protocol"] == 1
        assert hello["limits"]["max_subscriptions"] == 3 and hello["limits"]["max_frame_bytes"] == 1024

        async def check(frame, code: str, **expect) -> None:
            if isinstance(frame, bytes):
                await client.ws.send_bytes(frame)
            else:
                await client.send(frame)
            error = await client.error(code)
            for key, value in expect.items():
                assert error.get(key) == value, (key, error)
            assert code in ERROR_CODES
            await client.ping(f"after-{code}-{len(client.frames)}")  # the connection is still served

        # Frames that are not protocol v1.
        await check("{not json", "malformed_json")
        await check("", "malformed_json")
        await check("[1, 2]", "bad_request")
        await check("42", "bad_request")
        await check({"type": "launch"}, "bad_request")
        await check({"topic": "items:1"}, "bad_request")
        await check({"type": "subscribe"}, "bad_request")
        await check({"type": "subscribe", "topic": 7}, "bad_request")
        await check({"type": "unsubscribe", "topic": ["items:1"]}, "bad_request")
        await check({"type": "ping", "ref": {"no": "objects"}}, "bad_request")
        await check({"type": "ping", "ref": True}, "bad_request")
        await check(b"\x00\x01binary", "unsupported_frame")
        await check(json.dumps({"type": "ping", "pad": "x" * 2000}), "frame_too_large")

        # Topics.
        for bad in ("items", "items:", ":1", "Items:1", "items:1:2", "items:a b", "items:" + "9" * 129, "items:é"):
            await check({"type": "subscribe", "topic": bad, "ref": "r1"}, "invalid_topic", ref="r1")
        await check({"type": "subscribe", "topic": "nosuch:1"}, "unknown_feed", topic="nosuch:1")
        await check({"type": "subscribe", "topic": "items:abc"}, "invalid_param", topic="items:abc")
        await check({"type": "subscribe", "topic": "items:99999999999999999999"}, "invalid_param")
        await check({"type": "subscribe", "topic": "things:not-a-uuid", "ref": 5}, "invalid_param", ref=5)

        # Subscription bookkeeping.
        await check({"type": "unsubscribe", "topic": "items:2"}, "not_subscribed", topic="items:2")
        await client.send({"type": "subscribe", "topic": "items:2", "ref": "s"})
        ack = await client.until(lambda f: f["type"] == "subscribed")
        assert ack == {"type": "subscribed", "topic": "items:2", "ref": "s"}
        snap = await client.until(lambda f: f["type"] == "snapshot")
        assert snap["topic"] == "items:2" and len(snap["rows"]) == 2
        await check({"type": "subscribe", "topic": "items:2"}, "already_subscribed", topic="items:2")
        await client.send({"type": "subscribe", "topic": "labels:a"})
        await client.send({"type": "subscribe", "topic": "things:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"})
        await check({"type": "subscribe", "topic": "items:0"}, "too_many_subscriptions", topic="items:0")
        # Limits count live subscriptions: after an unsubscribe there is room again.
        await client.send({"type": "unsubscribe", "topic": "labels:a", "ref": 9})
        assert await client.until(lambda f: f["type"] == "unsubscribed") == {
            "type": "unsubscribed", "topic": "labels:a", "ref": 9,
        }
        await client.send({"type": "subscribe", "topic": "items:0"})
        snap0 = await client.until(lambda f: f["type"] == "snapshot" and f["topic"] == "items:0")
        assert {r["id"] for r in snap0["rows"]} == {3, 6}
        await check({"type": "unsubscribe", "topic": "labels:a"}, "not_subscribed")
    finally:
        await client.close()


async def test_rate_limit(node, watcher):
    client = await RawClient.connect(node.ws_url)
    try:
        assert (await client.recv())["type"] == "hello"
        burst, rate = LIMITS["message_burst"], LIMITS["messages_per_second"]
        sent = burst * 3
        started = time.monotonic()
        for i in range(sent):
            await client.send({"type": "ping", "ref": i})
        error = await client.error("rate_limited")
        elapsed = time.monotonic() - started
        # Every ping before the first refusal was answered; the bucket allows the burst plus the refill.
        pongs = [f["ref"] for f in client.frames if f["type"] == "pong"]
        assert pongs == list(range(len(pongs)))
        assert burst <= len(pongs) <= burst + rate * elapsed + 1, (len(pongs), elapsed)
        # The frames over the limit were dropped, not queued; the connection stays open and
        # works again once the bucket refills.
        await eventually(lambda: _ping_answered(client), timeout=20, message="connection usable after rate limit")
        assert error["message"]

        # Binary frames count against the same limit (they cannot be used to flood the node).
        await asyncio.sleep(1.1)  # the rate_limited error is sent at most once a second
        before = len(client.frames)
        for _ in range(sent):
            await client.ws.send_bytes(b"\x00")
        await client.until(lambda f: f.get("code") == "rate_limited")
        refused = [f for f in client.frames[before:] if f.get("code") == "unsupported_frame"]
        assert 1 <= len(refused) < sent  # the bucket is only partly refilled here
    finally:
        await client.close()


async def test_a_burst_within_the_limits_gets_every_reply(node, watcher):
    """A client may send message_burst frames at once: each is answered, none silently dropped."""
    client = await RawClient.connect(node.ws_url)
    try:
        assert (await client.recv())["type"] == "hello"
        topics = [f"items:{n}" for n in range(LIMITS["max_subscriptions"])]
        frames = [{"type": "subscribe", "topic": t, "ref": f"sub-{t}"} for t in topics]
        frames += [{"type": "subscribe", "topic": f"bad topic {n}", "ref": n} for n in range(20)]
        frames += [{"type": "ping", "ref": f"p{n}"} for n in range(LIMITS["message_burst"] - len(frames) - 1)]
        await client.ws.send_str(json.dumps(frames[0]))
        await asyncio.gather(*(client.ws.send_str(json.dumps(f)) for f in frames[1:]))
        refs = {f["ref"] for f in frames}
        while refs:
            frame = await client.recv()
            assert frame.get("code") != "rate_limited", frame
            refs.discard(frame.get("ref"))
    finally:
        await client.close()


async def _ping_answered(client: RawClient) -> bool:
    ref = f"probe-{len(client.frames)}"
    await client.send({"type": "ping", "ref": ref})
    try:
        await client.until(lambda f: f.get("ref") == ref or f.get("code") == "rate_limited", timeout=2)
    except (AssertionError, asyncio.TimeoutError):
        return False
    return client.frames[-1].get("type") == "pong"


async def test_oversized_frame_beyond_the_read_limit_closes_only_that_socket(node, watcher):
    """Frames up to 4x max_frame_bytes get ``frame_too_large``; beyond that the socket is closed with 1009."""
    client = await RawClient.connect(node.ws_url)
    try:
        assert (await client.recv())["type"] == "hello"
        await client.send(json.dumps({"type": "ping", "pad": "x" * (4 * 1024 + 100)}))
        msg = await client.ws.receive(timeout=15)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await client.ws.receive(timeout=15)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert client.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    finally:
        await client.close()
    status, _ = await node.get("/health/live")
    assert status == 200
