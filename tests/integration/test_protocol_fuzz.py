"""Fuzzed client frames against a real node: every frame gets exactly the answer docs/protocol.md promises.

Frames are valid frames mutated, structurally (wrong types in every field,
lone surrogates, astral characters, huge numbers, deep nesting, boundary-length
topics, unknown fields) and as text (inserted, deleted and swapped characters,
NaN/Infinity, broken escapes, truncation, sizes at the limits). A small model
written from the doc, not from the code, predicts each frame's control reply
(or that there is none); control replies come back in order, so each reply is
matched to its frame. Data frames may arrive in between and are checked for
shape only.

Checked throughout: only documented frame types and error codes; ``ref`` and
``topic`` echoed exactly where the doc says; no 1011, no ERROR log record, no
traceback; the connections stay open. Frames over 4x the limit (1009) and text
frames that are not UTF-8 (1007) close their connection by design and are
sent on throwaway connections.

The generator is seeded: ``SUBSYS_FUZZ_SEED`` and ``SUBSYS_FUZZ_FRAMES``
override the defaults, and a failure names the seed and the frame.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import re
import uuid
from typing import Any

import aiohttp
import pytest

from subsys.core.protocol import ERROR_CODES

from support import RawClient, db_execute

pytestmark = pytest.mark.timeout(300)

SEED = int(os.environ.get("SUBSYS_FUZZ_SEED", "8675309"))
FRAMES = int(os.environ.get("SUBSYS_FUZZ_FRAMES", "20000"))
CONNECTIONS = 3
BATCH = 200
MAX_FRAME = 4096
MAX_SUBS = 8
MAX_NESTING = 32  # docs/protocol.md, section 8
# Rate limits far above what the fuzzer sends: it must reach the parser, not the token bucket.
LIMITS = {"max_frame_bytes": MAX_FRAME, "max_subscriptions": MAX_SUBS,
          "messages_per_second": 1_000_000.0, "message_burst": 1_000_000}  # fmt: skip
SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp bigint NOT NULL);
INSERT INTO items SELECT g, g % 5 FROM generate_series(1, 10) AS g;
"""
FEEDS = {
    "items": {"sql": "SELECT id FROM items WHERE grp = $1", "key": "id", "param": "int", "interval": 1.0},
    "labels": {"sql": "SELECT 1 AS id, $1::text AS label", "key": "id", "interval": 1.0},
    "things": {"sql": "SELECT 1 AS id, $1::uuid AS thing", "key": "id", "param": "uuid", "interval": 1.0},
}

DATA_TYPES = {"snapshot", "diff", "resync", "status"}
CONTROL_TYPES = {"hello", "subscribed", "unsubscribed", "pong", "error"}
FRAME_ERRORS = {"malformed_json", "bad_request", "unsupported_frame", "frame_too_large", "rate_limited"}

# -- the model: docs/protocol.md, sections 2, 7, 8 and 9 --------------------------------------

_TOPIC = re.compile(r"[a-z][a-z0-9_]{0,63}:[A-Za-z0-9_.@\-]{1,128}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _not_json(name: str) -> Any:
    raise ValueError(name)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _unicode(text: str) -> bool:
    return not any("\ud800" <= ch <= "\udfff" for ch in text)


def _param_ok(feed: str, param: str) -> bool:
    if feed == "items":
        canonical = re.fullmatch(r"-?(0|[1-9][0-9]*)", param) is not None and param != "-0"
        return canonical and -(2**63) <= int(param) < 2**63
    if feed == "things":
        return _UUID.fullmatch(param) is not None
    return True


class Model:
    """One connection's subscriptions, and the control reply each frame must get."""

    def __init__(self) -> None:
        self.topics: set[str] = set()
        self.ever: set[str] = set()

    def expect(self, text: str) -> dict[str, Any] | None:
        def error(code: str, *, topic: str | None = None, ref: Any = None) -> dict[str, Any]:
            frame: dict[str, Any] = {"type": "error", "code": code}
            if topic is not None:
                frame["topic"] = topic
            if ref is not None:
                frame["ref"] = ref
            return frame

        if len(text.encode()) > MAX_FRAME:
            return error("frame_too_large")
        try:
            data = json.loads(text, parse_constant=_not_json)
        except (ValueError, RecursionError):
            return error("malformed_json")
        if _depth(data) > MAX_NESTING:
            return error("malformed_json")
        if not isinstance(data, dict):
            return error("bad_request")
        ref, kind, topic = data.get("ref"), data.get("type"), data.get("topic")
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (str, int))):
            return error("bad_request")
        if isinstance(ref, str) and not _unicode(ref):
            return error("bad_request")
        if kind == "ping":
            return {"type": "pong", "ref": ref} if ref is not None else {"type": "pong"}
        if kind not in ("subscribe", "unsubscribe") or not isinstance(topic, str) or not _unicode(topic):
            return error("bad_request")
        if kind == "unsubscribe":
            if topic not in self.topics:
                return error("not_subscribed", topic=topic, ref=ref)
            self.topics.discard(topic)
            return {"type": "unsubscribed", "topic": topic, **({"ref": ref} if ref is not None else {})}
        if len(topic) > 193 or _TOPIC.fullmatch(topic) is None:
            return error("invalid_topic", topic=topic, ref=ref)
        feed, param = topic.split(":", 1)
        if feed not in FEEDS:
            return error("unknown_feed", topic=topic, ref=ref)
        if not _param_ok(feed, param):
            return error("invalid_param", topic=topic, ref=ref)
        if topic in self.topics:
            return error("already_subscribed", topic=topic, ref=ref)
        if len(self.topics) >= MAX_SUBS:
            return error("too_many_subscriptions", topic=topic, ref=ref)
        self.topics.add(topic)
        self.ever.add(topic)
        return {"type": "subscribed", "topic": topic, "ref": ref} if ref is not None else None


