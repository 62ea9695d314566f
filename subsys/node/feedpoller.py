"""The merged poller: one polling loop per feed per node, one statement per batch of topics.

A ``FeedPoller`` holds the topics of one feed this node polls (each at its own
epoch) and, every ``interval``, runs the feed's merged statement
(:mod:`subsys.node.merge`) once per batch of at most ``database.batch_size``
topics, splits the rows by parameter and publishes each topic at *its* epoch
through the same :func:`subsys.node.poller.deliver` as the per-topic poller.

Per topic in effect:

* **max_rows**: the statement limits each topic to ``max_rows + 1`` rows; a
  topic over it gets ``row_limit_exceeded``, its batch-mates their rows.
* **errors**: a statement that fails for a reason that may be one topic's
  (``query_failed``, ``query_timeout``, ...) is *isolated*: its topics are run
  one by one, each with its own ``statement_timeout``, so each gets its own rows
  or its own error. A topic that fails alone stays *solo* (polled alone with
  ``retry_initial``..``retry_max`` backoff) until it succeeds, then rejoins the
  batch. If every topic of the batch succeeded alone, the batch itself was the
  problem: after a timeout the feed's batches are halved (and grow back later);
  otherwise the merged statement is prepared afresh (the schema may have moved).
* **database unavailable**: says nothing about any one topic: every topic of the
  statement gets it and the feed backs off, as per-topic pollers would.

A new topic is polled at once (failover latency), then joins the schedule. Each
statement runs in its own task, so the loop never waits on the database: a
statement still running ``STOP_WAIT`` after it should have ended (past its
timeouts, or cancelled because its topics stopped) is handed to the node as a
*stuck query* (a zombie, reaped by terminating its connection) and its topics
carry on without it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from subsys.config import DatabaseConfig, Feed
from subsys.core.diff import Rows
from subsys.core.errors import PollError
from subsys.node.database import (
    Unmergeable, acquire, bucket_merged, classify_error, encodes_as_compared, feed_rows, limited_sql, prepare_merged,
    release,
)  # fmt: skip
from subsys.node.merge import MergeTemplate
from subsys.node.poller import UNCHANGED, deliver
from subsys.node.stream import TopicStream

__all__ = ["FeedPoller", "Member", "Statement", "STOP_WAIT"]

log = logging.getLogger(__name__)

STOP_WAIT = 1.0  # a database call this late past its end is stuck (a hung backend)
_GROW_AFTER = 50  # clean merged statements before a halved batch size doubles again


class Owner(Protocol):
    """What a FeedPoller needs from the node's poller set."""

    slots: asyncio.Semaphore  # statements in flight, node-wide (bounded by the pool)
    statements: "collections.Counter[tuple[str, str]]"  # sent to the server, by (feed, "merged" | "alone")

    def pool(self) -> asyncpg.Pool | None: ...
    def can_publish(self, topic: str, epoch: int) -> bool: ...
    def new_id(self) -> str: ...
    def spawn(self, coro: Any, name: str) -> asyncio.Task: ...
    def topic_stopped(self, topic: str) -> None: ...
    def statement_stuck(self, statement: "Statement") -> None: ...
    def unmergeable(self, feed: Feed, reason: str, members: list["Member"]) -> None: ...


@dataclass(eq=False)
class Member:
    stream: TopicStream
    epoch: int
    fresh: bool = True  # not polled yet: polled at once, outside the schedule
    solo: bool = False  # polled alone (after failing alone, or while its batch is isolated)
    backoff: float = 0.0
    retry_at: float = 0.0
    tick: int = -1  # the tick of its last poll: due again when the feed's tick moves past it
    busy: "Statement | None" = None
    isolation: "Isolation | None" = None
    # The raw values of the rows it last published, kept when equal values mean equal frames
    # (database.encodes_as_compared): an equal result next tick is not decoded nor diffed.
    raw: tuple | None = None


@dataclass(eq=False)
class Isolation:
    """A failed batch whose topics are being re-run one by one."""

    cause: str
    pending: set[Member]
    failed: int = 0


@dataclass(eq=False)
class Statement:
    """One database call for some members of a feed: merged, or one topic alone."""

    id: str
    feed: str
    merged: bool
    members: list[Member]
    topics: dict[str, int]  # topic -> epoch it runs for (kept as evidence when they stop)
    sql: str | None = None  # the merged statement it runs (the feed's may be re-prepared meanwhile)
    task: asyncio.Task | None = None
    conn: Any = None  # while it holds a connection (reaping terminates it)
    pid: int | None = None
    started: float = field(default_factory=time.time)
    stuck_since: float | None = None
    why: str = ""
    holds_slot: bool = False
    timer: asyncio.TimerHandle | None = None

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "feed": self.feed, "topics": dict(self.topics), "since": self.stuck_since,
                "started": self.started, "pid": self.pid, "why": self.why}  # fmt: skip


