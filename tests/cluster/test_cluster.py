"""The cluster on a real Consul agent: nodes are real ``subsys serve`` processes.

Database-side proof: the feed calls ``poll_items(grp)``, which logs every
execution with the polling node's ``application_name`` (``subsys:<node>``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid

import aiohttp
import pytest

from conftest import CHECK_TTL, GRACE, INTERVAL, ItemsCluster
from support import Watcher, db_execute, eventually, leave_mid_handshake

pytestmark = pytest.mark.consul

SECRET = "test-cluster-secret"


async def test_one_owner_one_poller_every_client_gets_every_diff(cluster: ItemsCluster) -> None:
    nodes = await cluster.start_nodes(3)
    watchers = await cluster.watch(nodes, per_node=2)
    owners = await cluster.owners()
    assert list(owners) == ["items:1"], owners

    since = time.time()
    for value in range(1, 6):  # one change at a time, each seen everywhere before the next
        await cluster.execute("update items set v = $1 where id = 1", value)
        await eventually(
            lambda v=value: all(w.value_of(1) == v for w in watchers), timeout=20, message=f"all clients see v={value}"
        )
    polls = await cluster.polls_since(since)
    assert list(polls) == [f"subsys:{owners['items:1'].node_id}"], f"more than one node polled: {polls}"
    assert sum((await cluster.pollers()).values()) == 1
    for watcher in watchers:
        values = []
        for frame in watcher.data():
            for row in frame.get("updated", []):
                values.append(row["v"])
        assert values == [1, 2, 3, 4, 5], (watcher.node.name, values)
        assert not watcher.epoch_regressions


async def test_sigkill_owner_fails_over_with_resync(cluster: ItemsCluster) -> None:
    nodes = await cluster.start_nodes(3)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    owner_name = owner.name
    survivors = [w for w in watchers if w.node is not owner]

    owner.kill()
    await owner.wait(timeout=30)
    new_owner = await eventually(
        lambda: cluster.new_owner("items:1", old_epoch), timeout=30, message="a survivor acquires the topic"
    )
    assert new_owner.node_id != owner_name and new_owner.epoch > old_epoch
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
        assert all(f["epoch"] >= new_owner.epoch for f in watcher.data()[resync_at:]), after


async def test_sigstop_owner_is_fenced_after_takeover(cluster: ItemsCluster) -> None:
    nodes = await cluster.start_nodes(3)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    owner_name = owner.name
    others = [w for w in watchers if w.node is not owner]

    owner.signal(signal.SIGSTOP)
    try:
        new_owner = await eventually(lambda: cluster.new_owner("items:1", old_epoch), timeout=60, message="takeover")
        assert new_owner.node_id != owner_name
        for watcher in others:
            await eventually(lambda w=watcher: w.max_epoch >= new_owner.epoch, timeout=30)
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
        stale = [f for f in watcher.data(since=taken_over) if f["epoch"] < new_owner.epoch]
        assert not stale, stale
    await asyncio.sleep(INTERVAL * 5)
    polls = await cluster.polls_since(since)
    assert f"subsys:{owner_name}" not in polls, polls


async def _pollers_of(cluster: ItemsCluster, name: str, *, expected: int) -> bool:
    return (await cluster.pollers()).get(name) == expected


async def test_sigterm_hands_topics_over_without_a_gap(cluster: ItemsCluster) -> None:
    nodes = await cluster.start_nodes(2)
    watchers = await cluster.watch(nodes)
    owner, old_epoch = await cluster.owner()
    survivor = next(w for w in watchers if w.node is not owner)

    since = time.time()
    await asyncio.sleep(INTERVAL * 3)
    owner.signal(signal.SIGTERM)
    assert await owner.wait(timeout=30) == 0, owner.logs()[-3000:]
    await eventually(lambda: cluster.new_owner("items:1", old_epoch), timeout=30)
    await eventually(lambda: any(f["type"] == "resync" for f in survivor.data()), timeout=30)
    await asyncio.sleep(INTERVAL * 3)
    stamps = await cluster.poll_times(since)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # The new owner polls within one interval of the old owner's last poll
    # (plus the slack of a busy 2-core machine).
    assert max(gaps) < INTERVAL * 2 + 1.0, max(gaps)
    assert "Traceback" not in owner.logs()


async def test_keys_disappear_when_everyone_leaves(cluster: ItemsCluster) -> None:
    nodes = await cluster.start_nodes(2)
    watchers = await cluster.watch(nodes)
    view = await cluster.view()
    assert view.owners and view.presence
    for watcher in watchers:
        await watcher.stop()
    await eventually(lambda: _no_keys(cluster), timeout=GRACE + 20, message="owner and presence keys removed")
    assert sum((await cluster.pollers()).values()) == 0
    assert len((await cluster.view()).nodes) == 2


async def _no_keys(cluster: ItemsCluster) -> bool:
    view = await cluster.view()
    return not view.owners and not view.presence


async def test_consul_restart_converges(cluster: ItemsCluster) -> None:
    consul_agent = cluster.consul.servers[0]
    nodes = await cluster.start_nodes(3)
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


async def _all_fenced(cluster: ItemsCluster) -> bool:
    for node in cluster.nodes.values():
        status, body = await node.health()
        if status != 503 or body["coordinator"]["state"] != "unreachable" or body["pollers"] != 0:
            return False
    return True


async def _converged(cluster: ItemsCluster, topics: list[str]) -> bool:
    owners = await cluster.owners()
    return sorted(owners) == topics and sum((await cluster.pollers()).values()) == len(topics)


async def test_peer_link_rejects_missing_and_wrong_secret(cluster: ItemsCluster) -> None:
    (node,) = await cluster.start_nodes(1)
    secret = cluster.secret
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {secret}"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(node.url + "/internal/peer", headers=headers)
            assert info.value.status == 401
        async with session.ws_connect(
            node.url + "/internal/peer", headers={"Authorization": f"Bearer {secret}"}
        ) as ws:
            await ws.send_json({"type": "follow", "topic": "items:1"})
            frame = await ws.receive_json(timeout=10)
            assert frame == {"type": "not_owner", "topic": "items:1"}
    await eventually(lambda: node.logs().count("rejected peer link") >= 3, timeout=10)
    assert secret not in node.logs()


async def test_drain_hands_topics_over_and_keeps_serving(consul, start_node, items_db) -> None:
    """``Node.handoff()`` (what the admin API's drain calls) on a live node, both nodes in-process."""
    db_url = items_db
    sections = {
        "consul": {"address": consul.servers[0].http_addr, "prefix": f"d{uuid.uuid4().hex[:8]}/", "check_ttl": CHECK_TTL},
        "secrets": {"cluster_secret": SECRET},
        "node": {"grace_period": GRACE},
    }
    feeds = {"items": {"sql": "select * from poll_items($1)", "key": ["id"], "param": "int", "interval": INTERVAL}}
    first = await start_node(feeds, database_url=db_url, **sections)
    on_first = Watcher(first.ws_url)
    await on_first.ready()
    assert first.node.running_pollers(), "the only interested node owns the topic"
    second = await start_node(feeds, database_url=db_url, **sections)
    on_second = Watcher(second.ws_url)
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


async def test_a_peer_that_leaves_during_the_handshake_is_a_departure_not_a_traceback(
    consul, start_node, items_db, monkeypatch, caplog
) -> None:
    """A stopping node may drop its peer link mid-handshake: no traceback (one was counted as a crash)."""
    caplog.set_level(logging.INFO)
    sections = {
        "consul": {"address": consul.servers[0].http_addr, "prefix": f"h{uuid.uuid4().hex[:8]}/", "check_ttl": CHECK_TTL},
        "secrets": {"cluster_secret": SECRET},
    }
    feeds = {"items": {"sql": "select * from poll_items($1)", "key": ["id"], "param": "int", "interval": INTERVAL}}
    node = await start_node(feeds, database_url=items_db, **sections)
    await leave_mid_handshake(
        monkeypatch, node.port, "/internal/peer", {"Authorization": f"Bearer {SECRET}", "X-Subsys-Node": "leaver"}
    )
    assert "closed during its handshake" in caplog.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text
    watcher = Watcher(node.ws_url)
    await watcher.ready()
    await watcher.stop()
