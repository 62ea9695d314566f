"""``decide()`` case by case, against scripted cluster views (subsys/node/reconcile.py).

Each test builds what the node has (``TopicFacts``) and what its coordinator's
view says (``ClusterFacts``), and checks the actions, in order, and the timers
the decision hands back. Multi-step cases feed a decision's timers into the
next call, as the node does (``Script``).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from subsys.coordinator.base import OwnerRecord
from subsys.node.reconcile import (
    Acquire,
    ClusterFacts,
    Decision,
    DropFollowers,
    Follow,
    Forget,
    SetPresence,
    StartPoller,
    StopPoller,
    TopicFacts,
    Timing,
    Unfollow,
    decide,
    steady,
)

pytestmark = pytest.mark.timeout(30)

ME = "n1"
PEER = "n2"
TOPIC = "items:1"
SESSION = "session-now"
OLD_SESSION = "session-before"
PEER_SESSION = "session-of-n2"
GRACE = 5.0
ORPHAN_DELAY = 1.0
TIMING = Timing(grace=GRACE, orphan_delay=ORPHAN_DELAY)
NOW = 1000.0


def record(node: str = PEER, epoch: int = 10, holder: str = PEER_SESSION) -> OwnerRecord:
    return OwnerRecord(TOPIC, node, f"http://{node}:8080", epoch, since=1.0, holder=holder)


def topic(**changes) -> TopicFacts:
    """Nothing on this node for the topic (no subscribers, no poller, nothing written)."""
    base = TopicFacts(local=False, followers=False, polling_epoch=None, following=None, presence_written=False)
    return dataclasses.replace(base, **changes)


def subscribed(**changes) -> TopicFacts:
    """Local subscribers, presence already written."""
    return topic(local=True, presence_written=True, **changes)


def unowned(**changes) -> ClusterFacts:
    base = ClusterFacts(node_id=ME, owner=None, holds=False, can_publish=False, presence_elsewhere=False)
    return dataclasses.replace(base, **changes)


def ours(epoch: int = 10, **changes) -> ClusterFacts:
    """Held by this node's current registration, confirmed (not fenced)."""
    base = ClusterFacts(
        node_id=ME, owner=record(ME, epoch, SESSION), holds=True, can_publish=True, presence_elsewhere=False
    )
    return dataclasses.replace(base, **changes)


def theirs(epoch: int = 10, **changes) -> ClusterFacts:
    base = ClusterFacts(node_id=ME, owner=record(PEER, epoch), holds=False, can_publish=False, presence_elsewhere=False)
    return dataclasses.replace(base, **changes)


def earlier_self(epoch: int = 10, **changes) -> ClusterFacts:
    """Held by an earlier registration of this node id (a lost session, a previous process)."""
    base = ClusterFacts(
        node_id=ME, owner=record(ME, epoch, OLD_SESSION), holds=False, can_publish=False, presence_elsewhere=False
    )
    return dataclasses.replace(base, **changes)


def kinds(decision: Decision) -> list[type]:
    return [type(action) for action in decision.actions]


class Script:
    """Calls ``decide`` repeatedly, carrying the timers like Node.reconcile_topic does."""

    def __init__(self, facts: TopicFacts) -> None:
        self.facts = facts

    def step(self, cluster: ClusterFacts, now: float, **fact_changes) -> Decision:
        self.facts = dataclasses.replace(self.facts, **fact_changes)
        decision = decide(self.facts, cluster, now, TIMING)
        self.facts = dataclasses.replace(
            self.facts, cluster_empty_since=decision.cluster_empty_since, orphan_since=decision.orphan_since
        )
        return decision


# -- no owner ---------------------------------------------------------------------


def test_no_owner_with_local_subscribers_acquires_at_once() -> None:
    decision = decide(subscribed(), unowned(), NOW, TIMING)
    assert decision.actions == (Acquire("no owner"),)
    assert decision.role == "acquiring"
    assert decision.owner_node is None


def test_no_owner_first_local_subscriber_writes_presence_then_acquires() -> None:
    decision = decide(topic(local=True), unowned(), NOW, TIMING)
    assert decision.actions == (SetPresence(True), Acquire("no owner"))
    assert decision.role == "acquiring"


