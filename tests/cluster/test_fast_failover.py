"""Failover sooner than the check TTL, with a death certificate, and never on mere silence.

The check TTL is long here (10 s) so the two paths cannot be mistaken for
each other: a takeover well inside it came from a death certificate (the
owner's address refused connections twice), one after it from Consul's TTL.
The figures themselves are `subsys bench failover`'s; these tests assert the
mechanism and its safety.
"""

from __future__ import annotations

import socket
import time

import pytest

from subsys.client.admin import AdminClient

from conftest import ItemsCluster, items_cluster, items_spec
from support import Watcher, eventually

pytestmark = pytest.mark.consul

TTL = 10.0


@pytest.fixture
async def slow_ttl(consul, items_db, tmp_path, request):
    # No janitor: it would certify dead owners too; here the followers must.
    spec = items_spec(items_db, consul={"check_ttl": TTL, "lock_delay": 0.5}, node={"zombie_interval": 0})
    async with items_cluster(spec, consul=consul, workdir=tmp_path, request=request) as cluster:
        yield cluster


async def three_with_n1_owning(cluster: ItemsCluster) -> tuple[list[Watcher], object]:
    n1, n2, n3 = await cluster.start_nodes(3)
    await cluster.watch([n1], ("items:1",))
    survivors = await cluster.watch([n2, n3], ("items:1",))
    owner = await cluster.owner_of("items:1")
    assert owner.node_id == "n1"
    return survivors, owner


def resync_time(watcher: Watcher, above: int) -> float | None:
    return next((at for at, f in watcher.frames if f["type"] == "resync" and f["epoch"] > above), None)


async def certificates(cluster: ItemsCluster, node: str) -> int:
    async with AdminClient(cluster.nodes[node].url, token=cluster.admin_token) as admin:
        info = await admin.node(node)
    return int((info.peer_links or {}).get("death_certificates", 0))


@pytest.mark.parametrize("restart", [False, True], ids=["stays-dead", "restarted-at-once"])
async def test_a_killed_owner_is_certified_dead_and_replaced_long_before_its_ttl(
    slow_ttl: ItemsCluster, restart: bool
) -> None:
    survivors, owner = await three_with_n1_owning(slow_ttl)
    killed_at = time.monotonic()
    if restart:
        await slow_ttl.restart("n1", wait=False)
    else:
        slow_ttl.kill("n1")
    for watcher in survivors:
        await eventually(lambda w=watcher: resync_time(w, owner.epoch), timeout=3 * TTL, message="a resync")
        took = resync_time(watcher, owner.epoch) - killed_at
        assert took < TTL / 2, f"{watcher.name}: takeover after {took:.1f}s: not the fast path"
        assert not watcher.epoch_regressions and not watcher.duplicate_snapshots
    if not restart:
        certified = sum([await certificates(slow_ttl, n) for n in ("n2", "n3")])
        assert certified >= 1, "a follower certified the dead owner"
    await slow_ttl.execute("update items set v = 5 where id = 1")
    for watcher in survivors:
        await eventually(lambda w=watcher: w.value_of(1) == 5, message="data flows from the new owner")


async def test_a_stopped_owner_gets_no_certificate_and_fails_over_only_by_its_ttl(slow_ttl: ItemsCluster) -> None:
    survivors, owner = await three_with_n1_owning(slow_ttl)
    stopped_at = time.monotonic()
    slow_ttl.pause("n1")
    try:
        for watcher in survivors:
            await eventually(lambda w=watcher: resync_time(w, owner.epoch), timeout=4 * TTL, message="TTL failover")
            took = resync_time(watcher, owner.epoch) - stopped_at
            assert took > TTL - 2.5, f"{watcher.name}: taken over after {took:.1f}s, before the TTL could expire"
        assert sum([await certificates(slow_ttl, n) for n in ("n2", "n3")]) == 0
    finally:
        slow_ttl.resume("n1")
    for watcher in survivors:
        assert not watcher.epoch_regressions


async def test_an_address_that_accepts_but_never_answers_gets_no_certificate(slow_ttl: ItemsCluster) -> None:
    """The owner dies and something else holds its port, accepting and saying nothing: silence, not death."""
    survivors, owner = await three_with_n1_owning(slow_ttl)
    port = slow_ttl.nodes["n1"].port
    slow_ttl.kill("n1")
    await slow_ttl.nodes["n1"].wait(timeout=30)
    killed_at = time.monotonic()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(128)  # accepts (the kernel completes handshakes), never reads or answers
    try:
        for watcher in survivors:
            await eventually(lambda w=watcher: resync_time(w, owner.epoch), timeout=4 * TTL, message="TTL failover")
            took = resync_time(watcher, owner.epoch) - killed_at
            assert took > TTL - 2.5, f"{watcher.name}: taken over after {took:.1f}s without a certificate"
        assert sum([await certificates(slow_ttl, n) for n in ("n2", "n3")]) == 0
    finally:
        squatter.close()
    for watcher in survivors:
        assert not watcher.epoch_regressions
