"""The recorded history a chaos run is judged from: the database's versions and the faults.

* :data:`SCHEMA`: the rows the writer changes, a control row that makes the
  feed's query slow or hung, and the poll log. The feed's own query
  (``chaos_poll``) writes one poll-log row per execution with
  ``current_setting('application_name')`` = ``subsys:<node>``, and holds a
  shared advisory lock (class 4242, the topic) while it runs, so that polls a
  ``statement_timeout`` cancels (their poll-log row rolls back with them)
  are still seen in flight (:func:`sample_inflight`).
* :class:`RowHistory`: every version each row had, in commit order (the
  writer is the only writer and commits one change at a time). A client's
  view of a topic is "a version the database really had" iff some point ``k``
  of that order gave exactly those rows.
* :class:`Writer`: changes rows (``v`` only ever grows: an update sets the
  next ``v``, a re-insert continues from the last), records each commit, and
  resolves a change whose commit is in doubt (the connection died under it)
  by reading the row back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

__all__ = ["SCHEMA", "FEED_NAME", "feed_config", "RowHistory", "Writer", "FaultRecord", "row_id", "sample_inflight"]

log = logging.getLogger(__name__)

LOCK_CLASS = 4242
ROWS_PER_TOPIC = 6

SCHEMA = f"""
create table chaos_rows (id int primary key, topic int not null, v int not null);
create index chaos_rows_topic on chaos_rows (topic);
create table chaos_ctl (id int primary key, delay float8 not null);
insert into chaos_ctl values (1, 0);
create table poll_log (at timestamptz not null default clock_timestamp(), app text not null, topic int not null);
create index poll_log_at on poll_log (at);
create function chaos_poll(t int) returns table (id int, topic int, v int)
language plpgsql volatile as $$
declare d float8;
begin
  perform pg_advisory_xact_lock_shared({LOCK_CLASS}, t);
  insert into poll_log (app, topic) values (current_setting('application_name'), t);
  select c.delay into d from chaos_ctl c where c.id = 1;
  if d > 0 then perform pg_sleep(d); end if;
  return query select r.id, r.topic, r.v from chaos_rows r where r.topic = t order by r.id;
end $$;
"""

FEED_NAME = "rows"


def feed_config(interval: float, statement_timeout: float) -> dict[str, Any]:
    return {"sql": "select * from chaos_poll($1)", "key": ["id"], "param": "int",
            "interval": interval, "statement_timeout": statement_timeout}  # fmt: skip


def row_id(topic: int, index: int) -> int:
    return topic * 1000 + index


@dataclass
class FaultRecord:
    """One applied fault: what, to whom, when (wall clock and monotonic), and what it measured."""

    round: int
    kind: str
    target: str = ""
    started: float = 0.0  # time.time()
    ended: float = 0.0
    started_mono: float = 0.0
    ended_mono: float = 0.0
    k_end: int = 0  # the writer's last commit when the fault ended
    owned: dict[str, int] = field(default_factory=dict)  # topics the victim owned: topic -> epoch
    failover: float | None = None
    convergence: float | None = None
    zombies_cleared: float | None = None
    exit_code: int | None = None  # of a SIGTERM'd node
    resyncs: int = 0  # resyncs the clients got from the fault to the round's end (ownership changes)
    notes: list[str] = field(default_factory=list)


class RowHistory:
    """Every version of every row, indexed by ``k``: the writer's commit counter (0 = the seed)."""

    def __init__(self) -> None:
        self.k = 0
        self.times: list[float] = [time.monotonic()]  # monotonic time of commit k
        self._timeline: dict[int, tuple[list[int], list[int | None]]] = {}  # id -> (ks, values)
        self.topic_rows: dict[int, set[int]] = {}
        # The writer's change in flight, (topic, id, value): committed at the server maybe before
        # ``record`` runs, so a client may see it first (the runner and the writer share one loop).
        self.pending: tuple[int, int, int | None] | None = None

    def seed(self, topic: int, rid: int, value: int | None) -> None:
        self._timeline[rid] = ([0], [value])
        self.topic_rows.setdefault(topic, set()).add(rid)

    def record(self, topic: int, rid: int, value: int | None) -> int:
        self.k += 1
        self.times.append(time.monotonic())
        ks, values = self._timeline.setdefault(rid, ([0], [None]))
        ks.append(self.k)
        values.append(value)
        self.topic_rows.setdefault(topic, set()).add(rid)
        return self.k

    def current(self, rid: int) -> int | None:
        return self._timeline[rid][1][-1] if rid in self._timeline else None

    def last_value(self, rid: int) -> int:
        """The highest ``v`` the row ever had (a re-insert continues from it)."""
        return max(v for v in self._timeline[rid][1] if v is not None)

    def current_rows(self, topic: int) -> dict[int, int]:
        return {rid: v for rid in self.topic_rows.get(topic, ()) if (v := self.current(rid)) is not None}

    def _spans(self, rid: int, value: int | None) -> list[tuple[int, float]]:
        """The ``[k_from, k_to)`` spans in which row ``rid`` had ``value`` (None: absent)."""
        ks, values = self._timeline.get(rid, ([0], [None]))
        spans = []
        for i, v in enumerate(values):
            if v == value:
                spans.append((ks[i], ks[i + 1] if i + 1 < len(ks) else math.inf))
        return spans

    def versions(self, topic: int, view: dict[int, int]) -> list[tuple[int, float]]:
        """The spans of ``k`` at which the database's rows of ``topic`` were exactly ``view`` ([] = never)."""
        rows = self.topic_rows.get(topic, set())
        if any(rid not in rows for rid in view):
            return []
        spans: list[tuple[int, float]] = [(0, math.inf)]
        for rid in rows:
            mine = self._spans(rid, view.get(rid))
            spans = [(max(a, c), min(b, d)) for a, b in spans for c, d in mine if max(a, c) < min(b, d)]
            if not spans:
                return self._pending_version(topic, view)
        return spans

    def _pending_version(self, topic: int, view: dict[int, int]) -> list[tuple[int, float]]:
        """``[(k + 1, inf)]`` if ``view`` is the rows with the writer's in-flight change applied."""
        if self.pending is None or self.pending[0] != topic:
            return []
        _topic, pending_rid, pending_value = self.pending
        expected = {rid: self.current(rid) for rid in self.topic_rows.get(topic, set())}
        expected[pending_rid] = pending_value
        if view == {rid: v for rid, v in expected.items() if v is not None}:
            return [(self.k + 1, math.inf)]
        return []

    def k_at(self, mono: float) -> int:
        """The last commit at or before monotonic time ``mono``."""
        return max(0, bisect.bisect_right(self.times, mono) - 1)