# -- the generator ------------------------------------------------------------------------------

UUIDS = [str(uuid.UUID(int=n * 7919)) for n in range(1, 4)]
TOPICS = (
    [f"items:{n}" for n in range(6)] + ["items:-3", "labels:a", "labels:x.y@z-_", "labels:" + "L" * 128]
    + [f"things:{u}" for u in UUIDS]
    + [
        "items:+5", "items:05", "items:-0", "items:1_0", "items:9223372036854775808", "items:-9223372036854775809",
        "items:9223372036854775807", "items:abc", "things:" + UUIDS[0].upper(), "things:" + UUIDS[0].replace("-", ""),
        "things:nope", "nosuch:1", "Items:1", "items", "items:", ":1", "items:1:2", "items:1\n", "items: 1",
        "items:\u00e9", "labels:\U0001f600", "itemsé:1", "", ":",
        "a" * 64 + ":" + "b" * 128, "a" * 64 + ":" + "b" * 129,  # 193 characters: the longest topic
        "a" * 65 + ":1", "labels:" + "x" * 129, "x" * 194, "labels:a\u0000", "labels:\u202e", "labels:a b",
    ]
)  # fmt: skip
STRINGS = [
    "", "x", "ping", "subscribe", "unsubscribe", "PING", "ping ", "null", "\u00e9", "\U0001f600", "\U0001d11e" * 40,
    "\u202e", "\u0000", "\n", "\ufeff", "\\", '"', "\ud800", "\udc00", "a\ud83d", "\ude00b", "\ude00\ud83d",
    "ß" * 300, "x" * 1000,
]  # fmt: skip
NUMBERS = [0, -1, 1, 7, 2**31, 2**53, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, int("9" * 4300), 1.5, -0.0, 1e308, 0.1]
TEXT_CHARS = list('{}[]:,"\\ \t\n0123456789-+.eEtrufalsn') + ["\u00e9", "\U0001f600", "\u0000", "\x7f", "\u2028"]
SPECIALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "\"\\ud800\"", "\"\\udc00\"", "\"\\x41\"", "\"\\u12\"",
            "01", "1.", ".5", "+1", "tru", "nul", "'x'", "[1,]", "{\"a\"}", "9" * 4301, "[" * 1000 + "]" * 1000,
            "{\"a\":" * 500 + "1" + "}" * 500]  # fmt: skip


