"""The chaos runner: a local cluster, a writer, many clients, one fault per round, invariants checked.

A round: check the cluster is whole (every node ready, every client caught
up), apply one fault, then measure failover (node faults), convergence,
the zombie list emptying, CPU and log volume (outages), and finally pause
the writer and require every view to equal the current rows exactly. After
the last round every client leaves and nothing may remain after the grace.
The single-poller proof is made at the end from the database's poll log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from subsys.chaos import probes
from subsys.chaos.clients import ClientPool, topic_param
from subsys.chaos.faults import FAULTS, NODE_FAULTS, OUTAGES, FaultContext, needs
from subsys.chaos.history import FEED_NAME, SCHEMA, FaultRecord, RowHistory, Writer, feed_config
from subsys.chaos.invariants import Invariants, bounds_for, overlaps
from subsys.chaos.verdict import build_verdict
from subsys.testing.cluster import ClusterSpec, LocalCluster

__all__ = ["ChaosConfig", "run_chaos", "schedule"]


@dataclass
class ChaosConfig:
    rounds: int = 10
    seed: int = 1
    faults: tuple[str, ...] = tuple(FAULTS)
    nodes: int = 3
    clients: int = 45
    topics: int = 12
    topics_per_client: int = 4
    consul_servers: int = 1
    interval: float = 0.2
    check_ttl: float = 3.0
    lock_delay: float = 0.5
    grace: float = 2.0
    zombie_interval: float = 1.0
    statement_timeout: float = 1.5
    write_rate: float = 20.0
    churn_topics: int = 3  # topics only churners subscribe to: their cleanup is checked every churn round
    workdir: Path | None = None
    own_session: bool = False  # nodes in their own session (a terminal's Ctrl-C reaches only the runner)
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


def schedule(config: ChaosConfig) -> tuple[list[str], dict[str, str]]:
    """The rounds' faults: every runnable kind once per cycle, each cycle shuffled by the seed."""
    skipped = {k: why for k in config.faults if (why := needs(k, config.consul_servers))}
    kinds = [k for k in config.faults if k not in skipped]
    if not kinds:
        return [], skipped
    rng, plan = random.Random(config.seed), []
    while len(plan) < config.rounds:
        cycle = list(kinds)
        rng.shuffle(cycle)
        plan += cycle
    return plan[: config.rounds], skipped