async def sample_inflight(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    """``(application_name, topic)`` of every feed query running now (its advisory lock)."""
    rows = await conn.fetch(
        "select a.application_name as app, l.objid::int as topic from pg_locks l"
        " join pg_stat_activity a on a.pid = l.pid"
        " where l.locktype = 'advisory' and l.classid = $1 and l.granted",
        LOCK_CLASS,
    )
    return [(row["app"], row["topic"]) for row in rows if row["app"].startswith("subsys:")]


# InternalClientError: asyncpg's protocol state machine, when the server dropped the connection
# under a statement ("cannot switch to state 12; another operation is in progress"); it once
# ended the writer in the middle of a PostgreSQL restart.
_DOUBT = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.AdminShutdownError,
          asyncpg.CannotConnectNowError, asyncpg.InternalClientError, asyncio.TimeoutError)  # fmt: skip


def _note_unexpected(exc: BaseException) -> None:
    """A failure outside the usual connection errors is logged once per type: the next run names it."""
    if not isinstance(exc, _DOUBT) and type(exc) not in _UNEXPECTED_SEEN:
        _UNEXPECTED_SEEN.add(type(exc))
        log.warning("writer: unexpected %r (treated as a lost connection)", exc, exc_info=exc)


_UNEXPECTED_SEEN: set[type] = set()


