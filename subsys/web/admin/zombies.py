"""Zombies over the admin API: scan, list, reap; and the janitor that heals the cluster on its own.

A scan gathers the sources of truth (the coordinator's raw records; every
node's own pollers, topics, session and agent registrations; PostgreSQL's
``pg_stat_activity``) and hands them to :func:`subsys.node.zombies.detect`.
One node, the *janitor* (the live, non-draining node with the lowest id),
scans every ``node.zombie_interval`` seconds and reaps what is safe to reap
on its own (``node.zombie_reap``); any node scans on demand for the API.

Reaping is fenced like everything else: every action re-checks its evidence
at the moment of acting (a key is deleted only at the index that was judged,
a session destroyed only if it is still dead, a poller stopped only if its
node still does not hold the key at its epoch, a query's connection terminated
only if that query is still stuck).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import Counter

from subsys.coordinator.base import KeyFact
from subsys.core import admin as api
from subsys.node.zombies import KINDS, Finding, ScanInput, Timing, Tracker, detect
from subsys.web.admin.gather import gather
from subsys.web.admin.routes import PRINCIPAL, ApiError, audit, json_model, read_body
from subsys.web.appkeys import NODE
from subsys.web.health import EXTRA_COLLECTORS
from subsys.web.internal import REAPER, STATE_EXTRAS, PeerClient, PeerUnavailable, refuses

__all__ = ["ZombieService", "setup_zombies", "ZOMBIES", "ZOMBIE_ROUTES"]

log = logging.getLogger(__name__)


class ZombieService:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        node = app[NODE]
        settings = node.settings
        self.interval = settings.node.zombie_interval
        self.auto_reap = settings.node.zombie_reap
        self.timing = Timing(grace=settings.node.grace_period, check_ttl=settings.consul.check_ttl,
                             interval=self.interval or 5.0)  # fmt: skip
        self.tracker = Tracker(self.timing)
        self.confirmed: list[Finding] = []
        self.partial: dict[str, Any] = {"answered_by": node.node_id, "partial": False, "unavailable": []}
        self.scanned_at = 0.0
        self.reaped: collections.Counter[str] = collections.Counter()
        self.metric = Counter("subsys_zombies_reaped", "Zombies reaped, by kind and by whom", ["kind", "by"],
                              registry=None)  # fmt: skip
        self._lock = asyncio.Lock()
        self.answered: set[str] = {node.node_id}  # the nodes that answered the last scan

    def collect(self):
        yield from self.metric.collect()

    # -- scanning --------------------------------------------------------------------

    async def scan(self) -> list[Finding]:
        async with self._lock:
            node = self.app[NODE]
            gathered = await gather(self.app, topics="summary", fresh=True)
            records = await node.coordinator.records()
            findings = detect(ScanInput(
                records=records, reports=gathered.reports,
                unreachable={p.node: p.reason for p in gathered.problems}, refused=gathered.refused,
                db_connections=await self._db_connections(),
            ), self.timing)  # fmt: skip
            now = time.time()
            self.confirmed = self.tracker.update(findings, now)
            self.partial = gathered.partial()
            self.answered = set(gathered.reports)
            if not records.complete:
                self.partial = {**self.partial, "partial": True, "unavailable": [
                    *self.partial["unavailable"], api.PeerProblem(node="coordinator", reason="records unreadable")]}
            self.scanned_at = now
            return self.confirmed

    async def _db_connections(self) -> dict[str, int]:
        """Open PostgreSQL connections per subsys node (application_name ``subsys:<node>``)."""
        pool = self.app[NODE].database.pool
        if pool is None:
            return {}
        try:
            async with asyncio.timeout(2.0):
                rows = await pool.fetch(
                    "select application_name, count(*) as n from pg_stat_activity "
                    "where application_name like 'subsys:%' group by 1"
                )
        except Exception:  # evidence, not a requirement: a scan without it is still a scan
            return {}
        return {row["application_name"].removeprefix("subsys:"): int(row["n"]) for row in rows}

    async def current(self) -> list[Finding]:
        """Confirmed zombies now: a fresh scan, and a second one shortly after if there was no recent one."""
        fresh = time.time() - self.scanned_at < 2 * self.timing.interval
        findings = await self.scan()
        if not fresh:
            await asyncio.sleep(1.0)
            findings = await self.scan()
        return findings

    # -- reaping -----------------------------------------------------------------------

    async def reap(self, findings: list[Finding], *, dry_run: bool, by: str) -> api.ReapResult:
        outcomes: list[api.ReapOutcome] = []
        for finding in findings:
            for action in finding.actions:
                if dry_run:
                    done, detail = False, "dry run: " + _describe(action)
                else:
                    try:
                        done, detail = await self._act(finding, action)
                    except Exception as exc:  # one failed reap must not stop the others
                        log.warning("reaping %s failed: %r", finding.id, exc)
                        done, detail = False, f"failed: {type(exc).__name__}: {exc}"
                outcomes.append(api.ReapOutcome(id=finding.id, kind=finding.kind, subject=finding.subject,
                                                action=action, done=done, detail=detail))  # fmt: skip
            if not dry_run and any(o.done for o in outcomes if o.id == finding.id):
                self.reaped[finding.kind] += 1
                self.metric.labels(kind=finding.kind, by=by).inc()
                self.tracker.forget(finding.id)
                log.info("reaped zombie %s (%s): %s", finding.id, by, finding.evidence.get("why", ""))
        failed = sum(1 for o in outcomes if not o.done and o.detail.startswith("failed"))
        skipped = sum(1 for o in outcomes if not o.done and not o.detail.startswith(("failed", "dry run")))
        return api.ReapResult(dry_run=dry_run, outcomes=outcomes, reaped=sum(o.done for o in outcomes),
                              failed=failed, skipped=skipped)  # fmt: skip

    async def _act(self, finding: Finding, action: dict[str, Any]) -> tuple[bool, str]:
        node = self.app[NODE]
        coordinator = node.coordinator
        do = action["do"]
        if do == "destroy_session":
            session, owner = action["session"], action["node"]
            record = coordinator.view.nodes.get(owner)
            # A fresh death certificate: its address refuses connections now, twice.
            dead_address = record is not None and await refuses(record.address)

            def still_dead(info: dict[str, Any], status: dict[str, str]) -> bool:
                if record is not None and record.holder and record.holder != session:
                    return True  # the node runs with another session now
                checks = [c.get("ID", "") for c in info.get("ServiceChecks") or []]
                if any(status.get(c, "missing") != "passing" for c in checks):
                    return True
                return dead_address

            if await coordinator.destroy_session_if(session, still_dead=still_dead):
                return True, f"destroyed session {session}: Consul deletes its keys"
            return False, "the session is gone or alive again: nothing done"
        if do == "delete_key":
            key = action["key"]
            fact = KeyFact(key["kind"], key["topic"], key["node"], key.get("holder"), int(key["index"]))
            if await coordinator.delete_key_at(fact):
                return True, f"deleted the {fact.kind} key at index {fact.index}"
            return False, "the key changed since it was judged: nothing done"
        target = action["node"]
        payload = {k: v for k, v in action.items()}
        if target == node.node_id:
            if do == "stop_poller":
                done = await node.reap_poller(action["topic"], int(action["epoch"]))
            elif do == "terminate_query":
                done = await node.reap_query(action["query"])
            elif do == "release":
                done = await node.release_idle(action["topic"], int(action["epoch"]))
            else:
                done = await self.deregister(action["service_id"], action.get("incarnation", ""))
        else:
            record = coordinator.view.nodes.get(target)
            if record is None:
                return False, f"{target} is not in the cluster any more"
            try:
                answer = await PeerClient(self.app).call(record.address, "POST", "/internal/reap", json=payload)
            except PeerUnavailable as exc:
                return False, f"failed: {target} did not answer: {exc}"
            done = bool(answer.get("done"))
        return done, (_describe(action) if done else "the evidence no longer holds: nothing done")

    async def deregister(self, service_id: str, incarnation: str = "") -> bool:
        """Deregister a leaked registration from this node's agent if it is still the one judged
        (same incarnation: a restarted process re-registers under the same service id) and its
        process is still gone (another incarnation is live, or its address refuses connections now)."""
        node = self.app[NODE]
        view = node.coordinator.view

        async def dead_address(name: str) -> bool:
            record = view.nodes.get(name)
            return record is not None and await refuses(record.address)

        registrations = {r.service_id: r for r in await node.coordinator.local_registrations()}
        judged = registrations.get(service_id)
        if judged is None or (incarnation and judged.incarnation != incarnation):
            return False
        refused = await dead_address(judged.node)

        def still_dead(reg: Any) -> bool:
            if incarnation and reg.incarnation != incarnation:
                return False
            current = view.nodes.get(reg.node)
            if current is not None and reg.incarnation and current.incarnation != reg.incarnation:
                return True
            return refused

        return await node.coordinator.deregister_if(service_id, still_dead=still_dead)

    # -- the janitor ---------------------------------------------------------------------

    def janitor(self) -> str | None:
        """The node that heals: the lowest id among the nodes that answered the last scan and
        are not draining. A dead node cannot be it, whatever the coordinator still says of it."""
        view = self.app[NODE].coordinator.view
        live = sorted(n for n in self.answered if not (view.nodes.get(n) and view.nodes[n].draining))
        return live[0] if live else None

    async def run(self) -> None:
        """Scan every interval; heal if this node is the janitor. Any failure waits for the next round.

        Every node scans (so a dead janitor is replaced at once); two nodes that both think they
        are the janitor (a partition) do no harm: every reap re-checks its evidence.
        """
        node = self.app[NODE]
        while self.interval:
            await asyncio.sleep(self.interval)
            if node.shutting_down:
                continue
            try:
                findings = await self.scan()
                if self.auto_reap and self.janitor() == node.node_id:
                    safe = [f for f in findings if f.auto]
                    if safe:
                        result = await self.reap(safe, dry_run=False, by="janitor")
                        if result.reaped:
                            log.info("janitor reaped %d zombie(s): %s", result.reaped,
                                     ", ".join(sorted({o.id for o in result.outcomes if o.done})))  # fmt: skip
            except Exception:
                log.exception("zombie scan failed; next round in %.0fs", self.interval)


def _describe(action: dict[str, Any]) -> str:
    do = action["do"]
    if do == "destroy_session":
        return f"destroy session {action['session']} of {action['node']}"
    if do == "delete_key":
        key = action["key"]
        return f"delete the {key['kind']} key {key['topic'] or key['node']} at index {key['index']}"
    if do == "stop_poller":
        return f"stop {action['node']}'s poller of {action['topic']} (epoch {action['epoch']})"
    if do == "release":
        return f"make {action['node']} release {action['topic']} (epoch {action['epoch']})"
    if do == "terminate_query":
        return f"terminate the connection of {action['node']}'s stuck query {action['query']} (backend pid {action.get('pid')})"
    return f"deregister {action['service_id']} from {action['node']}'s agent"


def _topics_of(finding: Finding) -> set[str]:
    """The topics a finding is about: its subject's, or a stuck query's (a merged call polls many)."""
    if finding.kind == "stuck_query":
        return {t["topic"] for t in finding.evidence.get("topics") or []}
    return {finding.subject.split("@")[0]}


def _matches(finding: Finding, *, kind: str | None, topic: str | None, node: str | None) -> bool:
    return ((kind is None or finding.kind == kind)
            and (topic is None or topic in _topics_of(finding))
            and (node is None or node in finding.nodes))  # fmt: skip


def _model(finding: Finding) -> api.Zombie:
    return api.Zombie(id=finding.id, kind=finding.kind, subject=finding.subject, nodes=finding.nodes,
                      first_seen=finding.first_seen, scans=finding.scans, evidence=finding.evidence,
                      actions=finding.actions, auto=finding.auto)  # fmt: skip


ZOMBIES: web.AppKey[ZombieService] = web.AppKey("subsys_zombies", ZombieService)


async def list_zombies(request: web.Request) -> web.Response:
    service = request.app[ZOMBIES]
    findings = await service.current()
    query = request.query
    selected = [f for f in findings if _matches(f, kind=query.get("kind"), topic=query.get("topic"),
                                                 node=query.get("node"))]  # fmt: skip
    return json_model(api.ZombieList(
        **service.partial, zombies=[_model(f) for f in selected], scanned_at=service.scanned_at,
        janitor=service.janitor(), auto_reap=service.auto_reap and bool(service.interval),
        reaped=dict(service.reaped), kinds=KINDS,
    ))  # fmt: skip


async def reap_zombies(request: web.Request) -> web.Response:
    started = time.monotonic()
    principal = request[PRINCIPAL]
    service = request.app[ZOMBIES]
    body: api.ReapRequest = await read_body(request, api.ReapRequest)
    findings = await service.current()
    selected = [f for f in findings
                if (body.ids is None or f.id in body.ids)
                and _matches(f, kind=body.kind, topic=body.topic, node=body.node)]  # fmt: skip
    if body.ids is not None:
        missing = sorted(set(body.ids) - {f.id for f in selected})
        if missing and not selected:
            raise ApiError(404, "unknown_zombie", f"no such zombie now: {', '.join(missing)}")
    result = await service.reap(selected, dry_run=body.dry_run, by=principal.token_id)
    for outcome in result.outcomes:
        audit(principal, "reap" if not body.dry_run else "reap (dry run)", outcome.id,
              "ok" if outcome.done else outcome.detail, started, reap_action=outcome.action)  # fmt: skip
    return json_model(result)


async def _zombies_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[ZOMBIES]
    task = app[NODE].spawn(service.run(), name="zombie-janitor")
    try:
        yield
    finally:
        task.cancel()


ZOMBIE_ROUTES: list = [
    ("GET", "/zombies", list_zombies, False, "Zombies now, with their evidence", None, api.ZombieList, [
        ("kind", "string", "one kind"), ("topic", "string", "one topic"), ("node", "string", "involving this node")]),
    ("POST", "/zombies/reap", reap_zombies, True, "Reap zombies (all, or selected; dry_run says what)",
     api.ReapRequest, api.ReapResult, []),
]  # fmt: skip


def setup_zombies(app: web.Application) -> None:
    service = ZombieService(app)
    app[ZOMBIES] = service
    app[EXTRA_COLLECTORS].append(service)
    app[REAPER] = service.deregister

    async def registrations() -> dict[str, Any]:
        try:
            regs = await app[NODE].coordinator.local_registrations()
        except Exception:  # the zombie scan says "partial" through the missing section
            return {}
        return {"registrations": [{"service_id": r.service_id, "node": r.node, "incarnation": r.incarnation,
                                   "checks": r.checks} for r in regs]}  # fmt: skip

    app.setdefault(STATE_EXTRAS, []).append(registrations)
    app.cleanup_ctx.append(_zombies_ctx)
