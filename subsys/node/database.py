"""Database access for pollers: the pool, running a feed's query, and naming every failure.

Every exception the database layer can raise (connect, acquire, query,
release, the pool's reset) becomes a :class:`PollError` with one of the
documented status codes (docs/protocol.md, ``status``), so a poller never
dies of one. A PostgreSQL restart, for instance, surfaces as
``ConnectionDoesNotExistError`` from a release or asyncpg's
``InternalClientError('cannot switch to state ...')`` from a query: both
are ``database_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import asyncpg

from subsys.config import DatabaseConfig, Feed
from subsys.core.diff import Rows, index_rows
from subsys.core.encoding import encode_row
from subsys.core.errors import PollError

__all__ = ["Database", "classify_error", "run_feed_query", "limited_sql"]

log = logging.getLogger(__name__)

_UNAVAILABLE = (
    OSError,
    ConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.InterfaceError,  # includes InternalClientError: a connection torn down mid-protocol
    asyncpg.exceptions.InternalClientError,
)


def classify_error(exc: BaseException) -> PollError:
    """The documented status code for any exception of the database layer."""
    if isinstance(exc, PollError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, asyncpg.exceptions.QueryCanceledError)):
        return PollError("query timed out (statement_timeout)", code="query_timeout")
    if isinstance(exc, _UNAVAILABLE):
        return PollError(f"database unavailable: {exc}", code="database_unavailable")
    if isinstance(exc, asyncpg.PostgresError):
        return PollError(f"query failed: {exc}", code="query_failed")
    return PollError(f"poll failed: {exc!r}", code="poll_failed")


def limited_sql(feed: Feed) -> str:
    return f"SELECT * FROM ({feed.sql}) AS subsys_feed LIMIT {feed.max_rows + 1}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb arrive as JSON values, not strings (see subsys.core.encoding).
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's reset step: nothing to undo after a read-only feed query."""


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Give a connection back; a broken one is terminated, never a reason to fail a poll."""
    try:
        await pool.release(conn)
    except Exception as exc:  # the server went away under us: the pool replaces the connection
        log.debug("releasing a broken connection: %r", exc)
        # asyncpg's pool may have terminated it and detached the proxy already; terminate()
        # on a detached proxy raises InterfaceError, which must not replace the poll's outcome.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()


async def run_feed_query(pool: asyncpg.Pool, feed: Feed, param: Any, *, holder: Any = None) -> Rows:
    """Run the feed's query for one parameter. ``holder.conn`` is the connection while it runs."""
    timeout = feed.statement_timeout
    try:
        conn = await pool.acquire(timeout=timeout)
    except asyncio.TimeoutError as exc:
        # No connection in time (server not answering, or the pool exhausted): the query never
        # ran, so this is not a query_timeout.
        raise PollError(f"database unavailable: no connection within {timeout:g}s", code="database_unavailable") from exc
    except Exception as exc:
        raise classify_error(exc) from exc
    if holder is not None:
        holder.conn = conn
    try:
        records = await conn.fetch(limited_sql(feed), param, timeout=timeout)
    except Exception as exc:
        raise classify_error(exc) from exc
    finally:
        if holder is not None:
            holder.conn = None
        await _release(pool, conn)
    if len(records) > feed.max_rows:
        raise PollError(f"result has more than max_rows={feed.max_rows} rows", code="row_limit_exceeded")
    return index_rows((encode_row(record.items()) for record in records), feed.key)


class Database:
    """The node's connection pool and a cached health check."""

    def __init__(self, *, config: DatabaseConfig, application_name: str) -> None:
        self.config = config
        self.application_name = application_name
        self.pool: asyncpg.Pool | None = None
        self._checked: tuple[float, bool, str] = (0.0, False, "not checked")

    async def open(self) -> None:
        options: dict[str, Any] = dict(
            max_size=self.config.max_pool,
            server_settings={"application_name": self.application_name},
            init=_init_connection,
            # Feeds are read-only SELECTs: no session state to reset between polls. A no-op (not
            # None: None means asyncpg's default) spares a reset query on every release.
            reset=_no_reset,
        )
        try:
            self.pool = await asyncpg.create_pool(self.config.url, min_size=self.config.min_pool, **options)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Serve anyway (not ready): pollers retry with backoff and /health says why.
            log.warning("database unreachable at start (%s); connecting lazily", exc)
            self.pool = await asyncpg.create_pool(self.config.url, min_size=0, **options)

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (asyncio.TimeoutError, Exception):
                pool.terminate()

    async def health(self) -> tuple[bool, str]:
        checked_at, ok, detail = self._checked
        if time.monotonic() - checked_at < 1.0:
            return ok, detail
        try:
            assert self.pool is not None
            async with asyncio.timeout(2.0):
                conn = await self.pool.acquire()
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await _release(self.pool, conn)
            ok, detail = True, "ok"
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._checked = (time.monotonic(), ok, detail)
        return ok, detail
