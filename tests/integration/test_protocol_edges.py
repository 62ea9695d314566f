"""Edge cases of the client protocol, from the client's side: a raw WebSocket against a real node.

Each test names the rule of docs/protocol.md it checks. Every test also
checks the node's log: a client frame, however odd, never causes an ERROR
record or a traceback, and never a 1011 close.
"""

from __future__ import annotations

import json
import logging
import re

import aiohttp
import pytest

from subsys.core.protocol import MAX_NESTING

from support import RawClient, db_execute, eventually, leave_mid_handshake

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 8192
LIMITS = {"max_frame_bytes": MAX_FRAME, "messages_per_second": 1000.0, "message_burst": 1000, "max_subscriptions": 50}
SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items SELECT g, g % 3, 0 FROM generate_series(1, 6) AS g;
CREATE TABLE labels (id int PRIMARY KEY, label text NOT NULL);
INSERT INTO labels VALUES (1, 'a'), (2, 'b');
CREATE TABLE knob (mode text NOT NULL);
INSERT INTO knob VALUES ('normal');
CREATE FUNCTION knob_rows(p int) RETURNS TABLE (id int, qty int) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF (SELECT mode FROM knob) = 'fail' THEN RAISE EXCEPTION 'feed is broken'; END IF;
    RETURN QUERY SELECT i.id, i.qty FROM items i WHERE i.grp = p ORDER BY i.id;
