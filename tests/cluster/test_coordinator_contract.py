"""The coordinator contract (subsys/coordinator/base.py), against both implementations.

Every case runs on ``embedded`` and on ``consul`` (a real Consul agent: the
module's ``consul`` fixture, a fresh key prefix per test). Coordinators are
driven as a node drives them: ``start()``, ``run()`` as a task, and at the end
the run task cancelled, then ``close()``.

The embedded coordinator is single-node: one ``EmbeddedCoordinator`` *is* the
whole cluster, and a second one is another cluster, not a second node. So on
embedded the contract is what one node sees of itself; the cases that need a
second node run on Consul only. The cases at the end are
Consul-only (sessions, incarnations, the agent's registrations) and marked
``consul_only`` in their names.

What "the cluster says" after a coordinator closed is read from the cluster,
not from the closed coordinator: on Consul a fresh consistent read of the
prefix (``read_view``), on embedded the coordinator's own (cleared) view.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from subsys.config import Settings, load_settings
from subsys.coordinator.base import ClusterView, Coordinator
from subsys.coordinator.consul.coordinator import ConsulCoordinator
from subsys.coordinator.consul.view import read_view
from subsys.coordinator.embedded import EmbeddedCoordinator
from subsys.testing.nodes import write_toml

from support import eventually

pytestmark = pytest.mark.timeout(180)

SECRET = "contract-test-secret"
# A long TTL on purpose: nothing here may wait for a check to go critical, so when
# a session dies in these tests it is because something invalidated it, not the TTL.
CHECK_TTL = 30.0
LOCK_DELAY = 0.5
WAIT = 10.0
TIMEOUT = 20.0  # generous waits for conditions; all well under CHECK_TTL
TOPIC = "items:1"


@dataclass
class Backend:
    kind: str
    workdir: Path
    consul_addr: str = ""
    prefix: str = ""
    running: list[tuple[Coordinator, asyncio.Task | None]] = field(default_factory=list)
    abandoned: list[Coordinator] = field(default_factory=list)

    @property
    def multi_node(self) -> bool:
        return self.kind == "consul"

    def settings(self, node_id: str) -> Settings:
        config: dict[str, Any] = {"node": {"node_id": node_id, "host": "127.0.0.1", "port": 1}}
        if self.kind == "consul":
            config["consul"] = {
                "address": self.consul_addr, "prefix": self.prefix, "check_ttl": CHECK_TTL,
                "lock_delay": LOCK_DELAY, "wait": WAIT,
            }  # fmt: skip
            config["secrets"] = {"cluster_secret": SECRET}
        path = write_toml(self.workdir / f"{node_id}-{uuid.uuid4().hex[:6]}.toml", config)
        return load_settings(path, env={})

    def build(self, node_id: str, incarnation: str) -> Coordinator:
        settings = self.settings(node_id)
        if self.kind == "consul":
            return ConsulCoordinator(settings=settings, incarnation=incarnation, version="test")
        return EmbeddedCoordinator(
            node_id=settings.node_id, address=settings.advertise_url, incarnation=incarnation, version="test"
        )

    async def start(self, node_id: str | None = None, incarnation: str | None = None) -> Coordinator:
        """A started coordinator with its ``run()`` task, as a node has it."""
        coordinator = self.build(node_id or f"n-{uuid.uuid4().hex[:8]}", incarnation or uuid.uuid4().hex[:12])
        await coordinator.start()
        task = asyncio.create_task(coordinator.run(), name=f"run {coordinator.node_id}")
        self.running.append((coordinator, task))
        return coordinator

    async def stop(self, coordinator: Coordinator) -> None:
        """Leave as a node does on shutdown: stop the loops, then ``close()``."""
        for index, (running, task) in enumerate(self.running):
            if running is coordinator:
                del self.running[index]
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    if not task.cancelled() and task.exception() is not None:
                        raise AssertionError(f"run() of {coordinator.node_id} failed") from task.exception()
                await coordinator.close()
                return
        raise AssertionError(f"{coordinator.node_id} is not running")

    async def abandon(self, coordinator: ConsulCoordinator) -> None:
        """Like SIGKILL: every loop stops at once, nothing is cleaned up (no ``close()``)."""
        for index, (running, task) in enumerate(self.running):
            if running is coordinator:
                del self.running[index]
                assert task is not None
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self.abandoned.append(coordinator)
                return
        raise AssertionError(f"{coordinator.node_id} is not running")

    async def cluster_view(self, coordinator: Coordinator) -> ClusterView:
        """What the cluster says (the only view of a single-node cluster is its coordinator's)."""
        if self.kind == "consul":
            return await read_view(address=self.consul_addr, prefix=self.prefix)
        return coordinator.view

    async def close(self) -> None:
        errors = []
        while self.running:
            try:
                await self.stop(self.running[-1][0])
            except Exception as exc:  # stop every coordinator, then report
                errors.append(exc)
        for coordinator in self.abandoned:
            await coordinator.client.close()  # the HTTP client only: its session is the test's business
        if errors:
            raise errors[0]


@pytest.fixture(params=["embedded", pytest.param("consul", marks=pytest.mark.consul)])
def backend_kind(request) -> tuple[str, str]:
    """``(kind, consul address)``; the module's Consul agent is started only for ``consul``.

    A plain fixture: pytest-asyncio cannot set up the (async) ``consul`` fixture
    from ``getfixturevalue`` inside a running event loop.
    """
    if request.param == "consul":
        return "consul", request.getfixturevalue("consul").servers[0].http_addr
    return "embedded", ""


def new_backend(kind: str, address: str, workdir: Path) -> Backend:
    if kind == "consul":
        return Backend("consul", workdir, consul_addr=address, prefix=f"contract-{uuid.uuid4().hex[:10]}/")
    return Backend("embedded", workdir)


@pytest.fixture
async def backend(backend_kind: tuple[str, str], tmp_path: Path) -> AsyncIterator[Backend]:
    """Either implementation (the test runs once for each)."""
    backend = new_backend(*backend_kind, tmp_path)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def consul_backend(consul, tmp_path: Path) -> AsyncIterator[Backend]:
    """The Consul implementation only, for the Consul-only cases."""
    backend = new_backend("consul", consul.servers[0].http_addr, tmp_path)
    try:
        yield backend
    finally:
        await backend.close()


async def view_until(coordinator: Coordinator, predicate: Callable[[ClusterView], Any], what: str) -> int:
    """Wait for the coordinator's view to satisfy ``predicate`` by ``wait_changed`` alone (no polling).

    If a change did not wake ``wait_changed``, this would sleep to its deadline and fail.
    Returns the generation at which it held.
    """
    deadline = time.monotonic() + TIMEOUT
    seen = coordinator.generation
    while not predicate(coordinator.view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the view of {coordinator.node_id} never showed {what}: {coordinator.view}")
        seen = await coordinator.wait_changed(seen, remaining)
    return seen


async def publishing(coordinator: Coordinator, topic: str, epoch: int) -> bool:
    return await eventually(
        lambda: coordinator.can_publish(topic, epoch), timeout=TIMEOUT,
        message=f"{coordinator.node_id} may publish {topic} at epoch {epoch}",
    )  # fmt: skip


# -- ownership ---------------------------------------------------------------------


async def test_acquire_returns_a_record_held_by_us(backend: Backend) -> None:
    c = await backend.start()
    record = await c.acquire(TOPIC, reason="contract")
    assert record is not None
    assert c.holds(record)
    assert (record.topic, record.node_id, record.address) == (TOPIC, c.node_id, c.address)
    assert record.reason == "contract"
    assert record.incarnation == c.incarnation
    assert record.epoch > 0
    assert c.view.owners.get(TOPIC) == record  # the coordinator's own view has it at once
    assert c.owned() == {TOPIC: record}
    await view_until(c, lambda v: v.owners.get(TOPIC) == record, "our owner record")


async def test_acquire_by_the_holder_again_keeps_it_held_and_never_lowers_the_epoch(backend: Backend) -> None:
    c = await backend.start()
    first = await c.acquire(TOPIC)
    assert first is not None
    again = await c.acquire(TOPIC)
    assert again is not None and c.holds(again)
    assert again.epoch >= first.epoch
    assert c.holds(c.view.owners.get(TOPIC))


async def test_a_second_node_cannot_acquire_a_held_topic(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    record = await a.acquire(TOPIC)
    assert record is not None
    assert b.ready  # so the refusal below is about the held key, not about b
    assert await b.acquire(TOPIC) is None
    await view_until(b, lambda v: TOPIC in v.owners, "a's ownership")
    seen = b.view.owners[TOPIC]
    assert seen.node_id == a.node_id and seen.epoch == record.epoch
    assert not b.holds(seen)
    assert not b.can_publish(TOPIC, record.epoch)
    assert b.owned() == {}
    assert await publishing(a, TOPIC, record.epoch)


async def test_concurrent_acquisitions_have_exactly_one_winner(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    nodes = [await backend.start() for _ in range(3)]
    results = await asyncio.gather(*(c.acquire(TOPIC) for c in nodes))
    winners = [(c, r) for c, r in zip(nodes, results) if r is not None]
    assert len(winners) == 1, results
    winner, record = winners[0]
    for c in nodes:
        await view_until(c, lambda v: v.owners.get(TOPIC) is not None and v.owners[TOPIC].epoch == record.epoch,
                         "the winner's record")  # fmt: skip
        assert c.holds(c.view.owners[TOPIC]) == (c is winner)


async def test_release_at_the_acquired_epoch_frees_the_topic(backend: Backend) -> None:
    c = await backend.start()
    record = await c.acquire(TOPIC)
    assert record is not None
    await c.release(TOPIC, record.epoch)
    assert TOPIC not in c.view.owners
    assert c.owned() == {}
    assert TOPIC not in (await backend.cluster_view(c)).owners


async def test_a_release_for_a_node_shows_its_reservation_in_the_releasers_view_at_once(backend: Backend) -> None:
    """Before any watch fires: else the old owner's own reconcile takes the topic straight back."""
    c = await backend.start()
    record = await c.acquire(TOPIC)
    assert record is not None
    assert await c.release(TOPIC, record.epoch, to="elsewhere", reason="contract")
    reservation = c.view.reservations.get(TOPIC)
    assert reservation is not None and reservation.for_node == "elsewhere", c.view.reservations
    assert reservation.active(time.time()) and reservation.from_epoch == record.epoch
    assert TOPIC not in c.view.owners


async def test_release_at_a_wrong_epoch_does_not_free_the_topic(backend: Backend) -> None:
    c = await backend.start()
    record = await c.acquire(TOPIC)
    assert record is not None
    for wrong in (record.epoch - 1, record.epoch + 1):
        await c.release(TOPIC, wrong)
        assert c.holds(c.view.owners.get(TOPIC)), wrong
        assert c.view.owners[TOPIC].epoch == record.epoch
        cluster = await backend.cluster_view(c)
        assert cluster.owners[TOPIC].epoch == record.epoch, wrong
    assert await publishing(c, TOPIC, record.epoch)


async def test_a_second_node_acquires_after_a_release_but_not_after_a_wrong_epoch_release(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    record = await a.acquire(TOPIC)
    assert record is not None
    await a.release(TOPIC, record.epoch + 1)
    assert await b.acquire(TOPIC) is None
    await a.release(TOPIC, record.epoch)
    taken = await eventually(lambda: b.acquire(TOPIC), timeout=TIMEOUT, message="b acquires the released topic")
    assert b.holds(taken)
    assert taken.epoch > record.epoch


async def test_epochs_strictly_increase_when_the_same_node_acquires_again(backend: Backend) -> None:
    c = await backend.start()
    epochs = []
    for _ in range(3):
        record = await c.acquire(TOPIC)
        assert record is not None and c.holds(record)
        epochs.append(record.epoch)
        await c.release(TOPIC, record.epoch)
    assert epochs == sorted(set(epochs)), epochs


async def test_epochs_strictly_increase_when_another_node_acquires_after_a_release(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    epochs = []
    for taker in (a, b, a, b):
        record = await eventually(lambda: taker.acquire(TOPIC), timeout=TIMEOUT, message=f"{taker.node_id} acquires")
        assert taker.holds(record)
        epochs.append(record.epoch)
        await taker.release(TOPIC, record.epoch)
    assert epochs == sorted(set(epochs)), epochs


async def test_epochs_of_different_topics_never_collide_with_a_reacquisition(backend: Backend) -> None:
    c = await backend.start()
    first = await c.acquire("items:1")
    other = await c.acquire("items:2")
    assert first is not None and other is not None
    await c.release("items:1", first.epoch)
    again = await c.acquire("items:1")
    assert again is not None and again.epoch > first.epoch


# -- fencing -----------------------------------------------------------------------------


async def test_can_publish_only_while_held_at_that_epoch(backend: Backend) -> None:
    c = await backend.start()
    assert not c.can_publish(TOPIC, 1)  # not held at all
    record = await c.acquire(TOPIC)
    assert record is not None
    assert await publishing(c, TOPIC, record.epoch)
    assert not c.can_publish(TOPIC, record.epoch - 1)
    assert not c.can_publish(TOPIC, record.epoch + 1)
    assert not c.can_publish("items:2", record.epoch)
    await c.release(TOPIC, record.epoch)
    assert not c.can_publish(TOPIC, record.epoch)


async def test_can_publish_turns_false_once_the_view_shows_another_owner(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    record = await a.acquire(TOPIC)
    assert record is not None
    assert await publishing(a, TOPIC, record.epoch)
    # a never releases: its key is removed behind its back (an operator, say), and b takes it.
    assert isinstance(b, ConsulCoordinator)
    await b.client.kv_delete(b.keys.owner(TOPIC))
    taken = await eventually(lambda: b.acquire(TOPIC), timeout=TIMEOUT, message="b acquires")
    await view_until(a, lambda v: v.owners.get(TOPIC) is not None and v.owners[TOPIC].epoch == taken.epoch,
                     "b's ownership")  # fmt: skip
    assert not a.can_publish(TOPIC, record.epoch)
    assert not a.can_publish(TOPIC, taken.epoch)
    assert not a.holds(a.view.owners[TOPIC])
    assert a.owned() == {}


async def test_can_publish_is_false_after_close(backend: Backend) -> None:
    c = await backend.start()
    record = await c.acquire(TOPIC)
    assert record is not None
    assert await publishing(c, TOPIC, record.epoch)
    await backend.stop(c)
    assert not c.can_publish(TOPIC, record.epoch)
    assert not c.ready


# -- presence and the change signal -----------------------------------------------------------


async def test_presence_set_and_unset_show_in_the_view_and_wake_wait_changed(backend: Backend) -> None:
    c = await backend.start()
    start = c.generation
    waiter = asyncio.create_task(c.wait_changed(start, TIMEOUT))
    await c.set_presence(TOPIC, True)
    shown = await view_until(c, lambda v: c.node_id in v.presence.get(TOPIC, set()), "our presence")
    assert shown > start
    assert await waiter > start  # a waiter from before the change was woken by it
    waiter = asyncio.create_task(c.wait_changed(shown, TIMEOUT))
    await c.set_presence(TOPIC, False)
    gone = await view_until(c, lambda v: c.node_id not in v.presence.get(TOPIC, set()), "our presence gone")
    assert gone > shown
    assert await waiter > shown
    assert TOPIC not in (await backend.cluster_view(c)).presence


async def test_presence_is_per_topic(backend: Backend) -> None:
    c = await backend.start()
    await c.set_presence("items:1", True)
    await c.set_presence("items:2", True)
    await view_until(c, lambda v: {"items:1", "items:2"} <= set(v.presence), "both presences")
    await c.set_presence("items:1", False)
    await view_until(c, lambda v: "items:1" not in v.presence and c.node_id in v.presence.get("items:2", set()),
                     "only items:2")  # fmt: skip


async def test_presence_of_two_nodes_shows_in_both_views(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    await a.set_presence(TOPIC, True)
    await b.set_presence(TOPIC, True)
    both = {a.node_id, b.node_id}
    for c in (a, b):
        await view_until(c, lambda v: v.presence.get(TOPIC) == both, "both nodes' presence")
    await a.set_presence(TOPIC, False)
    for c in (a, b):
        await view_until(c, lambda v: v.presence.get(TOPIC) == {b.node_id}, "only b's presence")


async def test_acquire_and_release_move_the_generation_and_wake_wait_changed(backend: Backend) -> None:
    c = await backend.start()
    before = c.generation
    waiter = asyncio.create_task(c.wait_changed(before, TIMEOUT))
    record = await c.acquire(TOPIC)
    assert record is not None
    assert await waiter > before
    held = c.generation
    waiter = asyncio.create_task(c.wait_changed(held, TIMEOUT))
    await c.release(TOPIC, record.epoch)
    assert await waiter > held


async def test_wait_changed_returns_at_once_when_the_generation_already_moved(backend: Backend) -> None:
    c = await backend.start()
    seen = c.generation
    await c.set_presence(TOPIC, True)
    await view_until(c, lambda v: TOPIC in v.presence, "our presence")
    # The change happened before the call: it returns without waiting for its (long) timeout.
    assert await asyncio.wait_for(c.wait_changed(seen, 3600), TIMEOUT) > seen


# -- membership and leaving ----------------------------------------------------------------------


async def test_nodes_has_this_node_while_started_and_not_after_close(backend: Backend) -> None:
    c = await backend.start()
    assert c.ready
    assert c.node_id in c.view.nodes  # start() returns once the first view is loaded
    me = c.view.nodes[c.node_id]
    assert (me.address, me.incarnation) == (c.address, c.incarnation)
    assert c.node_id in (await backend.cluster_view(c)).nodes
    await backend.stop(c)
    assert not c.ready
    assert c.node_id not in (await backend.cluster_view(c)).nodes


async def test_another_node_sees_a_node_join_and_leave(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    observer = await backend.start()
    c = await backend.start()
    await view_until(observer, lambda v: c.node_id in v.nodes, "the new node")
    assert observer.view.nodes[c.node_id].incarnation == c.incarnation
    await backend.stop(c)
    await view_until(observer, lambda v: c.node_id not in v.nodes, "the node gone")
    assert observer.node_id in observer.view.nodes


async def test_close_drops_every_key_this_node_held(backend: Backend) -> None:
    c = await backend.start()
    owned = [await c.acquire(topic) for topic in ("items:1", "items:2")]
    assert all(record is not None for record in owned)
    for topic in ("items:1", "items:3"):
        await c.set_presence(topic, True)
    await view_until(c, lambda v: {"items:1", "items:3"} <= set(v.presence), "our presences")
    await backend.stop(c)
    cluster = await backend.cluster_view(c)
    assert cluster.owners == {}
    assert cluster.presence == {}
    assert c.node_id not in cluster.nodes


async def test_close_drops_only_this_nodes_keys(consul_backend: Backend) -> None:
    backend = consul_backend  # two nodes: a cluster, which only Consul makes
    a = await backend.start()
    b = await backend.start()
    record_a = await a.acquire("items:1")
    record_b = await b.acquire("items:2")
    assert record_a is not None and record_b is not None
    await a.set_presence("items:1", True)
    await b.set_presence("items:1", True)
    await view_until(b, lambda v: v.presence.get("items:1") == {a.node_id, b.node_id}, "both presences")
    await backend.stop(a)
    await view_until(b, lambda v: "items:1" not in v.owners and a.node_id not in v.nodes
                     and v.presence.get("items:1") == {b.node_id}, "a's keys gone")  # fmt: skip
    assert b.view.owners["items:2"].epoch == record_b.epoch
    assert await publishing(b, "items:2", record_b.epoch)
    # and a's topic is free for b at once (an explicit leave imposes no lock-delay worth waiting on)
    taken = await eventually(lambda: b.acquire("items:1"), timeout=TIMEOUT, message="b takes a's topic")
    assert taken.epoch > record_a.epoch


# -- Consul only: sessions, incarnations, the watch ---------------------------------------------------
#
# Not run on embedded: it has no sessions, checks, incarnations or watch to get wrong.

consul_only = pytest.mark.consul


@consul_only
async def test_consul_only_a_lost_session_fences_reregisters_and_its_old_keys_are_gone(
    consul_backend: Backend,
) -> None:
    backend = consul_backend
    c = await backend.start()
    assert isinstance(c, ConsulCoordinator)
    record = await c.acquire(TOPIC)
    assert record is not None
    await c.set_presence(TOPIC, True)
    assert await publishing(c, TOPIC, record.epoch)
    old = c.session
    assert old is not None

    await c.client.destroy_session(old)

    await eventually(lambda: not c.can_publish(TOPIC, record.epoch), timeout=TIMEOUT, message="fenced")
    await eventually(lambda: c.session not in (None, old) and c.ready, timeout=TIMEOUT,
                     message="registered again with a new session")  # fmt: skip
    assert not c.holds(record)
    assert not c.can_publish(TOPIC, record.epoch)

    async def old_keys_gone() -> bool:
        cluster = await backend.cluster_view(c)
        assert TOPIC not in cluster.owners, cluster.owners  # the old session's owner key went with it
        me = cluster.nodes.get(c.node_id)
        assert me is not None and me.holder == c.session, me  # the node key, written again
        return True

    await eventually(old_keys_gone, timeout=TIMEOUT, message="the old session's keys gone")

    async def presence_rewritten() -> bool:  # what this node wanted is written again by the new session
        entry = await c.client.kv_get(c.keys.presence(TOPIC, c.node_id))
        return entry is not None and entry.session == c.session

    await eventually(presence_rewritten, timeout=TIMEOUT, message="presence held by the new session")
    sessions = [s["ID"] for s in await c.client.list_sessions() if s.get("Name") == c.keys.session_name(c.node_id)]
    assert sessions == [c.session]
    # The node acquires anew (after the lock-delay of the destroyed session) at a higher epoch.
    again = await eventually(lambda: c.acquire(TOPIC), timeout=TIMEOUT, message="acquires again")
    assert c.holds(again) and again.epoch > record.epoch
    assert await publishing(c, TOPIC, again.epoch)


@consul_only
async def test_consul_only_a_new_incarnation_replaces_an_abandoned_one_at_once(consul_backend: Backend) -> None:
    backend = consul_backend
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    first = await backend.start(node_id, incarnation="first")
    assert isinstance(first, ConsulCoordinator)
    record = await first.acquire(TOPIC)
    assert record is not None
    await first.set_presence(TOPIC, True)
    old_session = first.session
    assert old_session is not None

    await backend.abandon(first)  # SIGKILL: no close(), its check is not passed any more...
    second = await backend.start(node_id, incarnation="second")  # ...and it restarts at once
    assert isinstance(second, ConsulCoordinator)
    assert second.session not in (None, old_session)

    # The old check's TTL is CHECK_TTL (far longer than these waits): the old session
    # ends because the new incarnation replaced it, not because its check expired.
    async def old_session_invalid() -> bool:
        return await second.client.session_info(old_session) is None

    await eventually(old_session_invalid, timeout=TIMEOUT, message="the old session invalidated")

    async def old_keys_gone() -> bool:
        cluster = await backend.cluster_view(second)
        assert TOPIC not in cluster.owners, cluster.owners
        assert TOPIC not in cluster.presence, cluster.presence
        me = cluster.nodes.get(node_id)
        assert me is not None and me.holder == second.session and me.incarnation == "second", me
        return True

    await eventually(old_keys_gone, timeout=TIMEOUT, message="the old incarnation's keys gone")

    services = [s for s in (await second.client.agent_services()).values()
                if s.get("ID") == second.service_id or (s.get("Meta") or {}).get("node") == node_id]  # fmt: skip
    assert len(services) == 1, services
    assert services[0]["Meta"]["incarnation"] == "second"
    checks = [c for c in (await second.client.agent_checks()).values()
              if c.get("ServiceID") == second.service_id or second.keys.incarnation_of_check(node_id, c.get("CheckID", ""))]  # fmt: skip
    assert [c["CheckID"] for c in checks] == [second.check_id], checks
    sessions = [s["ID"] for s in await second.client.list_sessions() if s.get("Name") == second.keys.session_name(node_id)]
    assert sessions == [second.session]

    taken = await eventually(lambda: second.acquire(TOPIC), timeout=TIMEOUT, message="the new incarnation acquires")
    assert second.holds(taken) and taken.epoch > record.epoch


@consul_only
async def test_consul_only_a_listing_from_before_a_release_does_not_bring_the_ownership_back(
    consul_backend: Backend,
) -> None:
    """A watch answer that was on its way while the node released must not undo the release.

    The owners watch's answer that shows our fresh acquisition is held back (as a busy
    event loop would) until after ``release()``; applying it late must not put the
    released key back in the view, where ``can_publish`` would say yes again.
    """
    c = await consul_backend.start()
    assert isinstance(c, ConsulCoordinator)
    owners_prefix = c.keys.part("owners")
    held_back = asyncio.Event()
    go_on = asyncio.Event()
    real_kv_list = c.client.kv_list

    async def late_kv_list(prefix: str, **kwargs: Any):
        entries, index = await real_kv_list(prefix, **kwargs)
        if prefix == owners_prefix and kwargs.get("wait") and not go_on.is_set() and any(e.session for e in entries):
            held_back.set()
            await go_on.wait()
        return entries, index

    c.client.kv_list = late_kv_list  # type: ignore[method-assign]
    record = await c.acquire(TOPIC)
    assert record is not None
    await asyncio.wait_for(held_back.wait(), TIMEOUT)  # the watch has the listing with our key...
    await c.release(TOPIC, record.epoch)  # ...and we release before it is applied
    assert not c.can_publish(TOPIC, record.epoch)

    # Record what the view says after each owners listing is applied from now on.
    states: list[tuple[bool, bool]] = []
    real_apply = c._apply

    def recording_apply(part: str, entries: list) -> bool:
        changed = real_apply(part, entries)
        if part == "owners":
            states.append((TOPIC in c.view.owners, c.can_publish(TOPIC, record.epoch)))
        return changed

    c._apply = recording_apply  # type: ignore[method-assign]
    go_on.set()
    # The late listing, then the next one (asked for at the late one's index: answered
    # at once, the delete came after it).
    await eventually(lambda: len(states) >= 2, timeout=TIMEOUT, message="two owners listings applied")
    assert states[:2] == [(False, False), (False, False)], states
    assert not c.can_publish(TOPIC, record.epoch)
    # A later acquisition by another node shows as usual (nothing hides newer epochs).
    other = await consul_backend.start()
    taken = await eventually(lambda: other.acquire(TOPIC), timeout=TIMEOUT, message="another node acquires")
    assert taken.epoch > record.epoch
    await view_until(c, lambda v: v.owners.get(TOPIC) == taken, "the other node's ownership")
    assert not c.can_publish(TOPIC, taken.epoch)
