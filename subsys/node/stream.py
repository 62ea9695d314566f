"""Per-topic streams: the one place a topic's facts live on a node.

A ``TopicStream`` holds what the node knows of a topic (receivers, role,
epoch, seq, latest rows, poll timings, last error, reconcile timers) and is
where data flows: the owner's poller publishes into it, a follower's peer
link applies the owner's frames to it, and it fans publications out to its
receivers. **Fencing is enforced here**: a publication of an older epoch
raises :class:`FencedError` (counted), and the stream never moves backwards.

``TopicRegistry`` holds the streams; the node's read-only facade
(:mod:`subsys.node.inspect`) reads them for the admin API and zombie
detection.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from prometheus_client import Histogram

from subsys.config import Feed
from subsys.core.diff import Diff, Rows, apply_diff, compute_diff, index_rows, key_object, row_key
from subsys.core.errors import FencedError
from subsys.core.protocol import Publication

__all__ = ["Receiver", "TopicStream", "TopicRegistry", "PollStats", "StreamCounters"]

log = logging.getLogger(__name__)

HISTORY_LENGTH = 32


class Receiver(Protocol):
    """Anything that takes a topic's publications: a client socket or a peer link."""

    def deliver(self, publication: Publication) -> None: ...


@dataclass(slots=True)
class PollStats:
    polls: int = 0
    failures: int = 0
    changes: int = 0
    last_poll_at: float | None = None  # wall clock
    last_duration_ms: float | None = None
    max_duration_ms: float = 0.0
    last_change_at: float | None = None
    recent_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))


FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0)


def _failover_histogram() -> Histogram:
    return Histogram(
        "subsys_failover_seconds",
        "Gap in publishing when this node took a topic over: last data of the old epoch to the first"
        " of the new one (kind: forced by an operator, or unforced)",
        ["kind"], buckets=FAILOVER_BUCKETS, registry=None,
    )  # fmt: skip


@dataclass(slots=True)
class StreamCounters:
    """Counters shared by a registry's streams (exported as metrics)."""

    fenced: int = 0  # publications refused for an older epoch
    duplicate_snapshots: int = 0  # follower snapshots identical to what the stream had
    failover: Histogram = field(default_factory=_failover_histogram)


