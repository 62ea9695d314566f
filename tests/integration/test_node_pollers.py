"""One poller per topic, proved from the database side, and the grace period.

The feed calls ``logged_items($1)``, a VOLATILE plpgsql function that
records each execution in ``poll_log`` with the session's
``application_name`` (the node sets it to ``subsys:<node_id>``), so the
database itself counts how often, and by whom, the feed was run.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from subsys.client.ws import connect

from support import Subscription, db_execute, db_fetch, db_fetchval, eventually

pytestmark = pytest.mark.timeout(90)

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items VALUES (1, 1, 10), (2, 1, 20), (3, 2, 30);
CREATE TABLE poll_log (
    n    bigserial PRIMARY KEY,
    app  text NOT NULL,
    grp  int NOT NULL,
    at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION logged_items(p int) RETURNS TABLE (id int, qty int)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO poll_log (app, grp) VALUES (current_setting('application_name'), p);
    RETURN QUERY SELECT i.id, i.qty FROM items i WHERE i.grp = p ORDER BY i.id;
END
$$;
"""

INTERVAL = 0.1
FEED = {"sql": "SELECT * FROM logged_items($1)", "key": "id", "param": "int", "interval": INTERVAL}


async def poll_count(url: str, grp: int = 1) -> int:
    return await db_fetchval(url, "SELECT count(*) FROM poll_log WHERE grp = $1", grp)


async def metric(node, name: str) -> float:
    status, text = await node.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_two_clients_one_topic_one_poller(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url)

    async with connect(node.ws_url) as c1, connect(node.ws_url) as c2:
        # Subscribe both at once: the node must not race itself into two pollers.
        s1, s2 = Subscription(c1, "items:1"), Subscription(c2, "items:1")
        f1, f2 = await asyncio.gather(s1.next(), s2.next())
        assert f1["type"] == f2["type"] == "snapshot"
        assert len(node.node.registry.get("items:1").local) == 2

        # Measure the feed's executions over a window, with the database's clock.
        window = 2.0
        t0 = await db_fetchval(database_url, "SELECT clock_timestamp()")
        await asyncio.sleep(window)
        t1 = await db_fetchval(database_url, "SELECT clock_timestamp()")
        rows = await db_fetch(
            database_url, "SELECT app, at FROM poll_log WHERE grp = 1 AND at >= $1 AND at < $2 ORDER BY at", t0, t1
        )
        seconds = (t1 - t0).total_seconds()
        one_poller = seconds / INTERVAL  # ~20: a second poller would double it
        assert {r["app"] for r in rows} == {node.application_name}, "only this node's pool runs the feed"
        assert 3 <= len(rows) <= 1.5 * one_poller + 2, (
            f"{len(rows)} polls in {seconds:.2f}s at interval {INTERVAL}s: expected one poller (~{one_poller:.0f})"
        )
        # Two pollers would interleave: with one, consecutive polls are about an interval apart.
        gaps = sorted((b["at"] - a["at"]).total_seconds() for a, b in zip(rows, rows[1:]))
        median_gap = gaps[len(gaps) // 2]
        assert median_gap >= 0.75 * INTERVAL, f"median gap between polls {median_gap:.3f}s: more than one poller"

        # The node agrees: one poller, and /metrics says so too.
        assert node.node.running_pollers() == {"items:1": 1}
        assert await metric(node, "subsys_pollers") == 1
        status, health = await node.get("/health")
        assert status == 200 and health["pollers"] == 1 and health["clients"] == 2

        # Both clients are served by that one poller: the same diff, same seq.
        await db_execute(database_url, "UPDATE items SET qty = 11 WHERE id = 1")
        d1, d2 = await asyncio.gather(s1.next(), s2.next())
        assert d1 == d2 and d1["type"] == "diff" and d1["seq"] == f1["seq"] + 1
        await s1.stop()
        await s2.stop()


async def test_a_second_topic_gets_its_own_poller(start_node, database_url):
    """Control for the test above: the counting method does see a second poller."""
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url)
    async with connect(node.ws_url) as client:
        s1, s2 = Subscription(client, "items:1"), Subscription(client, "items:2")
        await asyncio.gather(s1.next(), s2.next())
        pollers = node.node.running_pollers()
        assert sorted(pollers) == ["items:1", "items:2"] and all(epoch >= 1 for epoch in pollers.values())
        before = await db_fetchval(database_url, "SELECT count(*) FROM poll_log")
        await eventually(lambda: _grew_for_both(database_url, before), message="both topics polled")
        await s1.stop()
        await s2.stop()


