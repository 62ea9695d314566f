"""The cluster on a real Consul agent: nodes are real ``subsys serve`` processes.

Database-side proof: the feed calls ``poll_items(grp)``, which logs every
execution with the polling node's ``application_name`` (``subsys:<node>``).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import asyncpg
import pytest

from _support import db_execute, eventually
from subsys.client import connect
from subsys.localcluster import ConsulAgent, NodeProcess, ProcessError, consul_binary, write_toml

pytestmark = pytest.mark.consul

INTERVAL = 0.2
GRACE = 2.0
CHECK_TTL = 3.0
SECRET = "test-cluster-secret"

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


@pytest.fixture(scope="module")
async def consul_agent(tmp_path_factory) -> AsyncIterator[ConsulAgent]:
    try:
        await consul_binary()
    except ProcessError as exc:
        pytest.fail(f"cannot provide a Consul agent: {exc}")
    agent = ConsulAgent(tmp_path_factory.mktemp("consul"), node_name="subsys-test")
    await agent.start()
    try:
        await agent.wait_ready()
        yield agent
    finally:
        await agent.stop()


class Cluster:
    def __init__(self, *, agent: ConsulAgent, db_url: str, workdir: Path) -> None:
        self.agent, self.db_url, self.workdir = agent, db_url, workdir
        self.prefix = f"t{uuid.uuid4().hex[:8]}/"
        self.nodes: list[NodeProcess] = []
        self.watchers: list[Watcher] = []
        self.config = write_toml(
            workdir / "subsys.toml",
            {
                "node": {"grace_period": GRACE},
                "consul": {"check_ttl": CHECK_TTL, "lock_delay": 0.5},
                "feeds": {
                    "items": {
                        "sql": "select * from poll_items($1)",
                        "key": ["id"],
                        "param": "int",
                        "interval": INTERVAL,
                    }
                },
            },
        )

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.db_url,
            "CONSUL_HTTP_ADDR": self.agent.http_addr,
            "SUBSYS_CONSUL_PREFIX": self.prefix,
            "SUBSYS_CLUSTER_SECRET": SECRET,
            "SUBSYS_LOG_LEVEL": "INFO",
        }

    async def start(self, count: int) -> list[NodeProcess]:
        new = [
            NodeProcess(f"n{len(self.nodes) + i + 1}", config=self.config, env=self.env(), workdir=self.workdir)
            for i in range(count)
        ]
        self.nodes.extend(new)
        for node in new:
            await node.start()
        await asyncio.gather(*(node.wait_ready() for node in new))
        return new

    def by_name(self, name: str) -> NodeProcess:
        return next(node for node in self.nodes if node.name == name)

    async def watch(self, nodes: list[NodeProcess], topics: tuple[str, ...] = ("items:1",), per_node: int = 1):
        """Clients on ``nodes`` (``per_node`` per node and topic), each past its first data frame."""
        new = [Watcher(node, topic) for node in nodes for topic in topics for _ in range(per_node)]
        self.watchers.extend(new)
        await asyncio.gather(*(w.ready() for w in new))
        return new

    async def owner(self, topic: str = "items:1") -> tuple[NodeProcess, int]:
        """The owner node of ``topic`` (waiting for one) and its epoch."""
        name = await eventually(lambda: _owner_of(self, topic), timeout=30, message=f"an owner for {topic}")
        return self.by_name(name), (await self.owners())[topic]["epoch"]

    async def owners(self) -> dict[str, dict[str, Any]]:
        return await self.agent.owners(self.prefix)

    async def keys(self, part: str) -> list[str]:
        return [entry["Key"] for entry in await self.agent.kv(f"{self.prefix}{part}/")]

    async def pollers(self) -> dict[str, dict[str, int]]:
        """Running pollers per live node, from each node's /health and /metrics."""
        result = {}
        for node in self.nodes:
            if node.running:
                try:
                    _status, body = await node.health()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    continue
                result[node.name] = body.get("pollers", 0)
        return result

    async def pollers_since(self, since: float) -> dict[str, int]:
        conn = await asyncpg.connect(self.db_url)
        try:
            rows = await conn.fetch(
                "select app, count(*) as n from poll_log where at > to_timestamp($1) group by app", since
            )
        finally:
            await conn.close()
        return {row["app"]: row["n"] for row in rows}

    async def execute(self, sql: str, *args: Any) -> None:
        await db_execute(self.db_url, sql, *args)

    async def stop(self) -> None:
        await asyncio.gather(*(watcher.stop() for watcher in self.watchers))
        await asyncio.gather(*(node.stop() for node in self.nodes))

    def logs(self) -> str:
        return "\n".join(f"===== {node.name}\n{node.logs()[-4000:]}" for node in self.nodes)