@dataclass(eq=False)
class TopicStream:
    topic: str
    feed: Feed
    param: Any
    counters: StreamCounters = field(default_factory=StreamCounters)
    local: set[Any] = field(default_factory=set)  # client connections on this node
    remote: set[Any] = field(default_factory=set)  # peer links following us
    role: str = "idle"  # idle | owner | follower | acquiring
    owner_node: str | None = None
    last_owner: str | None = None  # the last owner node seen (names a takeover's predecessor)
    epoch: int = 0
    seq: int = 0
    rows: Rows = field(default_factory=dict)
    has_data: bool = False
    state: str = "starting"  # starting | ok | error
    last_error: dict[str, Any] | None = None
    stats: PollStats = field(default_factory=PollStats)
    # reconcile timers (monotonic) and what was last written to the coordinator
    empty_since: float | None = None  # the last local subscriber left
    cluster_empty_since: float | None = None  # the owner saw no presence anywhere
    orphan_since: float | None = None  # presence somewhere, no owner
    presence_written: bool = False
    created: float = field(default_factory=time.time)
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH))
    last_data_at: float | None = None  # wall clock of the last data message (any epoch)
    epoch_ended_at: float | None = None  # wall clock: when this node saw the current epoch's owner go
    _epoch_change: tuple[int, float | None] | None = field(default=None, repr=False)
    _snapshot: Publication | None = field(default=None, repr=False)
    _status: Publication | None = field(default=None, repr=False)

    # -- reading -----------------------------------------------------------

    def receivers(self) -> Iterable[Any]:
        yield from list(self.local)
        yield from list(self.remote)

    def current(self) -> tuple[Publication | None, Publication | None]:
        """The latest snapshot and status, for a receiver that needs a full state.

        While the feed is failing there is no snapshot: a snapshot tells a client the
        topic is fine. It gets the error status, and the snapshot once the feed recovers.
        """
        if self.state == "error":
            return None, self._status
        if self.has_data and self._snapshot is None:
            self._snapshot = Publication(
                "snapshot", self.topic, self.epoch, self.seq,
                {"key": list(self.feed.key), "rows": list(self.rows.values())},
            )  # fmt: skip
        return (self._snapshot if self.has_data else None), None

    def record(self, event: str, **details: Any) -> None:
        """Append to the topic's history on this node (ownership changes, releases, gaps)."""
        self.history.append({"at": time.time(), "event": event, **details})

    # -- writing (owner path and follower path share these) -------------------

    def _broadcast(self, publication: Publication) -> None:
        for receiver in self.receivers():
            receiver.deliver(publication)

    def _fence(self, epoch: int) -> None:
        """Refuse anything older than the epoch the stream is at; move forward to a newer one."""
        if epoch < self.epoch:
            self.counters.fenced += 1
            raise FencedError(f"{self.topic}: publication of epoch {epoch} refused, stream is at {self.epoch}")
        if epoch > self.epoch:
            self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        """A new ownership begins: the next data message is a full snapshot."""
        # The gap is measured from when the old epoch was seen to end (its owner gone from the
        # view), not from its last data: a quiet topic publishes nothing for long stretches.
        ended = max(filter(None, (self.last_data_at, self.epoch_ended_at)), default=None)
        self._epoch_change = (self.epoch, ended) if self.epoch else None
        self.epoch_ended_at = None
        self.epoch = epoch
        self.seq = 0
        self.has_data = False
        self._snapshot = None

    def epoch_ended(self, epoch: int) -> None:
        """This node saw the owner of ``epoch`` go (released, lost, replaced)."""
        if epoch == self.epoch and self.epoch_ended_at is None:
            self.epoch_ended_at = time.time()

    def begin_epoch(self, epoch: int) -> None:
        """The owner path: this node starts polling at ``epoch`` (never an older one)."""
        self._fence(epoch)

    def _data_published(self) -> None:
        now = time.time()
        if self._epoch_change is not None:
            old_epoch, old_at = self._epoch_change
            self._epoch_change = None
            gap = round((now - old_at) * 1000, 1) if old_at is not None else None
            self.record("epoch", from_epoch=old_epoch, to_epoch=self.epoch, gap_ms=gap)
            if gap is not None and self.role == "owner":  # the node that took it over measures the gap
                acquired = next((e for e in reversed(self.history) if e["event"] == "acquired"), {})
                forced = str(acquired.get("reason", "")).startswith("forced failover")
                self.counters.failover.labels(kind="forced" if forced else "unforced").observe(gap / 1000)
        self.last_data_at = now

    def publish_rows(self, rows: Rows, *, epoch: int) -> bool:
        """Owner path: diff ``rows`` against the last published state; publish if changed."""
        self._fence(epoch)
        recovered = self.state == "error"
        self.state, self.last_error, self._status = "ok", None, None
        if not self.has_data or recovered:
            self.rows, self.has_data = rows, True
            self.seq += 1
            self._snapshot = None
            if recovered and self.seq > 1:
                self._broadcast(self._status_publication("ok", None, None))
            snapshot, _ = self.current()
            self._broadcast(snapshot)
            self._count_change()
            self._data_published()
            return True
        diff = compute_diff(self.rows, rows, self.feed.key)
        if not diff:
            return False
        self.rows = rows
        self.seq += 1
        self._snapshot = None
        self._broadcast(self._diff_publication(diff))
        self._count_change()
        self._data_published()
        return True

    def publish_error(self, code: str, message: str, *, epoch: int) -> None:
        """Owner path: the feed failed; tell receivers once per error kind."""
        self._fence(epoch)
        self.last_error = {"code": code, "message": message, "at": time.time()}
        if self.state == "error" and self._status is not None and self._status.body.get("code") == code:
            return
        self.state = "error"
        self._status = self._status_publication("error", code, message)
        self._broadcast(self._status)

    def apply_remote(self, frame: dict[str, Any]) -> bool:
        """Follower path: take a frame from the owner's peer link; False if it was dropped.

        A frame of an older epoch is fenced (dropped and counted); a snapshot
        identical in (epoch, seq) to what the stream has is not passed on again.
        """
        epoch, kind = int(frame.get("epoch", 0)), frame.get("type")
        if epoch < self.epoch:
            self.counters.fenced += 1
            return False
        if kind in ("snapshot", "resync"):
            seq = int(frame["seq"])
            if epoch == self.epoch and self.has_data and self.state == "ok" and seq <= self.seq:
                self.counters.duplicate_snapshots += 1
                return True  # nothing new: the receivers already have it (or something newer)
            if epoch > self.epoch:
                self._start_epoch(epoch)
            self.rows = index_rows(frame.get("rows", []), self.feed.key)
            self.seq, self.has_data, self._snapshot = seq, True, None
            self.state, self.last_error, self._status = "ok", None, None
            snapshot, _ = self.current()
            self._broadcast(snapshot)
            self._data_published()
            return True
        if kind == "diff":
            if epoch != self.epoch or not self.has_data or int(frame["seq"]) != self.seq + 1:
                return False  # gap: the owner link will be asked for a snapshot
            body = _diff_body(frame)
            deleted = [row_key(key_obj, self.feed.key) for key_obj in body["deleted"]]
            self.rows = apply_diff(self.rows, Diff(body["inserted"], body["updated"], deleted), self.feed.key)
            self.seq, self._snapshot = int(frame["seq"]), None
            self._broadcast(Publication("diff", self.topic, epoch, self.seq, body))
            self._data_published()
            return True
        if kind == "status":
            if epoch > self.epoch:
                self._start_epoch(epoch)
            state = frame.get("state", "ok")
            if state == "ok" and self.state == "ok":
                return True  # nothing new
            self.state = state
            self.last_error = (
                {"code": frame.get("code"), "message": frame.get("message"), "at": time.time()}
                if state == "error" else None
            )  # fmt: skip
            self._status = self._status_publication(state, frame.get("code"), frame.get("message"))
            self._broadcast(self._status)
            return True
        return False

    # -- helpers -------------------------------------------------------------

    def _count_change(self) -> None:
        self.stats.changes += 1
        self.stats.last_change_at = time.time()

    def _status_publication(self, state: str, code: str | None, message: str | None) -> Publication:
        return Publication(
            "status", self.topic, self.epoch, self.seq, {"state": state, "code": code, "message": message}
        )

    def _diff_publication(self, diff: Diff) -> Publication:
        body = {
            "inserted": diff.inserted,
            "updated": diff.updated,
            "deleted": [key_object(key, self.feed.key) for key in diff.deleted],
        }
        return Publication("diff", self.topic, self.epoch, self.seq, body)

    def record_poll(self, duration_ms: float, *, failed: bool) -> None:
        stats = self.stats
        stats.polls += 1
        stats.failures += failed
        stats.last_poll_at = time.time()
        stats.last_duration_ms = round(duration_ms, 3)
        stats.max_duration_ms = max(stats.max_duration_ms, stats.last_duration_ms)
        stats.recent_ms.append(stats.last_duration_ms)


def _diff_body(frame: dict[str, Any]) -> dict[str, Any]:
    return {name: frame.get(name, []) for name in ("inserted", "updated", "deleted")}


class TopicRegistry:
    def __init__(self) -> None:
        self._topics: dict[str, TopicStream] = {}
        self.counters = StreamCounters()

    def get(self, topic: str) -> TopicStream | None:
        return self._topics.get(topic)

    def open(self, topic: str, feed: Feed, param: Any) -> TopicStream:
        stream = self._topics.get(topic)
        if stream is None:
            stream = self._topics[topic] = TopicStream(topic=topic, feed=feed, param=param, counters=self.counters)
        return stream

    def remove(self, topic: str) -> None:
        self._topics.pop(topic, None)

    def __iter__(self) -> Iterator[TopicStream]:
        return iter(list(self._topics.values()))

    def __len__(self) -> int:
        return len(self._topics)

    def __contains__(self, topic: str) -> bool:
        return topic in self._topics
