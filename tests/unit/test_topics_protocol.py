"""Topic grammar and protocol v1 frame parsing / building."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from subsys.core.errors import ProtocolError, TopicError
from subsys.core.protocol import (
    ERROR_CODES,
    MAX_NESTING,
    PROTOCOL_VERSION,
    ClientFrame,
    Publication,
    error_frame,
    escape_surrogates,
    parse_client_frame,
    status_frame,
)
from subsys.core.topics import MAX_TOPIC_LENGTH, Topic, convert_param, parse_topic

# -- topics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, feed, param",
    [
        ("orders:42", "orders", "42"),
        ("a:b", "a", "b"),
        ("order_lines2:A-z_0.9@x", "order_lines2", "A-z_0.9@x"),
        ("f" + "x" * 63 + ":" + "p" * 128, "f" + "x" * 63, "p" * 128),
        ("o:-1", "o", "-1"),
    ],
)
def test_valid_topics(text, feed, param):
    topic = parse_topic(text)
    assert topic == Topic(feed, param)
    assert str(topic) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "orders",
        "orders:",
        ":42",
        "Orders:42",
        "1orders:42",
        "_orders:42",
        "or-ders:42",
        "orders:4:2",
        "orders:4 2",
        "orders:42\n",
        " orders:42",
        "orders:é",
        "orders:a/b",
        "orders:a'b",
        "f" + "x" * 64 + ":1",  # feed of 65 chars
        "orders:" + "p" * 129,  # param of 129 chars
        "x" * (MAX_TOPIC_LENGTH + 1),
    ],
)
def test_invalid_topics(text):
    with pytest.raises(TopicError) as exc:
        parse_topic(text)
    assert exc.value.code == "invalid_topic"


@pytest.mark.parametrize("value", [None, 42, ["orders:1"], {"topic": "orders:1"}, b"orders:1"])
def test_topic_must_be_a_string(value):
    with pytest.raises(TopicError) as exc:
        parse_topic(value)
    assert exc.value.code == "invalid_topic"


@given(
    st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z", fullmatch=True),
    st.from_regex(r"\A[A-Za-z0-9_.@\-]{1,128}\Z", fullmatch=True),
)
def test_property_grammar_round_trips(feed, param):
    assert str(parse_topic(f"{feed}:{param}")) == f"{feed}:{param}"


@given(st.text(max_size=40))
def test_property_anything_else_is_rejected_with_invalid_topic(text):
    ok = re.fullmatch(r"[a-z][a-z0-9_]{0,63}:[A-Za-z0-9_.@\-]{1,128}", text) is not None
    try:
        parse_topic(text)
    except TopicError as exc:
        assert not ok and exc.code == "invalid_topic"
    else:
        assert ok


def test_convert_param():
    assert convert_param("abc", "text") == "abc"
    assert convert_param("-42", "int") == -42
    assert convert_param(str(2**63 - 1), "int") == 2**63 - 1
    assert convert_param(str(-(2**63)), "int") == -(2**63)
    value = convert_param("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid")
    assert value == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


@pytest.mark.parametrize(
    "raw, kind",
    [("abc", "int"), ("1.5", "int"), (str(2**63), "int"), (str(-(2**63) - 1), "int"), ("", "int"), ("xyz", "uuid"),
     ("1", "float"),
     # One topic, one spelling: other spellings of the same value would start extra pollers.
     ("007", "int"), ("1_0", "int"), ("+5", "int"), ("-0", "int"),
     ("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "uuid"), ("a0eebc999c0b4ef8bb6d6bb9bd380a11", "uuid")],
)
def test_convert_param_errors(raw, kind):
    with pytest.raises(TopicError) as exc:
        convert_param(raw, kind)
    assert exc.value.code == "invalid_param"


# -- client frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, frame",
    [
        ('{"type":"subscribe","topic":"orders:1"}', ClientFrame("subscribe", "orders:1")),
        ('{"type":"unsubscribe","topic":"orders:1","ref":7}', ClientFrame("unsubscribe", "orders:1", 7)),
        ('{"type":"ping"}', ClientFrame("ping")),
        ('{"type":"ping","ref":"abc","extra":1}', ClientFrame("ping", None, "abc")),
        # The topic is not validated here: that is the node's job (invalid_topic / unknown_feed).
        ('{"type":"subscribe","topic":"NOT A TOPIC"}', ClientFrame("subscribe", "NOT A TOPIC")),
    ],
)
def test_parse_valid_frames(text, frame):
    assert parse_client_frame(text) == frame


@pytest.mark.parametrize("text", ["{", "", "not json", '{"type": "ping",}', "[" * 100_000])
def test_malformed_json(text):
    with pytest.raises(ProtocolError) as exc:
        parse_client_frame(text)
    assert exc.value.code == "malformed_json"


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","ref":NaN}',
        '{"type":"ping","x":[Infinity]}',
        '{"type":"ping","x":-Infinity}',
        '{"type":"ping","ref":' + "9" * 4301 + "}",
        '{"type":"ping","x":' + "[" * MAX_NESTING + "]" * MAX_NESTING + "}",
        "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
        "[" * 1000 + "]" * 1000,
    ],
)
def test_not_json_constants_long_numbers_and_deep_nesting_are_malformed_json(text):
    with pytest.raises(ProtocolError) as exc:
        parse_client_frame(text)
    assert exc.value.code == "malformed_json"


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine():
    nested = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    assert parse_client_frame('{"type":"ping","ref":1,"x":' + nested + "}") == ClientFrame("ping", None, 1)
    assert parse_client_frame(json.dumps({"type": "ping", "ref": "[" * 500})).ref == "[" * 500


# JSON escapes, as they come over the wire; the last one is a raw surrogate in the decoded text.
@pytest.mark.parametrize("lone", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b", "\\ude00\\ud83d", "\ud800"])
@pytest.mark.parametrize(
    "template",
    [
        '{"type":"ping","ref":"%s"}',
        '{"type":"subscribe","topic":"t:%s","ref":1}',
        '{"type":"unsubscribe","topic":"t:1","ref":"%s"}',
    ],
)
def test_lone_surrogates_in_echoed_fields_are_bad_request(template, lone):
    with pytest.raises(ProtocolError) as exc:
        parse_client_frame(template % lone)
    assert exc.value.code == "bad_request"


def test_surrogate_pairs_are_characters():
    assert parse_client_frame('{"type":"ping","ref":"\\ud83d\\ude00"}').ref == "\U0001f600"
    assert parse_client_frame('{"type":"ping","ref":1,"x":"\\ud800"}').ref == 1  # not echoed: ignored


def test_escape_surrogates_makes_a_frame_sendable_and_keeps_its_meaning():
    value = {"s": "a\ud800b\\\udc00", "ok": "é\U0001f600"}
    frame = json.dumps(value, ensure_ascii=False)
    escaped = escape_surrogates(frame)
    escaped.encode("utf-8")
    assert json.loads(escaped) == value
    assert escape_surrogates("plain é") == "plain é"


@pytest.mark.parametrize(
    "frame",
    [
        [],
        "subscribe",
        None,
        1,
        {},
        {"type": "SUBSCRIBE", "topic": "orders:1"},
        {"type": "snapshot"},
        {"type": None},
        {"type": "subscribe"},
        {"type": "subscribe", "topic": None},
        {"type": "subscribe", "topic": 1},
        {"type": "unsubscribe", "topic": {"a": 1}},
        {"type": "ping", "ref": True},
        {"type": "ping", "ref": 1.5},
        {"type": "ping", "ref": [1]},
    ],
)
def test_bad_requests(frame):
    with pytest.raises(ProtocolError) as exc:
        parse_client_frame(json.dumps(frame))
    assert exc.value.code == "bad_request"
    assert exc.value.message


# -- server frames -----------------------------------------------------------------


def test_error_frame():
    assert json.loads(error_frame("unknown_feed", "no feed 'x'", topic="x:1", ref=3)) == {
        "type": "error", "code": "unknown_feed", "message": "no feed 'x'", "topic": "x:1", "ref": 3,
    }
    assert json.loads(error_frame("malformed_json", "bad")) == {"type": "error", "code": "malformed_json", "message": "bad"}


def test_status_frame():
    assert json.loads(status_frame("t:1", epoch=3, state="error", code="database_unavailable", message="down")) == {
        "type": "status", "topic": "t:1", "epoch": 3, "state": "error", "code": "database_unavailable",
        "message": "down",
    }
    assert json.loads(status_frame("t:1", epoch=3, state="ok", code=None, message=None)) == {
        "type": "status", "topic": "t:1", "epoch": 3, "state": "ok",
    }


def test_publication_wire_has_epoch_and_seq_and_is_cached():
    pub = Publication("snapshot", "t:1", 2, 5, {"key": ["id"], "rows": [{"id": 1}]})
    wire = pub.wire()
    assert json.loads(wire) == {"type": "snapshot", "topic": "t:1", "epoch": 2, "seq": 5, "key": ["id"],
                                "rows": [{"id": 1}]}
    assert pub.wire() is wire  # serialised once for every receiver
    assert json.loads(pub.wire("resync"))["type"] == "resync"
    diff = Publication("diff", "t:1", 2, 6, {"inserted": [], "updated": [{"id": 1}], "deleted": [{"id": 2}]})
    assert json.loads(diff.wire())["seq"] == 6
    status = Publication("status", "t:1", 2, 6, {"state": "error", "code": "query_failed", "message": "m"})
    assert json.loads(status.wire())["type"] == "status"


def test_error_codes_are_stable_and_documented():
    assert PROTOCOL_VERSION == 1
    assert set(ERROR_CODES) >= {
        "malformed_json", "bad_request", "unsupported_frame", "frame_too_large", "rate_limited", "invalid_topic",
        "unknown_feed", "invalid_param", "too_many_subscriptions", "not_subscribed", "already_subscribed",
        "shutting_down",
    }
    assert all(isinstance(text, str) and text for text in ERROR_CODES.values())


def test_protocol_doc_lists_every_error_code():
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    text = doc.read_text(encoding="utf-8")
    missing = [code for code in ERROR_CODES if code not in text]
    assert not missing, f"docs/protocol.md does not document: {missing}"