async def _grew_for_both(url: str, before: int) -> bool:
    rows = await db_fetch(url, "SELECT grp, count(*) AS n FROM poll_log WHERE n > $1 GROUP BY grp", before)
    return {r["grp"] for r in rows if r["n"] >= 3} == {1, 2}


async def test_poller_stops_after_grace_and_is_reused_within_it(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    grace = 3.0
    node = await start_node({"items": FEED}, database_url=database_url, node={"grace_period": grace})
    topic = "items:1"

    # A first client subscribes: a poller starts.
    async with connect(node.ws_url) as client:
        sub = Subscription(client, topic)
        first = await sub.next()
        assert first["type"] == "snapshot"
        first_epoch = node.node.running_pollers()[topic]
        await sub.stop()  # sends unsubscribe
    await eventually(lambda: not node.node.registry.get(topic).local, message="node saw the client leave")
    left_at = time.monotonic()
    polls_when_left = await poll_count(database_url)

    # It comes back inside the grace period: same poller, snapshot straight from the current state.
    async with connect(node.ws_url) as client:
        sub = Subscription(client, topic)
        again = await sub.next()
        assert again["type"] == "snapshot"
        assert again["seq"] == first["seq"], "nothing changed: the running poller's state, not a new poll cycle"
        assert again["rows"] == first["rows"]
        assert time.monotonic() - left_at < grace, "test too slow to exercise the grace period"
        assert node.node.running_pollers() == {topic: first_epoch}, "the running poller was reused"
        assert again["epoch"] == first_epoch
        # The poller kept polling while nobody was subscribed (it was not restarted).
        await eventually(lambda: _more_polls(database_url, polls_when_left + 3), message="polls continue")
        await db_execute(database_url, "UPDATE items SET qty = 12 WHERE id = 1")
        diff = await sub.next()
        assert diff["type"] == "diff" and diff["seq"] == first["seq"] + 1
        # The last client leaves for good, this time by closing its socket without unsubscribing.
    left_at = time.monotonic()
    await sub.stop()

    await eventually(lambda: not node.node.running_pollers(), timeout=grace + 15, message="poller stopped")
    assert time.monotonic() - left_at >= grace * 0.9, "the poller must outlive the grace period"
    # Database side: the feed is no longer executed.
    await asyncio.sleep(0.3)
    stopped_at = await poll_count(database_url)
    await asyncio.sleep(10 * INTERVAL)
    assert await poll_count(database_url) == stopped_at, "feed still being polled after the poller stopped"
    assert await metric(node, "subsys_pollers") == 0
    await eventually(lambda: node.node.registry.get(topic) is None, message="topic forgotten")

    # A new subscriber after that starts a fresh poller.
    async with connect(node.ws_url) as client:
        sub = Subscription(client, topic)
        snap = await sub.next()
        assert snap["type"] == "snapshot"
        assert {r["id"]: r["qty"] for r in snap["rows"]} == {1: 12, 2: 20}
        assert node.node.running_pollers()[topic] > first_epoch, "a new poller, of a new epoch"
        assert snap["epoch"] > first_epoch
        await eventually(lambda: _more_polls(database_url, stopped_at + 2), message="new poller polls")
        await sub.stop()


async def _more_polls(url: str, at_least: int) -> bool:
    return await poll_count(url) >= at_least