def test_no_owner_with_local_subscribers_acquires_even_with_presence_elsewhere() -> None:
    decision = decide(subscribed(), unowned(presence_elsewhere=True), NOW, TIMING)
    assert decision.actions == (Acquire("no owner"),)


def test_no_owner_presence_only_elsewhere_starts_the_orphan_timer_and_waits() -> None:
    decision = decide(topic(empty_since=NOW - 1), unowned(presence_elsewhere=True), NOW, TIMING)
    assert not decision.has(Acquire)
    assert decision.orphan_since == NOW
    assert decision.role == "idle"


def test_no_owner_presence_only_elsewhere_keeps_the_orphan_timer_while_it_runs() -> None:
    facts = topic(empty_since=NOW - 1, orphan_since=NOW - ORPHAN_DELAY / 2)
    decision = decide(facts, unowned(presence_elsewhere=True), NOW, TIMING)
    assert not decision.has(Acquire)
    assert decision.orphan_since == NOW - ORPHAN_DELAY / 2


def test_no_owner_presence_only_elsewhere_acquires_once_the_orphan_delay_passed() -> None:
    facts = topic(empty_since=NOW - 1, orphan_since=NOW - ORPHAN_DELAY)
    decision = decide(facts, unowned(presence_elsewhere=True), NOW, TIMING)
    assert decision.actions == (Acquire("ownerless with subscribers elsewhere"),)
    assert decision.role == "acquiring"
    assert decision.orphan_since == NOW - ORPHAN_DELAY


def test_orphan_timer_starts_runs_and_acquires_at_the_delay_over_several_passes() -> None:
    script = Script(topic(empty_since=NOW))
    assert not script.step(unowned(presence_elsewhere=True), NOW).has(Acquire)
    assert script.facts.orphan_since == NOW
    assert not script.step(unowned(presence_elsewhere=True), NOW + ORPHAN_DELAY * 0.9).has(Acquire)
    assert script.facts.orphan_since == NOW  # kept, not restarted
    assert script.step(unowned(presence_elsewhere=True), NOW + ORPHAN_DELAY).has(Acquire)


def test_orphan_timer_resets_when_an_owner_appears() -> None:
    script = Script(topic(empty_since=NOW))
    script.step(unowned(presence_elsewhere=True), NOW)
    assert script.facts.orphan_since == NOW
    decision = script.step(theirs(presence_elsewhere=True), NOW + 0.5)
    assert decision.orphan_since is None
    # The owner goes away again: the delay counts from now, not from the first orphaning.
    later = NOW + 0.5 + ORPHAN_DELAY * 0.9
    assert not script.step(unowned(presence_elsewhere=True), NOW + 0.6).has(Acquire)
    assert script.facts.orphan_since == NOW + 0.6
    assert not script.step(unowned(presence_elsewhere=True), later).has(Acquire)
    assert script.step(unowned(presence_elsewhere=True), NOW + 0.6 + ORPHAN_DELAY).has(Acquire)


def test_orphan_timer_resets_when_this_node_owns_the_topic() -> None:
    script = Script(subscribed(orphan_since=NOW - 0.5))
    decision = script.step(ours(), NOW)
    assert decision.orphan_since is None


def test_orphan_timer_does_not_run_while_nobody_has_presence() -> None:
    # No owner and no presence anywhere: nothing is orphaned, so no timer. Otherwise a
    # timer started here would let this node take the topic the moment another node's
    # first subscriber shows up, racing the node that has the subscribers.
    script = Script(topic(empty_since=NOW))
    decision = script.step(unowned(), NOW)
    assert decision.orphan_since is None
    decision = script.step(unowned(presence_elsewhere=True), NOW + 3 * ORPHAN_DELAY)
    assert not decision.has(Acquire)
    assert decision.orphan_since == NOW + 3 * ORPHAN_DELAY