@pytest.fixture
async def items_db(make_database) -> str:
    """A fresh database with the items schema and its poll log."""
    db_url = await make_database()
    await db_execute(db_url, SCHEMA)
    return db_url


@pytest.fixture
async def cluster(consul_agent, items_db, tmp_path, request) -> AsyncIterator[Cluster]:
    db_url = items_db
    cluster = Cluster(agent=consul_agent, db_url=db_url, workdir=tmp_path)
    try:
        yield cluster
    finally:
        await cluster.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(cluster.logs())


class Watcher:
    """A client on one node that records every frame and checks epochs never go back."""

    def __init__(self, node: NodeProcess, topic: str = "items:1") -> None:
        self.node, self.topic = node, topic
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.epoch_regressions: list[tuple[int, int]] = []
        self._max_epoch = 0
        self._ready = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with connect(self.node.ws_url) as client:
            async for frame in client.subscribe(self.topic):
                epoch = frame.get("epoch")
                if frame.get("type") in ("snapshot", "resync", "diff") and epoch is not None:
                    if epoch < self._max_epoch:
                        self.epoch_regressions.append((epoch, self._max_epoch))
                    self._max_epoch = max(self._max_epoch, epoch)
                    self._ready.set()
                self.frames.append((time.monotonic(), frame))

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready.wait(), 30)

    def data(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [f for t, f in self.frames if t >= since and f.get("type") in ("snapshot", "resync", "diff")]

    def value_of(self, row_id: int) -> int | None:
        rows: dict[int, int] = {}
        for frame in self.data():
            if frame["type"] in ("snapshot", "resync"):
                rows = {row["id"]: row["v"] for row in frame["rows"]}
            else:
                for key in frame["deleted"]:
                    rows.pop(key["id"], None)
                for row in frame["inserted"] + frame["updated"]:
                    rows[row["id"]] = row["v"]
        return rows.get(row_id)

    @property
    def max_epoch(self) -> int:
        return self._max_epoch

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _owner_of(cluster: Cluster, topic: str) -> str | None:
    owner = (await cluster.owners()).get(topic)
    return owner["node"] if owner else None


async def test_one_owner_one_poller_every_client_gets_every_diff(cluster: Cluster) -> None:
    nodes = await cluster.start(3)
    watchers = await cluster.watch(nodes, per_node=2)
    owners = await cluster.owners()
    assert list(owners) == ["items:1"], owners

    since = time.time()
    for value in range(1, 6):
        await cluster.execute("update items set v = $1 where id = 1", value)
        await asyncio.sleep(INTERVAL * 2)
    await eventually(lambda: all(w.value_of(1) == 5 for w in watchers), timeout=20, message="all clients see v=5")
    polls = await cluster.pollers_since(since)
    assert list(polls) == [f"subsys:{owners['items:1']['node']}"], f"more than one node polled: {polls}"
    assert sum((await cluster.pollers()).values()) == 1
    for watcher in watchers:
        values = []
        for frame in watcher.data():
            for row in frame.get("updated", []):
                values.append(row["v"])
        assert values == [1, 2, 3, 4, 5], (watcher.node.name, values)
        assert not watcher.epoch_regressions


async def test_sigkill_owner_fails_over_with_resync(cluster: Cluster) -> None:
    nodes = await cluster.start(3)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    owner_name = owner.name
    survivors = [w for w in watchers if w.node is not owner]

    owner.kill()
    await owner.wait(timeout=30)
    new_owner = await eventually(
        lambda: _new_owner(cluster, old_epoch), timeout=30, message="a survivor acquires the topic"
    )
    assert new_owner["node"] != owner_name and new_owner["epoch"] > old_epoch
    for watcher in survivors:
        await eventually(
            lambda w=watcher: any(f["type"] == "resync" and f["epoch"] > old_epoch for f in w.data()),
            timeout=30,
            message=f"{watcher.node.name} gets a resync with a higher epoch",
        )
    await cluster.execute("update items set v = 42 where id = 2")
    for watcher in survivors:
        await eventually(lambda w=watcher: w.value_of(2) == 42, timeout=20, message="live diffs after failover")
        assert not watcher.epoch_regressions, watcher.epoch_regressions
        after = [f for f in watcher.data() if f["type"] != "resync"]
        resync_at = next(i for i, f in enumerate(watcher.data()) if f["type"] == "resync")
        assert all(f["epoch"] >= new_owner["epoch"] for f in watcher.data()[resync_at:]), after


async def _new_owner(cluster: Cluster, old_epoch: int) -> dict[str, Any] | None:
    owner = (await cluster.owners()).get("items:1")
    return owner if owner and owner["epoch"] > old_epoch else None


async def test_sigstop_owner_is_fenced_after_takeover(cluster: Cluster) -> None:
    nodes = await cluster.start(3)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    owner_name = owner.name
    others = [w for w in watchers if w.node is not owner]

    owner.signal(signal.SIGSTOP)
    try:
        new_owner = await eventually(lambda: _new_owner(cluster, old_epoch), timeout=60, message="takeover")
        assert new_owner["node"] != owner_name
        for watcher in others:
            await eventually(lambda w=watcher: w.max_epoch >= new_owner["epoch"], timeout=30)
        taken_over = time.monotonic()
        # The frozen owner's database change would be visible in its diffs if it published.
        await cluster.execute("update items set v = 7 where id = 1")
    finally:
        owner.signal(signal.SIGCONT)
    # The old owner wakes up, learns it lost the key and stops its poller by itself.
    await eventually(
        lambda: _pollers_of(cluster, owner_name, expected=0), timeout=30, message="old owner stops its poller"
    )
    since = time.time()
    await cluster.execute("update items set v = 8 where id = 1")
    for watcher in others:
        await eventually(lambda w=watcher: w.value_of(1) == 8, timeout=20)
        assert not watcher.epoch_regressions, watcher.epoch_regressions
        stale = [f for f in watcher.data(since=taken_over) if f["epoch"] < new_owner["epoch"]]
        assert not stale, stale
    await asyncio.sleep(INTERVAL * 5)
    polls = await cluster.pollers_since(since)
    assert f"subsys:{owner_name}" not in polls, polls


async def _pollers_of(cluster: Cluster, name: str, *, expected: int) -> bool:
    return (await cluster.pollers()).get(name) == expected


async def test_sigterm_hands_topics_over_without_a_gap(cluster: Cluster) -> None:
    nodes = await cluster.start(2)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    survivor = next(w for w in watchers if w.node is not owner)

    since = time.time()
    await asyncio.sleep(INTERVAL * 3)
    owner.signal(signal.SIGTERM)
    assert await owner.wait(timeout=30) == 0, owner.logs()[-3000:]
    await eventually(lambda: _new_owner(cluster, old_epoch), timeout=30)
    await eventually(lambda: any(f["type"] == "resync" for f in survivor.data()), timeout=30)
    await asyncio.sleep(INTERVAL * 3)
    conn = await asyncpg.connect(cluster.db_url)
    try:
        stamps = [
            row["at"].timestamp()
            for row in await conn.fetch("select at from poll_log where at > to_timestamp($1) order by at", since)
        ]
    finally:
        await conn.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # The new owner polls within one interval of the old owner's last poll
    # (plus the slack of a busy 2-core machine).
    assert max(gaps) < INTERVAL * 2 + 1.0, max(gaps)
    assert "Traceback" not in owner.logs()


async def test_keys_disappear_when_everyone_leaves(cluster: Cluster) -> None:
    nodes = await cluster.start(2)
    watchers = await cluster.watch(nodes)
    assert await cluster.keys("owners") and await cluster.keys("presence")
    for watcher in watchers:
        await watcher.stop()
    await eventually(lambda: _no_keys(cluster), timeout=GRACE + 20, message="owner and presence keys removed")
    assert sum((await cluster.pollers()).values()) == 0
    assert len(await cluster.keys("nodes")) == 2


async def _no_keys(cluster: Cluster) -> bool:
    return not await cluster.keys("owners") and not await cluster.keys("presence")


async def test_consul_restart_converges(cluster: Cluster, consul_agent: ConsulAgent) -> None:
    nodes = await cluster.start(3)
    topics = ["items:1", "items:2"]
    watchers = await cluster.watch(nodes, tuple(topics))

    await consul_agent.stop()
    # Without Consul a node cannot prove its ownership for long: it fences itself
    # (stops its pollers) and says so in /health, while staying alive.
    await eventually(lambda: _all_fenced(cluster), timeout=30, message="nodes fence themselves and report it")
    await consul_agent.start()
    await consul_agent.wait_ready()
    for node in nodes:
        await node.wait_ready(timeout=60)
    await eventually(lambda: _converged(cluster, topics), timeout=60, message="one owner and poller per topic")
    await cluster.execute("update items set v = 99 where id in (1, 3)")
    for watcher in watchers:
        row = 1 if watcher.topic == "items:1" else 3
        await eventually(lambda w=watcher, r=row: w.value_of(r) == 99, timeout=30)
        assert not watcher.epoch_regressions


async def _all_fenced(cluster: Cluster) -> bool:
    for node in cluster.nodes:
        status, body = await node.health()
        if status != 503 or body["coordinator"]["state"] != "unreachable" or body["pollers"] != 0:
            return False
    return True


async def _converged(cluster: Cluster, topics: list[str]) -> bool:
    owners = await cluster.owners()
    return sorted(owners) == topics and sum((await cluster.pollers()).values()) == len(topics)


async def test_peer_link_rejects_missing_and_wrong_secret(cluster: Cluster) -> None:
    (node,) = await cluster.start(1)
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(node.url + "/internal/peer", headers=headers)
            assert info.value.status == 401
        async with session.ws_connect(
            node.url + "/internal/peer", headers={"Authorization": f"Bearer {SECRET}"}
        ) as ws:
            await ws.send_json({"type": "follow", "topic": "items:1"})
            frame = await ws.receive_json(timeout=10)
            assert frame == {"type": "not_owner", "topic": "items:1"}
    await eventually(lambda: node.logs().count("rejected peer link") >= 3, timeout=10)
    assert SECRET not in node.logs()


async def test_drain_hands_topics_over_and_keeps_serving(consul_agent, start_node, items_db) -> None:
    """``Node.handoff()`` (what the admin API's drain calls) on a live node, both nodes in-process."""
    db_url = items_db
    sections = {
        "consul": {"address": consul_agent.http_addr, "prefix": f"d{uuid.uuid4().hex[:8]}/", "check_ttl": CHECK_TTL},
        "secrets": {"cluster_secret": SECRET},
        "node": {"grace_period": GRACE},
    }
    feeds = {"items": {"sql": "select * from poll_items($1)", "key": ["id"], "param": "int", "interval": INTERVAL}}
    first = await start_node(feeds, database_url=db_url, **sections)
    on_first = Watcher(first)
    await on_first.ready()
    assert first.node.running_pollers(), "the only interested node owns the topic"
    second = await start_node(feeds, database_url=db_url, **sections)
    on_second = Watcher(second)
    await on_second.ready()
    old_epoch = first.node.running_pollers()["items:1"]

    await first.node.handoff()
    await eventually(lambda: second.node.running_pollers().get("items:1", 0) > old_epoch, timeout=30)
    assert first.node.running_pollers() == {}
    # The drained node keeps its client, now as a follower of the new owner.
    await eventually(lambda: any(f["type"] == "resync" for f in on_first.data()), timeout=30)
    await db_execute(db_url, "update items set v = 5 where id = 1")
    for watcher in (on_first, on_second):
        await eventually(lambda w=watcher: w.value_of(1) == 5, timeout=30)
        assert not watcher.epoch_regressions
        await watcher.stop()
