"""The invariants a chaos run checks, each a :class:`Tally` of checks made, violations and the worst figure.

Per-connection stream checks (:class:`StreamCheck`) run on every frame a
client records; the database-side single-poller proof (:func:`overlaps`)
runs on the poll log and the in-flight samples; the rest (convergence,
zombies, cleanup, crashes, CPU, logs) are measured by the runner and entered
here with :meth:`Invariants.check`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["bounds_for", "Bounds", "Tally", "Invariants", "StreamCheck", "overlaps"]

MAX_EVIDENCE = 20  # violations kept with their evidence per invariant (all are counted)


@dataclass(frozen=True)
class Bounds:
    """The bounds the run holds the cluster to (seconds unless said otherwise); why: docs/chaos.md."""

    failover: float  # fault -> first resync with a higher epoch on a surviving node
    convergence: float  # fault end -> every view includes every write committed before it
    quiescent: float  # writer paused -> every view equals the current rows exactly
    overlap: float  # two pollers of one topic: only within [fault start, fault end + this]
    zombies: float  # fault end -> the zombie list is empty
    cleanup: float  # all clients gone -> no owner/presence key, extra session, poller (after the grace)
    cpu_percent: float  # mean CPU of each node during an outage (percent of one core)
    log_bytes_per_s: float  # each node's log growth during an outage


def bounds_for(*, check_ttl: float, lock_delay: float, grace: float, interval: float,
               zombie_interval: float) -> Bounds:  # fmt: skip
    # Failover: the TTL + lock-delay + 1 s, doubled for a busy 2-core machine.
    # Convergence: a failover (or a re-registration after Consul comes back) plus a few polls.
    # Overlap: a frozen or cut-off owner fences itself within its TTL; a poll it started just
    # before is the one stray execution allowed. Zombies: two scans to confirm, a reap, and the
    # grace for idle owners, plus the TTL Consul needs to drop a dead session; doubled.
    return Bounds(
        failover=2 * (check_ttl + lock_delay + 1.0),
        convergence=2 * (check_ttl + lock_delay + 1.0) + 10 * interval + 3.0,
        quiescent=5.0,
        overlap=check_ttl + 1.0,
        zombies=2 * (check_ttl + grace + 3 * zombie_interval),
        cleanup=grace + check_ttl + 5.0,
        cpu_percent=50.0,
        log_bytes_per_s=4096.0,
    )


@dataclass
class Tally:
    name: str
    description: str
    unit: str = ""
    higher_is_worse: bool = True
    checks: int = 0
    violations: int = 0
    worst: float | None = None
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def check(self, ok: bool, figure: float | None = None, **evidence: Any) -> bool:
        self.checks += 1
        if figure is not None:
            if self.worst is None or (figure > self.worst if self.higher_is_worse else figure < self.worst):
                self.worst = figure
        if not ok:
            self.violations += 1
            if len(self.evidence) < MAX_EVIDENCE:
                self.evidence.append(evidence)
        return ok

    def as_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "violations": self.violations, "worst": self.worst, "unit": self.unit,
                "description": self.description, "evidence": self.evidence}  # fmt: skip


class Invariants:
    def __init__(self, bounds: Bounds) -> None:
        b = bounds
        self.bounds = bounds
        self.tallies = {t.name: t for t in [
            Tally("epoch_monotonic", "no client gets an older epoch after a newer one (per connection, topic)",
                  "epochs back"),
            Tally("seq_contiguous", "a diff follows its predecessor's seq by exactly one in the same epoch; "
                  "a new epoch comes as a resync; a snapshot's seq never goes back", "bad frames"),
            Tally("view_in_history", "every view (after each data frame) is a version the database had",
                  "views never in the DB"),
            Tally("view_monotonic", "a connection's view never goes back to an older database version",
                  "versions back"),
            Tally("failover", f"fault -> first higher-epoch resync on a surviving node <= {b.failover:g}s", "s"),
            Tally("convergence", f"fault end -> every view includes every earlier write <= {b.convergence:g}s",
                  "s"),
            Tally("quiescent_equal", f"writer paused -> every view equals the current rows <= {b.quiescent:g}s",
                  "s"),
            Tally("single_poller", "two nodes poll one topic only within [fault start, fault end + "
                  f"{b.overlap:g}s] (poll log + in-flight locks)", "s past fault end"),
            Tally("zombies_cleared", f"fault end -> zombie list empty <= {b.zombies:g}s", "s"),
            Tally("cleanup", f"clients gone -> no owner/presence key, extra session, poller <= {b.cleanup:g}s",
                  "s"),
            Tally("no_crash", "no node exits unless told to; a SIGTERM exits 0; no traceback in a log",
                  "crashes"),
            Tally("cpu_bounded", f"each node's mean CPU during an outage <= {b.cpu_percent:g}% of a core", "%"),
            Tally("log_bounded", f"each node's log grows <= {b.log_bytes_per_s:g} B/s during an outage", "B/s"),
        ]}  # fmt: skip

    def __getitem__(self, name: str) -> Tally:
        return self.tallies[name]

    def check(self, name: str, ok: bool, figure: float | None = None, **evidence: Any) -> bool:
        return self.tallies[name].check(ok, figure, **evidence)

    @property
    def violations(self) -> int:
        return sum(t.violations for t in self.tallies.values())


class StreamCheck:
    """The protocol's per-connection, per-topic guarantees (docs/protocol.md section 4), frame by frame."""

    def __init__(self, inv: Invariants, where: str) -> None:
        self.inv, self.where = inv, where
        self.max_epoch = 0
        self.last: tuple[int, int] | None = None  # (epoch, seq) of the last snapshot/resync/diff
        self.lowest_k: float = 0  # the oldest database version the last view can be

    def frame(self, frame: dict[str, Any]) -> None:
        kind, epoch = frame.get("type"), frame.get("epoch")
        if kind not in ("snapshot", "resync", "diff", "status") or epoch is None:
            return
        self.inv.check("epoch_monotonic", epoch >= self.max_epoch, None if epoch >= self.max_epoch else 1,
                       where=self.where, frame=_brief(frame), max_epoch=self.max_epoch)  # fmt: skip
        self.max_epoch = max(self.max_epoch, epoch)
        if kind == "status":
            return
        seq, last, ok, why = frame["seq"], self.last, True, ""
        if kind == "diff":
            ok = last is not None and last == (epoch, seq - 1)
            why = "" if ok else f"diff after {last}"
        elif last is not None:
            if kind == "snapshot" and epoch != last[0]:
                ok, why = epoch == last[0], f"a new epoch as a snapshot, not a resync, after {last}"
            elif kind == "snapshot":
                ok, why = seq >= last[1], f"snapshot seq went back from {last}"
            else:
                ok, why = epoch > last[0], f"resync without a newer epoch after {last}"
        self.inv.check("seq_contiguous", ok, None if ok else 1, where=self.where, frame=_brief(frame), why=why)
        self.last = (epoch, seq)

    def view(self, spans: list[tuple[int, float]], rows: dict[int, int], frame: dict[str, Any]) -> None:
        ok = bool(spans)
        self.inv.check("view_in_history", ok, None if ok else 1, where=self.where, frame=_brief(frame),
                       rows=dict(sorted(rows.items())))  # fmt: skip
        if not ok:
            return
        newest = max(b for _a, b in spans)
        back = newest <= self.lowest_k
        self.inv.check("view_monotonic", not back, None if not back else 1, where=self.where,
                       frame=_brief(frame), view_upto=newest, before_from=self.lowest_k)  # fmt: skip
        self.lowest_k = max(self.lowest_k, min(a for a, _b in spans))


