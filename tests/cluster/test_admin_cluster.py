"""The admin API across a Consul cluster: any node answers for all, failover, drain, dead peers, fuzzing."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from subsys.client.admin import AdminClient

from conftest import ItemsCluster
from support import eventually

pytestmark = pytest.mark.consul


def admin(cluster: ItemsCluster, *names: str) -> AdminClient:
    return AdminClient([cluster.nodes[n].url for n in names or list(cluster.nodes)], token=cluster.admin_token)


async def test_any_node_answers_for_the_whole_cluster(cluster: ItemsCluster) -> None:
    n1, n2, n3 = await cluster.start_nodes(3)
    await cluster.watch([n1], ("items:1",))  # n1 owns it
    await cluster.watch([n2], ("items:1", "items:2"))
    async with admin(cluster, "n3") as api:
        nodes = await api.nodes()
        assert [n.node for n in nodes.nodes] == ["n1", "n2", "n3"] and not nodes.partial
        assert all(n.reachable and n.health == "ok" and n.session for n in nodes.nodes)
        page = await eventually(lambda: _topics(api, 2), message="both topics, seen from n3")
        one = next(t for t in page.topics if t.topic == "items:1")
        assert one.owner == "n1" and one.presence == {"n1": 1, "n2": 1} and one.subscribers == 2
        assert one.polls > 0 and one.last_poll_ms is not None, "poll timings come from the owner"
        by_owner = await api.topics(owner="n1")
        assert [t.topic for t in by_owner.topics] == ["items:1"]
        summary = await api.cluster()
        assert summary.coordinator == "consul" and summary.nodes == 3 and summary.nodes_ready == 3
        assert summary.answered_by == "n3"


async def _topics(api: AdminClient, count: int):
    page = await api.topics()
    return page if page.total == count and all(t.owner for t in page.topics) else None


async def test_forced_failover_moves_the_poller_and_records_why(cluster: ItemsCluster) -> None:
    n1, n2, n3 = await cluster.start_nodes(3)
    watchers = await cluster.watch([n1, n2, n3], ("items:1",))
    owner, epoch = await cluster.owner()
    target = next(name for name in ("n1", "n2", "n3") if name != owner.name)
    async with admin(cluster) as api:
        result = await api.failover("items:1", to=target)
        assert result.to_node == target and result.from_node == owner.name
        assert result.epoch_after > result.epoch_before == epoch
        since = time.time()
        for watcher in watchers:
            await eventually(lambda w=watcher: any(f["type"] == "resync" and f["epoch"] == result.epoch_after
                                                   for f in w.data()), message=f"{watcher.name} resyncs")  # fmt: skip
            assert not watcher.epoch_regressions and not watcher.duplicate_snapshots
        await cluster.execute("update items set v = 11 where id = 1")
        await eventually(lambda: all(w.value_of(1) == 11 for w in watchers), message="diffs after the move")
        polls = await cluster.polls_since(since)
        assert list(polls) == [f"subsys:{target}"], f"the poller moved to {target}: {polls}"
        detail = await api.topic("items:1")
        assert detail.owner == target and detail.owner_reason.startswith("forced failover by operator:")
        released = [h for h in detail.history if h.event == "released" and h.node == owner.name]
        assert released and released[-1].to == target and released[-1].reason.startswith("forced failover")
        gaps = [h.gap_ms for h in detail.history if h.event == "epoch" and h.to_epoch == result.epoch_after]
        assert gaps and all(g is not None for g in gaps), "the publishing gap is measured"
        without_target = await api.failover("items:1")
        assert without_target.to_node != target and without_target.epoch_after > result.epoch_after


async def test_drain_empties_a_node_while_its_clients_keep_receiving(cluster: ItemsCluster) -> None:
    n1, n2 = await cluster.start_nodes(2)
    watchers = await cluster.watch([n1], ("items:1", "items:2"))  # n1 owns both
    await cluster.watch([n2], ("items:1",))
    async with admin(cluster, "n2") as api:
        result = await api.drain("n1")
        assert result.remaining == 0 and result.moved == 2
        owners = await cluster.owners()
        assert {r.node_id for r in owners.values()} == {"n2"}
        await cluster.execute("update items set v = 21 where id in (1, 3)")
        for watcher in watchers:
            row = 1 if watcher.topic == "items:1" else 3
            await eventually(lambda w=watcher, r=row: w.value_of(r) == 21, message="the drained node still serves")
            assert not watcher.epoch_regressions
        node = await api.node("n1")
        assert node.draining and node.owned == 0 and node.health == "unavailable"
        await api.undrain("n1")
        assert not (await api.node("n1")).draining


async def test_a_dead_peer_makes_a_partial_answer_not_an_error(cluster: ItemsCluster) -> None:
    n1, n2, n3 = await cluster.start_nodes(3)
    await cluster.watch([n2], ("items:1",))
    cluster.pause("n3")  # alive to Consul for a moment, silent to everyone
    try:
        async with admin(cluster, "n1") as api:
            nodes = await api.nodes()
            assert nodes.partial and [p.node for p in nodes.unavailable] == ["n3"]
            assert next(n for n in nodes.nodes if n.node == "n3").health == "unreachable"
            page = await api.topics()
            assert page.partial and page.total == 1
    finally:
        cluster.resume("n3")


async def test_the_live_admin_api_matches_its_openapi_document_under_fuzzing(cluster: ItemsCluster, tmp_path: Path) -> None:
    """A short schemathesis run: no 5xx, every response matches the document."""
    n1, n2 = await cluster.start_nodes(2)
    await cluster.watch([n1, n2], ("items:1",))
    async with admin(cluster, "n1") as api:
        spec = await api.openapi()
        # Every real response of the routes above also validates against the document.
        checker = OpenAPI.from_dict(spec)
        for path in ("/cluster", "/nodes", "/topics", "/topics/items:1", "/nodes/n2", "/whoami"):
            raw = await api._request("GET", path)
            request = MockRequest(n1.url, "get", "/admin/v1" + path)
            checker.validate_response(request, MockResponse(json.dumps(raw).encode()))
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(spec))
    runner = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert runner, "schemathesis is a test dependency"
    proc = await asyncio.create_subprocess_exec(
        runner, "run", str(schema_file), "--url", n1.url, "-H", f"Authorization: Bearer {cluster.admin_token}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples", "15", "--seed", "7", "--request-timeout", "60", "--phases", "examples,fuzzing",
        "--exclude-path-regex", "/events$", "--workers", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    for node in cluster.running():
        log = node.logs()
        at = log.find("Traceback")
        assert at < 0, log[max(0, at - 1500) : at + 3000]


async def test_a_read_token_reads_but_cannot_act(cluster: ItemsCluster) -> None:
    (n1,) = await cluster.start_nodes(1)
    await cluster.watch([n1], ("items:1",))
    async with AdminClient(n1.url, token=cluster.admin_read_token) as api:
        assert (await api.whoami()).read_only
        assert (await api.topics()).total == 1
        from subsys.client.admin import Forbidden

        with pytest.raises(Forbidden):
            await api.failover("items:1")
        with pytest.raises(Forbidden):
            await api.drain("n1")


async def test_a_drain_of_many_topics_hands_every_one_over_without_a_gap(cluster: ItemsCluster) -> None:
    """Each topic is released *for* a chosen node: none is left unowned, not even for a moment."""
    n1, n2 = await cluster.start_nodes(2)
    topics = tuple(f"items:{i}" for i in range(1, 41))
    await cluster.watch([n1], topics)
    await cluster.watch([n2], topics[:5])
    owners = await eventually(lambda: _all_owned_by(cluster, topics, "n1"), message="n1 owns all 40")
    assert len(owners) == 40
    async with admin(cluster, "n2") as api:
        result = await api.drain("n1")
        assert result.moved == 40 and result.remaining == 0, result
        after = await cluster.owners()
        assert sorted(after) == sorted(topics), "no topic left without an owner after the drain"
        assert {r.node_id for r in after.values()} == {"n2"}
        summary = await api.cluster()
        assert summary.unowned == 0


async def _all_owned_by(cluster: ItemsCluster, topics: tuple[str, ...], node: str):
    owners = await cluster.owners()
    return owners if all(owners.get(t) and owners[t].node_id == node for t in topics) else None
