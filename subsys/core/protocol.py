"""Client WebSocket protocol v1: parsing client frames, building server frames.

See docs/protocol.md for the prose and examples; this module is the source
of truth for field names and error codes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from subsys.core.encoding import dumps
from subsys.core.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "MAX_NESTING",
    "ClientFrame",
    "parse_client_frame",
    "error_frame",
    "Publication",
    "status_frame",
    "escape_surrogates",
]

PROTOCOL_VERSION = 1

ERROR_CODES = {
    "malformed_json": "the frame is not valid JSON",
    "bad_request": "the frame is JSON but not a valid v1 message (wrong type or fields)",
    "unsupported_frame": "binary frames are not part of protocol v1",
    "frame_too_large": "the frame is larger than limits.max_frame_bytes",
    "rate_limited": "more frames than limits.messages_per_second allows; the frame was dropped",
    "invalid_topic": "the topic does not follow the 'feed:param' grammar",
    "unknown_feed": "no feed of that name is configured",
    "invalid_param": "the parameter does not fit the feed's parameter type",
    "too_many_subscriptions": "the connection already has limits.max_subscriptions topics",
    "not_subscribed": "unsubscribe for a topic this connection is not subscribed to",
    "already_subscribed": "subscribe for a topic this connection is already subscribed to",
    "shutting_down": "the node is going away; reconnect to another node",
}

_CLIENT_TYPES = ("subscribe", "unsubscribe", "ping")

# Protocol frames nest one level. A fixed limit makes "too deep" the same answer on every
# Python (the parser's own limit follows the interpreter's recursion limit).
MAX_NESTING = 32


@dataclass(frozen=True, slots=True)
class ClientFrame:
    type: str
    topic: str | None = None
    ref: Any = None


def _reject_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are Python's extension, not JSON (RFC 8259).
    raise ValueError(f"{name} is not JSON")


def _sendable(value: str) -> bool:
    """Can this string go back out in a frame? A lone UTF-16 surrogate (a JSON escape like
    "\\ud800", or half of a pair) cannot be encoded as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nested_deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one client frame; every string it returns is valid Unicode (safe to echo)."""
    try:
        # ValueError also covers integers of more than 4300 digits (Python's conversion limit).
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser allows
        raise ProtocolError("frame is not valid JSON", code="malformed_json") from None
    # Counting brackets is cheap and bounds the nesting, so only a frame that could be too deep is walked.
    if text.count("[") + text.count("{") > MAX_NESTING and _nested_deeper_than(data, MAX_NESTING):
        raise ProtocolError(f"frame is nested deeper than {MAX_NESTING} levels", code="malformed_json")
    if not isinstance(data, dict):
        raise ProtocolError("frame must be a JSON object")
    ref = data.get("ref")
    if ref is not None and not isinstance(ref, (str, int)) or isinstance(ref, bool):
        raise ProtocolError("'ref' must be a string or an integer")
    if isinstance(ref, str) and not _sendable(ref):
        raise ProtocolError("'ref' must be valid Unicode (it has a lone UTF-16 surrogate)")
    kind = data.get("type")
    if kind not in _CLIENT_TYPES:
        raise ProtocolError(f"'type' must be one of {', '.join(_CLIENT_TYPES)}")
    topic = data.get("topic")
    if kind in ("subscribe", "unsubscribe"):
        if not isinstance(topic, str):
            raise ProtocolError(f"'{kind}' needs a string 'topic'")
        if not _sendable(topic):
            raise ProtocolError("'topic' must be valid Unicode (it has a lone UTF-16 surrogate)")
        return ClientFrame(kind, topic, ref)
    return ClientFrame(kind, None, ref)


_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(frame: str) -> str:
    """``frame`` (JSON) with each lone UTF-16 surrogate written as its ``\\uXXXX`` escape.

    Such a character cannot be encoded as UTF-8, so the frame could not be sent
    at all. JSON's own syntax is ASCII, so a surrogate can only sit inside a
    string, where the escape means the same character to a JSON parser.
    """
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", frame)


def error_frame(code: str, message: str, *, topic: str | None = None, ref: Any = None) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if topic is not None:
        frame["topic"] = topic
    if ref is not None:
        frame["ref"] = ref
    return dumps(frame)


def status_frame(topic: str, *, epoch: int, state: str, code: str | None, message: str | None) -> str:
    frame: dict[str, Any] = {"type": "status", "topic": topic, "epoch": epoch, "state": state}
    if code:
        frame["code"] = code
        frame["message"] = message or ""
    return dumps(frame)


@dataclass(slots=True, eq=False)
class Publication:
    """One data message (snapshot or diff) of one topic, serialised once for all receivers."""

    kind: str  # "snapshot" | "diff" | "status"
    topic: str
    epoch: int
    seq: int
    body: dict[str, Any] = field(default_factory=dict)
    _wire: dict[str, str] = field(default_factory=dict)
    # Transport encodings of ``wire()`` (e.g. WebSocket frame bytes), built once for every receiver.
    frames: dict[str, bytes] = field(default_factory=dict)

    def wire(self, as_type: str | None = None) -> str:
        frame_type = as_type or self.kind
        cached = self._wire.get(frame_type)
        if cached is None:
            if self.kind == "status":
                cached = status_frame(self.topic, epoch=self.epoch, **self.body)
            else:
                cached = dumps(
                    {"type": frame_type, "topic": self.topic, "epoch": self.epoch, "seq": self.seq, **self.body}
                )
            self._wire[frame_type] = cached
        return cached
