"""Zombies made for real, listed with the right kind and evidence, reaped, gone; clients converge.

Sessions live long here (check TTL 30 s) and the janitor is off unless a test
turns it on, so what Consul and the janitor would heal stays visible long
enough to be listed and reaped by hand (`subsys zombies --reap` is the same
API call).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from subsys.client.admin import AdminClient

from conftest import ITEMS_FEED, ItemsCluster, items_cluster, items_spec
from support import eventually

pytestmark = pytest.mark.consul

LONG_TTL = 30.0


def zombie_spec(items_db: str, *, reap: bool, interval: float = 0.5, **settings):
    # No fast failover: a follower would end a dead owner's session before the scan could list it.
    return items_spec(items_db, consul={"check_ttl": LONG_TTL, "fast_failover": False},
                      node={"zombie_reap": reap, "zombie_interval": interval, **settings.pop("node", {})}, **settings)  # fmt: skip


@pytest.fixture
async def manual(consul, items_db, tmp_path, request):
    async with items_cluster(zombie_spec(items_db, reap=False), consul=consul, workdir=tmp_path, request=request) as c:
        yield c


@pytest.fixture
async def healing(consul, items_db, tmp_path, request):
    async with items_cluster(zombie_spec(items_db, reap=True), consul=consul, workdir=tmp_path, request=request) as c:
        yield c


def api(cluster: ItemsCluster, name: str) -> AdminClient:
    return AdminClient(cluster.nodes[name].url, token=cluster.admin_token)


async def kinds_now(admin: AdminClient, wanted: set[str]):
    listing = await admin.zombies()
    found = {z.kind for z in listing.zombies}
    return listing if wanted <= found else None


async def test_a_killed_owner_leaves_a_dead_session_a_stuck_owner_stale_presence_and_a_leaked_registration(
    manual: ItemsCluster,
) -> None:
    n1, n2 = await manual.start_nodes(2)
    await manual.watch([n1], ("items:1",))
    survivors = await manual.watch([n2], ("items:1",))
    old = await manual.owner_of("items:1")
    assert old.node_id == "n1"
    n1.kill()
    await n1.wait(timeout=30)
    async with api(manual, "n2") as admin:
        wanted = {"dead_session", "stuck_owner", "stale_presence", "leaked_registration"}
        listing = await eventually(lambda: kinds_now(admin, wanted), timeout=60, message=f"all of {wanted}")
        by_kind = {z.kind: z for z in listing.zombies}
        stuck = by_kind["stuck_owner"]
        assert stuck.subject == "items:1" and stuck.nodes == ["n1"]
        assert "refuses connections" in stuck.evidence["why"] and stuck.evidence["owner_key"]["holder"] == old.holder
        assert by_kind["dead_session"].subject == old.holder
        assert by_kind["stale_presence"].subject == "items:1@n1"
        assert by_kind["leaked_registration"].evidence["registration"]["node"] == "n1"
        assert all(z.scans >= 2 and z.first_seen > 0 for z in listing.zombies), "seen on two scans"
        dry = await admin.reap(dry_run=True)
        assert dry.dry_run and dry.reaped == 0 and dry.outcomes
        assert (await manual.owner_of("items:1")).holder == old.holder, "a dry run changes nothing"
        result = await admin.reap()
        assert result.reaped >= 1 and result.failed == 0, result
        await eventually(lambda: _no_zombies(admin), timeout=60, message="no zombie left")
    new = await eventually(lambda: manual.new_owner("items:1", old.epoch), timeout=30, message="n2 takes over")
    assert new.node_id == "n2"
    await manual.execute("update items set v = 3 where id = 1")
    await eventually(lambda: survivors[0].value_of(1) == 3, message="the surviving client converges")


async def _no_zombies(admin: AdminClient) -> bool:
    return not (await admin.zombies()).zombies


async def test_a_restart_at_once_leaves_no_zombie_now(manual: ItemsCluster) -> None:
    """What used to leave a dead session holding its topics forever (the defects issue) leaves nothing."""
    n1, n2 = await manual.start_nodes(2)
    await manual.watch([n1], ("items:1",))
    await manual.watch([n2], ("items:1",))
    old = await manual.owner_of("items:1")
    await manual.restart("n1")
    async with api(manual, "n2") as admin:
        await eventually(lambda: manual.new_owner("items:1", old.epoch), timeout=30, message="a new owner")
        await eventually(lambda: _no_zombies(admin), timeout=30, message="no zombie after a restart")


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "per-topic"])
async def test_a_database_call_that_cannot_stop_is_a_stuck_query_until_reaped(manual: ItemsCluster, merged) -> None:
    """A hung database call (its backend frozen) outlives its topic's failover: a real zombie.

    Merged or not, the old owner stops polling the topic at once (its reconcile never
    waits on the database); what is left is the call itself, listed as one stuck query
    with its node, feed, topics and backend pid, and reaped by terminating its connection.
    """
    slow = {**ITEMS_FEED, "statement_timeout": 60.0}
    manual.spec.feeds = {"items": slow}
    manual.spec.settings = {**manual.spec.settings, "database": {"merged_polling": merged}}
    manual.write_config()
    n1, n2 = await manual.start_nodes(2)
    await manual.watch([n1], ("items:1",))
    watchers = await manual.watch([n2], ("items:1",))
    old = await manual.owner_of("items:1")
    pids: set[int] = set()

    async def freeze_n1() -> None:
        # Every backend of n1, including any its pool opens meanwhile (a scan whose query hung
        # holds its connection, so the pool opens another): whichever n1 polls on, it hangs.
        for row in await manual.fetch("select pid from pg_stat_activity where application_name = 'subsys:n1'"):
            if row["pid"] not in pids:
                os.kill(row["pid"], signal.SIGSTOP)
                pids.add(row["pid"])

    try:
        for _ in range(10):  # several poll intervals: n1's next poll is now stuck in a frozen backend
            await freeze_n1()
            await asyncio.sleep(0.1)
        assert pids
        async with api(manual, "n2") as admin:
            moved = await admin.failover("items:1", to="n2")
            assert moved.to_node == "n2"
            listing = await eventually(lambda: kinds_now(admin, {"stuck_query"}), timeout=60,
                                       message="the stuck query is listed")  # fmt: skip
            zombie = next(z for z in listing.zombies if z.kind == "stuck_query")
            evidence = zombie.evidence
            assert zombie.nodes == ["n1"] and evidence["node"] == "n1" and evidence["feed"] == "items"
            assert evidence["topics"] == [{"topic": "items:1", "epoch": old.epoch, "held_by_node": False}]
            assert evidence["pid"] in pids and evidence["age"] > 0, evidence
            query = zombie.subject.split("/", 1)[1]
            assert zombie.actions == [{"do": "terminate_query", "node": "n1", "query": query, "pid": evidence["pid"]}]
            assert not [z for z in listing.zombies if z.kind in ("duplicate_poller", "orphan_poller")], \
                "the topic itself is polled by n2 alone"
            result = await admin.reap(ids=[zombie.id])
            assert result.reaped == 1, result
            await eventually(lambda: _no_zombies(admin), timeout=60, message="reaped")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    await manual.execute("update items set v = 4 where id = 1")
    await eventually(lambda: watchers[0].value_of(1) == 4, message="clients converge")


async def test_an_owner_that_outstays_the_grace_is_an_idle_owner(manual: ItemsCluster) -> None:
    """n1 runs with a grace of 10 minutes (a rollout of a bad setting): it keeps a topic nobody wants."""
    (n1,) = await manual.start_nodes(1, env={"SUBSYS_GRACE_PERIOD": "600"})
    (n2,) = await manual.start_nodes(1)
    (watcher,) = await manual.watch([n1], ("items:1",))
    await watcher.stop()
    manual.watchers.clear()
    async with api(manual, "n2") as admin:
        listing = await eventually(lambda: kinds_now(admin, {"idle_owner"}), timeout=60, message="an idle owner")
        zombie = next(z for z in listing.zombies if z.kind == "idle_owner")
        assert zombie.subject == "items:1" and zombie.nodes == ["n1"] and zombie.evidence["presence"] == []
        await admin.reap(kind="idle_owner")
        await eventually(lambda: _unowned(manual, "items:1"), timeout=30, message="released")
        await eventually(lambda: _no_zombies(admin), timeout=30, message="no zombie left")


async def _unowned(cluster: ItemsCluster, topic: str) -> bool:
    return await cluster.owner_of(topic) is None


async def test_the_janitor_heals_a_dead_owner_long_before_its_ttl(healing: ItemsCluster) -> None:
    cluster = healing
    n1, n2 = await cluster.start_nodes(2)
    await cluster.watch([n1], ("items:1",))
    survivors = await cluster.watch([n2], ("items:1",))
    old = await cluster.owner_of("items:1")
    n1.kill()
    # The check TTL is 30 s; the janitor's death certificate (refused twice) comes much sooner.
    new = await eventually(lambda: cluster.new_owner("items:1", old.epoch), timeout=LONG_TTL / 2,
                           message="taken over before the TTL ran out")  # fmt: skip
    assert new.node_id == "n2"
    await eventually(lambda: any(f["type"] == "resync" for f in survivors[0].data()), message="resync")
    async with api(cluster, "n2") as admin:
        listing = await admin.zombies()
        assert listing.janitor == "n2" and listing.auto_reap and sum(listing.reaped.values()) >= 1