def test_no_owner_while_draining_never_acquires() -> None:
    decision = decide(subscribed(), unowned(draining=True), NOW, TIMING)
    assert not decision.has(Acquire)
    facts = topic(empty_since=NOW, orphan_since=NOW - 10 * ORPHAN_DELAY)
    decision = decide(facts, unowned(presence_elsewhere=True, draining=True), NOW, TIMING)
    assert not decision.has(Acquire)
    assert decision.role == "idle"


def test_no_owner_stops_a_poller_left_running_and_drops_its_followers() -> None:
    decision = decide(subscribed(polling_epoch=7, followers=True), unowned(), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers, Acquire]
    assert decision.actions[0].release is False


def test_no_owner_stops_following_the_old_owner() -> None:
    decision = decide(subscribed(following="http://n2:8080"), unowned(), NOW, TIMING)
    assert decision.actions == (Unfollow(), Acquire("no owner"))


# -- held by this node -------------------------------------------------------------


def test_held_by_us_and_polling_at_that_epoch_is_nothing_to_do() -> None:
    decision = decide(subscribed(polling_epoch=10), ours(10), NOW, TIMING)
    assert decision.actions == ()
    assert decision.role == "owner"
    assert decision.owner_node == ME
    assert decision.cluster_empty_since is None


def test_held_by_us_and_polling_with_followers_is_nothing_to_do() -> None:
    decision = decide(subscribed(polling_epoch=10, followers=True), ours(10, presence_elsewhere=True), NOW, TIMING)
    assert decision.actions == ()


def test_held_by_us_not_polling_starts_the_poller_at_the_owner_epoch() -> None:
    decision = decide(subscribed(), ours(10), NOW, TIMING)
    assert decision.actions == (StartPoller(10),)
    assert decision.role == "owner"


def test_held_by_us_not_polling_but_fenced_waits_without_starting_a_poller() -> None:
    decision = decide(subscribed(), ours(10, can_publish=False), NOW, TIMING)
    assert decision.actions == ()
    assert decision.role == "owner"


def test_held_by_us_fenced_keeps_its_followers() -> None:
    facts = subscribed(followers=True)
    decision = decide(facts, ours(10, can_publish=False, presence_elsewhere=True), NOW, TIMING)
    assert not decision.has(StartPoller)
    assert not decision.has(DropFollowers)
    assert not decision.has(StopPoller)
    # and while still polling (the poller checks the gate itself before each publish):
    decision = decide(dataclasses.replace(facts, polling_epoch=10), ours(10, can_publish=False), NOW, TIMING)
    assert decision.actions == ()


def test_held_by_us_at_a_new_epoch_while_polling_an_older_one_restarts_the_poller() -> None:
    decision = decide(subscribed(polling_epoch=7), ours(10), NOW, TIMING)
    assert kinds(decision) == [StopPoller, StartPoller]
    assert decision.actions[0].release is False  # the key is ours at the new epoch: keep it
    assert decision.actions[1] == StartPoller(10)
    assert not decision.has(DropFollowers)


def test_held_by_us_at_a_new_epoch_but_fenced_stops_the_old_poller_only() -> None:
    decision = decide(subscribed(polling_epoch=7, followers=True), ours(10, can_publish=False), NOW, TIMING)
    assert kinds(decision) == [StopPoller]
    assert decision.actions[0].release is False


def test_held_by_us_while_following_someone_stops_following() -> None:
    decision = decide(subscribed(following="http://n2:8080"), ours(10), NOW, TIMING)
    assert decision.actions == (StartPoller(10), Unfollow())


def test_held_by_us_while_draining_releases_and_drops_followers() -> None:
    decision = decide(subscribed(polling_epoch=10, followers=True), ours(10, draining=True), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers]
    assert decision.actions[0].release is True
    assert decision.role == "idle"
    assert not decision.has(StartPoller)


def test_held_by_us_while_draining_and_fenced_still_releases() -> None:
    decision = decide(subscribed(), ours(10, draining=True, can_publish=False), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers]
    assert decision.actions[0].release is True


def test_held_by_us_with_presence_gone_everywhere_starts_the_grace_timer() -> None:
    decision = decide(topic(polling_epoch=10, empty_since=NOW), ours(10), NOW, TIMING)
    assert decision.actions == ()
    assert decision.role == "owner"
    assert decision.cluster_empty_since == NOW


