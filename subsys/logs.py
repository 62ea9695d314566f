"""Logging: human-readable by default, one JSON object per line with ``json``."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]


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
