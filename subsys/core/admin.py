"""The admin API's wire contract (``/admin/v1``): typed models, shared by the node and its clients.

The node builds its responses from these models, the OpenAPI document is
generated from them (``subsys.web.admin.openapi``), and the typed admin
client and the console parse responses with them. Field names are stable;
new fields may be added.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_PREFIX",
    "EVIDENCE",
    "evidence_label",
    "is_session_id",
    "ErrorBody",
    "ErrorResponse",
    "PeerProblem",
    "WhoAmI",
    "ClusterSummary",
    "NodeInfo",
    "NodeList",
    "TopicError",
    "TopicSummary",
    "TopicPage",
    "HistoryEntry",
    "NodeTopicState",
    "TopicDetail",
    "FailoverRequest",
    "FailoverResult",
    "DrainResult",
    "Event",
    "Zombie",
    "ZombieList",
    "ReapRequest",
    "ReapOutcome",
    "ReapResult",
    "TOPIC_SORT_KEYS",
    "TOPIC_STATES",
]

API_PREFIX = "/admin/v1"
TOPIC_STATES = ("ok", "error", "starting", "unowned")
TOPIC_SORT_KEYS = (
    "topic", "feed", "owner", "epoch", "seq", "state", "subscribers", "interval",
    "last_poll_ms", "last_poll_at", "last_change_at", "polls", "failures",
)  # fmt: skip


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(_Model):
    code: str = Field(description="stable, machine-readable")
    message: str
    detail: dict[str, Any] | None = None


class ErrorResponse(_Model):
    error: ErrorBody


class PeerProblem(_Model):
    """A node that did not answer for its own facts; its part of the answer is missing."""

    node: str
    reason: str


class _Partial(_Model):
    answered_by: str = Field(description="the node that assembled this answer")
    partial: bool = Field(False, description="true when some node did not answer (see unavailable)")
    unavailable: list[PeerProblem] = Field(default_factory=list)


class WhoAmI(_Model):
    role: Literal["read", "operator"]
    token_id: str
    read_only: bool
    node: str


class ClusterSummary(_Partial):
    coordinator: str = Field(description="embedded | consul")
    version: str
    nodes: int
    nodes_ready: int
    nodes_draining: int
    topics: int
    owned: int
    unowned: int = Field(description="topics with subscribers somewhere and no owner right now")
    failing: int = Field(description="topics whose feed is failing")
    clients: int
    subscriptions: int


class NodeInfo(_Model):
    node: str
    address: str
    version: str = ""
    incarnation: str = ""
    started: float | None = None
    uptime: float | None = None
    reachable: bool
    health: Literal["ok", "unavailable", "unreachable"]
    ready: bool | None = None
    draining: bool = False
    failure: str | None = None
    owned: int = 0
    followed: int = 0
    pollers: int = 0
    clients: int = 0
    subscriptions: int = 0
    session: str | None = Field(None, description="the node's coordinator registration (Consul session)")
    coordinator: dict[str, Any] | None = None
    peer_links: dict[str, Any] | None = None
    feeds: dict[str, Any] | None = Field(
        None, description="how the node polls each feed: merged (one statement per batch of topics) or "
        "per-topic, and why not merged")
    error: str | None = Field(None, description="why the node did not answer, when unreachable")


class NodeList(_Partial):
    nodes: list[NodeInfo]


class TopicError(_Model):
    code: str
    message: str
    at: float | None = None


class TopicSummary(_Model):
    topic: str
    feed: str
    owner: str | None
    epoch: int | None = None
    seq: int | None = None
    state: Literal["ok", "error", "starting", "unowned"]
    presence: dict[str, int | None] = Field(
        default_factory=dict, description="local subscribers per node (null: the node did not say)"
    )
    subscribers: int = 0
    interval: float | None = None
    polls: int = 0
    failures: int = 0
    last_poll_ms: float | None = None
    last_poll_at: float | None = None
    last_change_at: float | None = None
    last_error: TopicError | None = None


class TopicPage(_Partial):
    topics: list[TopicSummary]
    total: int = Field(description="topics matching the filters, before paging")
    offset: int
    limit: int


class HistoryEntry(_Model):
    at: float
    node: str = Field(description="the node that recorded it")
    event: str = Field(description="acquired | released | stopped | epoch (an epoch change seen by this node)")
    epoch: int | None = None
    from_epoch: int | None = None
    to_epoch: int | None = None
    reason: str | None = None
    to: str | None = None
    gap_ms: float | None = Field(None, description="epoch: time from the last data of the old epoch to the first of the new")


class NodeTopicState(_Model):
    node: str
    role: str
    epoch: int
    seq: int
    state: str
    local_subscribers: int
    followers: int
    polling_epoch: int | None = None
    following: str | None = None


class TopicDetail(TopicSummary, _Partial):
    recent_poll_ms: list[float] = Field(default_factory=list)
    max_poll_ms: float | None = None
    rows: int | None = None
    owner_since: float | None = None
    owner_reason: str | None = None
    reserved_for: str | None = None
    nodes: list[NodeTopicState] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)


class FailoverRequest(_Model):
    to: str | None = Field(None, description="the node that should take the topic (default: chosen by the cluster)")


class FailoverResult(_Model):
    topic: str
    from_node: str
    to_node: str
    epoch_before: int
    epoch_after: int
    took_ms: float
    reason: str


class DrainResult(_Model):
    node: str
    draining: bool
    moved: int
    remaining: int
    took_ms: float


class Event(_Model):
    id: str
    type: str = Field(description="snapshot | owner | presence | node | health")
    at: float
    data: dict[str, Any]


class Zombie(_Model):
    id: str = Field(description="kind:subject, stable while the zombie lasts")
    kind: str
    subject: str = Field(description="a topic, a session id, a service id, or topic@node")
    nodes: list[str]
    first_seen: float
    scans: int = Field(description="consecutive scans that saw it")
    evidence: dict[str, Any] = Field(description="which sources disagree, and how, with the values")
    actions: list[dict[str, Any]] = Field(description="what a reap does")
    auto: bool = Field(description="the janitor reaps this kind on its own")


# A zombie's evidence names: (label, the source of truth that said it). A newer node may send a name
# this table lacks; clients show it under its own name.
EVIDENCE: dict[str, tuple[str, str]] = {
    "why": ("why", ""),
    "pollers": ("pollers", "the nodes' own reports"),
    "owner_key": ("owner key", "the coordinator"),
    "presence_key": ("presence key", "the coordinator"),
    "sessions": ("sessions", "the nodes' own reports"),
    "session": ("session", "the coordinator"),
    "node": ("node", ""),  # the coordinator (a session's) or the node's own report (a stuck call's)
    "holds": ("keys held", "the coordinator"),
    "checks": ("checks", "Consul"),
    "db_connections": ("db connections", "PostgreSQL's pg_stat_activity"),
    "presence": ("presence", "the coordinator"),
    "grace": ("grace period", "the node's settings"),
    "reserved_for": ("reserved for", "the coordinator"),
    "hold_ended_ago": ("hold ended", "the coordinator"),
    "last_poll_ago": ("last poll", "the node's own report"),
    "agent_of": ("agent of", ""),
    "registration": ("registration", "a Consul agent"),
    "feed": ("feed", "the node's own report"),
    "topics": ("topics it polled", "the node's own report and the coordinator"),
    "pid": ("backend pid", "the node's own report"),
    "age": ("running for", "the node's own report"),
    "since": ("stuck since", "the node's own report"),
}
_SESSION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def evidence_label(name: str) -> tuple[str, str]:
    """(label, source) of an evidence entry; an unknown name is shown as it is."""
    return EVIDENCE.get(name, (name.replace("_", " "), ""))


def is_session_id(value: object) -> bool:
    """A Consul session id (a UUID), which clients shorten; node ids, topics and calls are shown whole."""
    return _SESSION_ID.match(str(value)) is not None


class ZombieList(_Partial):
    zombies: list[Zombie]
    scanned_at: float
    janitor: str | None = Field(None, description="the node whose scans heal the cluster on their own")
    auto_reap: bool
    reaped: dict[str, int] = Field(default_factory=dict, description="zombies the janitor fixed, by kind")
    kinds: dict[str, str] = Field(default_factory=dict, description="every kind, explained")


class ReapRequest(_Model):
    ids: list[str] | None = Field(None, description="reap these (default: every zombie matching the filters)")
    kind: str | None = None
    topic: str | None = None
    node: str | None = None
    dry_run: bool = False


class ReapOutcome(_Model):
    id: str
    kind: str
    subject: str
    action: dict[str, Any]
    done: bool
    detail: str


class ReapResult(_Model):
    dry_run: bool
    outcomes: list[ReapOutcome]
    reaped: int
    failed: int
    skipped: int = Field(description="actions not taken because the evidence no longer held")
