"""The node's pollers: which topics it polls, at which epoch, how, and its stuck database calls.

A topic is polled either by its feed's merged loop (:class:`FeedPoller`, one
per feed, one statement per batch of topics) or alone by a per-topic
:class:`Poller`: the latter when ``database.merged_polling`` is false, or for
a feed whose SQL cannot be merged (said once at start, with why, and in the
node's report). Both publish through the same code (``poller.deliver``).

Stopping a topic never waits on the database for long: a merged topic leaves
its loop at once; a per-topic poller gets ``STOP_WAIT``. A database call that
does not end when it should (a per-topic poller that will not stop, or a
statement past its timeouts or cancelled and still running) is a *stuck query*:
kept, reported (``stuck()``, a zombie) and reaped by terminating its connection.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import asyncpg

from subsys.config import Feed, Settings
from subsys.core.diff import Rows
from subsys.core.errors import PollError
from subsys.node.database import Database, Unmergeable, prepare_merged, run_feed_query
from subsys.node.feedpoller import STOP_WAIT, FeedPoller, Member, Statement
from subsys.node.merge import MergeTemplate, Refusal, plan_feed
from subsys.node.poller import Poller
from subsys.node.stream import TopicStream

__all__ = ["PollerSet", "StuckQuery", "STOP_WAIT"]

log = logging.getLogger(__name__)

_PREPARE_AT_START = 10.0  # at most this long spent at start preparing merged statements


@dataclass(eq=False)
class StuckQuery:
    id: str
    feed: str
    topics: dict[str, int]  # topic -> the epoch it polled for
    since: float
    pid: int | None  # the PostgreSQL backend
    why: str
    task: asyncio.Task
    connection: Callable[[], Any]  # the connection now, if it still holds one

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "feed": self.feed, "topics": dict(self.topics), "since": self.since,
                "age": round(time.time() - self.since, 3), "pid": self.pid, "why": self.why}  # fmt: skip


class PollerSet:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        can_publish: Callable[[str, int], bool],
        spawn: Callable[..., asyncio.Task],
        kick: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.database = database
        self.can_publish = can_publish
        self._spawn = spawn
        self._kick = kick
        self._topics: dict[str, tuple[Poller, asyncio.Task]] = {}
        self._feeds: dict[str, FeedPoller] = {}
        self._stuck: dict[str, StuckQuery] = {}
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)  # ids of one process never name another's queries
        # Statements in flight, all feeds: one connection is left for health checks and scans.
        self.slots = asyncio.Semaphore(max(1, settings.database.max_pool - 1))
        self._templates: dict[str, MergeTemplate] = {}
        self._prepared: dict[str, str] = {}
        self.per_topic: dict[str, str] = {}  # feed -> why it is polled per topic
        # Statements sent to the server (a connection was had), by (feed, kind): "merged" (a
        # batch), "alone" (one topic of a merged feed, isolated or retried), "topic" (a per-topic
        # feed). /metrics shows them.
        self.statements: collections.Counter[tuple[str, str]] = collections.Counter()
        for feed in settings.feeds.values():
            if not settings.database.merged_polling:
                self.per_topic[feed.name] = "merged polling is off (database.merged_polling = false)"
                continue
            plan = plan_feed(feed.sql)
            if isinstance(plan, Refusal):
                self.per_topic[feed.name] = plan.reason
            else:
                self._templates[feed.name] = plan

    async def start(self) -> None:
        """Say how each feed is polled; have the server check the merged statements if it can."""
        for name, why in sorted(self.per_topic.items()):
            log.warning("feed %s: per-topic polling: %s", name, why)
        pool = self.database.pool
        if pool is None or not self._templates:
            return
        try:
            async with asyncio.timeout(_PREPARE_AT_START):
                for name in sorted(self._templates):
                    feed = self.settings.feeds[name]
                    try:
                        self._prepared[name] = await prepare_merged(pool, feed, self._renderer(feed))
                    except Unmergeable as exc:
                        self._templates.pop(name)
                        self.per_topic[name] = str(exc)
                        log.warning("feed %s: per-topic polling: %s", name, exc)
                    except PollError as exc:
                        log.info("feed %s: merged statement not prepared yet (%s): when first polled", name, exc.message)
        except TimeoutError:
            log.warning("preparing the merged statements took over %.0fs: the rest when first polled", _PREPARE_AT_START)

    def _renderer(self, feed: Feed) -> Callable[[str], str]:
        template = self._templates[feed.name]
        return lambda array: template.render(array, feed.max_rows)

    # -- what runs --------------------------------------------------------------------------

    def running(self) -> dict[str, int]:
        running = {topic: poller.epoch for topic, (poller, _task) in self._topics.items()}
        for loop in self._feeds.values():
            running.update(loop.running())
        return running

    def epoch_of(self, topic: str) -> int | None:
        entry = self._topics.get(topic)
        if entry is not None:
            return entry[0].epoch
        loop = self._feeds.get(topic.split(":", 1)[0])
        member = loop.members.get(topic) if loop is not None else None
        return member.epoch if member is not None else None

    def stuck(self) -> list[dict[str, Any]]:
        return [entry.describe() for entry in self._stuck.values()]

    def describe(self) -> dict[str, dict[str, Any]]:
        """How each feed is polled on this node (the node's report)."""
        feeds: dict[str, dict[str, Any]] = {}
        for name in sorted(self.settings.feeds):
            if name in self._feeds:
                feeds[name] = {**self._feeds[name].describe(), "why": None}
            elif name in self.per_topic:
                topics = sum(1 for p, _t in self._topics.values() if p.stream.feed.name == name)
                feeds[name] = {"polling": "per-topic", "why": self.per_topic[name], "topics": topics}
            else:
                feeds[name] = {"polling": "merged", "why": None, "topics": 0}
        return feeds

    def modes(self) -> dict[str, str]:
        return {name: ("per-topic" if name in self.per_topic else "merged") for name in sorted(self.settings.feeds)}

    # -- starting and stopping -----------------------------------------------------------------

    def start_topic(self, stream: TopicStream, epoch: int) -> None:
        feed = stream.feed
        if feed.name in self._templates:
            self._feed_loop(feed).add(stream, epoch)
        else:
            self._start_poller(stream, epoch)

    def _feed_loop(self, feed: Feed) -> FeedPoller:
        loop = self._feeds.get(feed.name)
        if loop is None:
            loop = FeedPoller(feed, self._templates[feed.name], database=self.settings.database, owner=self,
                              sql=self._prepared.get(feed.name))  # fmt: skip
            self._feeds[feed.name] = loop
            task = self._spawn(loop.run(), name=f"feed poller {feed.name}")
            task.add_done_callback(lambda done, name=feed.name, loop=loop: self._loop_done(name, loop, done))
        return loop

    def _loop_done(self, name: str, loop: FeedPoller, task: asyncio.Task) -> None:
        if self._feeds.get(name) is loop:
            del self._feeds[name]  # its topics are no longer polled: the node's reconcile restarts them
            self._kick()
        if not task.cancelled() and task.exception() is not None:
            log.error("feed poller crashed feed=%s", name, exc_info=task.exception())

    def _start_poller(self, stream: TopicStream, epoch: int) -> None:
        poller = Poller(stream=stream, epoch=epoch, query=self._run_query, database=self.settings.database,
                        can_publish=self.can_publish)  # fmt: skip
        task = self._spawn(poller.run(), name=f"poller {stream.topic}")
        task.add_done_callback(lambda done, topic=stream.topic: self._poller_done(topic, done))
        self._topics[stream.topic] = (poller, task)

    async def _run_query(self, stream: TopicStream, poller: Poller) -> Rows:
        if self.database.pool is None:
            raise PollError("database not open", code="database_unavailable")
        return await run_feed_query(self.database.pool, stream.feed, stream.param, holder=poller,
                                    on_sent=lambda: self._count(stream.feed.name, "topic"))  # fmt: skip

    def _count(self, feed: str, kind: str) -> None:
        self.statements[(feed, kind)] += 1

    def _poller_done(self, topic: str, task: asyncio.Task) -> None:
        current = self._topics.get(topic)
        if current is not None and current[1] is task:
            del self._topics[topic]
            self._kick()
        if not task.cancelled() and task.exception() is not None:
            log.error("poller crashed topic=%s", topic, exc_info=task.exception())

    async def stop(self, topic: str) -> int | None:
        """Stop polling ``topic``; the epoch it was polled at, or None if it was not."""
        entry = self._topics.pop(topic, None)
        if entry is not None:
            await self._cancel(topic, entry)
            return entry[0].epoch
        loop = self._feeds.get(topic.split(":", 1)[0])
        return loop.remove(topic) if loop is not None else None

    async def _cancel(self, topic: str, entry: tuple[Poller, asyncio.Task]) -> None:
        """Cancel a poller and wait a moment; one that will not stop is kept (and reported) as stuck.

        Waiting longer would let one hung database call block every other topic's reconcile.
        """
        poller, task = entry
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_WAIT)
        if not done:
            why = f"a per-topic poller cancelled and not stopped within {STOP_WAIT:.0f}s (a hung database call)"
            log.warning("poller topic=%s epoch=%d: %s: kept as a zombie to reap", topic, poller.epoch, why)
            self._add_stuck(StuckQuery(
                id=self.new_id(), feed=poller.stream.feed.name, topics={topic: poller.epoch}, since=time.time(),
                pid=poller.pid, why=why, task=task, connection=lambda: poller.conn,
            ))  # fmt: skip

    async def force_stop(self, topic: str, epoch: int) -> bool:
        """Stop a poller of ``topic`` at ``epoch`` even in a hung database call (a reap)."""
        entry = self._topics.get(topic)
        if entry is not None and entry[0].epoch == epoch:
            del self._topics[topic]
            poller, task = entry
            if poller.conn is not None:
                poller.conn.terminate()
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_WAIT)
            log.info("reaped poller topic=%s epoch=%d (stopped: %s)", topic, epoch, task.done())
            return True
        loop = self._feeds.get(topic.split(":", 1)[0])
        member = loop.members.get(topic) if loop is not None else None
        if loop is not None and member is not None and member.epoch == epoch:
            loop.remove(topic)
            log.info("reaped merged polling of topic=%s epoch=%d", topic, epoch)
            return True
        return False

    async def reap_query(self, query_id: str) -> bool:
        """End a stuck query: terminate its connection (the pool replaces it)."""
        entry = self._stuck.get(query_id)
        if entry is None:
            return False
        conn = entry.connection()
        if conn is not None:
            conn.terminate()
        entry.task.cancel()
        await asyncio.wait({entry.task}, timeout=STOP_WAIT)
        log.info("reaped stuck query %s feed=%s topics=%s pid=%s (ended: %s)",
                 entry.id, entry.feed, sorted(entry.topics), entry.pid, entry.task.done())  # fmt: skip
        return True

    def _add_stuck(self, entry: StuckQuery) -> None:
        self._stuck[entry.id] = entry
        entry.task.add_done_callback(lambda _task, key=entry.id: self._stuck.pop(key, None))

    # -- what a FeedPoller asks of its owner ------------------------------------------------------

    def pool(self) -> asyncpg.Pool | None:
        return self.database.pool

    def new_id(self) -> str:
        return f"{self._id_prefix}-q{next(self._ids)}"

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        return self._spawn(coro, name=name)

    def topic_stopped(self, topic: str) -> None:
        self._kick()  # fenced: reconcile decides what next

    def statement_stuck(self, statement: Statement) -> None:
        assert statement.task is not None
        self._add_stuck(StuckQuery(
            id=statement.id, feed=statement.feed, topics=dict(statement.topics),
            since=statement.stuck_since or time.time(), pid=statement.pid, why=statement.why,
            task=statement.task, connection=lambda: statement.conn,
        ))  # fmt: skip

    def unmergeable(self, feed: Feed, reason: str, members: list[Member]) -> None:
        """The server refused the feed's merged statement: per-topic polling from now on."""
        log.warning("feed %s: per-topic polling: %s", feed.name, reason)
        self._templates.pop(feed.name, None)
        self.per_topic[feed.name] = reason
        self._feeds.pop(feed.name, None)
        for member in members:
            self._start_poller(member.stream, member.epoch)
        self._kick()
