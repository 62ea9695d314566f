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
import datetime as dt
import json
import logging
import time
import uuid
from typing import Any, Callable, Sequence

import asyncpg
from asyncpg.pgproto import pgproto

from subsys.config import DatabaseConfig, Feed
from subsys.core.diff import Rows, index_rows
from subsys.core.encoding import encode_row
from subsys.core.errors import PollError

__all__ = [
    "Database", "classify_error", "run_feed_query", "limited_sql", "acquire", "release", "feed_rows", "split_merged",
    "bucket_merged", "encodes_as_compared", "prepare_merged", "Unmergeable",
]

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
    """The pool's reset on release: nothing to send (see Database.open)."""


async def acquire(pool: asyncpg.Pool, timeout: float) -> asyncpg.Connection:
    """A connection within ``timeout``, or a PollError saying the database is unavailable."""
    try:
        return await pool.acquire(timeout=timeout)
    except asyncio.TimeoutError as exc:
        # No connection in time (server not answering, or the pool exhausted): the query never
        # ran, so this is not a query_timeout.
        raise PollError(f"database unavailable: no connection within {timeout:g}s", code="database_unavailable") from exc
    except Exception as exc:
        raise classify_error(exc) from exc


async def release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Give a connection back; a broken one is terminated, never a reason to fail a poll."""
    try:
        await pool.release(conn)
    except Exception as exc:  # the server went away under us: the pool replaces the connection
        log.debug("releasing a broken connection: %r", exc)
        # asyncpg's pool may have terminated it and detached the proxy already; terminate()
        # on a detached proxy raises InterfaceError, which must not replace the poll's outcome.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()


def feed_rows(records: Sequence[asyncpg.Record], feed: Feed, names: Sequence[str] | None = None) -> Rows:
    """One topic's result as rows by key, or the PollError a per-topic poll would raise.

    ``names`` (with ``records`` of a merged statement) are the feed's columns, which sit
    between the parameter's ordinal and the row number: values are taken by position.
    """
    if len(records) > feed.max_rows:
        raise PollError(f"result has more than max_rows={feed.max_rows} rows", code="row_limit_exceeded")
    if names is None:
        return index_rows((encode_row(record.items()) for record in records), feed.key)
    return index_rows((encode_row(zip(names, record[1:-1])) for record in records), feed.key)


def bucket_merged(records: Sequence[asyncpg.Record], count: int) -> tuple[list[list[asyncpg.Record]], tuple[str, ...]]:
    """A merged statement's rows (see subsys.node.merge) by parameter, and the feed's column names."""
    buckets: list[list[asyncpg.Record]] = [[] for _ in range(count)]
    for record in records:
        buckets[record[0] - 1].append(record)
    for bucket in buckets:
        # Each topic's rows in the order its query gave them (the row number), whatever the
        # plan interleaved; already in order in practice, which the sort checks in O(n).
        bucket.sort(key=_row_number)
    return buckets, (tuple(records[0].keys())[1:-1] if records else ())


def split_merged(records: Sequence[asyncpg.Record], feed: Feed, count: int) -> list[Rows | PollError]:
    """Each parameter's outcome from a merged statement's rows: what its own query would give."""
    buckets, names = bucket_merged(records, count)
    outcomes: list[Rows | PollError] = []
    for bucket in buckets:
        try:
            outcomes.append(feed_rows(bucket, feed, names))
        except PollError as exc:
            outcomes.append(exc)
    return outcomes


# Types whose values encode the same whenever they compare equal (not Decimal: 1.0 == 1.00; not
# float: 0.0 == -0.0; not json: 1 == 1.0 == True inside; not time: equal instants, other offsets).
# A column's type cannot change under a prepared statement (PostgreSQL refuses the next run).
_SAME_ENCODING = frozenset({type(None), bool, int, str, bytes, uuid.UUID, pgproto.UUID, dt.date, dt.datetime})


def encodes_as_compared(values: Sequence[Sequence[Any]]) -> bool:
    """True if rows of these raw values equal to them would also encode the same (see above)."""
    same = _SAME_ENCODING
    return all(type(value) in same for row in values for value in row)


def _row_number(record: asyncpg.Record) -> int:
    return record[-1]


async def run_feed_query(
    pool: asyncpg.Pool, feed: Feed, param: Any, *, holder: Any = None, on_sent: Callable[[], None] | None = None
) -> Rows:
    """Run the feed's query for one parameter.

    ``holder.conn`` and ``holder.pid`` are the connection and its server process while the
    query runs and until the connection is back in the pool (a stuck release included), so
    reaping can terminate it. ``on_sent`` is called once a connection is had and the query
    goes to the server (not when the database is unavailable).
    """
    timeout = feed.statement_timeout
    conn = await acquire(pool, timeout)
    if holder is not None:
        holder.conn, holder.pid = conn, conn.get_server_pid()
    if on_sent is not None:
        on_sent()
    try:
        records = await conn.fetch(limited_sql(feed), param, timeout=timeout)
    except Exception as exc:
        raise classify_error(exc) from exc
    finally:
        await release(pool, conn)
        if holder is not None:
            holder.conn = None
    return feed_rows(records, feed)


class Unmergeable(Exception):
    """PostgreSQL refuses a feed's merged statement although it accepts the feed's own query."""


async def prepare_merged(pool: asyncpg.Pool, feed: Feed, render: Callable[[str], str]) -> str:
    """The merged statement of ``feed``, checked by the server; ``render(array type)`` builds it.

    $1's type is the one PostgreSQL infers for the feed's own query (what a per-topic poll
    binds), so function overloads, operators and index use are the same merged or not.
    Raises :class:`Unmergeable` (for good: say why, poll per topic) or a PollError (the
    feed's own query fails, or the database is unavailable: what every topic's poll would say).
    """
    timeout = feed.statement_timeout
    conn = await acquire(pool, timeout)
    try:
        try:
            own = await conn.prepare(limited_sql(feed), timeout=timeout)
            params = own.get_parameters()
            if len(params) != 1:
                raise Unmergeable(f"PostgreSQL sees {len(params)} parameters in the feed's query, not one")
            array = await conn.fetchval(
                "SELECT format_type(typarray, NULL) FROM pg_type WHERE oid = $1 AND typarray <> 0",
                params[0].oid, timeout=timeout,
            )  # fmt: skip
        except (Unmergeable, PollError):
            raise
        except Exception as exc:
            raise classify_error(exc) from exc
        if array is None:
            raise Unmergeable(f"$1 is of type {params[0].name}, which has no array type")
        sql = render(array)
        try:
            await conn.prepare(sql, timeout=timeout)
        except asyncpg.PostgresError as exc:
            # Syntax or semantics (class 42) or a feature (0A): the rewrite is refused as such, e.g.
            # $1 where PostgreSQL allows no column of an outer query. Anything else is transient.
            if (exc.sqlstate or "")[:2] in ("42", "0A"):
                raise Unmergeable(f"PostgreSQL refuses the merged statement: {exc}") from None
            raise classify_error(exc) from exc
        except Exception as exc:
            raise classify_error(exc) from exc
        return sql
    finally:
        await release(pool, conn)


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
            # Feeds are read-only SELECTs: no session state to reset between polls. asyncpg's
            # default (reset=None) sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
            # RESET ALL" on every release, one more statement per poll; a custom reset replaces
            # it (asyncpg still rolls back a transaction left open, which feeds never leave).
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
                    await release(self.pool, conn)
            ok, detail = True, "ok"
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._checked = (time.monotonic(), ok, detail)
        return ok, detail
