"""Logging: human-readable by default, one JSON object per line with ``json``."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging", "RepeatedLog"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        node = getattr(record, "node", None) or _JsonFormatter.node
        if node:
            entry["node"] = node
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    node = ""


def setup_logging(*, fmt: str = "human", level: str = "INFO", node: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        _JsonFormatter.node = node
        handler.setFormatter(_JsonFormatter())
    else:
        prefix = f"[{node}] " if node else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_client_errors_without_tracebacks)


def _client_errors_without_tracebacks(record: logging.LogRecord) -> bool:
    """A malformed HTTP request is the client's fault: aiohttp answers 400 and logs it as an
    ERROR with a traceback. Keep one warning line, so a log scan for tracebacks finds only bugs."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and type(exc).__name__ in ("BadHttpMessage", "BadStatusLine", "LineTooLong",
                                                  "InvalidHeader", "BadHttpMethod", "InvalidURLError"):  # fmt: skip
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "rejected a malformed HTTP request: %s", (exc,)
        record.exc_info, record.exc_text = None, None
    return True


class RepeatedLog:
    """Log a repeated condition once, then one line with a count per ``every`` seconds.

    A condition is identified by ``key``; :meth:`clear` ends it (and says how
    often it repeated since the last line). Retry loops use this so that an
    outage costs a few log lines, not one per attempt.
    """

    def __init__(self, logger: logging.Logger, *, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._open: dict[str, list] = {}  # key -> [first_at, last_line_at, unreported count, total, level, msg]

    def log(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Record one occurrence; True if it was written out (the first, or a periodic summary)."""
        now = time.monotonic()
        entry = self._open.get(key)
        if entry is None:
            self._open[key] = [now, now, 0, 1, level, msg]
            self._log.log(level, msg, *args)
            return True
        entry[2] += 1
        entry[3] += 1
        if now - entry[1] >= self._every:
            self._log.log(level, msg + " (repeated %d times in the last %.0fs)", *args, entry[2], now - entry[1])
            entry[1], entry[2] = now, 0
            return True
        return False

    def clear(self, key: str, msg: str | None = None, *args: object, level: int = logging.INFO) -> None:
        entry = self._open.pop(key, None)
        if entry is not None and (msg or entry[3] > 1):
            text = msg or "recovered"
            self._log.log(level, text + " (after %d occurrence(s) over %.1fs)", *args, entry[3], time.monotonic() - entry[0])

    def active(self, key: str) -> bool:
        return key in self._open

    def count(self, key: str) -> int:
        entry = self._open.get(key)
        return entry[3] if entry else 0