def test_held_by_us_within_grace_keeps_polling_and_the_timer() -> None:
    facts = topic(polling_epoch=10, empty_since=NOW - 1, cluster_empty_since=NOW - GRACE / 2)
    decision = decide(facts, ours(10), NOW, TIMING)
    assert decision.actions == ()
    assert decision.cluster_empty_since == NOW - GRACE / 2


def test_held_by_us_at_grace_releases_and_drops_followers() -> None:
    facts = topic(polling_epoch=10, empty_since=NOW - GRACE, cluster_empty_since=NOW - GRACE)
    decision = decide(facts, ours(10), NOW, TIMING)
    assert decision.actions == (
        StopPoller("released after the grace period", release=True),
        DropFollowers("released"),
    )
    assert decision.role == "idle"
    assert decision.cluster_empty_since is None


def test_held_by_us_grace_timer_starts_runs_and_releases_over_several_passes() -> None:
    script = Script(subscribed(polling_epoch=10))
    assert script.step(ours(10), NOW).actions == ()
    assert script.facts.cluster_empty_since is None
    # The last local subscriber leaves: presence goes, and the timer starts.
    decision = script.step(ours(10), NOW + 1, local=False, empty_since=NOW + 1)
    assert decision.actions == (SetPresence(False),)
    assert script.facts.cluster_empty_since == NOW + 1
    script.facts = dataclasses.replace(script.facts, presence_written=False)
    assert script.step(ours(10), NOW + 1 + GRACE * 0.9).actions == ()
    assert script.facts.cluster_empty_since == NOW + 1
    decision = script.step(ours(10), NOW + 1 + GRACE)
    assert kinds(decision) == [StopPoller, DropFollowers]
    assert decision.actions[0].release is True


def test_held_by_us_grace_timer_resets_when_presence_comes_back() -> None:
    script = Script(topic(polling_epoch=10, empty_since=NOW))
    script.step(ours(10), NOW)
    assert script.facts.cluster_empty_since == NOW
    assert script.step(ours(10, presence_elsewhere=True), NOW + GRACE / 2).actions == ()
    assert script.facts.cluster_empty_since is None
    script.step(ours(10), NOW + GRACE / 2 + 0.1)
    assert script.facts.cluster_empty_since == NOW + GRACE / 2 + 0.1
    assert not script.step(ours(10), NOW + GRACE + 0.1).has(StopPoller)  # counted from the reset


def test_held_by_us_grace_timer_is_cleared_by_a_local_subscriber() -> None:
    facts = subscribed(polling_epoch=10, cluster_empty_since=NOW - 2 * GRACE)
    decision = decide(facts, ours(10), NOW, TIMING)
    assert decision.actions == ()
    assert decision.cluster_empty_since is None


def test_held_by_us_past_grace_but_not_polling_releases_without_starting_a_poller() -> None:
    # A poller that died (or a topic adopted after a restart) once the grace ran out:
    # release it; starting a poller only to stop it in the same pass is wasted work.
    facts = topic(empty_since=NOW - 2 * GRACE, cluster_empty_since=NOW - GRACE)
    decision = decide(facts, ours(10), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers]
    assert decision.actions[0].release is True
    facts = dataclasses.replace(facts, polling_epoch=7)  # polling an older epoch
    decision = decide(facts, ours(10), NOW, TIMING)
    assert not decision.has(StartPoller)
    assert [a.release for a in decision.actions if isinstance(a, StopPoller)][-1] is True


# -- owned by another node -----------------------------------------------------------


def test_owned_elsewhere_with_local_subscribers_follows_the_owner() -> None:
    decision = decide(subscribed(), theirs(10), NOW, TIMING)
    assert decision.actions == (Follow(record(PEER, 10)),)
    assert decision.role == "follower"
    assert decision.owner_node == PEER


