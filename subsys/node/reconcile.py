"""The reconcile decision: what a node should do about one topic, as a pure function.

``decide(facts, cluster, now, timing)`` compares what the node has for a
topic (``TopicFacts``) with what the coordinator's view says
(``ClusterFacts``) and returns a ``Decision``: the actions to take, in
order, and the new values of the topic's timers. It does no I/O and keeps no
state, so every case is unit-tested against scripted views
(tests/unit/test_reconcile.py); the node only executes decisions.

Being level-triggered, a decision repairs whatever a race or a failed call
left behind: the next pass decides again from the facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from subsys.coordinator.base import OwnerRecord

__all__ = [
    "TopicFacts",
    "ClusterFacts",
    "Timing",
    "Decision",
    "Action",
    "SetPresence",
    "StartPoller",
    "StopPoller",
    "DropFollowers",
    "Acquire",
    "Follow",
    "Unfollow",
    "Forget",
    "decide",
    "steady",
]


@dataclass(frozen=True, slots=True)
class TopicFacts:
    """What this node has for the topic."""

    local: bool  # local subscribers now
    followers: bool  # peer links follow this node for the topic
    polling_epoch: int | None  # the epoch this node's poller runs at, if any
    following: str | None  # the owner address this node follows, if any
    presence_written: bool  # what this node last wrote as its presence
    empty_since: float | None = None  # when the last local subscriber left
    cluster_empty_since: float | None = None
    orphan_since: float | None = None


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    """What the coordinator's view says about the topic, from this node's side."""

    node_id: str
    owner: OwnerRecord | None
    holds: bool  # the owner key is held by this node's *current* registration
    can_publish: bool  # ... and that was confirmed recently (the fencing gate)
    presence_elsewhere: bool  # another node has local subscribers
    draining: bool = False
    reserved_for: str | None = None  # a handoff keeps the ownerless topic for this node for now


@dataclass(frozen=True, slots=True)
class Timing:
    grace: float  # presence must stay empty this long before a topic is let go
    orphan_delay: float = 1.0  # presence somewhere, no owner this long: any node takes it


class Action:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SetPresence(Action):
    present: bool


@dataclass(frozen=True, slots=True)
class StartPoller(Action):
    epoch: int


@dataclass(frozen=True, slots=True)
class StopPoller(Action):
    why: str
    release: bool = False  # also give the owner key back (cas at the owner's epoch)


@dataclass(frozen=True, slots=True)
class DropFollowers(Action):
    """Tell the nodes that follow us that we no longer own the topic (``not_owner``)."""

    why: str


@dataclass(frozen=True, slots=True)
class Acquire(Action):
    why: str


@dataclass(frozen=True, slots=True)
class Follow(Action):
    owner: OwnerRecord


@dataclass(frozen=True, slots=True)
class Unfollow(Action):
    pass


@dataclass(frozen=True, slots=True)
class Forget(Action):
    """Nothing left to do for the topic on this node: drop its stream."""


@dataclass(frozen=True, slots=True)
class Decision:
    actions: tuple[Action, ...]
    role: str  # idle | owner | follower | acquiring
    owner_node: str | None
    cluster_empty_since: float | None
    orphan_since: float | None
    notes: tuple[str, ...] = field(default=())

    def has(self, kind: type[Action]) -> bool:
        return any(isinstance(action, kind) for action in self.actions)


def decide(facts: TopicFacts, cluster: ClusterFacts, now: float, timing: Timing) -> Decision:
    actions: list[Action] = []
    if facts.presence_written != facts.local:
        actions.append(SetPresence(facts.local))
    owner = cluster.owner

    if cluster.holds and owner is not None:
        if cluster.draining:
            actions.append(StopPoller("draining", release=True))
            actions.append(DropFollowers("draining"))
            return Decision(tuple(actions), "idle", None, None, None)
        # The grace comes first: a topic to release gets no poller started (and at
        # once stopped again) in the same decision.
        if facts.local or cluster.presence_elsewhere:
            empty_since = None
        elif facts.cluster_empty_since is None:
            empty_since = now
        elif now - facts.cluster_empty_since >= timing.grace:
            actions.append(StopPoller("released after the grace period", release=True))
            actions.append(DropFollowers("released"))
            return Decision(tuple(actions), "idle", None, None, None)
        else:
            empty_since = facts.cluster_empty_since
        if facts.polling_epoch != owner.epoch:
            if facts.polling_epoch is not None:
                actions.append(StopPoller("epoch changed"))
            if cluster.can_publish:
                actions.append(StartPoller(owner.epoch))
            # else: ownership not confirmed recently (coordinator unreachable): wait, keep followers
        if facts.following is not None:
            actions.append(Unfollow())
        return Decision(tuple(actions), "owner", cluster.node_id, empty_since, None)

    # Not the owner (any more).
    if facts.polling_epoch is not None:
        actions.append(StopPoller("not the owner any more"))
    if facts.followers:
        actions.append(DropFollowers("not the owner"))
    waiting_takeover = False  # ownerless with presence elsewhere: Acquire once orphan_delay is up
    wanted_here = facts.local or (facts.empty_since is not None and now - facts.empty_since < timing.grace)

    if owner is not None and owner.node_id == cluster.node_id:
        # Held by an earlier registration of this node (a lost session): Consul deletes
        # it (Behavior=delete), then this node acquires anew. Never follow ourselves.
        if facts.following is not None:
            actions.append(Unfollow())
        role, owner_node, orphan_since = "idle", None, None
    elif owner is not None:
        if wanted_here:
            actions.append(Follow(owner))
            role = "follower"
        else:
            if facts.following is not None:
                actions.append(Unfollow())
            role = "idle"
        owner_node, orphan_since = owner.node_id, None
    else:
        if facts.following is not None:
            actions.append(Unfollow())
        # The orphan timer runs only while the topic is orphaned: presence elsewhere and
        # no owner. Started without presence, it would let this node take the topic the
        # moment another node's first subscriber shows up, racing that node.
        orphan_since = None
        if cluster.presence_elsewhere:
            orphan_since = facts.orphan_since if facts.orphan_since is not None else now
        role, owner_node = "idle", None
        if cluster.draining:
            pass
        elif cluster.reserved_for == cluster.node_id:
            actions.append(Acquire("handed over to this node"))
            role = "acquiring"
        elif cluster.reserved_for is not None:
            pass  # kept for another node for a moment: a handoff, not a free-for-all
        elif facts.local:
            actions.append(Acquire("no owner"))
            role = "acquiring"
        elif orphan_since is not None and now - orphan_since >= timing.orphan_delay:
            actions.append(Acquire("ownerless with subscribers elsewhere"))
            role = "acquiring"
        elif orphan_since is not None:
            # A takeover candidate: keep the topic (and its timer) until the delay is up.
            waiting_takeover = True

    if (
        role == "idle"
        and not waiting_takeover
        and not facts.local
        and not facts.followers
        and (facts.empty_since is None or now - facts.empty_since >= timing.grace)
        and not facts.presence_written
        and not any(isinstance(a, (SetPresence, Acquire)) for a in actions)
    ):
        actions.append(Forget())
    return Decision(tuple(actions), role, owner_node, None, orphan_since)


def steady(facts: TopicFacts, cluster: ClusterFacts, decision: Decision) -> bool:
    """True when only an event, never time passing, can change this topic's decision.

    An owner polling at the owner's epoch with subscribers somewhere, or a follower with
    local subscribers, and no timer running: the next decision would be the same until
    the view changes, a subscriber comes or goes, or a poller or a follow link stops (each
    of which wakes a full reconcile pass). The node skips steady topics on its timed
    passes, so a pass costs what the topics in transition cost, not every topic's.
    """
    if decision.cluster_empty_since is not None or decision.orphan_since is not None or cluster.reserved_for is not None:
        return False
    owner = cluster.owner
    if owner is None or facts.empty_since is not None:
        return False
    if decision.role == "owner":
        return not decision.actions and facts.polling_epoch == owner.epoch
    if decision.role == "follower":
        return facts.local and decision.actions == (Follow(owner),) and facts.polling_epoch is None
    return False
