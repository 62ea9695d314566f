"""Zombie detection: cross-check the coordinator's records against what every node says it runs.

A zombie is a fact that disagrees with the source of truth (docs/operations.md,
"Zombies"). :func:`detect` is pure: given the coordinator's raw records, each
node's own report, which nodes did not answer (and whether their address
refused the connection: a dead process), it returns the disagreements, each
with its evidence and the action that fixes it. :class:`Tracker` turns scans
into reports: a finding is reported only once it was seen on two consecutive
scans (or persisted past its kind's bound), so normal transitions (an
acquisition in flight, a grace running) are not.

Detection does not trust any one cause: an owner key whose holder does not
serve the topic is a zombie whatever produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from subsys.coordinator.base import KeyFact, Records

__all__ = ["KINDS", "Finding", "ScanInput", "Timing", "detect", "Tracker"]

KINDS = {
    "orphan_poller": "a poller runs on a node whose session does not hold the topic's key at its epoch",
    "duplicate_poller": "more than one node runs a poller for one topic",
    "stuck_query": "a node's database call that did not end when it should have (past its statement_timeout, or"
    " cancelled because its topics stopped, and still running): a hung backend holding a connection",
    "stuck_owner": "an owner key held by a session whose node is gone, restarted, or does not poll the topic",
    "idle_owner": "an owner key held with no presence anywhere beyond the grace period",
    "stale_presence": "a presence entry for a node that is gone or has no such subscribers",
    "dead_session": "a subsys session whose process is gone (another incarnation, a failed check, a dead address)",
    "leaked_registration": "an agent service registration of a node process that is gone",
    "released_key": "a released owner key kept for a node that never took it, after its hold ran out",
}


@dataclass(frozen=True, slots=True)
class Timing:
    grace: float  # node.grace_period
    check_ttl: float
    interval: float  # how often the janitor scans (bounds "persisted past")

    @property
    def idle_bound(self) -> float:
        return self.grace + 2 * self.interval

    @property
    def unpolled_bound(self) -> float:
        return self.check_ttl + 2 * self.interval


@dataclass
class ScanInput:
    records: Records
    reports: dict[str, dict[str, Any]]  # node id -> its own facts (reachable nodes)
    unreachable: dict[str, str]  # node id -> why it did not answer
    refused: set[str]  # of those, nodes whose address refused the connection: nothing listens there
    db_connections: dict[str, int] = field(default_factory=dict)  # node id -> open PostgreSQL connections
    now: float = field(default_factory=time.time)


@dataclass
class Finding:
    kind: str
    subject: str  # a topic, a session id, a service id
    nodes: list[str]
    evidence: dict[str, Any]
    actions: list[dict[str, Any]]  # what fixes it: {"do": ..., ...}
    auto: bool = True  # the janitor may fix it on its own
    first_seen: float = 0.0
    scans: int = 1

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.subject}"


def _session_of(report: dict[str, Any]) -> str | None:
    return (report.get("coordinator") or {}).get("session")


def _key_summary(fact: KeyFact | None) -> dict[str, Any] | None:
    if fact is None:
        return None
    return {"holder": fact.holder, "index": fact.index, "node": fact.node}


def detect(scan: ScanInput, timing: Timing) -> list[Finding]:
    """Every disagreement between the coordinator's records and the nodes' reports, in a stable order."""
    check = _Crosscheck(scan, timing)
    return [
        *check.pollers(), *check.stuck_queries(), *check.owner_keys(),
        *check.presence(), *check.sessions(), *check.registrations(),
    ]  # fmt: skip


class _Crosscheck:
    """One scan's indexes (built once: 10,000 topics must not make a quadratic scan), one method per family."""

    def __init__(self, scan: ScanInput, timing: Timing) -> None:
        self.scan, self.timing = scan, timing
        records, reports = scan.records, scan.reports
        self.owner_keys_by_topic = {f.topic: f for f in records.keys if f.kind == "owner"}
        self.presence_keys = [f for f in records.keys if f.kind == "presence"]
        self.live_session = {nid: s for nid, r in reports.items() if (s := _session_of(r))}
        self.session_node = {s.id: s.node for s in records.sessions}
        self.sessions_by_id = {s.id: s for s in records.sessions}
        # node -> topic -> its report
        self.topic_report = {nid: {t["topic"]: t for t in r.get("topic_reports") or []} for nid, r in reports.items()}

    # -- evidence ----------------------------------------------------------------------

    def gone(self, node: str) -> str | None:
        """Why ``node``'s process is known to be gone (its address refuses connections: a death
        certificate), or None. Absence is no evidence: a node that is starting has a session and
        a registration before its node key, and a frozen one just times out."""
        if node in self.scan.refused:
            return f"its address refuses connections ({self.scan.unreachable.get(node, 'refused')})"
        return None

    def dead_holder(self, holder: str, claimed: str) -> str | None:
        """Why the session ``holder`` cannot belong to a live process, or None."""
        node = self.session_node.get(holder, claimed)
        live = self.live_session.get(node)
        if live is not None and live != holder:
            return f"{node} runs now with session {live} (a later incarnation)"
        why = self.gone(node)
        if why:
            return f"{node}: {why}"
        session = self.sessions_by_id.get(holder)
        if session is not None:
            # Critical only: a check the catalog does not show yet may be one just registered.
            status = self.scan.records.check_status
            failed = [c for c in session.checks if c != "serfHealth" and status.get(c) == "critical"]
            if failed:
                return f"its check {failed[0]} is critical"
        return None

    def holds(self, nid: str, topic: str, epoch: int) -> bool:
        """Whether ``nid``'s live session holds ``topic``'s owner key at exactly ``epoch``."""
        key = self.owner_keys_by_topic.get(topic)
        return key is not None and key.holder == self.live_session.get(nid) and key.index == epoch

    # -- families ----------------------------------------------------------------------

    def pollers(self) -> list[Finding]:
        running: dict[str, list[tuple[str, int]]] = {}  # topic -> (node, epoch)
        for nid, report in self.scan.reports.items():
            for topic, epoch in (report.get("pollers") or {}).items():
                running.setdefault(topic, []).append((nid, int(epoch)))
        findings = []
        for topic, entries in sorted(running.items()):
            strays = [(n, e) for n, e in entries if not self.holds(n, topic, e)]
            if not strays:
                continue
            evidence = {
                "pollers": [{"node": n, "epoch": e} for n, e in entries],
                "owner_key": _key_summary(self.owner_keys_by_topic.get(topic)),
                "sessions": {n: self.live_session.get(n) for n, _e in entries},
                "db_connections": {n: self.scan.db_connections.get(n) for n, _e in entries},
            }
            actions = [{"do": "stop_poller", "node": n, "topic": topic, "epoch": e} for n, e in strays]
            kind = "duplicate_poller" if len(entries) > 1 else "orphan_poller"
            findings.append(Finding(kind, topic, sorted({n for n, _e in entries}), evidence, actions))
        return findings

    def stuck_queries(self) -> list[Finding]:
        # One finding per call, not per topic: a merged statement polls many topics, and ending it
        # (terminating its connection) is one action. Its topics carry on without it on that node.
        findings = []
        for nid, report in sorted(self.scan.reports.items()):
            for item in report.get("stuck_queries") or []:
                topics = [
                    {"topic": topic, "epoch": int(epoch), "held_by_node": self.holds(nid, topic, int(epoch))}
                    for topic, epoch in sorted((item.get("topics") or {}).items())
                ]
                evidence = {
                    "node": nid, "feed": item.get("feed"), "topics": topics, "pid": item.get("pid"),
                    "age": item.get("age"), "since": item.get("since"), "why": item.get("why"),
                    "db_connections": self.scan.db_connections.get(nid),
                }  # fmt: skip
                action = {"do": "terminate_query", "node": nid, "query": item["id"], "pid": item.get("pid")}
                findings.append(Finding("stuck_query", f"{nid}/{item['id']}", [nid], evidence, [action]))
        return findings

    def owner_keys(self) -> list[Finding]:
        presence_of: dict[str, set[str]] = {}
        for fact in self.presence_keys:
            if fact.holder:
                presence_of.setdefault(fact.topic, set()).add(fact.node)
        findings = []
        for topic, key in sorted(self.owner_keys_by_topic.items()):
            finding = self._owner_key(topic, key, has_presence=bool(presence_of.get(topic)))
            if finding is not None:
                findings.append(finding)
        return findings

    def _owner_key(self, topic: str, key: KeyFact, *, has_presence: bool) -> Finding | None:
        scan = self.scan
        if key.holder is None:
            until = float(key.value.get("until", 0) or 0)
            if until >= scan.now:
                return None
            return Finding(
                "released_key", topic, [str(key.value.get("reserved_for", ""))],
                {"owner_key": _key_summary(key), "reserved_for": key.value.get("reserved_for"),
                 "hold_ended_ago": round(scan.now - until, 1)},
                [{"do": "delete_key", "key": _key_action(key)}],
            )  # fmt: skip
        claimed = key.node
        dead = self.dead_holder(key.holder, claimed)
        if dead:
            return Finding(
                "stuck_owner", topic, [claimed],
                {"owner_key": _key_summary(key), "why": dead, "db_connections": scan.db_connections.get(claimed)},
                [{"do": "destroy_session", "session": key.holder, "node": claimed}],
            )  # fmt: skip
        if claimed not in scan.reports or self.live_session.get(claimed) != key.holder:
            return None
        polling = topic in (scan.reports[claimed].get("pollers") or {})
        item = self.topic_report[claimed].get(topic) or {}
        last = item.get("last_poll_at")
        silent_for = scan.now - last if last else None
        bound = self.timing.unpolled_bound + 3 * float(item.get("interval") or 0)
        if not polling and (silent_for is None or silent_for > bound):
            return Finding(
                "stuck_owner", topic, [claimed],
                {"owner_key": _key_summary(key), "why": f"{claimed} holds it but runs no poller for it",
                 "last_poll_ago": round(silent_for, 1) if silent_for is not None else None},
                [{"do": "delete_key", "key": _key_action(key)}], auto=False,
            )  # fmt: skip
        if not has_presence:
            return Finding(
                "idle_owner", topic, [claimed],
                {"owner_key": _key_summary(key), "presence": [], "grace": self.timing.grace},
                [{"do": "release", "node": claimed, "topic": topic, "epoch": key.index}],
            )  # fmt: skip
        return None

    def presence(self) -> list[Finding]:
        findings = []
        for fact in self.presence_keys:
            if fact.holder is None:
                continue
            node = fact.node
            why = self.dead_holder(fact.holder, node)
            if not why and node in self.scan.reports:
                item = self.topic_report[node].get(fact.topic)
                if not item or not item.get("local_subscribers"):
                    why = f"{node} has no local subscribers to {fact.topic}"
            if why:
                findings.append(Finding(
                    "stale_presence", f"{fact.topic}@{node}", [node],
                    {"presence_key": _key_summary(fact), "why": why},
                    [{"do": "delete_key", "key": _key_action(fact)}],
                ))  # fmt: skip
        return findings

    def sessions(self) -> list[Finding]:
        records = self.scan.records
        live = set(self.live_session.values())
        findings = []
        for session in records.sessions:
            if session.id in live:
                continue
            why = self.dead_holder(session.id, session.node)
            if why:
                holds = sorted(f"{f.kind}:{f.topic or f.node}" for f in records.keys if f.holder == session.id)
                findings.append(Finding(
                    "dead_session", session.id, [session.node],
                    {"session": session.id, "node": session.node, "why": why, "holds": holds,
                     "checks": {c: records.check_status.get(c, "missing") for c in session.checks}},
                    [{"do": "destroy_session", "session": session.id, "node": session.node}],
                ))  # fmt: skip
        return findings

    def registrations(self) -> list[Finding]:
        reports = self.scan.reports
        findings = []
        for reporter, report in reports.items():
            for reg in report.get("registrations", []):
                node = reg["node"]
                current = reports.get(node, {}).get("incarnation")
                why = None
                # A critical check alone proves nothing here: a frozen process (a long pause, SIGSTOP)
                # resumes and re-registers under the same id, and a deregistration racing that would
                # take its fresh registration. Consul removes a critical one itself after a minute.
                if node in reports and current and reg.get("incarnation") and reg["incarnation"] != current:
                    why = f"registered by incarnation {reg['incarnation']}; {node} runs as {current}"
                elif node not in reports and (reason := self.gone(node)):
                    why = f"{node}: {reason}"
                if why:
                    findings.append(Finding(
                        "leaked_registration", reg["service_id"], [node],
                        {"agent_of": reporter, "registration": reg, "why": why},
                        [{"do": "deregister", "node": reporter, "service_id": reg["service_id"],
                          "incarnation": reg.get("incarnation", "")}],
                    ))  # fmt: skip
        return findings


def _key_action(fact: KeyFact) -> dict[str, Any]:
    return {"kind": fact.kind, "topic": fact.topic, "node": fact.node, "index": fact.index, "holder": fact.holder}


class Tracker:
    """Remembers findings across scans; reports those seen twice in a row or older than their bound."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self._seen: dict[str, Finding] = {}

    def update(self, findings: list[Finding], now: float) -> list[Finding]:
        current: dict[str, Finding] = {}
        for finding in findings:
            before = self._seen.get(finding.id)
            finding.first_seen = before.first_seen if before else now
            finding.scans = before.scans + 1 if before else 1
            current[finding.id] = finding
        self._seen = current
        return [f for f in current.values() if self._confirmed(f, now)]

    def _confirmed(self, finding: Finding, now: float) -> bool:
        if finding.kind == "idle_owner":  # a grace is running: only past it
            return now - finding.first_seen >= self.timing.idle_bound and finding.scans >= 2
        return finding.scans >= 2

    def forget(self, finding_id: str) -> None:
        self._seen.pop(finding_id, None)