class Writer:
    """Changes rows at ``rate`` per second, one transaction per change, and records each commit."""

    def __init__(self, url: str, history: RowHistory, topics: list[int], *, rate: float, seed: int) -> None:
        self.url, self.history, self.topics, self.rate = url, history, topics, rate
        self.rng = random.Random(seed)
        self.conn: asyncpg.Connection | None = None
        self.paused = asyncio.Event()
        self.idle = asyncio.Event()  # set while paused and no change is in flight
        self.errors = 0
        self.doubtful = 0  # changes whose commit had to be read back
        self._marking: asyncio.Future | None = None
        # What the writer is doing, and why it stopped: a round whose changes never come names it.
        self.step = "not started"
        self.failure: BaseException | None = None

    async def seed_rows(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            rows = [(row_id(t, i), t, 0) for t in self.topics for i in range(ROWS_PER_TOPIC)]
            await conn.executemany("insert into chaos_rows (id, topic, v) values ($1, $2, $3)", rows)
        finally:
            await conn.close()
        for rid, topic, v in rows:
            self.history.seed(topic, rid, v)

    def _next_change(self) -> tuple[str, int, int, int | None]:
        """(sql kind, topic, id, new value): mostly updates; some deletes and re-inserts."""
        topic = self.rng.choice(self.topics)
        rids = sorted(self.history.topic_rows[topic])
        present = [r for r in rids if self.history.current(r) is not None]
        absent = [r for r in rids if self.history.current(r) is None]
        roll = self.rng.random()
        if absent and roll < 0.08:
            rid = self.rng.choice(absent)
            return "insert", topic, rid, self.history.last_value(rid) + 1
        if len(present) > 2 and roll > 0.93:
            return "delete", topic, self.rng.choice(present), None
        rid = self.rng.choice(present)
        return "update", topic, rid, (self.history.current(rid) or 0) + 1

    async def _connect(self) -> asyncpg.Connection:
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(10):  # not wait_for: on 3.11 it can lose a cancellation
                    return await asyncpg.connect(self.url, timeout=5)
            except Exception as exc:  # the server is away: anything but "try again" would end the writer
                _note_unexpected(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _read_back(self, rid: int) -> Any:
        """The row's value, on a fresh connection, retried until the server answers.

        A restarting server can take a connection and drop it again: a failure here must not
        end the writer (it did: every later round then timed out waiting for its changes).
        """
        while True:
            with contextlib.suppress(Exception):
                if self.conn is not None:
                    self.conn.terminate()
            self.conn = await self._connect()
            try:
                async with asyncio.timeout(10):
                    return await self.conn.fetchval("select v from chaos_rows where id = $1", rid)
            except Exception as exc:
                _note_unexpected(exc)
                await asyncio.sleep(0.1)

    async def _apply(self, kind: str, topic: int, rid: int, value: int | None) -> None:
        assert self.conn is not None
        if kind == "update":
            await self.conn.execute("update chaos_rows set v = $2 where id = $1", rid, value, timeout=10)
        elif kind == "delete":
            await self.conn.execute("delete from chaos_rows where id = $1", rid, timeout=10)
        else:
            await self.conn.execute("insert into chaos_rows (id, topic, v) values ($1, $2, $3)",
                                    rid, topic, value, timeout=10)  # fmt: skip

    async def _change(self, kind: str, topic: int, rid: int, value: int | None) -> None:
        self.history.pending = (topic, rid, value)
        try:
            await self._commit(kind, topic, rid, value)
        finally:
            self.history.pending = None

    async def _commit(self, kind: str, topic: int, rid: int, value: int | None) -> None:
        if self.conn is None or self.conn.is_closed():
            self.step = "connecting"
            self.conn = await self._connect()
        try:
            self.step = f"{kind} of row {rid}"
            # asyncpg's own timeout is not trusted to fire on a connection the server dropped.
            async with asyncio.timeout(15):
                await self._apply(kind, topic, rid, value)
        except Exception as exc:
            if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _DOUBT):
                self.errors += 1  # the server refused it: not committed
                log.debug("writer: %r", exc)
                return
            # Any other failure leaves the commit in doubt. Only this writer writes: read the
            # row back once connected.
            _note_unexpected(exc)
            self.doubtful += 1
            self.step = f"reading back row {rid}"
            now = await self._read_back(rid)
            if now == value:
                self.history.record(topic, rid, value)
            elif now != self.history.current(rid):
                raise RuntimeError(f"row {rid} has v={now}, neither {value} nor the recorded value") from exc
        else:
            self.history.record(topic, rid, value)

    async def mark(self, timeout: float = 60.0) -> int:
        """Change one row of every topic now; the commit counter once all are committed.

        Run when a fault ends: every topic then has a change the clients can only see
        if the topic's data path works again, so convergence times a real recovery.
        """
        self._marking = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(asyncio.shield(self._marking), timeout)

    async def run(self) -> None:
        period = 1.0 / self.rate
        try:
            while True:
                if self.paused.is_set():
                    self.step = "paused"
                    self.idle.set()
                    while self.paused.is_set():
                        await asyncio.sleep(0.05)
                    self.idle.clear()
                marking, self._marking = self._marking, None
                if marking is not None:
                    for topic in self.topics:
                        rid = min(r for r in self.history.topic_rows[topic] if self.history.current(r) is not None)
                        await self._change("update", topic, rid, (self.history.current(rid) or 0) + 1)
                    if not marking.done():
                        marking.set_result(self.history.k)
                    continue
                await self._change(*self._next_change())
                self.step = "sleeping"
                await asyncio.sleep(period)
        except Exception as exc:
            self.failure = exc
            log.exception("writer: stopped")
            raise
        finally:
            if self.conn is not None:
                self.conn.terminate()

    async def pause(self, timeout: float = 30.0) -> None:
        self.paused.set()
        await asyncio.wait_for(self.idle.wait(), timeout)

    def resume(self) -> None:
        self.paused.clear()

    def state(self) -> str:
        """Where the writer is, for a round's notes: its step, or the error that stopped it."""
        if self.failure is not None:
            return f"stopped by {self.failure!r}"
        return f"busy: {self.step}"
