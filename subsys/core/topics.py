"""Topic grammar: ``feed:param``.

* feed: 1-64 chars, a lowercase letter then lowercase letters, digits, ``_``.
* param: 1-128 chars of ``A-Z a-z 0-9 _ - . @``; for ``int`` feeds the
  plain decimal form (``42``, not ``042`` or ``4_2``), for ``uuid`` feeds the
  canonical lowercase hyphenated form, so one topic has one name (and one poller).

Anything else is rejected at the edge with ``invalid_topic``. The parameter
is always passed to PostgreSQL as a bound parameter; the grammar is a
guard against garbage, not the defence against injection.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from subsys.core.errors import TopicError

__all__ = ["Topic", "parse_topic", "convert_param", "PARAM_TYPES", "MAX_TOPIC_LENGTH"]

_TOPIC_RE = re.compile(r"^([a-z][a-z0-9_]{0,63}):([A-Za-z0-9_.@\-]{1,128})$")
MAX_TOPIC_LENGTH = 64 + 1 + 128
PARAM_TYPES = ("text", "int", "uuid")


@dataclass(frozen=True, slots=True)
class Topic:
    feed: str
    param: str

    def __str__(self) -> str:
        return f"{self.feed}:{self.param}"


def parse_topic(value: Any) -> Topic:
    if not isinstance(value, str):
        raise TopicError("topic must be a string 'feed:param'")
    if len(value) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic longer than {MAX_TOPIC_LENGTH} characters")
    match = _TOPIC_RE.fullmatch(value)  # not .match: "$" also matches before a final "\n"
    if match is None:
        raise TopicError(
            "topic must be 'feed:param': feed is [a-z][a-z0-9_]{0,63}, param is [A-Za-z0-9_.@-]{1,128}"
        )
    return Topic(match.group(1), match.group(2))


def convert_param(raw: str, param_type: str) -> Any:
    """Turn a topic's text parameter into the Python value asyncpg binds."""
    if param_type == "text":
        return raw
    if param_type == "int":
        try:
            value = int(raw, 10)
        except ValueError:
            raise TopicError(f"parameter {raw!r} is not an integer", code="invalid_param") from None
        if not -(2**63) <= value < 2**63:
            raise TopicError(f"parameter {raw!r} is out of range", code="invalid_param")
        if str(value) != raw:
            # One topic, one spelling: orders:007 and orders:1_0 would be extra pollers of the same rows.
            raise TopicError(f"parameter {raw!r} must be written as {value}", code="invalid_param")
        return value
    if param_type == "uuid":
        try:
            value = uuid.UUID(raw)
        except ValueError:
            raise TopicError(f"parameter {raw!r} is not a UUID", code="invalid_param") from None
        if str(value) != raw:
            raise TopicError(f"parameter {raw!r} must be written as {value}", code="invalid_param")
        return value
    raise TopicError(f"unsupported parameter type {param_type!r}", code="invalid_param")
