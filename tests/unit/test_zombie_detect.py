"""``detect()`` and ``Tracker`` case by case, against scripted records (subsys/node/zombies.py).

Each test starts from a healthy two-node cluster (``healthy()``: n1 owns and
polls items:1 at epoch 10 with a local subscriber, n2 follows it with one
too) and breaks one fact, the way a race, a crash or a failed removal does,
then checks the finding: its kind, subject, the action that fixes it, and
whether the janitor may take that action on its own. The negative cases are
the ones that matter most: a frozen node, a fresh registration or a grace
that is still running must never look like a zombie.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from subsys.coordinator.base import KeyFact, Records, SessionFact
from subsys.node.zombies import KINDS, ScanInput, Timing, Tracker, detect

pytestmark = pytest.mark.timeout(30)

NOW = 10_000.0
TOPIC = "items:1"
TIMING = Timing(grace=5.0, check_ttl=3.0, interval=2.0)


def owner_key(node: str = "n1", holder: str | None = "s1", index: int = 10, **value: Any) -> KeyFact:
    return KeyFact("owner", TOPIC, node, holder, index, dict(value))


def presence_key(node: str, holder: str | None, index: int = 11) -> KeyFact:
    return KeyFact("presence", TOPIC, node, holder, index)


def report(session: str, *, pollers: dict[str, int] | None = None, subscribers: int = 1, **extra: Any) -> dict:
    topic = {"topic": TOPIC, "last_poll_at": NOW - 0.1, "interval": 0.5, "local_subscribers": subscribers}
    return {"coordinator": {"session": session}, "pollers": pollers or {}, "topic_reports": [topic], **extra}


def healthy() -> ScanInput:
    records = Records(
        keys=[owner_key(), presence_key("n1", "s1"), presence_key("n2", "s2", 12)],
        sessions=[SessionFact("s1", "n1", ("serfHealth", "c1")), SessionFact("s2", "n2", ("serfHealth", "c2"))],
        check_status={"c1": "passing", "c2": "passing"},
    )
    reports = {
        "n1": report("s1", pollers={TOPIC: 10}, incarnation="i1"),
        "n2": report("s2", incarnation="i2"),
    }
    return ScanInput(records=records, reports=reports, unreachable={}, refused=set(), now=NOW)


def with_keys(scan: ScanInput, *keys: KeyFact) -> ScanInput:
    """``scan`` with its keys of the same (kind, topic, node) replaced by ``keys``."""
    names = {(k.kind, k.topic, k.node) for k in keys}
    kept = [k for k in scan.records.keys if (k.kind, k.topic, k.node) not in names]
    return dataclasses.replace(scan, records=dataclasses.replace(scan.records, keys=kept + list(keys)))


def without_keys(scan: ScanInput, kind: str) -> ScanInput:
    kept = [k for k in scan.records.keys if k.kind != kind]
    return dataclasses.replace(scan, records=dataclasses.replace(scan.records, keys=kept))


def n2_gone(scan: ScanInput, *, refused: bool) -> ScanInput:
    """n2 did not answer the scan: its address refused (a dead process) or timed out (frozen)."""
    reports = {k: v for k, v in scan.reports.items() if k != "n2"}
    why = "connection refused" if refused else "timed out"
    return dataclasses.replace(scan, reports=reports, unreachable={"n2": why}, refused={"n2"} if refused else set())


def kinds(scan: ScanInput) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in detect(scan, TIMING)]


def only(scan: ScanInput, kind: str):
    found = detect(scan, TIMING)
    assert [f.kind for f in found] == [kind], [(f.kind, f.subject, f.evidence) for f in found]
    return found[0]


def test_a_healthy_cluster_has_no_zombie() -> None:
    assert kinds(healthy()) == []


def test_every_kind_is_described() -> None:
    assert all(KINDS.values()) and len(KINDS) == 9


# -- pollers -------------------------------------------------------------------------------


def test_a_poller_at_an_older_epoch_than_its_nodes_key_is_an_orphan() -> None:
    scan = healthy()
    scan.reports["n1"]["pollers"] = {TOPIC: 9}
    finding = only(scan, "orphan_poller")
    assert finding.subject == TOPIC and finding.nodes == ["n1"] and finding.auto
    assert finding.actions == [{"do": "stop_poller", "node": "n1", "topic": TOPIC, "epoch": 9}]


def test_a_poller_of_a_topic_without_an_owner_key_is_an_orphan() -> None:
    scan = without_keys(healthy(), "owner")
    scan = without_keys(scan, "presence")  # no presence either: nothing else to say
    finding = only(scan, "orphan_poller")
    assert finding.evidence["owner_key"] is None


def test_two_pollers_are_a_duplicate_and_only_the_stray_is_stopped() -> None:
    scan = healthy()
    scan.reports["n2"]["pollers"] = {TOPIC: 10}  # same epoch, but n2's session does not hold the key
    finding = only(scan, "duplicate_poller")
    assert finding.nodes == ["n1", "n2"]
    assert finding.actions == [{"do": "stop_poller", "node": "n2", "topic": TOPIC, "epoch": 10}]
    assert finding.evidence["sessions"] == {"n1": "s1", "n2": "s2"}


# -- database calls ------------------------------------------------------------------------


def test_a_stuck_query_is_one_finding_per_call_naming_which_topics_the_node_still_holds() -> None:
    scan = healthy()
    scan.reports["n1"]["stuck_queries"] = [
        {"id": "q7", "feed": "items", "pid": 4242, "age": 31.0, "topics": {TOPIC: 10, "items:2": 3}}
    ]
    scan.db_connections = {"n1": 4}
    finding = only(scan, "stuck_query")
    assert finding.subject == "n1/q7"
    assert finding.actions == [{"do": "terminate_query", "node": "n1", "query": "q7", "pid": 4242}]
    assert finding.evidence["topics"] == [
        {"topic": TOPIC, "epoch": 10, "held_by_node": True},
        {"topic": "items:2", "epoch": 3, "held_by_node": False},
    ]
    assert finding.evidence["db_connections"] == 4


# -- owner keys ----------------------------------------------------------------------------


def test_a_released_key_is_a_zombie_only_once_its_hold_ran_out() -> None:
    held = with_keys(healthy(), owner_key(holder=None, until=NOW + 1, reserved_for="n2"))
    held.reports["n1"]["pollers"] = {}
    assert kinds(held) == []
    ran_out = with_keys(held, owner_key(holder=None, until=NOW - 4, reserved_for="n2"))
    finding = only(ran_out, "released_key")
    assert finding.nodes == ["n2"] and finding.evidence["hold_ended_ago"] == 4.0
    assert finding.actions[0]["do"] == "delete_key" and finding.actions[0]["key"]["index"] == 10


def test_an_owner_key_of_an_earlier_incarnation_is_a_stuck_owner_and_its_session_dead() -> None:
    scan = healthy()
    scan = with_keys(scan, owner_key(holder="s1-old"), presence_key("n1", "s1-old"))
    scan.records.sessions.append(SessionFact("s1-old", "n1", ("serfHealth", "c1-old")))
    scan.reports["n1"]["pollers"] = {}
    found = {(f.kind, f.subject): f for f in detect(scan, TIMING)}
    assert set(found) == {("stuck_owner", TOPIC), ("stale_presence", f"{TOPIC}@n1"), ("dead_session", "s1-old")}
    stuck = found["stuck_owner", TOPIC]
    assert "a later incarnation" in stuck.evidence["why"] and stuck.auto
    assert stuck.actions == [{"do": "destroy_session", "session": "s1-old", "node": "n1"}]
    assert found["dead_session", "s1-old"].evidence["holds"] == ["owner:items:1", "presence:items:1"]


def test_an_owner_whose_address_refuses_connections_is_a_stuck_owner() -> None:
    scan = with_keys(healthy(), owner_key(node="n2", holder="s2"))
    scan.reports["n1"]["pollers"] = {}
    scan = n2_gone(scan, refused=True)
    found = {f.kind for f in detect(scan, TIMING)}
    assert found == {"stuck_owner", "stale_presence", "dead_session"}


def test_an_owner_that_only_times_out_is_no_zombie_a_frozen_process_keeps_its_keys() -> None:
    scan = with_keys(healthy(), owner_key(node="n2", holder="s2"))
    scan.reports["n1"]["pollers"] = {}
    assert kinds(n2_gone(scan, refused=False)) == []


def test_an_owner_whose_check_is_critical_is_a_stuck_owner_and_a_missing_check_is_not() -> None:
    scan = healthy()
    scan.records.check_status["c1"] = "critical"
    scan.reports["n1"]["coordinator"]["session"] = "s1-next"  # the node runs on; its old session does not
    scan.reports["n1"]["pollers"] = {}
    assert ("stuck_owner", TOPIC) in kinds(scan)
    del scan.records.check_status["c1"]  # not in the catalog yet: may be one just registered
    scan.reports["n1"]["coordinator"]["session"] = "s1"
    assert ("stuck_owner", TOPIC) not in kinds(scan)


def test_an_owner_that_runs_no_poller_is_stuck_only_past_its_bound_and_never_reaped_alone() -> None:
    scan = healthy()
    scan.reports["n1"]["pollers"] = {}
    assert kinds(scan) == []  # polled 0.1 s ago: a poller restarting
    scan.reports["n1"]["topic_reports"][0]["last_poll_at"] = NOW - 60
    finding = only(scan, "stuck_owner")
    assert not finding.auto and finding.actions[0]["do"] == "delete_key"
    assert finding.evidence["last_poll_ago"] == 60.0


def test_an_owner_with_no_presence_anywhere_is_an_idle_owner() -> None:
    scan = without_keys(healthy(), "presence")
    scan.reports["n1"]["topic_reports"][0]["local_subscribers"] = 0
    scan.reports["n2"]["topic_reports"][0]["local_subscribers"] = 0
    finding = only(scan, "idle_owner")
    assert finding.actions == [{"do": "release", "node": "n1", "topic": TOPIC, "epoch": 10}]


# -- presence ------------------------------------------------------------------------------


def test_presence_of_a_node_without_local_subscribers_is_stale() -> None:
    scan = healthy()
    scan.reports["n2"]["topic_reports"][0]["local_subscribers"] = 0
    finding = only(scan, "stale_presence")
    assert finding.subject == f"{TOPIC}@n2" and finding.actions[0]["key"]["kind"] == "presence"


def test_presence_of_a_frozen_node_is_not_stale() -> None:
    assert kinds(n2_gone(healthy(), refused=False)) == []


# -- sessions and registrations ------------------------------------------------------------


def test_a_session_of_a_dead_process_holding_nothing_is_a_dead_session() -> None:
    scan = healthy()
    scan.records.sessions.append(SessionFact("s2-old", "n2", ("serfHealth", "c2-old")))
    finding = only(scan, "dead_session")
    assert finding.subject == "s2-old" and finding.evidence["holds"] == []
    assert finding.evidence["checks"] == {"serfHealth": "missing", "c2-old": "missing"}


def test_a_registration_of_an_earlier_incarnation_is_leaked_and_a_critical_check_alone_is_not() -> None:
    scan = healthy()
    reg = {"service_id": "subsys:n2", "node": "n2", "incarnation": "i2-old", "checks": {"c2-old": "critical"}}
    scan.reports["n1"]["registrations"] = [reg]
    finding = only(scan, "leaked_registration")
    assert finding.actions == [{"do": "deregister", "node": "n1", "service_id": "subsys:n2", "incarnation": "i2-old"}]
    scan.reports["n1"]["registrations"] = [dict(reg, incarnation="i2")]  # critical, but its own: a pause
    assert kinds(scan) == []


def test_a_registration_of_a_node_that_is_gone_is_leaked_only_with_a_certificate() -> None:
    scan = healthy()
    scan.reports["n1"]["registrations"] = [{"service_id": "subsys:n2", "node": "n2", "incarnation": "i2"}]
    assert ("leaked_registration", "subsys:n2") not in kinds(n2_gone(scan, refused=False))
    assert ("leaked_registration", "subsys:n2") in kinds(n2_gone(scan, refused=True))


# -- the tracker ---------------------------------------------------------------------------


def test_the_tracker_reports_a_finding_seen_on_two_scans_in_a_row() -> None:
    scan = healthy()
    scan.reports["n1"]["pollers"] = {TOPIC: 9}
    tracker = Tracker(TIMING)
    assert tracker.update(detect(scan, TIMING), now=NOW) == []
    confirmed = tracker.update(detect(scan, TIMING), now=NOW + 2)
    assert [(f.kind, f.scans, f.first_seen) for f in confirmed] == [("orphan_poller", 2, NOW)]
    assert tracker.update([], now=NOW + 4) == []  # gone: forgotten
    assert tracker.update(detect(scan, TIMING), now=NOW + 6) == []  # back: counted from one again


def test_the_tracker_reports_an_idle_owner_only_past_the_grace() -> None:
    scan = without_keys(healthy(), "presence")
    tracker = Tracker(TIMING)
    for at in (0.0, 2.0, 4.0, 6.0, 8.0):
        assert tracker.update(detect(scan, TIMING), now=NOW + at) == [], at
    assert [f.kind for f in tracker.update(detect(scan, TIMING), now=NOW + TIMING.idle_bound)] == ["idle_owner"]