class Fuzzer:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, depth: int = 0) -> Any:
        r, pick = self.rng, self.rng.random()
        if pick < 0.3:
            return r.choice(STRINGS)
        if pick < 0.5:
            return r.choice(NUMBERS)
        if pick < 0.6:
            return r.choice([None, True, False])
        if pick < 0.7:
            return r.choice(TOPICS)
        if pick < 0.8 and depth < 3:
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        if pick < 0.9 and depth < 3:
            return {r.choice(["type", "topic", "ref", "x", ""]): self.value(depth + 1) for _ in range(r.randint(0, 3))}
        nested: list = []
        for _ in range(r.choice([MAX_NESTING - 2, MAX_NESTING - 1, MAX_NESTING, 100])):  # deeper: SPECIALS
            nested = [nested]
        return nested

    def valid(self) -> dict[str, Any]:
        r = self.rng
        kind = r.choice(["subscribe", "subscribe", "unsubscribe", "ping"])
        frame: dict[str, Any] = {"type": kind}
        if kind != "ping":
            frame["topic"] = r.choice(TOPICS)
        if r.random() < 0.7:
            frame["ref"] = r.choice([r.randint(-5, 10**6), f"r{r.randint(0, 999)}", r.choice(STRINGS),
                                     r.choice(NUMBERS)])  # fmt: skip
        return frame

    def structured(self) -> dict[str, Any] | list | Any:
        r, frame = self.rng, self.valid()
        for _ in range(r.randint(1, 3)):
            op = r.random()
            key = r.choice(["type", "topic", "ref", "extra", "padding"])
            if op < 0.5:
                frame[key] = self.value()
            elif op < 0.7:
                frame.pop(key, None)
            elif op < 0.8:
                frame[r.choice(STRINGS)] = self.value()
            elif op < 0.9:
                return r.choice([[frame], frame.get("type"), None, 42, "frame", []])
        return frame

    def dumps(self, obj: Any) -> str:
        ascii_only = self.rng.random() < 0.5
        text = json.dumps(obj, ensure_ascii=ascii_only)
        try:
            text.encode()
        except UnicodeEncodeError:  # raw lone surrogates cannot be sent as UTF-8: use their escapes
            text = json.dumps(obj)
        return text

    def mutate_text(self, text: str) -> str:
        r = self.rng
        for _ in range(r.randint(1, 3)):
            at = r.randint(0, len(text))
            op = r.random()
            if op < 0.25:
                text = text[:at] + r.choice(TEXT_CHARS) + text[at:]
            elif op < 0.45:
                text = text[:at] + text[at + r.randint(1, 4):]
            elif op < 0.65:
                text = re.sub(r"(-?\d+(\.\d+)?|true|false|null)", lambda m: r.choice(SPECIALS), text, count=1)
            elif op < 0.75:
                quote = text.find('"', at)
                if quote >= 0:
                    escape = r.choice(["\\ud800", "\\udfff", "\\ud83d", "\\ude00", "\\ud83d\\ude00"])
                    text = text[: quote + 1] + escape + text[quote + 1:]
            elif op < 0.85:
                text = text[:at]
            else:
                text = r.choice(["[" + text + "]", text + text, " " + text + "\n", "\ufeff" + text, text + "x"])
        return text

    def sized(self) -> str:
        """A valid frame padded to a size around a limit (within 4x: those are still answered)."""
        r = self.rng
        size = r.choice([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, 2 * MAX_FRAME, 4 * MAX_FRAME - 1, 4 * MAX_FRAME])
        frame = self.valid()
        if len(json.dumps(frame)) > MAX_FRAME - 100:  # a huge ref would not leave room for the padding
            frame = {"type": frame["type"], "ref": "sized"}
        pad_char = r.choice(["a", "\u00e9", "\U0001f600"])
        head = self.dumps({**frame, "pad": ""})[:-2]
        room = size - len(head.encode()) - 2
        text = head + pad_char * (room // len(pad_char.encode())) + "a" * (room % len(pad_char.encode())) + '"}'
        assert len(text.encode()) == size
        return text

    def frame(self) -> str | bytes:
        pick = self.rng.random()
        if pick < 0.03:
            return self.rng.randbytes(self.rng.randint(0, 64))  # binary: unsupported_frame
        if pick < 0.05:
            return self.sized()
        if pick < 0.35:
            return self.dumps(self.valid())
        if pick < 0.75:
            return self.dumps(self.structured())
        return self.mutate_text(self.dumps(self.structured() if self.rng.random() < 0.5 else self.valid()))


# -- running it --------------------------------------------------------------------------------


def _check_data(frame: dict[str, Any], model: Model, where: str) -> None:
    assert frame["type"] in DATA_TYPES, where
    assert frame.get("topic") in model.ever, where
    assert "ref" not in frame, where
    fields = {"snapshot": {"type", "topic", "epoch", "seq", "key", "rows"},
              "resync": {"type", "topic", "epoch", "seq", "key", "rows"},
              "diff": {"type", "topic", "epoch", "seq", "inserted", "updated", "deleted"}}  # fmt: skip
    if frame["type"] in fields:
        assert set(frame) == fields[frame["type"]], where
    else:
        assert frame["state"] in ("ok", "error") and "seq" not in frame, where


def _check_reply(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert got.get("type") in CONTROL_TYPES, where
    if want["type"] == "error":
        assert got["type"] == "error" and got["code"] == want["code"], where
        assert got["code"] in ERROR_CODES and isinstance(got["message"], str) and got["message"], where
        assert {k: v for k, v in got.items() if k != "message"} == want, where
        if got["code"] in FRAME_ERRORS:
            assert "ref" not in got and "topic" not in got, where
    else:
        assert got == want, where


async def _fuzz_connection(node, rng: random.Random, count: int, name: str) -> collections.Counter:
    """Send ``count`` fuzzed frames; returns how often each kind of answer came."""
    fuzzer, model, answers = Fuzzer(rng), Model(), collections.Counter()
    client = await RawClient.connect(node.ws_url, max_msg_size=0)
    try:
        assert (await client.recv())["type"] == "hello"
        sent = 0
        while sent < count:
            batch = [fuzzer.frame() for _ in range(min(BATCH, count - sent))]
            expected: list[tuple[int, Any, dict[str, Any]]] = []
            for n, frame in enumerate(batch, start=sent):
                if isinstance(frame, bytes):
                    await client.ws.send_bytes(frame)
                    want = {"type": "error", "code": "unsupported_frame"}
                else:
                    await client.ws.send_str(frame)
                    want = model.expect(frame)
                if want is not None:
                    expected.append((n, frame, want))
            sentinel = f"{name}-sentinel-{sent}"
            await client.send({"type": "ping", "ref": sentinel})
            expected.append((-1, "sentinel", {"type": "pong", "ref": sentinel}))
            for n, frame, want in expected:
                where = f"seed {SEED}, {name} frame #{n}: {frame!r:.300} -> expected {want!r:.300}"
                while True:
                    got = await client.recv(timeout=30)
                    if got.get("type") in DATA_TYPES:
                        _check_data(got, model, f"{where}; data frame {got!r:.300}")
                        continue
                    _check_reply(got, want, f"{where}; got {got!r:.300}")
                    answers[got.get("code", got["type"])] += n >= 0
                    break
            answers["frames"] += len(batch)
            sent += len(batch)
        assert not client.ws.closed, f"{name} was closed: {client.ws.close_code}"
        return answers
    finally:
        await client.close()


async def _closes_with(node, send, code: int) -> None:
    client = await RawClient.connect(node.ws_url, max_msg_size=0)
    try:
        assert (await client.recv())["type"] == "hello"
        await send(client.ws)
        msg = await client.ws.receive(timeout=15)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await client.ws.receive(timeout=15)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == code, msg
    finally:
        await client.close()


@pytest.fixture
async def node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    return await start_node(FEEDS, database_url=database_url, limits=LIMITS)


async def test_fuzzed_frames_get_their_documented_answers(node, caplog):
    caplog.set_level(logging.INFO)
    rngs = [random.Random(f"{SEED}-{n}") for n in range(CONNECTIONS)]
    per_connection = -(-FRAMES // CONNECTIONS)
    runs = [_fuzz_connection(node, rng, per_connection, f"connection {n}") for n, rng in enumerate(rngs)]
    answers = sum(await asyncio.gather(*runs), collections.Counter())
    assert answers["frames"] >= FRAMES
    # The generator reaches every answer a frame can get (rate_limited is kept out by the limits).
    reached = set(answers) - {"frames"}
    every = set(ERROR_CODES) - {"rate_limited", "shutting_down"} | {"pong", "subscribed", "unsubscribed"}
    assert reached >= every, answers
    assert "rate_limited" not in reached
    print(f"fuzz seed {SEED}: {dict(answers)}")

    # Frames that close their connection by design, each on its own connection.
    rng = random.Random(f"{SEED}-closing")
    for _ in range(5):
        size = 4 * MAX_FRAME + 1 + rng.choice([0, 1, 100, MAX_FRAME])
        await _closes_with(node, lambda ws: ws.send_str('{"type":"ping","pad":"' + "a" * (size - 24) + '"}'), 1009)
    for bad in (b"\xff", b"\xed\xa0\x80", b'{"type":"ping","ref":"\xc3"}', b"\xf4\x90\x80\x80", b"ok\xc0\xaf"):
        await _closes_with(node, lambda ws: ws.send_frame(bad, aiohttp.WSMsgType.TEXT), 1007)

    bad_logs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad_logs and "Traceback" not in caplog.text, bad_logs[:5]
    status, _ = await node.get("/health/live")
    assert status == 200 and not node.task.done()
