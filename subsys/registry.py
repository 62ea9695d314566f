"""Everything this node knows about its topics, in one place.

``TopicState`` is the per-topic record (subscribers, role, epoch, seq,
latest rows, poll timings, last error); ``TopicRegistry`` holds them. The
admin API reads ``TopicState.describe()``; nothing else keeps topic facts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from .config import Feed
from .diff import Diff, Rows, apply_diff, compute_diff, index_rows, key_object, row_key
from .protocol import Publication

__all__ = ["Receiver", "TopicState", "TopicRegistry", "PollStats"]

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class TopicState:
    topic: str
    feed: Feed
    param: Any
    local: set[Any] = field(default_factory=set)  # client connections on this node
    remote: set[Any] = field(default_factory=set)  # peer links following us
    role: str = "idle"  # idle | owner | follower | acquiring
    owner_node: str | None = None
    epoch: int = 0
    seq: int = 0
    rows: Rows = field(default_factory=dict)
    has_data: bool = False
    state: str = "starting"  # starting | ok | error
    last_error: dict[str, Any] | None = None
    stats: PollStats = field(default_factory=PollStats)
    empty_since: float | None = None  # monotonic: when the last local subscriber left
    cluster_empty_since: float | None = None  # monotonic: owner's view of cluster presence
    created: float = field(default_factory=time.time)
    _snapshot: Publication | None = field(default=None, repr=False)
    _status: Publication | None = field(default=None, repr=False)

    # -- reading -----------------------------------------------------------

    def receivers(self) -> Iterable[Any]:
        yield from list(self.local)
        yield from list(self.remote)

    def current(self) -> tuple[Publication | None, Publication | None]:
        """The latest snapshot and (if in error) status, for a receiver that needs a full state."""
        if self.has_data and self._snapshot is None:
            self._snapshot = Publication(
                "snapshot", self.topic, self.epoch, self.seq,
                {"key": list(self.feed.key), "rows": list(self.rows.values())},
            )
        snapshot = self._snapshot if self.has_data else None
        return snapshot, (self._status if self.state == "error" else None)

    def describe(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "feed": self.feed.name,
            "role": self.role,
            "owner": self.owner_node,
            "epoch": self.epoch,
            "seq": self.seq,
            "state": self.state,
            "last_error": self.last_error,
            "local_subscribers": len(self.local),
            "remote_followers": len(self.remote),
            "rows": len(self.rows),
            "interval": self.feed.interval,
            "polls": self.stats.polls,
            "poll_failures": self.stats.failures,
            "changes": self.stats.changes,
            "last_poll_at": self.stats.last_poll_at,
            "last_poll_ms": self.stats.last_duration_ms,
            "max_poll_ms": self.stats.max_duration_ms,
            "last_change_at": self.stats.last_change_at,
        }

    # -- writing (owner path and follower path share these) -------------------

    def _broadcast(self, publication: Publication) -> None:
        for receiver in self.receivers():
            receiver.deliver(publication)

    def reset_epoch(self, epoch: int) -> None:
        """A new ownership begins: the next data message is a full snapshot."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.seq = 0
            self.has_data = False
            self._snapshot = None

    def publish_rows(self, rows: Rows, *, epoch: int) -> bool:
        """Owner path: diff ``rows`` against the last published state; publish if changed."""
        if epoch != self.epoch:
            self.reset_epoch(epoch)
        recovered = self.state != "ok"
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
            return True
        diff = compute_diff(self.rows, rows, self.feed.key)
        if not diff:
            return False
        self.rows = rows
        self.seq += 1
        self._snapshot = None
        self._broadcast(self._diff_publication(diff))
        self._count_change()
        return True

    def publish_error(self, code: str, message: str, *, epoch: int) -> None:
        """Owner path: the feed failed; tell receivers once per error kind."""
        self.last_error = {"code": code, "message": message, "at": time.time()}
        if self.state == "error" and self._status is not None and self._status.body.get("code") == code:
            return
        self.state = "error"
        self._status = self._status_publication("error", code, message)
        self._broadcast(self._status)

    def apply_remote(self, frame: dict[str, Any]) -> bool:
        """Follower path: take a frame from the owner's peer link; False if dropped (fenced)."""
        epoch, kind = int(frame.get("epoch", 0)), frame.get("type")
        if epoch < self.epoch:
            return False
        if kind in ("snapshot", "resync"):
            self.reset_epoch(epoch)
            self.rows = index_rows(frame.get("rows", []), self.feed.key)
            self.seq, self.has_data, self._snapshot = int(frame["seq"]), True, None
            self.state, self.last_error, self._status = "ok", None, None
            snapshot, _ = self.current()
            self._broadcast(snapshot)
            return True
        if kind == "diff":
            if epoch != self.epoch or not self.has_data or int(frame["seq"]) != self.seq + 1:
                return False  # gap: the owner link will be asked for a snapshot
            body = _diff_body(frame)
            deleted = [row_key(key_obj, self.feed.key) for key_obj in body["deleted"]]
            diff = Diff(body["inserted"], body["updated"], deleted)
            self.rows = apply_diff(self.rows, diff, self.feed.key)
            self.seq, self._snapshot = int(frame["seq"]), None
            self._broadcast(Publication("diff", self.topic, epoch, self.seq, body))
            return True
        if kind == "status":
            if epoch > self.epoch:
                self.reset_epoch(epoch)
            state = frame.get("state", "ok")
            self.state = state
            self.last_error = (
                {"code": frame.get("code"), "message": frame.get("message"), "at": time.time()}
                if state == "error" else None
            )
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


def _diff_body(frame: dict[str, Any]) -> dict[str, Any]:
    return {name: frame.get(name, []) for name in ("inserted", "updated", "deleted")}


class TopicRegistry:
    def __init__(self) -> None:
        self._topics: dict[str, TopicState] = {}

    def get(self, topic: str) -> TopicState | None:
        return self._topics.get(topic)

    def add(self, state: TopicState) -> TopicState:
        self._topics[state.topic] = state
        return state

    def remove(self, topic: str) -> None:
        self._topics.pop(topic, None)

    def __iter__(self):
        return iter(list(self._topics.values()))

    def __len__(self) -> int:
        return len(self._topics)

    def describe(self) -> list[dict[str, Any]]:
        return [state.describe() for state in self]