def test_owned_elsewhere_while_polling_stops_the_poller_and_follows() -> None:
    # Our session was lost (or we saw an older epoch): someone else holds the key now.
    decision = decide(subscribed(polling_epoch=7), theirs(12), NOW, TIMING)
    assert kinds(decision) == [StopPoller, Follow]
    assert decision.actions[0].release is False  # not ours to release
    assert decision.actions[1] == Follow(record(PEER, 12))


def test_owned_elsewhere_with_followers_attached_drops_them_and_follows() -> None:
    decision = decide(subscribed(polling_epoch=7, followers=True), theirs(12), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers, Follow]


def test_owned_elsewhere_keeps_following_each_pass() -> None:
    # Level-triggered: Follow is repeated; the peer link makes it idempotent.
    decision = decide(subscribed(following="http://n2:8080"), theirs(10), NOW, TIMING)
    assert decision.actions == (Follow(record(PEER, 10)),)


def test_owned_elsewhere_no_local_subscribers_within_grace_keeps_following() -> None:
    facts = topic(following="http://n2:8080", empty_since=NOW - GRACE / 2)
    decision = decide(facts, theirs(10), NOW, TIMING)
    assert decision.actions == (Follow(record(PEER, 10)),)
    assert decision.role == "follower"


def test_owned_elsewhere_last_local_subscriber_just_left_deletes_presence_and_keeps_following() -> None:
    facts = topic(following="http://n2:8080", presence_written=True, empty_since=NOW)
    decision = decide(facts, theirs(10), NOW, TIMING)
    assert decision.actions == (SetPresence(False), Follow(record(PEER, 10)))


def test_owned_elsewhere_no_local_subscribers_after_grace_unfollows_and_forgets() -> None:
    facts = topic(following="http://n2:8080", empty_since=NOW - GRACE)
    decision = decide(facts, theirs(10), NOW, TIMING)
    assert decision.actions == (Unfollow(), Forget())
    assert decision.role == "idle"
    assert decision.owner_node == PEER


# -- held by an earlier registration of this node ----------------------------------------


def test_held_by_an_earlier_registration_of_this_node_never_follows_itself() -> None:
    decision = decide(subscribed(), earlier_self(10), NOW, TIMING)
    assert not decision.has(Follow)
    assert not decision.has(Acquire)
    assert decision.actions == ()
    assert decision.role == "idle"
    assert decision.owner_node is None


def test_held_by_an_earlier_registration_stops_poller_drops_followers_and_unfollows() -> None:
    facts = subscribed(polling_epoch=10, followers=True, following="http://n2:8080")
    decision = decide(facts, earlier_self(10), NOW, TIMING)
    assert kinds(decision) == [StopPoller, DropFollowers, Unfollow]
    assert decision.actions[0].release is False  # the old session's key: Consul deletes it


def test_held_by_an_earlier_registration_then_gone_this_node_acquires() -> None:
    script = Script(subscribed())
    assert script.step(earlier_self(10), NOW).actions == ()
    assert script.step(unowned(), NOW + 1).actions == (Acquire("no owner"),)


# -- presence -----------------------------------------------------------------------------


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize(
    "cluster", [unowned(), ours(10), theirs(10), earlier_self(10), ours(10, draining=True)],
    ids=["unowned", "ours", "theirs", "earlier-self", "ours-draining"],
)
def test_set_presence_only_when_written_differs_from_wanted(local: bool, cluster: ClusterFacts) -> None:
    for written in (True, False):
        facts = topic(local=local, presence_written=written, polling_epoch=10 if cluster.holds else None)
        decision = decide(facts, cluster, NOW, TIMING)
        presence = [a for a in decision.actions if isinstance(a, SetPresence)]
        if written == local:
            assert presence == [], (local, written, decision)
        else:
            assert presence == [SetPresence(local)], (local, written, decision)
            assert decision.actions[0] == SetPresence(local)  # written first, before any other action


# -- forgetting ---------------------------------------------------------------------------


def test_forget_when_nothing_is_left() -> None:
    assert decide(topic(), unowned(), NOW, TIMING).actions == (Forget(),)
    assert decide(topic(empty_since=NOW - GRACE), theirs(10), NOW, TIMING).actions == (Forget(),)
    assert decide(topic(empty_since=NOW - GRACE), earlier_self(10), NOW, TIMING).actions == (Forget(),)