END
$$;
"""
FEEDS = {
    "items": {"sql": "SELECT id, qty FROM items WHERE grp = $1 ORDER BY id", "key": "id", "param": "int",
              "interval": 0.1},
    "labels": {"sql": "SELECT id, label FROM labels WHERE label = $1", "key": "id", "interval": 0.5},
    # A `json` value may hold an escaped lone surrogate (PostgreSQL checks pairs only for jsonb).
    "weird": {"sql": """SELECT 1 AS id, '{"s": "\\ud800 and \\udc00x"}'::json AS v, $1::text AS p""",
              "key": "id", "interval": 0.5},
    "knobbed": {"sql": "SELECT * FROM knob_rows($1)", "key": "id", "param": "int", "interval": 0.05},
}
# Lone UTF-16 surrogates, as a client sends them: JSON escapes (raw ones are not valid UTF-8).
LONE_SURROGATES = ["\ud800", "\udfff", "a\ud83d", "\ude00b", "\ude00\ud83d", "x\udbffy"]


@pytest.fixture
async def node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    return await start_node(FEEDS, database_url=database_url, limits=LIMITS,
                            database={"retry_initial": 0.05, "retry_max": 0.2})  # fmt: skip


@pytest.fixture
async def client(node):
    raw = await RawClient.connect(node.ws_url)
    assert (await raw.recv())["type"] == "hello"
    yield raw
    await raw.close()


@pytest.fixture(autouse=True)
def no_errors_logged(caplog):
    """No client frame may make the node log an ERROR or a traceback."""
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in caplog.text


async def reply(client: RawClient, frame: str | dict) -> dict:
    """Send one frame; its reply is the next frame (no subscription is sending data)."""
    await client.send(frame)
    return await client.recv()


def ping_frame(size: int, pad: str = "a") -> str:
    """A ping of exactly ``size`` UTF-8 bytes (``pad`` of 1 or 2 bytes; size must fit)."""
    head, tail = '{"type":"ping","ref":"sized","pad":"', '"}'
    room = size - len(head) - len(tail)
    width = len(pad.encode())
    text = head + pad * (room // width) + "a" * (room % width) + tail
    assert len(text.encode()) == size
    return text


async def assert_closed_with(client: RawClient, code: int) -> None:
    msg = await client.ws.receive(timeout=15)
    while msg.type == aiohttp.WSMsgType.TEXT:  # replies already on their way
        msg = await client.ws.receive(timeout=15)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    assert client.ws.close_code == code


# -- 1. strings that cannot be sent back ----------------------------------------------------


async def test_lone_surrogates_in_echoed_fields_are_bad_request_and_never_echoed(client):
    """Section 2: ``ref`` and ``topic`` must be valid Unicode; a lone surrogate is refused with
    ``bad_request``, which carries neither, and the frame has no other effect."""
    for lone in LONE_SURROGATES:
        for frame in (
            {"type": "ping", "ref": lone},
            {"type": "subscribe", "topic": "nosuch:" + lone, "ref": 1},
            {"type": "subscribe", "topic": "items:1", "ref": lone},
            {"type": "subscribe", "topic": lone},
            {"type": "unsubscribe", "topic": "items:" + lone, "ref": "u"},
            {"type": "unsubscribe", "topic": "items:1", "ref": lone},
        ):
            text = json.dumps(frame)  # ensure_ascii: the surrogate travels as its \\uXXXX escape
            error = await reply(client, text)
            assert error["type"] == "error" and error["code"] == "bad_request", (text, error)
            assert "ref" not in error and "topic" not in error, error
            await client.ping(f"alive-{len(client.frames)}")
    # A surrogate where nothing is echoed is simply ignored, like any unknown field.
    assert await reply(client, json.dumps({"type": "ping", "ref": 7, "x": "\ud800"})) == {"type": "pong", "ref": 7}
    # The subscribe refused for its ref left nothing behind.
    await client.send({"type": "subscribe", "topic": "items:1", "ref": "again"})
    assert await client.recv() == {"type": "subscribed", "topic": "items:1", "ref": "again"}
    assert (await client.recv())["type"] == "snapshot"


async def test_surrogate_pairs_and_astral_characters_are_echoed_intact(client):
    for ref in ("\U0001f600", "a\U0001f600b\U0001d11e", "é"):
        for ascii_only in (True, False):  # escaped (pairs for astral characters), then raw UTF-8
            text = json.dumps({"type": "ping", "ref": ref}, ensure_ascii=ascii_only)
            assert await reply(client, text) == {"type": "pong", "ref": ref}
    error = await reply(client, json.dumps({"type": "subscribe", "topic": "nosuch:\U0001f600", "ref": "\U0001f600"}))
    assert error["code"] == "invalid_topic" and error["topic"] == "nosuch:\U0001f600" and error["ref"] == "\U0001f600"
    error = await reply(client, json.dumps({"type": "unsubscribe", "topic": "items:\U0001d11e", "ref": 5}))
    assert error["code"] == "not_subscribed" and error["topic"] == "items:\U0001d11e" and error["ref"] == 5


async def test_data_holding_a_lone_surrogate_reaches_the_client_escaped(client):
    """The writer never dies on a frame UTF-8 cannot encode: a `json` value holding "\\ud800" is sent
    as that escape (the same string to a JSON parser) and the connection carries on."""
    await client.send({"type": "subscribe", "topic": "weird:x", "ref": 1})
    assert (await client.recv())["type"] == "subscribed"
    snapshot = await client.recv()
    assert snapshot["type"] == "snapshot", snapshot
    assert snapshot["rows"] == [{"id": 1, "v": {"s": "\ud800 and \udc00x"}, "p": "x"}]
    await client.ping("still-open")


# -- 4. frame size limits -------------------------------------------------------------------


async def test_frame_size_limits_on_both_sides_of_each_boundary(node, client):
    """Section 9: up to max_frame_bytes UTF-8 bytes is read; above it frame_too_large, the
    connection stays; exactly 4x is still answered; 4x + 1 closes with 1009."""
    assert await reply(client, ping_frame(MAX_FRAME)) == {"type": "pong", "ref": "sized"}
    assert await reply(client, ping_frame(MAX_FRAME, pad="é")) == {"type": "pong", "ref": "sized"}
    for size, pad in ((MAX_FRAME + 1, "a"), (MAX_FRAME + 1, "é"), (4 * MAX_FRAME, "a"), (4 * MAX_FRAME, "é")):
        error = await reply(client, ping_frame(size, pad))
        assert error["code"] == "frame_too_large" and "ref" not in error, (size, error)
        await client.ping(f"open-after-{size}")
    # Bytes, not characters: fewer characters than the limit, more bytes.
    chars = json.dumps({"type": "ping", "pad": "é" * (MAX_FRAME // 2 + 10)}, ensure_ascii=False)
    assert len(chars) < MAX_FRAME < len(chars.encode())
    assert (await reply(client, chars))["code"] == "frame_too_large"

    await client.send(ping_frame(4 * MAX_FRAME + 1))
    await assert_closed_with(client, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    other = await RawClient.connect(node.ws_url)
    try:
        assert (await other.recv())["type"] == "hello"
        await other.ping("the node carries on")
    finally:
        await other.close()


# -- 5. not JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","ref":NaN}',
        '{"type":"ping","ref":Infinity}',
        '{"type":"ping","ref":-Infinity}',
        '{"type":"ping","x":[1,NaN]}',
        '{"type":"ping","x":{"y":-Infinity}}',
        "NaN",
        '{"type":"ping","ref":"\\ud80"}',  # a broken escape
        '{"type":"ping","ref":"tab\there"}',  # a raw control character inside a string
        '{"type":"ping","ref":' + "9" * 4301 + "}",  # more digits than Python converts
        '{"type":"ping","x":' + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1) + "}",
        "[" * 1000 + "]" * 1000,
        '{"type":"ping","x":' + "[" * 1000 + "]" * 1000 + "}",
    ],
    ids=lambda text: text[:40],
)
async def test_not_json_is_malformed_json(client, text):
    error = await reply(client, text)
    assert error["type"] == "error" and error["code"] == "malformed_json", error
    assert set(error) == {"type", "code", "message"}
    await client.ping("open")


async def test_json_within_the_limits_is_read(client):
    nested = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    assert await reply(client, '{"type":"ping","ref":1,"x":' + nested + "}") == {"type": "pong", "ref": 1}
    big = int("9" * 4300)
    assert await reply(client, json.dumps({"type": "ping", "ref": big})) == {"type": "pong", "ref": big}
    assert (await reply(client, '{"type":"ping","ref":1e400}'))["code"] == "bad_request"  # a float, not an integer


async def test_invalid_utf8_closes_with_1007(node, client):
    """Section 12: a text frame that is not UTF-8 is a protocol violation; aiohttp closes with 1007.
    The same bytes in a binary frame are just an unsupported_frame."""
    await client.ws.send_bytes(b"\xed\xa0\x80")
    assert (await client.recv())["code"] == "unsupported_frame"
    await client.ping("open")
    other = await RawClient.connect(node.ws_url)
    try:
        assert (await other.recv())["type"] == "hello"
        # A lone surrogate written as raw UTF-8 (CESU-8) bytes is not UTF-8 either.
        await client.ws.send_frame(b'{"type":"ping","ref":"\xed\xa0\x80"}', aiohttp.WSMsgType.TEXT)
        await assert_closed_with(client, aiohttp.WSCloseCode.INVALID_TEXT)
        await other.ping("others are not affected")
    finally:
        await other.close()


# -- 6. unsubscribe and subscribe replies -------------------------------------------------------


async def test_unsubscribe_replies(client):
    """Section 2: ``unsubscribed`` when the connection was subscribed (ref only if given),
    otherwise only the ``not_subscribed`` error."""
    await client.send({"type": "subscribe", "topic": "items:1"})
    assert (await client.recv())["type"] == "snapshot"  # no ref: no `subscribed`
    unsubscribed = await reply(client, {"type": "unsubscribe", "topic": "items:1"})
    assert unsubscribed == {"type": "unsubscribed", "topic": "items:1"}
    error = await reply(client, {"type": "unsubscribe", "topic": "items:1", "ref": 3})
    assert error["code"] == "not_subscribed" and error["ref"] == 3
    assert not [f for f in client.frames if f["type"] == "unsubscribed" and f.get("ref") == 3]
    # "+5" breaks the topic grammar itself: invalid_topic, not invalid_param.
    assert (await reply(client, {"type": "subscribe", "topic": "items:+5"}))["code"] == "invalid_topic"
    assert (await reply(client, {"type": "subscribe", "topic": "items:05"}))["code"] == "invalid_param"


# -- 7. metrics -------------------------------------------------------------------------------


async def test_metrics_are_labelled_by_feed_never_by_topic(node, client):
    topics = ["items:424242", "labels:secret-param.x@y", "knobbed:9876543"]
    for topic in topics:
        await client.send({"type": "subscribe", "topic": topic})
    await eventually(lambda: len(node.node.running_pollers()) == len(topics), message="pollers running")
    status, text = await node.get("/metrics")
    assert status == 200
    for topic in topics:
        assert topic not in text and topic.split(":", 1)[1] not in text, topic
    labels = re.findall(r"^\w+\{([^}]*)\}", text, re.M)
    names = {pair.split("=", 1)[0] for line in labels for pair in re.findall(r'\w+="[^"]*"', line)}
    assert names <= {"node", "feed", "role", "kind"}, names
    for feed in FEEDS:
        assert re.search(rf'^subsys_polls_total\{{[^}}]*feed="{feed}"', text, re.M), feed
    values = {value for line in labels for value in re.findall(r'feed="([^"]*)"', line)}
    assert values == set(FEEDS)


# -- a failing feed sends no snapshot -----------------------------------------------------------------


async def test_a_subscriber_to_a_failing_topic_gets_no_snapshot_until_recovery(node, database_url, client):
    """Section 3, status: a snapshot means "the topic is fine". While the feed fails, a new
    subscriber gets the error status only (no stale snapshot); the snapshot comes on recovery."""
    first = await RawClient.connect(node.ws_url)
    try:
        await first.recv()
        await first.send({"type": "subscribe", "topic": "knobbed:1"})
        before = await first.until(lambda f: f["type"] == "snapshot")
        await db_execute(database_url, "UPDATE knob SET mode = 'fail'")
        await first.until(lambda f: f["type"] == "status" and f["state"] == "error")

        await client.send({"type": "subscribe", "topic": "knobbed:1", "ref": "late"})
        assert await client.recv() == {"type": "subscribed", "topic": "knobbed:1", "ref": "late"}
        status = await client.recv()
        assert status["type"] == "status" and status["state"] == "error" and status["code"] == "query_failed"

        await db_execute(database_url, "UPDATE knob SET mode = 'normal'; UPDATE items SET qty = 9 WHERE id = 1")
        snapshot = await client.until(lambda f: f["type"] == "snapshot")
        assert snapshot["seq"] > before["seq"] and {r["id"]: r["qty"] for r in snapshot["rows"]} == {1: 9, 4: 0}
        data = [f["type"] + ":" + f.get("state", "") for f in client.frames if f.get("topic") == "knobbed:1"]
        assert data == ["subscribed:", "status:error", "status:ok", "snapshot:"], data
    finally:
        await first.close()



async def test_a_client_that_leaves_during_the_handshake_is_a_departure_not_a_traceback(node, monkeypatch) -> None:
    """Rule: a client (a closed tab) may leave at any time, even mid-handshake; the node logs no
    traceback (``no_errors_logged``) and goes on serving."""
    await leave_mid_handshake(monkeypatch, node.port, "/ws")
    raw = await RawClient.connect(node.ws_url)
    try:
        assert (await raw.recv())["type"] == "hello"
    finally:
        await raw.close()