class FeedPoller:
    def __init__(self, feed: Feed, template: MergeTemplate, *, database: DatabaseConfig, owner: Owner,
                 sql: str | None = None) -> None:  # fmt: skip
        self.feed = feed
        self.template = template
        self.database = database
        self.owner = owner
        self.members: dict[str, Member] = {}
        self.batch_size = database.batch_size
        self._sql = sql  # the merged statement, once the server accepted it
        self._statements: set[Statement] = set()
        self._wake = asyncio.Event()
        self._tick = 0
        self._next_tick = time.monotonic()
        self._hold_until = 0.0  # the feed backs off after "database unavailable"
        self._backoff = database.retry_initial
        self._clean = 0
        self._done = False

    # -- membership (immediate: no database call is waited for) ----------------------------

    def add(self, stream: TopicStream, epoch: int) -> None:
        self.remove(stream.topic)
        self.members[stream.topic] = Member(stream, epoch)
        self._wake.set()

    def remove(self, topic: str) -> int | None:
        member = self.members.pop(topic, None)
        if member is None:
            return None
        if member.isolation is not None:
            self._isolated(member, failed=True)  # its verdict is unknown: conclude nothing
        statement, member.busy = member.busy, None
        if statement is not None and statement.task is not None and not any(m.busy is statement for m in statement.members):
            # Nothing left for it to do: stop it, and hand it over as stuck if it will not stop.
            statement.task.cancel()
            self._arm(statement, STOP_WAIT, "cancelled (its topics stopped) and still running", None)
        return member.epoch

    def running(self) -> dict[str, int]:
        return {topic: m.epoch for topic, m in self.members.items()}

    def describe(self) -> dict[str, Any]:
        return {"polling": "merged", "topics": len(self.members), "batch_size": self.batch_size,
                "statements_in_flight": len(self._statements), "prepared": self._sql is not None}  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("feed %s: merged polling, batches of up to %d topics, interval %.3fs",
                 self.feed.name, self.batch_size, self.feed.interval)  # fmt: skip
        try:
            while not self._done:
                self._wake.clear()
                now = time.monotonic()
                if self.members and self._sql is None and (now >= self._hold_until or self._any_fresh()):
                    await self._prepare()
                    continue
                if self._sql is not None:
                    self._launch(now)
                delay = self._next_wake(time.monotonic())
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for statement in list(self._statements):
                if statement.task is not None:
                    statement.task.cancel()

    def _any_fresh(self) -> bool:
        return any(m.fresh and m.busy is None for m in self.members.values())

    def _next_wake(self, now: float) -> float:
        if not self.members:
            return 3600.0
        at = [self._hold_until if self._sql is None else max(self._next_tick, self._hold_until)]
        at += [m.retry_at for m in self.members.values() if m.solo and m.busy is None]
        return max(0.0, min(at) - now)

    async def _prepare(self) -> None:
        pool = self.owner.pool()
        started = time.monotonic()
        try:
            if pool is None:
                raise PollError("database not open", code="database_unavailable")
            self._sql = await prepare_merged(pool, self.feed, lambda array: self.template.render(array, self.feed.max_rows))
        except Unmergeable as exc:
            self._done = True
            self.owner.unmergeable(self.feed, str(exc), list(self.members.values()))
            self.members.clear()
        except PollError as exc:
            # The feed's own query cannot be prepared (or the database is down): every topic's
            # poll would say so. Tell them all, and try again after a backoff.
            for member in list(self.members.values()):
                if member.busy is None:
                    member.fresh = False
                    self._deliver(member, exc, started)
            self._back_off()
        except Exception as exc:  # a bug: say so, keep the loop
            log.exception("feed %s: preparing the merged statement failed", self.feed.name)
            for member in list(self.members.values()):
                if member.busy is None:
                    self._deliver(member, PollError(f"poll failed: {exc!r}", code="poll_failed"), started)
            self._back_off()
        else:
            log.info("feed %s: merged statement prepared", self.feed.name)

    def _launch(self, now: float) -> None:
        if now >= self._next_tick and now >= self._hold_until:
            self._tick += 1
            self._next_tick += self.feed.interval
            if self._next_tick <= now:  # overran: don't burst to catch up
                self._next_tick = now + self.feed.interval
        idle = [m for m in self.members.values() if m.busy is None]
        # New topics at once, outside the schedule (failover latency depends on it); they join the next tick.
        for chunk in _chunks([m for m in idle if m.fresh], self.batch_size):
            self._start(chunk, merged=True)
        for member in idle:
            if member.solo and member.retry_at <= now:
                self._start([member], merged=False)
        if now >= self._hold_until:
            # Due: whoever missed the current tick (one busy at the tick, as soon as it is free).
            due = [m for m in idle if m.busy is None and not m.solo and m.tick < self._tick]
            for chunk in _chunks(due, self.batch_size):
                self._start(chunk, merged=True)

    def _start(self, members: list[Member], *, merged: bool) -> None:
        statement = Statement(
            id=self.owner.new_id(), feed=self.feed.name, merged=merged, members=members,
            topics={m.stream.topic: m.epoch for m in members}, sql=self._sql,
        )  # fmt: skip
        for member in members:
            member.busy = statement
            member.tick = self._tick
        self._statements.add(statement)
        statement.task = self.owner.spawn(self._run(statement), name=f"poll {self.feed.name} {statement.id}")

    # -- one statement ----------------------------------------------------------------------

    async def _run(self, statement: Statement) -> None:
        feed, timeout = self.feed, self.feed.statement_timeout
        try:
            await self.owner.slots.acquire()
            statement.holds_slot = True
            started = time.monotonic()
            self._arm(statement, timeout + STOP_WAIT, "no connection long past its timeout", "database_unavailable")
            pool = self.owner.pool()
            try:
                if pool is None:
                    raise PollError("database not open", code="database_unavailable")
                conn = await acquire(pool, timeout)
            except PollError as exc:
                self._settle(statement, exc, started)
                return
            statement.conn, statement.pid = conn, conn.get_server_pid()
            self.owner.statements[(feed.name, "merged" if statement.merged else "alone")] += 1
            try:
                self._arm(statement, timeout + STOP_WAIT, "still running long past its statement_timeout", "query_timeout")
                outcome: list[tuple[Rows | PollError, tuple | None]] | PollError
                try:
                    if statement.merged:
                        params = [m.stream.param for m in statement.members]
                        records = await conn.fetch(statement.sql, params, timeout=timeout)
                        buckets, names = bucket_merged(records, len(params))
                        outcome = [self._outcome(m, b, names) if m.busy is statement else (UNCHANGED, None)
                                   for m, b in zip(statement.members, buckets)]  # fmt: skip
                    else:
                        records = await conn.fetch(limited_sql(feed), statement.members[0].stream.param, timeout=timeout)
                        try:
                            outcome = [(feed_rows(records, feed), None)]
                        except PollError as exc:
                            outcome = [(exc, None)]
                except Exception as exc:
                    outcome = classify_error(exc)
                # Publish before giving the connection back: a release can hang (it waits for the
                # server to answer a timed-out query's cancel), the topics need not.
                self._settle(statement, outcome, started)
                self._arm(statement, STOP_WAIT, "its connection does not come back (a cancel unanswered)", None)
            finally:
                await release(pool, conn)
                statement.conn = None
        except asyncio.CancelledError:
            pass  # its topics stopped, it was reaped, or the node is closing: nothing to publish
        except Exception:  # a bug: never a dead statement holding its topics
            log.exception("feed %s: statement %s failed", feed.name, statement.id)
            self._settle(statement, PollError("poll failed (internal error)", code="poll_failed"), time.monotonic())
        finally:
            if statement.timer is not None:
                statement.timer.cancel()
            for member in statement.members:
                if member.busy is statement:  # no verdict (cancelled): polled again
                    member.busy = None
            self._free_slot(statement)
            self._statements.discard(statement)
            self._wake.set()

    def _free_slot(self, statement: Statement) -> None:
        if statement.holds_slot:
            statement.holds_slot = False
            self.owner.slots.release()

    def _arm(self, statement: Statement, seconds: float, why: str, code: str | None) -> None:
        """Watch a statement: still running in ``seconds``, it is stuck (``code``: what its topics get)."""
        if statement.timer is not None:
            statement.timer.cancel()
        statement.timer = asyncio.get_running_loop().call_later(seconds, self._stuck, statement, why, code)

    def _stuck(self, statement: Statement, why: str, code: str | None) -> None:
        if statement.task is None or statement.task.done() or statement.stuck_since is not None:
            return
        statement.stuck_since, statement.why = time.time(), why
        log.warning("feed %s: statement %s (%d topic(s), backend pid %s) is stuck: %s; kept as a zombie to reap",
                    self.feed.name, statement.id, len(statement.topics), statement.pid, why)  # fmt: skip
        self._free_slot(statement)
        self._statements.discard(statement)
        self.owner.statement_stuck(statement)
        if code is not None and any(m.busy is statement for m in statement.members):
            message = f"query timed out (statement_timeout): {why}" if code == "query_timeout" else f"database unavailable: {why}"
            self._settle(statement, PollError(message, code=code), time.monotonic() - self.feed.statement_timeout)
        self._wake.set()

    # -- outcomes -------------------------------------------------------------------------------

    def _settle(self, statement: Statement, outcome: list[tuple[Rows | PollError, tuple | None]] | PollError,
                started: float) -> None:  # fmt: skip
        live = [m for m in statement.members if m.busy is statement and self.members.get(m.stream.topic) is m]
        for member in live:
            member.busy = None
        if isinstance(outcome, list):
            by_member = dict(zip(statement.members, outcome))
            if statement.merged:
                self._backoff = self.database.retry_initial
                self._clean += 1
                if self.batch_size < self.database.batch_size and self._clean >= _GROW_AFTER:
                    self.batch_size, self._clean = min(self.database.batch_size, self.batch_size * 2), 0
            for member in live:
                result, raw = by_member[member]
                self._deliver(member, result, started, raw)
            return
        if outcome.code == "database_unavailable" or not statement.merged:
            # No topic to blame (the database), or a topic polled alone: its own error.
            for member in live:
                self._deliver(member, outcome, started)
            if statement.merged:
                self._back_off()
            return
        if not live:
            return
        log.info("feed %s: a statement for %d topics failed (%s: %s); running them one by one",
                 self.feed.name, len(live), outcome.code, outcome.message)  # fmt: skip
        isolation = Isolation(cause=outcome.code, pending=set(live))
        for member in live:
            member.solo, member.retry_at, member.backoff, member.isolation = True, 0.0, 0.0, isolation
        self._wake.set()

    def _outcome(self, member: Member, bucket: list, names: tuple[str, ...]) -> tuple[Rows | PollError, tuple | None]:
        """One topic's outcome from its rows of a merged statement, and their raw values if they
        may stand for it next time."""
        raw = tuple(record[1:-1] for record in bucket)
        if member.raw is not None and raw == member.raw and member.stream.state == "ok" and member.stream.has_data:
            return UNCHANGED, member.raw  # the CPU of a tick at 1,000 topics is mostly decoding unchanged rows
        try:
            return feed_rows(bucket, self.feed, names), (raw if encodes_as_compared(raw) else None)
        except PollError as exc:
            return exc, None

    def _deliver(self, member: Member, outcome: Rows | PollError, started: float, raw: tuple | None = None) -> None:
        member.fresh = False
        failed = isinstance(outcome, PollError)
        member.raw = raw  # what the stream holds from now on (if it publishes it: else the member goes)
        if not deliver(member.stream, member.epoch, outcome, (time.monotonic() - started) * 1000, self.owner.can_publish):
            self.remove(member.stream.topic)
            self.owner.topic_stopped(member.stream.topic)
            return
        if member.solo:
            if failed:
                member.backoff = min(member.backoff * 2, self.database.retry_max) or self.database.retry_initial
                member.retry_at = time.monotonic() + member.backoff
            else:
                member.solo, member.backoff, member.tick = False, 0.0, self._tick  # rejoins the batch
        if member.isolation is not None:
            self._isolated(member, failed=failed)

    def _isolated(self, member: Member, *, failed: bool) -> None:
        isolation, member.isolation = member.isolation, None
        assert isolation is not None
        isolation.pending.discard(member)
        isolation.failed += failed
        if isolation.pending or isolation.failed:
            return
        # Every topic succeeded alone: the batch itself was the problem.
        if isolation.cause == "query_timeout" and self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self._clean = 0
            log.warning("feed %s: a batch timed out though each of its topics runs in time alone: "
                        "batches of %d topics from now on", self.feed.name, self.batch_size)  # fmt: skip
        elif isolation.cause != "query_timeout":
            log.warning("feed %s: the merged statement failed (%s) though each topic's query succeeds: "
                        "preparing it afresh", self.feed.name, isolation.cause)  # fmt: skip
            self._sql = None

    def _back_off(self) -> None:
        self._hold_until = time.monotonic() + self._backoff
        self._next_tick = self._hold_until
        self._backoff = min(self._backoff * 2, self.database.retry_max)


def _chunks(items: list[Member], size: int) -> list[list[Member]]:
    return [items[i:i + size] for i in range(0, len(items), size)]