def _spec(config: ChaosConfig) -> ClusterSpec:
    three = config.consul_servers >= 3
    return ClusterSpec(
        nodes=config.nodes,
        feeds={FEED_NAME: feed_config(config.interval, config.statement_timeout)},
        schema=(SCHEMA,),
        consul_servers=3 if three else 1,
        consul_clients=config.nodes if three else 0,
        settings={
            "node": {"grace_period": config.grace, "zombie_interval": config.zombie_interval},
            "consul": {"check_ttl": config.check_ttl, "lock_delay": config.lock_delay},
            "database": {"retry_initial": 0.1, "retry_max": 1.0},
        },
        own_session=config.own_session,
        log_level="INFO",
    )  # fmt: skip


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.say = config.progress
        self.bounds = bounds_for(check_ttl=config.check_ttl, lock_delay=config.lock_delay, grace=config.grace,
                             interval=config.interval, zombie_interval=config.zombie_interval)  # fmt: skip
        self.inv = Invariants(self.bounds)
        self.history = RowHistory()
        self.records: list[FaultRecord] = []
        self.topics = [f"{FEED_NAME}:{i}" for i in range(1, config.topics + 1)]
        self.churn_topics = [f"{FEED_NAME}:{i}" for i in range(config.topics + 1, config.topics + 1 + config.churn_topics)]
        self.crashed: set[tuple[str, int]] = set()
        self.started_at = 0.0

    async def run(self) -> dict[str, Any]:
        config = self.config
        plan, skipped = schedule(config)
        started = time.monotonic()
        self.started_at = time.time()
        self.say(f"chaos: {len(plan)} rounds, seed {config.seed}, {config.nodes} nodes, "
                 f"{config.consul_servers} Consul server(s), {config.clients} clients, {config.topics} topics")  # fmt: skip
        cluster = LocalCluster(_spec(config), workdir=config.workdir, report=self.say)
        tracebacks: dict[str, int] = {}
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(cluster)
            self.cluster = cluster
            writer = Writer(cluster.database_url, self.history,
                            [topic_param(t) for t in self.topics + self.churn_topics],
                            rate=config.write_rate, seed=config.seed)  # fmt: skip
            await writer.seed_rows()
            self.writer = writer
            self.zombies = probes.ZombieWatch(cluster.admin_token)
            self.sampler = probes.InflightSampler(cluster.database_url)
            pool = await stack.enter_async_context(
                ClientPool(self.history, self.inv, lambda: cluster.nodes, seed=config.seed)
            )
            self.pool = pool
            background = [asyncio.create_task(coro, name=name) for name, coro in
                          (("writer", writer.run()), ("sampler", self.sampler.run()), ("crash watch", self._watch_crashes()))]  # fmt: skip
            stack.push_async_callback(_cancel, background)
            self.ctx = FaultContext(cluster, pool, random.Random(config.seed + 1), config.check_ttl,
                                    churn_topics=self.churn_topics, main_topics=self.topics)  # fmt: skip
            pool.start(config.clients, self.topics, config.topics_per_client)
            if await probes.wait_for(lambda: pool.caught_up(0), 90) is None:
                raise RuntimeError(f"clients not caught up at start: {pool.behind(0)[:10]}")
            self.say(f"cluster up in {time.monotonic() - started:.0f}s; {config.clients} clients caught up")
            for number, kind in enumerate(plan, 1):
                await self._round(number, kind)
            await self._all_leave()
            for node in cluster.nodes.values():
                tracebacks[node.name] = node.logs().count("Traceback")
            await self._single_poller()
            await _cancel(background)
        for name, code in cluster.exit_codes.items():
            self.inv.check("no_crash", code == 0, None if code == 0 else 1, node=name, why=f"final SIGTERM exit {code}")
        for name, count in tracebacks.items():
            self.inv.check("no_crash", count == 0, count or None, node=name, why=f"{count} traceback(s) in its log")
        return build_verdict(self, plan=plan, skipped=skipped, duration=time.monotonic() - started)

    # -- rounds ----------------------------------------------------------------------------

    async def _whole(self) -> None:
        """Every node ready and every client caught up with the current rows, before a fault."""
        for node in self.cluster.nodes.values():
            if not node.running:
                await node.start()
            await node.wait_ready(timeout=90)
        k = self.history.k
        if await probes.wait_for(lambda: self.pool.caught_up(k), 60) is None:
            self.say(f"  (clients still behind before the round: {self.pool.behind(k)[:6]})")

    async def _round(self, number: int, kind: str) -> None:
        await self._whole()
        record = FaultRecord(number, kind)
        self.records.append(record)
        before = probes.usage(self.cluster)
        # The fault runs as a task so convergence is timed from the moment the fault is over,
        # not from when its function returns (a restarted node's readiness comes later).
        fault = asyncio.create_task(FAULTS[kind](self.ctx, record))
        while not record.ended_mono and not fault.done():
            await asyncio.sleep(0.02)
        at_end = probes.usage(self.cluster)
        b = self.bounds
        try:
            record.k_end = await self.writer.mark(timeout=b.convergence)
        except asyncio.TimeoutError:
            record.k_end = self.history.k
            record.notes.append(f"the writer could not change every topic after the fault ({self.writer.state()})")
        converging_from = time.monotonic()
        converging = asyncio.create_task(probes.wait_for(lambda: self.pool.caught_up(record.k_end), 2 * b.convergence))
        clearing = asyncio.create_task(
            self.zombies.until_empty(self.cluster, 2 * b.zombies, settle=3 * self.config.zombie_interval)
        )
        try:
            after_fault = await fault
        except Exception as exc:  # e.g. a restarted node never got ready: the cluster did not recover
            after_fault = None
            record.notes.append(f"fault failed: {exc!r}"[:300])
            self.inv.check("no_crash", False, 1, round=number, fault=kind, why=f"recovery failed: {exc!r}"[:2000])
        took = await converging
        if kind == "sigterm":
            self.inv.check("no_crash", record.exit_code == 0, None if record.exit_code == 0 else 1, round=number,
                           node=record.target, why=f"SIGTERM exit code {record.exit_code}")  # fmt: skip
        if kind in OUTAGES:
            cpu, logs = probes.usage_between(before, at_end)
            for name, pct in cpu.items():
                self.inv.check("cpu_bounded", pct <= b.cpu_percent, round(pct, 1), round=number, fault=kind,
                               node=name, cpu_percent=round(pct, 1))  # fmt: skip
            for name, rate in logs.items():
                self.inv.check("log_bounded", rate <= b.log_bytes_per_s, round(rate), round=number, fault=kind,
                               node=name, bytes_per_s=round(rate))  # fmt: skip
        if took is not None:
            record.convergence = round(converging_from + took - record.ended_mono, 3)
        ok = record.convergence is not None and record.convergence <= b.convergence
        self.inv.check("convergence", ok, record.convergence, round=number, fault=kind,
                       behind=self.pool.behind(record.k_end)[:10])  # fmt: skip
        if kind in NODE_FAULTS:
            self._failover(record)
        if kind == "churn":
            await self._churn_cleanup(record)
        cleared, left = await clearing
        if cleared is not None:
            record.zombies_cleared = round(converging_from + cleared - record.ended_mono, 3)
        ok = record.zombies_cleared is not None and record.zombies_cleared <= b.zombies
        self.inv.check("zombies_cleared", ok, record.zombies_cleared, round=number, fault=kind, still=left[:10])
        if after_fault is not None:
            await after_fault()
        await self._quiescent(record)
        record.resyncs = sum(1 for at, *_rest in self.pool.resyncs if at >= record.started_mono)
        still = await self.zombies.listing(self.cluster)  # none may have appeared since
        self.inv.check("zombies_cleared", still == [], None, round=number, fault=kind, at="round end",
                       still=[z.id for z in still or []][:10] if still is not None else "no answer")  # fmt: skip
        await self.zombies.collect_reaped(self.cluster)
        self.say(f"round {number:>2} {kind:<18} target={record.target:<22} failover={_fmt(record.failover)} "
                 f"convergence={_fmt(record.convergence)} zombies_cleared={_fmt(record.zombies_cleared)} "
                 f"resyncs={record.resyncs}"
                 f"{'  ' + '; '.join(record.notes) if record.notes else ''}")  # fmt: skip

    def _failover(self, record: FaultRecord) -> None:
        """Fault -> the first resync with a higher epoch at a client on another node, per topic the victim owned."""
        times = []
        for topic, epoch in sorted(record.owned.items()):
            first = next((at for at, node, t, e in self.pool.resyncs
                          if t == topic and e > epoch and node != record.target and at >= record.started_mono), None)  # fmt: skip
            watched = any(topic in c.topics and c.node != record.target for c in self.pool.clients)
            if first is None and not watched:
                continue  # no client on another node follows it: nothing to time
            took = None if first is None else round(first - record.started_mono, 3)
            times.append(took)
            ok = took is not None and took <= self.bounds.failover
            self.inv.check("failover", ok, took, round=record.round, fault=record.kind, topic=topic, old_epoch=epoch)
        known = [t for t in times if t is not None]
        record.failover = max(known) if known and len(known) == len(times) else None

    async def _quiescent(self, record: FaultRecord) -> None:
        """Writer paused: every view must equal the database's current rows."""
        try:
            await self.writer.pause()
        except asyncio.TimeoutError:
            self.inv.check("quiescent_equal", False, None, round=record.round, why=f"the writer did not pause ({self.writer.state()})")
            self.writer.resume()
            return
        try:
            k = self.history.k
            took = await probes.wait_for(lambda: self.pool.caught_up(k), 2 * self.bounds.quiescent)
            ok = took is not None and took <= self.bounds.quiescent
            self.inv.check("quiescent_equal", ok, None if took is None else round(took, 3), round=record.round,
                           fault=record.kind, behind=self.pool.behind(k)[:10])  # fmt: skip
        finally:
            self.writer.resume()

    async def _churn_cleanup(self, record: FaultRecord) -> None:
        """The churners are gone: their own topics keep no key, presence or poller past the grace."""
        topics = set(self.churn_topics)
        took = await probes.wait_for(lambda: _empty(probes.leftovers(self.cluster, topics)), 2 * self.bounds.cleanup)
        left = [] if took is not None else await probes.leftovers(self.cluster, topics)
        quiet_from = time.time()
        await asyncio.sleep(2.0)
        polled = await probes.polls_after(self.cluster, quiet_from, {topic_param(t) for t in topics})
        span = None if took is None else round(time.monotonic() - record.ended_mono, 3)
        ok = span is not None and span <= self.bounds.cleanup and polled == 0
        self.inv.check("cleanup", ok, span, round=record.round, leftovers=left, polls_after_cleanup=polled)

    async def _all_leave(self) -> None:
        """Every client leaves; after the grace nothing of theirs remains (keys, sessions, pollers, polls)."""
        await self._whole()
        await self.pool.stop()
        left_at = time.monotonic()
        took = await probes.wait_for(lambda: _empty(probes.leftovers(self.cluster)), 2 * self.bounds.cleanup, 0.25)
        left = [] if took is not None else await probes.leftovers(self.cluster)
        quiet_from = time.time()
        await asyncio.sleep(2.0)
        polled = await probes.polls_after(self.cluster, quiet_from)
        span = None if took is None else round(time.monotonic() - left_at - 2.0, 3)
        ok = span is not None and span <= self.bounds.cleanup and polled == 0
        self.inv.check("cleanup", ok, span, when="all clients left", leftovers=left, polls_after_cleanup=polled)
        self.say(f"all clients left: clean after {_fmt(span)} (polls afterwards: {polled})")

    async def _single_poller(self) -> None:
        polls = await probes.poll_log(self.cluster, self.started_at) + self.sampler.samples
        episodes = overlaps(polls, gap=max(5 * self.config.interval, 1.0))
        self.overlap_episodes = episodes
        for episode in episodes:
            # The fault it follows: the latest one that started before it.
            fault = max((r for r in self.records if r.started <= episode["from"]), key=lambda r: r.started,
                        default=None)  # fmt: skip
            after_end = None if fault is None else episode["to"] - fault.ended
            episode["fault"] = None if fault is None else f"round {fault.round} {fault.kind}"
            episode["after_fault_end_s"] = None if after_end is None else round(after_end, 3)
            ok = after_end is not None and after_end <= self.bounds.overlap and episode["seconds"] <= self.bounds.overlap
            self.inv.check("single_poller", ok, max(after_end or 0.0, episode["seconds"]), **episode)
        polled_topics = {t for _at, _app, t in polls}
        clean = len(polled_topics) * (len(self.records) + 1) - len(episodes)
        for _ in range(max(clean, 0)):  # every (topic, round) window without an overlap is a check passed
            self.inv.check("single_poller", True)

    async def _watch_crashes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for node in list(self.cluster.nodes.values()):
                if node.proc is None or node.running or node.name in self.ctx.expected_down:
                    continue
                key = (node.name, node.pid)
                if key not in self.crashed:
                    self.crashed.add(key)
                    self.inv.check("no_crash", False, 1, node=node.name, exit=node.returncode,
                                   log_tail=node.log_tail(20))  # fmt: skip
                    self.say(f"  CRASH: {node.name} exited ({node.returncode}); restarting it")
                    with contextlib.suppress(Exception):
                        await node.start()


async def _empty(found: Any) -> bool:
    return not await found


async def _cancel(tasks: list[asyncio.Task], *, within: float = 30.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any runs on (Python 3.11's
    ``wait_for`` can lose a cancellation); a task still running after ``within`` is an error,
    never a hang."""
    deadline = asyncio.get_running_loop().time() + within
    while pending := [task for task in tasks if not task.done()]:
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"background tasks would not stop: {[t.get_name() for t in pending]}")
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    for task in tasks:  # retrieve their outcomes: nothing logged as never retrieved
        if not task.cancelled():
            task.exception()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


async def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    return await ChaosRun(config).run()
