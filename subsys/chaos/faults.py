"""The faults a chaos round applies, each on the one local-cluster harness.

Each fault is an async function ``(ctx, record)``: it picks its target with
the run's random generator, stamps ``record.started``/``record.ended`` (the
moment the fault is over: the process is back, the agent answers, the query
is fast again) and may return a coroutine the runner awaits after its
measurements (e.g. bringing a killed Consul leader back).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from subsys.chaos.clients import ClientPool
from subsys.chaos.history import FaultRecord
from subsys.testing.cluster import LocalCluster

__all__ = ["FAULTS", "OUTAGES", "NODE_FAULTS", "FaultContext", "needs"]

OUTAGE_SECONDS = 6.0  # "a Consul outage of several seconds": past the check TTL, so every node fences
PG_DOWN_SECONDS = 3.0
SLOW_DELAY, SLOW_SECONDS = 0.8, 4.0  # slow: under the feed's statement_timeout
HUNG_DELAY, HUNG_SECONDS = 60.0, 5.0  # hung: far past it; the node's statement_timeout cancels it
CHURNERS, CHURN_SECONDS = 12, 8.0


@dataclass
class FaultContext:
    cluster: LocalCluster
    pool: ClientPool
    rng: random.Random
    check_ttl: float
    expected_down: set[str] = field(default_factory=set)  # nodes the run stopped on purpose
    churn_topics: list[str] = field(default_factory=list)
    main_topics: list[str] = field(default_factory=list)


def _start(record: FaultRecord, target: str = "") -> None:
    record.target = target
    record.started, record.started_mono = time.time(), time.monotonic()


def _end(record: FaultRecord) -> None:
    record.ended, record.ended_mono = time.time(), time.monotonic()


async def _victim(ctx: FaultContext, record: FaultRecord) -> str:
    """A node that owns at least one topic (any node if none does), and what it owns."""
    owners = await ctx.cluster.owners()
    by_node: dict[str, dict[str, int]] = {}
    for topic, rec in owners.items():
        by_node.setdefault(rec.node_id, {})[topic] = rec.epoch
    candidates = sorted(n for n in by_node if n in ctx.cluster.nodes) or sorted(ctx.cluster.nodes)
    name = ctx.rng.choice(candidates)
    record.owned = by_node.get(name, {})
    return name


async def _kill(ctx: FaultContext, record: FaultRecord, *, after: float) -> None:
    name = await _victim(ctx, record)
    node = ctx.cluster.node(name)
    ctx.expected_down.add(name)
    ctx.pool.down.add(name)
    _start(record, name)
    node.kill()
    await node.wait(timeout=30)
    if after:
        await asyncio.sleep(after)
    await node.start()
    _end(record)
    ctx.pool.down.discard(name)
    ctx.expected_down.discard(name)
    await node.wait_ready(timeout=90)


async def kill_now(ctx: FaultContext, record: FaultRecord) -> None:
    """SIGKILL a topic owner; a supervisor restarts it at once (same node id)."""
    await _kill(ctx, record, after=0.0)


async def kill_late(ctx: FaultContext, record: FaultRecord) -> None:
    """SIGKILL a topic owner; it comes back after twice the check TTL."""
    await _kill(ctx, record, after=2 * ctx.check_ttl)


async def pause(ctx: FaultContext, record: FaultRecord) -> None:
    """SIGSTOP a topic owner past its check TTL, then SIGCONT: it must wake up fenced."""
    name = await _victim(ctx, record)
    ctx.pool.down.add(name)
    _start(record, name)
    ctx.cluster.pause(name)
    try:
        await asyncio.sleep(ctx.check_ttl + 2.0)
    finally:
        ctx.cluster.resume(name)
    _end(record)
    ctx.pool.down.discard(name)


async def sigterm(ctx: FaultContext, record: FaultRecord) -> None:
    """SIGTERM a topic owner (it hands its topics over and exits 0), then start it again."""
    name = await _victim(ctx, record)
    node = ctx.cluster.node(name)
    ctx.expected_down.add(name)
    ctx.pool.down.add(name)
    _start(record, name)
    code = await ctx.cluster.terminate(name)
    record.exit_code = code
    await node.start()
    _end(record)
    ctx.pool.down.discard(name)
    ctx.expected_down.discard(name)
    await node.wait_ready(timeout=90)


async def consul_restart(ctx: FaultContext, record: FaultRecord) -> None:
    """Restart the Consul agent a node talks to (the server, or that node's client agent)."""
    consul = ctx.cluster.consul
    assert consul is not None
    index = ctx.rng.randrange(len(ctx.cluster.nodes))
    agent = consul.agent_for(index)
    _start(record, agent.node_name)
    await agent.stop()
    await agent.start()
    await agent.wait_ready()
    _end(record)


async def consul_outage(ctx: FaultContext, record: FaultRecord) -> None:
    """Every Consul server down for several seconds (client agents, if any, stay up), then back."""
    consul = ctx.cluster.consul
    assert consul is not None
    _start(record, "all servers")
    await asyncio.gather(*(server.stop() for server in consul.servers))
    await asyncio.sleep(OUTAGE_SECONDS)
    for server in consul.servers:
        await server.start()
    await asyncio.gather(*(agent.wait_ready(90) for agent in consul.agents))
    _end(record)


async def consul_leader_loss(ctx: FaultContext, record: FaultRecord) -> Callable[[], Awaitable[Any]]:
    """SIGKILL the leader of three Consul servers; the others elect a new one. It rejoins afterwards."""
    consul = ctx.cluster.consul
    assert consul is not None
    leader = await consul.wait_leader()
    _start(record, leader.node_name)
    leader.kill()
    await leader.wait(timeout=30)
    new = await consul.wait_leader(60, not_=leader)
    _end(record)
    record.notes.append(f"new leader {new.node_name}")

    async def rejoin() -> None:
        await leader.start()
        await leader.wait_ready(90)

    return rejoin


async def pg_restart(ctx: FaultContext, record: FaultRecord) -> None:
    """PostgreSQL: fast stop (every backend killed), down a few seconds, started again."""
    pg = ctx.cluster.pg
    assert pg is not None
    _start(record, "postgres")
    await pg.stop_fast()
    await asyncio.sleep(PG_DOWN_SECONDS)
    await pg.start_again()
    _end(record)


async def slow_query(ctx: FaultContext, record: FaultRecord) -> None:
    """The feed's query slow (under its statement_timeout), then hung (far past it), then fast again."""
    _start(record, "feed query")
    try:
        await ctx.cluster.execute("update chaos_ctl set delay = $1", SLOW_DELAY)
        await asyncio.sleep(SLOW_SECONDS)
        await ctx.cluster.execute("update chaos_ctl set delay = $1", HUNG_DELAY)
        await asyncio.sleep(HUNG_SECONDS)
    finally:
        await ctx.cluster.execute("update chaos_ctl set delay = 0")
    _end(record)


async def churn(ctx: FaultContext, record: FaultRecord) -> None:
    """Churners connect, subscribe, unsubscribe and disconnect at random, then all leave."""
    _start(record, f"{CHURNERS} clients")
    await ctx.pool.churn(CHURNERS, ctx.churn_topics + ctx.main_topics[:4], CHURN_SECONDS)
    _end(record)


FAULTS: dict[str, Callable[[FaultContext, FaultRecord], Awaitable[Any]]] = {
    "kill_now": kill_now,
    "kill_late": kill_late,
    "pause": pause,
    "sigterm": sigterm,
    "consul_restart": consul_restart,
    "consul_outage": consul_outage,
    "consul_leader_loss": consul_leader_loss,
    "pg_restart": pg_restart,
    "slow_query": slow_query,
    "churn": churn,
}
NODE_FAULTS = {"kill_now", "kill_late", "pause", "sigterm"}  # a failover is expected and timed
OUTAGES = {"consul_restart", "consul_outage", "consul_leader_loss", "pg_restart", "slow_query"}


def needs(kind: str, consul_servers: int) -> str | None:
    """Why ``kind`` cannot run on this cluster shape (None: it can)."""
    if kind == "consul_leader_loss" and consul_servers < 3:
        return "needs --consul-servers 3"
    return None