def test_forget_after_stopping_a_poller_it_no_longer_owns() -> None:
    decision = decide(topic(polling_epoch=7, empty_since=NOW - GRACE), theirs(10), NOW, TIMING)
    assert kinds(decision) == [StopPoller, Forget]


def test_no_forget_while_presence_is_written() -> None:
    decision = decide(topic(presence_written=True), unowned(), NOW, TIMING)
    assert decision.actions == (SetPresence(False),)  # deleted first; forgotten on a later pass
    assert decide(topic(), unowned(), NOW, TIMING).has(Forget)


def test_no_forget_while_followers_are_attached() -> None:
    decision = decide(topic(followers=True), unowned(), NOW, TIMING)
    assert decision.actions == (DropFollowers("not the owner"),)
    decision = decide(topic(followers=True, empty_since=NOW - GRACE), theirs(10), NOW, TIMING)
    assert not decision.has(Forget)


def test_no_forget_within_grace_of_the_last_local_subscriber() -> None:
    for cluster in (unowned(), theirs(10), earlier_self(10)):
        decision = decide(topic(empty_since=NOW - GRACE / 2), cluster, NOW, TIMING)
        assert not decision.has(Forget), cluster


def test_no_forget_with_local_subscribers() -> None:
    for cluster in (unowned(draining=True), earlier_self(10), theirs(10)):
        assert not decide(subscribed(), cluster, NOW, TIMING).has(Forget), cluster


def test_no_forget_when_acquiring() -> None:
    decision = decide(topic(orphan_since=NOW - ORPHAN_DELAY), unowned(presence_elsewhere=True), NOW, TIMING)
    assert decision.has(Acquire)
    assert not decision.has(Forget)


def test_no_forget_while_waiting_out_the_orphan_delay() -> None:
    # Ownerless with subscribers elsewhere: this node is a takeover candidate. Forgetting
    # the topic would also forget the orphan timer, and the takeover would never happen.
    decision = decide(topic(), unowned(presence_elsewhere=True), NOW, TIMING)
    assert decision.orphan_since == NOW
    assert not decision.has(Forget)
    decision = decide(topic(empty_since=NOW - 2 * GRACE, orphan_since=NOW - 0.5), unowned(presence_elsewhere=True),
                      NOW, TIMING)  # fmt: skip
    assert not decision.has(Forget)


def test_forget_when_ownerless_with_presence_elsewhere_but_draining() -> None:
    # A draining node never takes the topic, so it has nothing to wait for.
    decision = decide(topic(), unowned(presence_elsewhere=True, draining=True), NOW, TIMING)
    assert decision.actions == (Forget(),)


def test_no_forget_while_owner() -> None:
    decision = decide(topic(polling_epoch=10, cluster_empty_since=NOW - 1), ours(10), NOW, TIMING)
    assert not decision.has(Forget)
    assert decision.role == "owner"


def test_released_owner_is_forgotten_on_the_next_pass() -> None:
    script = Script(topic(polling_epoch=10, empty_since=NOW - 2 * GRACE, cluster_empty_since=NOW - GRACE))
    decision = script.step(ours(10), NOW)
    assert decision.has(StopPoller) and not decision.has(Forget)
    # the node stopped the poller and released; the view shows no owner
    assert script.step(unowned(), NOW + 0.1, polling_epoch=None).actions == (Forget(),)


# -- purity ---------------------------------------------------------------------------------


def test_decide_is_pure_same_inputs_same_decision() -> None:
    facts = topic(local=True, polling_epoch=7, followers=True, following="http://n2:8080")
    cluster = theirs(12, presence_elsewhere=True)
    assert decide(facts, cluster, NOW, TIMING) == decide(facts, cluster, NOW, TIMING)


# -- handoffs (forced failover, drain, shutdown) ------------------------------------


