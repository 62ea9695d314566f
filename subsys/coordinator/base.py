"""The coordinator interface: who owns which topic, who has subscribers where.

Both implementations follow Consul's semantics, so the node behaves alike on
either:

* ownership is a lock on a per-topic key held by this node's current
  registration (a Consul session; in-process, the coordinator itself);
  ``acquire`` returns the ``OwnerRecord`` with its ``epoch`` (a fencing token
  that strictly increases across acquisitions of a topic) or ``None``;
* presence is one ephemeral entry per (topic, node), written only when this
  node's local subscriber count crosses zero;
* the coordinator keeps a ``ClusterView`` fed by watches and bumps
  ``generation`` on every change; the node reconciles against the view;
* ``can_publish(topic, epoch)`` is the fencing gate: true only while the
  view says this node holds that epoch *and* that was confirmed recently.

One contract test suite (tests/cluster/test_coordinator_contract.py)
runs against both implementations.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from subsys.core.changes import ChangeSignal

__all__ = [
    "OwnerRecord",
    "NodeRecord",
    "Reservation",
    "ClusterView",
    "Coordinator",
    "HANDOFF_HOLD",
    "KeyFact",
    "SessionFact",
    "RegistrationFact",
    "Records",
]

HANDOFF_HOLD = 10.0  # seconds a handed-off topic waits for its chosen node before anyone may take it


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    topic: str
    node_id: str
    address: str
    epoch: int
    since: float = 0.0  # wall clock of the acquisition
    holder: str = ""  # the registration (Consul session) that holds the key
    incarnation: str = ""  # the owning process's incarnation, when known
    reason: str = ""  # why it was acquired ("no owner", "forced failover by ...")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    address: str
    version: str = ""
    started: float = 0.0
    incarnation: str = ""
    holder: str = ""
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    """A released topic kept for one node for a moment (a forced failover, a drain, a shutdown).

    Until ``until`` (wall clock) only ``for_node`` takes the topic, whether or
    not it has subscribers, so a handoff lands where it was meant to and its
    old owner does not take it straight back.
    """

    topic: str
    for_node: str
    until: float
    reason: str = ""
    from_node: str = ""
    from_epoch: int = 0

    def active(self, now: float) -> bool:
        return now < self.until


@dataclass(slots=True)
class ClusterView:
    owners: dict[str, OwnerRecord] = field(default_factory=dict)
    presence: dict[str, set[str]] = field(default_factory=dict)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KeyFact:
    """One coordinator key as stored (the zombie scan's raw material)."""

    kind: str  # owner | presence | node
    topic: str  # "" for node keys
    node: str  # the node the key names (presence, node) or claims (owner)
    holder: str | None  # the session holding it (None: released)
    index: int  # its ModifyIndex: a reap deletes at exactly this index
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionFact:
    id: str
    node: str  # the subsys node id its name claims
    checks: tuple[str, ...]  # the health checks it is bound to
    agent: str = ""  # the Consul agent (machine) it was created on


@dataclass(frozen=True, slots=True)
class RegistrationFact:
    """A service registered on this node's local agent, with its checks' states."""

    service_id: str
    node: str
    incarnation: str
    checks: dict[str, str]  # check id -> passing | warning | critical


@dataclass(slots=True)
class Records:
    """What the coordinator stores, read fresh, for cross-checking against the nodes' own facts."""

    keys: list[KeyFact] = field(default_factory=list)
    sessions: list[SessionFact] = field(default_factory=list)
    check_status: dict[str, str] = field(default_factory=dict)  # every subsys check in the catalog
    registrations: list[RegistrationFact] = field(default_factory=list)  # on this node's agent
    complete: bool = True  # False: a part could not be read (the scan says so, and reaps nothing)


class Coordinator(abc.ABC):
    """Base class: holds the view and the change signal; subclasses do the I/O."""

    kind = "abstract"

    def __init__(self, *, node_id: str, address: str, incarnation: str) -> None:
        self.node_id = node_id
        self.address = address
        self.incarnation = incarnation
        self.view = ClusterView()
        self._changed = ChangeSignal()

    # -- lifecycle ---------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Register this node; return once the first view is loaded (or the attempt failed: ``run`` retries)."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Keep the registration alive and the view fresh until cancelled."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave the cluster: drop every key this node holds."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while this node is registered and its view is live."""

    def health(self) -> dict[str, Any]:
        # "session": what holds this node's keys (the zombie scan compares it with every key's holder).
        return {"kind": self.kind, "ready": self.ready, "session": self.holder_id}

    # -- ownership ---------------------------------------------------------

    @property
    def holder_id(self) -> str:
        """What identifies this node's current hold on a key."""
        return self.node_id

    def holds(self, record: OwnerRecord | None) -> bool:
        """True if ``record`` is held by this node's *current* registration."""
        return record is not None and record.holder == self.holder_id

    def owned(self) -> dict[str, OwnerRecord]:
        return {topic: rec for topic, rec in self.view.owners.items() if self.holds(rec)}

    @abc.abstractmethod
    async def acquire(self, topic: str, *, reason: str = "") -> OwnerRecord | None:
        """Try to take the topic's owner key (recording ``reason``); ``None`` if someone else holds it."""

    @abc.abstractmethod
    async def release(self, topic: str, epoch: int, *, to: str | None = None, reason: str = "") -> bool:
        """Give the key back if this node still holds it at ``epoch``; True if it did.

        ``to``: keep the topic for that node for ``HANDOFF_HOLD`` seconds (see ``Reservation``).
        """

    async def set_draining(self, draining: bool) -> None:
        """Tell the cluster this node is draining (others stop choosing it for handoffs)."""

    @abc.abstractmethod
    def can_publish(self, topic: str, epoch: int) -> bool:
        """The fencing gate, checked before every publish."""

    # -- zombies: reading the raw records, and reaping with the evidence re-checked ----

    async def records(self) -> Records:
        """Everything this coordinator stores, read fresh (not the watched view)."""
        return Records()

    async def local_registrations(self) -> list[RegistrationFact]:
        """This cluster's registrations on this node's own agent."""
        return []

    async def destroy_session_if(self, session: str, *, still_dead: Any) -> bool:
        """Destroy ``session`` if ``still_dead(fresh session info)`` holds at the moment of acting."""
        return False

    async def delete_key_at(self, fact: KeyFact) -> bool:
        """Delete the key of ``fact`` only if it is still at ``fact.index`` (cas)."""
        return False

    async def deregister_if(self, service_id: str, *, still_dead: Any) -> bool:
        """Deregister a service of this node's agent if ``still_dead(fresh registration)`` holds."""
        return False

    # -- presence ----------------------------------------------------------

    @abc.abstractmethod
    async def set_presence(self, topic: str, present: bool) -> None:
        """Record whether this node has local subscribers to ``topic``."""

    # -- change signal -----------------------------------------------------

    @property
    def generation(self) -> int:
        """Goes up on every change of the view or of this node's standing (fenced, session lost)."""
        return self._changed.count

    async def _notify(self) -> None:
        self._changed.notify()

    async def wait_changed(self, seen: int, timeout: float) -> int:
        """Wait until ``generation`` moves past ``seen`` (or timeout); return it. Safe to cancel."""
        return await self._changed.wait(seen, timeout)
