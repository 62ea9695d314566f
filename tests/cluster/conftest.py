"""Fixtures for cluster tests: one Consul server per module, a fresh cluster (key prefix, database) per test.

The cluster is :class:`subsys.testing.cluster.LocalCluster` (the harness dev,
bench and chaos use too) with a few test helpers. Node and Consul logs are
printed when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from subsys.testing.cluster import ClusterSpec, LocalCluster
from subsys.testing.consul import ConsulCluster, consul_binary
from subsys.testing.nodes import NodeProcess
from subsys.testing.procs import ProcessError

from support import Watcher, db_execute, eventually

INTERVAL = 0.2
GRACE = 2.0
CHECK_TTL = 3.0
LOCK_DELAY = 0.5

SCHEMA = """
create table items (id int primary key, grp int not null, v int not null);
create table poll_log (at timestamptz not null default clock_timestamp(), app text not null);
create function poll_items(g int) returns table (id int, grp int, v int)
language plpgsql volatile as $$
begin
  insert into poll_log (app) values (current_setting('application_name'));
  return query select i.id, i.grp, i.v from items i where i.grp = g order by i.id;
end $$;
insert into items values (1, 1, 0), (2, 1, 0), (3, 2, 0);
"""

ITEMS_FEED = {"sql": "select * from poll_items($1)", "key": ["id"], "param": "int", "interval": INTERVAL}


async def provide_consul(workdir: Path, **kwargs: Any) -> ConsulCluster:
    try:
        await consul_binary()
    except ProcessError as exc:
        pytest.fail(f"cannot provide a Consul agent: {exc}")
    consul = ConsulCluster(workdir, **kwargs)
    await consul.start()
    return consul


@pytest.fixture(scope="module")
async def consul(tmp_path_factory) -> AsyncIterator[ConsulCluster]:
    agents = await provide_consul(tmp_path_factory.mktemp("consul"), name="subsys-test")
    try:
        yield agents
    finally:
        await agents.stop()


@pytest.fixture
async def items_db(make_database) -> str:
    """A fresh database with the items schema and its poll log."""
    db_url = await make_database()
    await db_execute(db_url, SCHEMA)
    return db_url


class ItemsCluster(LocalCluster):
    """A LocalCluster over the items schema, with the helpers the cluster tests share."""

    watchers: list[Watcher]

    async def watch(self, nodes: list[NodeProcess], topics: tuple[str, ...] = ("items:1",), per_node: int = 1):
        """Clients on ``nodes`` (``per_node`` per node and topic), each past its first data frame."""
        new = []
        for node in nodes:
            for topic in topics:
                for _ in range(per_node):
                    watcher = Watcher(node.ws_url, topic, name=node.name)
                    watcher.node = node
                    new.append(watcher)
        self.watchers.extend(new)
        await asyncio.gather(*(w.ready() for w in new))
        return new

    async def owner(self, topic: str = "items:1") -> tuple[NodeProcess, int]:
        """The owner node of ``topic`` (waiting for one) and its epoch."""
        record = await eventually(lambda: self.owner_of(topic), timeout=30, message=f"an owner for {topic}")
        return self.nodes[record.node_id], record.epoch

    async def new_owner(self, topic: str, old_epoch: int):
        record = await self.owner_of(topic)
        return record if record is not None and record.epoch > old_epoch else None

    async def pollers(self) -> dict[str, int]:
        """Running pollers per live node, from each node's /health."""
        result = {}
        for node in self.running():
            try:
                _status, body = await node.health()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                continue
            result[node.name] = body.get("pollers", 0)
        return result

    async def polls_since(self, since: float) -> dict[str, int]:
        """Database-side proof: executions of the feed per application_name since ``since``."""
        rows = await self.fetch(
            "select app, count(*) as n from poll_log where at > to_timestamp($1) group by app", since
        )
        return {row["app"]: row["n"] for row in rows}

    async def poll_times(self, since: float) -> list[float]:
        rows = await self.fetch("select at from poll_log where at > to_timestamp($1) order by at", since)
        return [row["at"].timestamp() for row in rows]


def items_spec(db_url: str, **settings: Any) -> ClusterSpec:
    sections = {
        "node": {"grace_period": GRACE},
        "consul": {"check_ttl": CHECK_TTL, "lock_delay": LOCK_DELAY},
    }
    for name, values in settings.items():
        sections.setdefault(name, {}).update(values)
    return ClusterSpec(nodes=0, feeds={"items": ITEMS_FEED}, settings=sections, database_url=db_url)


@contextlib.asynccontextmanager
async def items_cluster(spec: ClusterSpec, *, consul: ConsulCluster, workdir: Path, request) -> AsyncIterator[ItemsCluster]:
    """A started ItemsCluster (no nodes yet), closed at the end; its logs printed if the test failed."""
    harness = ItemsCluster(spec, workdir=workdir, consul=consul)
    harness.watchers = []
    await harness.start(nodes=False)
    try:
        yield harness
    finally:
        await asyncio.gather(*(w.stop() for w in harness.watchers))
        await harness.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(harness.logs())


@pytest.fixture
async def cluster(consul, items_db, tmp_path, request) -> AsyncIterator[ItemsCluster]:
    async with items_cluster(items_spec(items_db), consul=consul, workdir=tmp_path, request=request) as harness:
        yield harness


def since_now() -> float:
    return time.time()