def test_a_topic_handed_over_to_this_node_is_acquired_without_subscribers_here() -> None:
    facts = TopicFacts(local=False, followers=False, polling_epoch=None, following=None, presence_written=False)
    cluster = ClusterFacts(node_id="n2", owner=None, holds=False, can_publish=False,
                           presence_elsewhere=False, reserved_for="n2")  # fmt: skip
    decision = decide(facts, cluster, 100.0, Timing(grace=5.0))
    assert [type(a) for a in decision.actions] == [Acquire]
    assert decision.role == "acquiring"


def test_a_topic_kept_for_another_node_is_not_raced_for_even_with_local_subscribers() -> None:
    facts = TopicFacts(local=True, followers=False, polling_epoch=None, following=None, presence_written=True)
    cluster = ClusterFacts(node_id="n1", owner=None, holds=False, can_publish=False,
                           presence_elsewhere=True, reserved_for="n2")  # fmt: skip
    decision = decide(facts, cluster, 100.0, Timing(grace=5.0))
    assert not decision.has(Acquire)
    assert not decision.has(Forget)


def test_a_draining_node_does_not_take_a_topic_handed_to_it() -> None:
    facts = TopicFacts(local=False, followers=False, polling_epoch=None, following=None, presence_written=False)
    cluster = ClusterFacts(node_id="n2", owner=None, holds=False, can_publish=False,
                           presence_elsewhere=False, draining=True, reserved_for="n2")  # fmt: skip
    assert not decide(facts, cluster, 100.0, Timing(grace=5.0)).has(Acquire)


# -- steady topics (skipped by timed passes) ------------------------------------------


def _all_cases():
    owners = {"unowned": unowned(), "ours": ours(), "ours-elsewhere": ours(presence_elsewhere=True),
              "ours-unconfirmed": ours(can_publish=False), "theirs": theirs(), "earlier-self": earlier_self(),
              "reserved": unowned(reserved_for=ME), "theirs-presence": theirs(presence_elsewhere=True)}  # fmt: skip
    for (name, cluster), local, polling, following, empty, written in itertools.product(
        owners.items(), (True, False), (None, 10, 9), (None, "http://n2:8080"), (None, NOW - 1.0), (True, False)
    ):
        facts = topic(local=local, polling_epoch=polling, following=following,
                      empty_since=None if local else empty, presence_written=written)  # fmt: skip
        yield name, facts, cluster


def test_a_steady_decision_stays_the_same_whatever_time_passes() -> None:
    """What lets a timed pass skip a steady topic: time alone can never change its decision."""
    seen = 0
    for name, facts, cluster in _all_cases():
        decision = decide(facts, cluster, NOW, TIMING)
        if not steady(facts, cluster, decision):
            continue
        seen += 1
        carried = dataclasses.replace(facts, cluster_empty_since=decision.cluster_empty_since,
                                      orphan_since=decision.orphan_since)  # fmt: skip
        for later in (NOW + 0.5, NOW + ORPHAN_DELAY, NOW + GRACE, NOW + 10 * GRACE):
            assert decide(carried, cluster, later, TIMING) == decision, (name, facts)
    assert seen >= 2


def test_an_owner_polling_its_epoch_with_subscribers_is_steady() -> None:
    facts = subscribed(polling_epoch=10)
    assert steady(facts, ours(), decide(facts, ours(), NOW, TIMING))
    follower = subscribed(following="http://n2:8080")
    assert steady(follower, theirs(), decide(follower, theirs(), NOW, TIMING))


@pytest.mark.parametrize("case", ["grace running", "orphan timer", "not polling yet", "reserved", "last subscriber gone"])
def test_a_topic_with_a_timer_or_an_action_pending_is_not_steady(case: str) -> None:
    facts, cluster = {
        "grace running": (topic(polling_epoch=10), ours()),
        "orphan timer": (topic(), unowned(presence_elsewhere=True)),
        "not polling yet": (subscribed(), ours(can_publish=False)),
        "reserved": (subscribed(), unowned(reserved_for=ME)),
        "last subscriber gone": (topic(empty_since=NOW - 1.0, following="http://n2:8080", presence_written=True), theirs()),
    }[case]
    assert not steady(facts, cluster, decide(facts, cluster, NOW, TIMING))