def _brief(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: frame.get(k) for k in ("type", "topic", "epoch", "seq") if k in frame}


# -- the single-poller proof -----------------------------------------------------------


def overlaps(polls: Iterable[tuple[float, str, int]], *, gap: float) -> list[dict[str, Any]]:
    """Episodes where two nodes polled one topic at the same time, from the database's records.

    ``polls``: ``(wall time, application_name, topic)``, from the poll log (one row per
    execution) and the in-flight samples. A node "is polling" a topic between two of its
    polls at most ``gap`` apart; a poll by another node strictly inside such a span is
    concurrent polling. A clean handover (the old owner's last poll before the new
    owner's first) is not. Episodes of one topic closer than ``gap`` are merged.
    """
    by_topic: dict[int, dict[str, list[float]]] = {}
    for at, app, topic in polls:
        by_topic.setdefault(topic, {}).setdefault(app, []).append(at)
    episodes: list[dict[str, Any]] = []
    for topic, apps in sorted(by_topic.items()):
        for times in apps.values():
            times.sort()
        hits: list[tuple[float, str, str]] = []
        for app, times in apps.items():
            for other, others in apps.items():
                if other == app:
                    continue
                for at in times:
                    i = bisect.bisect_left(others, at)
                    if 0 < i < len(others) and others[i - 1] < at < others[i] and others[i] - others[i - 1] <= gap:
                        hits.append((at, app, other))
        hits.sort()
        current: dict[str, Any] | None = None
        for at, app, other in hits:
            if current is not None and at - current["to"] <= gap:
                current["to"] = at
                current["nodes"] |= {app, other}
                current["polls"] += 1
            else:
                current = {"topic": topic, "from": at, "to": at, "nodes": {app, other}, "polls": 1}
                episodes.append(current)
    for episode in episodes:
        episode["nodes"] = sorted(episode["nodes"])
        episode["seconds"] = round(episode["to"] - episode["from"], 3)
    return episodes
