"""The poller: polls one owned topic at one epoch, until fenced or cancelled.

The topic's parameter is always a bound parameter ($1). Failures back off
exponentially up to a cap, are recorded in the topic's stream and sent to
subscribers as a ``status``; the first good poll afterwards publishes a
fresh snapshot. No exception ends the task except cancellation: every
database failure is a :class:`PollError` (see :mod:`subsys.node.database`),
and anything else is logged, reported as ``poll_failed`` and retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from subsys.config import DatabaseConfig
from subsys.core.diff import Rows
from subsys.core.errors import FencedError, PollError
from subsys.node.stream import TopicStream

__all__ = ["Poller", "QueryRunner", "deliver", "UNCHANGED"]

log = logging.getLogger(__name__)

QueryRunner = Callable[[TopicStream, "Poller"], Awaitable[Rows]]


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


# An outcome: the same rows as the stream published last (known without decoding them).
UNCHANGED: Any = _Unchanged()


def deliver(
    stream: TopicStream,
    epoch: int,
    outcome: Rows | PollError,
    duration_ms: float,
    can_publish: Callable[[str, int], bool],
) -> bool:
    """Publish one poll's outcome for ``stream`` at ``epoch``; False if fenced (stop polling it).

    Shared by the per-topic poller and the merged one (subsys.node.feedpoller), so a topic's
    frames are the same whichever polled it.
    """
    error = outcome if isinstance(outcome, PollError) else None
    stream.record_poll(duration_ms, failed=error is not None)
    if not can_publish(stream.topic, epoch):
        log.info("poller fenced topic=%s epoch=%d: result discarded", stream.topic, epoch)
        return False
    if outcome is UNCHANGED:
        return epoch >= stream.epoch  # nothing to publish; an older epoch is fenced as publish_rows would
    try:
        if error is not None:
            if stream.state != "error" or (stream.last_error or {}).get("code") != error.code:
                log.warning("poll failed topic=%s code=%s: %s", stream.topic, error.code, error.message)
            stream.publish_error(error.code, error.message, epoch=epoch)
        else:
            if stream.state == "error":
                log.info("poll recovered topic=%s", stream.topic)
            stream.publish_rows(outcome, epoch=epoch)  # type: ignore[arg-type]
    except FencedError as exc:
        log.warning("poller fenced by its stream: %s", exc)
        return False
    return True


class Poller:
    """Polls one topic for one ownership (``epoch``); stops when fenced or cancelled."""

    def __init__(
        self,
        *,
        stream: TopicStream,
        epoch: int,
        query: QueryRunner,
        database: DatabaseConfig,
        can_publish: Callable[[str, int], bool],
    ) -> None:
        self.stream = stream
        self.epoch = epoch
        self._query = query
        self._database = database
        self._can_publish = can_publish
        self.conn: Any = None  # the database connection of the query in flight (reaping closes it)
        self.pid: int | None = None  # its server process (evidence for a stuck query)

    async def run(self) -> None:
        stream, feed = self.stream, self.stream.feed
        backoff = self._database.retry_initial
        next_at = time.monotonic()
        log.info("poller started topic=%s epoch=%d interval=%.3fs", stream.topic, self.epoch, feed.interval)
        try:
            while True:
                started = time.monotonic()
                try:
                    outcome: Rows | PollError = await self._query(stream, self)
                except PollError as exc:
                    outcome = exc
                except Exception as exc:  # a bug, not the database: say so, keep polling
                    log.exception("unexpected poll failure topic=%s", stream.topic)
                    outcome = PollError(f"poll failed: {exc!r}", code="poll_failed")
                error = outcome if isinstance(outcome, PollError) else None
                if not deliver(stream, self.epoch, outcome, (time.monotonic() - started) * 1000, self._can_publish):
                    return
                if error is not None:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._database.retry_max)
                    next_at = time.monotonic()
                    continue
                backoff = self._database.retry_initial
                next_at += feed.interval
                now = time.monotonic()
                if next_at < now:  # overran the interval: don't burst to catch up
                    next_at = now
                await asyncio.sleep(next_at - now)
        finally:
            log.info("poller stopped topic=%s epoch=%d", stream.topic, self.epoch)

    def describe(self) -> dict[str, Any]:
        return {"topic": self.stream.topic, "epoch": self.epoch, "pid": self.pid}
