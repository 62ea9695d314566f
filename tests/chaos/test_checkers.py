"""The chaos run's checkers catch what they are meant to catch (a checker that never fails proves nothing)."""

from __future__ import annotations

import math

from subsys.chaos.history import RowHistory
from subsys.chaos.invariants import bounds_for, Invariants, StreamCheck, overlaps
from subsys.chaos.verdict import stats


def _inv() -> Invariants:
    return Invariants(bounds_for(check_ttl=3, lock_delay=0.5, grace=2, interval=0.2, zombie_interval=1))


def _frames(check: StreamCheck, *frames: tuple) -> None:
    for kind, epoch, seq in frames:
        check.frame({"type": kind, "topic": "rows:1", "epoch": epoch, "seq": seq})


def test_a_well_behaved_stream_passes_every_check() -> None:
    inv = _inv()
    _frames(StreamCheck(inv, "c1"), ("snapshot", 5, 1), ("diff", 5, 2), ("snapshot", 5, 4), ("diff", 5, 5),
            ("resync", 9, 1), ("diff", 9, 2))  # fmt: skip
    assert inv.violations == 0
    assert inv["seq_contiguous"].checks == 6 and inv["epoch_monotonic"].checks == 6


def test_an_older_epoch_a_gap_and_an_unannounced_epoch_are_violations() -> None:
    inv = _inv()
    _frames(StreamCheck(inv, "c1"), ("snapshot", 5, 1), ("diff", 5, 3))  # a gap
    _frames(StreamCheck(inv, "c2"), ("snapshot", 9, 1), ("diff", 5, 2))  # an older epoch (and a gap)
    _frames(StreamCheck(inv, "c3"), ("snapshot", 5, 1), ("snapshot", 9, 1))  # a new epoch not as a resync
    _frames(StreamCheck(inv, "c4"), ("snapshot", 5, 3), ("snapshot", 5, 2))  # a snapshot going back
    _frames(StreamCheck(inv, "c5"), ("diff", 5, 1))  # a diff before any snapshot
    assert inv["epoch_monotonic"].violations == 1
    assert inv["seq_contiguous"].violations == 5
    assert inv["epoch_monotonic"].evidence[0]["where"] == "c2"


def test_a_view_is_checked_against_every_version_the_database_had() -> None:
    history = RowHistory()
    history.seed(1, 1001, 0)
    history.seed(1, 1002, 0)
    history.record(1, 1001, 1)  # k=1
    history.record(1, 1002, 1)  # k=2
    history.record(1, 1002, None)  # k=3: deleted
    assert history.versions(1, {1001: 0, 1002: 0}) == [(0, 1)]
    assert history.versions(1, {1001: 1, 1002: 1}) == [(2, 3)]
    assert history.versions(1, {1001: 1}) == [(3, math.inf)]
    assert history.versions(1, {1001: 0, 1002: 1}) == []  # each value existed, never together
    assert history.versions(1, {1001: 7}) == []
    assert history.versions(1, {1001: 1, 9999: 0}) == []  # a row the topic never had


def test_a_view_may_show_the_writers_change_in_flight_and_nothing_else() -> None:
    """The commit reaches the server (and a client) before the writer's ``record`` runs: seen in CI."""
    history = RowHistory()
    history.seed(1, 1001, 0)
    history.seed(1, 1002, 0)
    history.record(1, 1001, 1)  # k=1
    seen_early = {1001: 1, 1002: 5}
    assert history.versions(1, seen_early) == []
    history.pending = (1, 1002, 5)
    assert history.versions(1, seen_early) == [(2, math.inf)]
    assert history.versions(1, {1001: 1}) == []  # not what the change makes (a delete would)
    assert history.versions(2, {1001: 1, 1002: 5}) == []  # another topic's view
    history.pending = (1, 1002, None)
    assert history.versions(1, {1001: 1}) == [(2, math.inf)]  # a delete in flight
    history.pending = None
    history.record(1, 1002, 5)  # k=2: recorded, the same span as it had in flight
    assert history.versions(1, seen_early) == [(2, math.inf)]


def test_a_view_going_back_in_time_is_a_violation() -> None:
    inv = _inv()
    check = StreamCheck(inv, "c1")
    check.view([(5, math.inf)], {}, {"type": "diff"})
    check.view([(2, 4)], {}, {"type": "diff"})
    check.view([], {1: 3}, {"type": "diff"})
    assert inv["view_monotonic"].violations == 1 and inv["view_in_history"].violations == 1


def test_the_poll_log_proves_concurrent_polling_but_not_a_clean_handover() -> None:
    handover = [(t / 10, "subsys:n1", 1) for t in range(10)] + [(1.0 + t / 10, "subsys:n2", 1) for t in range(30)]
    assert overlaps(handover, gap=1.0) == []
    stray = handover + [(3.05, "subsys:n1", 1)]  # a frozen old owner wakes up and polls once, inside n2's polling
    (episode,) = overlaps(stray, gap=1.0)
    assert episode["topic"] == 1 and episode["nodes"] == ["subsys:n1", "subsys:n2"] and episode["seconds"] == 0
    both = [(t / 10, "subsys:n1", 2) for t in range(30)] + [(0.55 + t / 10, "subsys:n2", 2) for t in range(20)]
    (episode,) = overlaps(both, gap=1.0)
    assert episode["seconds"] > 1.5
    assert overlaps([(0.0, "subsys:n1", 3), (5.0, "subsys:n1", 3), (2.0, "subsys:n2", 3)], gap=1.0) == []


def test_stats_are_median_p95_and_max() -> None:
    assert stats([1.0, 2.0, 3.0, None]) == {"n": 3, "missing": 1, "median": 2.0, "p95": 3.0, "max": 3.0}
    assert stats([None]) == {"n": 0, "missing": 1}
