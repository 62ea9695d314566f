"""The poller: one task per owned topic that runs the feed's SQL on an interval.

The topic's parameter is always a bound parameter ($1). The feed's SQL is
wrapped in ``LIMIT max_rows + 1`` so an oversized result is detected without
fetching it all; the query has a client-enforced timeout (asyncpg cancels it
on the server). Failures back off exponentially up to a cap, are recorded in
the topic's state and sent to subscribers as a ``status``; the first good poll
afterwards publishes a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import asyncpg

from .config import DatabaseConfig, Feed
from .diff import Rows, index_rows
from .encoding import encode_row
from .errors import PollError
from .registry import TopicState

__all__ = ["Poller", "run_feed_query", "classify_error"]

log = logging.getLogger(__name__)

_UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,
)


def classify_error(exc: BaseException) -> PollError:
    if isinstance(exc, PollError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, asyncpg.exceptions.QueryCanceledError)):
        return PollError("query timed out (statement_timeout)", code="query_timeout")
    if isinstance(exc, _UNAVAILABLE):
        return PollError(f"database unavailable: {exc}", code="database_unavailable")
    if isinstance(exc, asyncpg.PostgresError):
        return PollError(f"query failed: {exc}", code="query_failed")
    return PollError(f"poll failed: {exc!r}", code="poll_failed")


def _limited_sql(feed: Feed) -> str:
    return f"SELECT * FROM ({feed.sql}) AS subsys_feed LIMIT {feed.max_rows + 1}"


async def run_feed_query(pool: asyncpg.Pool, feed: Feed, param: Any) -> Rows:
    timeout = feed.statement_timeout
    try:
        conn = await pool.acquire(timeout=timeout)
    except asyncio.TimeoutError as exc:
        # No connection in time (server not answering, or the pool exhausted): the query never
        # ran, so this is not a query_timeout.
        raise PollError(f"database unavailable: no connection within {timeout:g}s", code="database_unavailable") from exc
    except Exception as exc:  # every failure becomes a PollError with a code
        raise classify_error(exc) from exc
    try:
        records = await conn.fetch(_limited_sql(feed), param, timeout=timeout)
    except Exception as exc:
        raise classify_error(exc) from exc
    finally:
        await pool.release(conn)
    if len(records) > feed.max_rows:
        raise PollError(f"result has more than max_rows={feed.max_rows} rows", code="row_limit_exceeded")
    return index_rows((encode_row(record.items()) for record in records), feed.key)


class Poller:
    """Polls one topic for one ownership (``epoch``); stops when fenced or cancelled."""

    def __init__(
        self,
        *,
        state: TopicState,
        pool: asyncpg.Pool,
        epoch: int,
        database: DatabaseConfig,
        can_publish: Callable[[str, int], bool],
    ) -> None:
        self.state = state
        self.epoch = epoch
        self._pool = pool
        self._database = database
        self._can_publish = can_publish

    async def run(self) -> None:
        state, feed = self.state, self.state.feed
        backoff = self._database.retry_initial
        next_at = time.monotonic()
        log.info("poller started topic=%s epoch=%d interval=%.3fs", state.topic, self.epoch, feed.interval)
        try:
            while True:
                started = time.monotonic()
                try:
                    rows = await run_feed_query(self._pool, feed, state.param)
                except PollError as exc:
                    self._record(started, failed=True)
                    if not self._can_publish(state.topic, self.epoch):
                        log.info("poller fenced topic=%s epoch=%d", state.topic, self.epoch)
                        return
                    if state.state != "error" or (state.last_error or {}).get("code") != exc.code:
                        log.warning("poll failed topic=%s code=%s: %s", state.topic, exc.code, exc.message)
                    state.publish_error(exc.code, exc.message, epoch=self.epoch)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._database.retry_max)
                    next_at = time.monotonic()
                    continue
                self._record(started, failed=False)
                backoff = self._database.retry_initial
                if not self._can_publish(state.topic, self.epoch):
                    log.info("poller fenced topic=%s epoch=%d: result discarded", state.topic, self.epoch)
                    return
                if state.state == "error":
                    log.info("poll recovered topic=%s", state.topic)
                state.publish_rows(rows, epoch=self.epoch)
                next_at += feed.interval
                now = time.monotonic()
                if next_at < now:  # overran the interval: don't burst to catch up
                    next_at = now
                await asyncio.sleep(next_at - now)
        finally:
            log.info("poller stopped topic=%s epoch=%d", state.topic, self.epoch)

    def _record(self, started: float, *, failed: bool) -> None:
        stats = self.state.stats
        duration = (time.monotonic() - started) * 1000
        stats.polls += 1
        stats.failures += failed
        stats.last_poll_at = time.time()
        stats.last_duration_ms = round(duration, 3)
        stats.max_duration_ms = max(stats.max_duration_ms, round(duration, 3))
