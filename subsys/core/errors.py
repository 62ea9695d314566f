"""Every domain error of subsys, in one place.

Errors that reach a client carry a stable machine-readable ``code``; the
codes are part of protocol v1 (docs/protocol.md) and never change meaning.
"""

from __future__ import annotations

__all__ = [
    "SubsysError",
    "ConfigError",
    "ProtocolError",
    "TopicError",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "FencedError",
    "PollError",
]


class SubsysError(Exception):
    """Base of every error subsys raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(SubsysError):
    """A configuration problem; names the file and key at fault."""

    code = "config_error"

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


class ProtocolError(SubsysError):
    """A client frame that breaks protocol v1 (malformed, wrong types, limits)."""

    code = "bad_request"


class TopicError(ProtocolError):
    """A topic that does not parse, names an unknown feed or a bad parameter."""

    code = "invalid_topic"


class CoordinatorError(SubsysError):
    code = "coordinator_error"


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator (Consul) cannot be reached right now."""

    code = "coordinator_unavailable"


class FencedError(CoordinatorError):
    """This node can no longer prove it holds an ownership; it must not publish."""

    code = "fenced"


class PollError(SubsysError):
    """A feed query failed; ``code`` says how (database_unavailable, query_timeout, ...)."""

    code = "poll_failed"
