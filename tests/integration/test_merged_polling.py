"""Merged polling, on a real PostgreSQL: one statement per batch of topics per tick, per-topic in effect.

The feed functions here record each execution with ``statement_timestamp()``
and the backend's pid: topics polled by one statement share both, so the
database itself counts statements (not topics) per tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import signal
import time

import pytest

from subsys.client.ws import connect

from support import Subscription, db_execute, db_fetch, db_fetchval, eventually

pytestmark = pytest.mark.timeout(120)

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items SELECT g, g % 10, g FROM generate_series(1, 40) AS g;
CREATE TABLE poll_log (grp int NOT NULL, pid int NOT NULL, stmt timestamptz NOT NULL);
CREATE FUNCTION logged_items(p int) RETURNS TABLE (id int, qty int) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO poll_log VALUES (p, pg_backend_pid(), statement_timestamp());
    RETURN QUERY SELECT i.id, i.qty FROM items i WHERE i.grp = p ORDER BY i.id;
END
$$;
CREATE TABLE knob (bad int NOT NULL);
INSERT INTO knob VALUES (-1);
"""
INTERVAL = 0.1
LOGGED = {"sql": "SELECT * FROM logged_items($1)", "key": "id", "param": "int", "interval": INTERVAL}


async def _subscribe_all(client, topics: list[str]) -> list[Subscription]:
    subs = [Subscription(client, topic) for topic in topics]
    firsts = await asyncio.gather(*(s.next() for s in subs))
    assert all(f["type"] == "snapshot" for f in firsts), firsts
    return subs


async def _statements(url: str, since) -> tuple[int, int]:
    row = (await db_fetch(url, "SELECT count(DISTINCT (pid, stmt)) AS s, count(*) AS t FROM poll_log WHERE stmt >= $1", since))[0]
    return int(row["s"]), int(row["t"])


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "per-topic"])
async def test_statements_per_tick_are_the_batches(start_node, database_url, merged):
    """10 topics in batches of 4: 3 statements a tick merged, 10 per topic; nothing else is sent."""
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": LOGGED}, database_url=database_url,
                            database={"merged_polling": merged, "batch_size": 4})  # fmt: skip
    topics = [f"items:{g}" for g in range(10)]
    async with connect(node.ws_url) as client:
        subs = await _subscribe_all(client, topics)
        await asyncio.sleep(1.0)  # past the first polls of each topic (polled at once, outside the schedule)
        kind = "merged" if merged else "topic"
        t0 = await db_fetchval(database_url, "SELECT clock_timestamp()")
        x0, m0 = await _xacts(database_url), await _counted(node, kind)
        await asyncio.sleep(6.0)
        x1, m1 = await _xacts(database_url), await _counted(node, kind)
        t1 = await db_fetchval(database_url, "SELECT clock_timestamp()")
        statements, executions = await _statements(database_url, t0)
        ticks = (t1 - t0).total_seconds() / INTERVAL
        expected = math.ceil(len(topics) / 4) if merged else len(topics)
        per_tick = statements / ticks
        assert executions / ticks == pytest.approx(len(topics), rel=0.25), "every topic polled once a tick"
        assert per_tick == pytest.approx(expected, rel=0.25), f"{per_tick:.2f} statements a tick, expected {expected}"
        # The node's own count (/metrics, subsys_statements) agrees with the database's.
        assert m1 - m0 == pytest.approx(statements, rel=0.1, abs=expected + 1), (m1 - m0, statements)
        # Transactions seen by the server (statistics are flushed about once a second: a loose
        # bound), including any pool reset on release: there is none, so ~ one per statement.
        transactions = (x1 - x0) / ticks
        print(f"statements/tick={per_tick:.2f} transactions/tick={transactions:.2f} executions/tick={executions / ticks:.2f}")
        assert transactions <= 1.4 * expected + 1, f"{transactions:.1f} transactions a tick for {expected} statements"
        assert sorted(node.node.running_pollers()) == sorted(topics)
        status, health = await node.get("/health")
        assert health["polling"] == {"items": "merged" if merged else "per-topic"}
        for sub in subs:
            await sub.stop()


async def _counted(node, kind: str) -> float:
    """The node's subsys_statements counter for the items feed (its /metrics)."""
    _status, text = await node.get("/metrics")
    match = re.search(rf'^subsys_statements_total\{{(?=[^}}]*feed="items")(?=[^}}]*kind="{kind}")[^}}]*\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


async def _xacts(url: str) -> int:
    return int(await db_fetchval(url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))


async def test_one_bad_parameter_does_not_break_its_batch(start_node, database_url):
    """items:0 divides by zero: it gets its status, its batch-mates their data, all along."""
    await db_execute(database_url, SCHEMA)
    feed = {"sql": "SELECT id, qty / $1 AS q FROM items WHERE grp = $1 OR $1 = 0 ORDER BY id",
            "key": "id", "param": "int", "interval": 0.05}  # fmt: skip
    node = await start_node({"items": feed}, database_url=database_url,
                            database={"batch_size": 100, "retry_initial": 0.05, "retry_max": 0.2})  # fmt: skip
    async with connect(node.ws_url) as client:
        good = await _subscribe_all(client, [f"items:{g}" for g in (1, 2, 3)])
        bad = Subscription(client, "items:0")
        status = await bad.until(lambda f: f["type"] == "status")
        assert status["state"] == "error" and status["code"] == "query_failed" and "division by zero" in status["message"]
        for round_ in range(3):  # the others keep getting their data while items:0 keeps failing
            await db_execute(database_url, "UPDATE items SET qty = qty + 10 WHERE grp IN (1, 2, 3)")
            for sub in good:
                diff = await sub.next_data()
                assert diff["type"] == "diff" and len(diff["updated"]) == 4, (round_, diff)
        assert [f["type"] for f in bad.frames] == ["status"], "told once, no snapshot while failing"
        assert node.node.registry.get("items:0").stats.failures >= 2
        feeds = node.node.pollers.describe()
        assert feeds["items"]["polling"] == "merged"
        for sub in [*good, bad]:
            await sub.stop()


async def test_a_slow_parameter_times_out_alone(start_node, database_url):
    """One topic's query sleeps past statement_timeout: query_timeout for it, data for the rest; then it recovers."""
    await db_execute(database_url, SCHEMA)
    feed = {"sql": "SELECT i.id, i.qty FROM items i, knob k, "
                   "LATERAL pg_sleep(CASE WHEN k.bad = $1 THEN 3 ELSE 0 END) AS s WHERE i.grp = $1 ORDER BY i.id",
            "key": "id", "param": "int", "interval": 0.05, "statement_timeout": 0.5}  # fmt: skip
    node = await start_node({"items": feed}, database_url=database_url,
                            database={"retry_initial": 0.05, "retry_max": 0.3})  # fmt: skip
    async with connect(node.ws_url) as client:
        subs = await _subscribe_all(client, [f"items:{g}" for g in range(1, 6)])
        slow, others = subs[2], subs[:2] + subs[3:]
        await db_execute(database_url, "UPDATE knob SET bad = 3")
        status = await slow.until(lambda f: f["type"] == "status", timeout=20)
        assert status["state"] == "error" and status["code"] == "query_timeout", status
        await db_execute(database_url, "UPDATE items SET qty = qty + 100 WHERE grp <> 3")
        for sub in others:
            diff = await sub.until(lambda f: f["type"] == "diff", timeout=10)
            assert len(diff["updated"]) == 4
        # Isolated: it is polled alone (with backoff), the batch goes on without it.
        assert node.node.registry.get("items:3").state == "error"
        await db_execute(database_url, "UPDATE knob SET bad = -1; UPDATE items SET qty = 0 WHERE grp = 3")
        fresh = await slow.until(lambda f: f["type"] == "snapshot", timeout=20)
        assert all(row["qty"] == 0 for row in fresh["rows"])
        assert [f["state"] for f in slow.frames if f["type"] == "status"] == ["error", "ok"]
        # ... and rejoins the merged batch.
        await eventually(lambda: not node.node.pollers._feeds["items"].members["items:3"].solo, message="rejoined")
        for sub in subs:
            await sub.stop()


CUSTOM_AGGREGATE = """
CREATE AGGREGATE my_sum(int) (SFUNC = int4pl, STYPE = int, INITCOND = '0');
"""


async def test_feeds_that_cannot_be_merged_fall_back_and_say_so(start_node, database_url, caplog):
    await db_execute(database_url, SCHEMA + CUSTOM_AGGREGATE)
    feeds = {
        "locked": {"sql": "SELECT id, qty FROM items WHERE grp = $1 ORDER BY id FOR SHARE", "key": "id", "param": "int",
                   "interval": 0.1},
        # Known to the server only: an aggregate of $1 alone would belong to the merging query.
        "summed": {"sql": "SELECT 1 AS id, my_sum($1) AS total FROM items", "key": "id", "param": "int", "interval": 0.1},
        "items": {"sql": "SELECT id, qty FROM items WHERE grp = $1 ORDER BY id", "key": "id", "param": "int",
                  "interval": 0.1},
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="subsys.node.pollers"):
        node = await start_node(feeds, database_url=database_url)
    said = [r.getMessage() for r in caplog.records if "per-topic polling" in r.getMessage()]
    assert any(m.startswith("feed locked: per-topic polling: FOR UPDATE/SHARE") for m in said), said
    assert any(m.startswith("feed summed: per-topic polling: PostgreSQL refuses the merged statement") for m in said), said
    assert not any("feed items:" in m for m in said)
    status, health = await node.get("/health")
    assert health["polling"] == {"items": "merged", "locked": "per-topic", "summed": "per-topic"}
    described = node.node.pollers.describe()
    assert "aggregate" in described["summed"]["why"] and described["items"]["why"] is None
    async with connect(node.ws_url) as client:
        subs = await _subscribe_all(client, ["locked:1", "summed:4", "items:1"])
        assert subs[1].frames[0]["rows"] == [{"id": 1, "total": 160}]
        await db_execute(database_url, "UPDATE items SET qty = 0 WHERE id = 1")
        assert (await subs[0].next_data())["updated"] == [{"id": 1, "qty": 0}]
        assert (await subs[2].next_data())["updated"] == [{"id": 1, "qty": 0}]
        assert sorted(node.node.pollers._topics) == ["locked:1", "summed:4"], "per-topic pollers, the fallback"
        for sub in subs:
            await sub.stop()


STEPS = [
    "UPDATE items SET qty = qty + 1 WHERE grp = 1",
    "DELETE FROM items WHERE grp = 2",  # empty result
    "INSERT INTO items VALUES (101, 2, 7), (102, 2, 8)",
    "UPDATE items SET qty = -qty WHERE grp IN (3, 4)",
    "INSERT INTO items SELECT g, 5, g FROM generate_series(200, 210) AS g",  # over max_rows
    "DELETE FROM items WHERE id >= 200",  # recovers
    "UPDATE items SET grp = 6 WHERE grp = 1",
]


@pytest.mark.parametrize("batch_size", [2, 100])
async def test_clients_get_the_same_frames_merged_or_not(start_node, database_url, batch_size):
    """Two nodes on one database, one merged, one per topic: the same frames for the same history."""
    await db_execute(database_url, SCHEMA)
    feed = {"sql": "SELECT id, qty, NULLIF(qty % 3, 0) AS m FROM items WHERE grp = $1 ORDER BY id", "key": "id",
            "param": "int", "interval": 0.05, "max_rows": 6}  # fmt: skip
    merged = await start_node({"items": feed}, database_url=database_url, database={"batch_size": batch_size})
    alone = await start_node({"items": feed}, database_url=database_url, database={"merged_polling": False})
    topics = [f"items:{g}" for g in range(8)]
    async with connect(merged.ws_url) as c1, connect(alone.ws_url) as c2:
        subs1, subs2 = await _subscribe_all(c1, topics), await _subscribe_all(c2, topics)
        for step in STEPS:
            await db_execute(database_url, step)
            expected = {
                t: {r["id"]: dict(r) for r in await db_fetch(
                    database_url, "SELECT id, qty, NULLIF(qty % 3, 0) AS m FROM items WHERE grp = $1", int(t[6:]))}
                for t in topics
            }  # fmt: skip

            def settled() -> bool:
                for subs in (subs1, subs2):
                    for sub in subs:
                        rows = expected[sub.topic]
                        if len(rows) > feed["max_rows"]:
                            if sub.frames[-1].get("code") != "row_limit_exceeded":
                                return False
                        elif {r["id"]: r for r in sub.view.rows.values()} != rows or sub.frames[-1]["type"] == "status":
                            return False
                return True

            await eventually(settled, message=f"both nodes settled after {step!r}")
            await asyncio.sleep(0.2)  # a few more polls: nothing more may come
        for s1, s2 in zip(subs1, subs2):
            assert _content(s1.frames) == _content(s2.frames), s1.topic
            await s1.stop()
            await s2.stop()


def _content(frames: list[dict]) -> list[dict]:
    """Frames without what differs between two nodes by design (nothing but the message text of errors)."""
    return [{k: v for k, v in f.items() if k != "message"} for f in frames]


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "per-topic"])
async def test_a_hung_call_is_a_stuck_query_and_reaping_ends_it(start_node, database_url, merged):
    """Its backend frozen, a poll's database call hangs; the topic stops at once, the call is reported, then reaped."""
    await db_execute(database_url, SCHEMA)
    feed = {**LOGGED, "statement_timeout": 60.0}
    node = await start_node({"items": feed}, database_url=database_url, database={"merged_polling": merged})
    async with connect(node.ws_url) as client:
        (sub,) = await _subscribe_all(client, ["items:1"])
        epoch = node.node.running_pollers()["items:1"]
        pids = [r["pid"] for r in await db_fetch(
            database_url, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", node.application_name)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.5)  # the next poll hangs in a frozen backend
            started = time.monotonic()
            assert await node.node.hand_over("items:1", epoch, to=None, reason="test")
            assert time.monotonic() - started < 3, "stopping a topic never waits on the database"
            assert "items:1" not in node.node.running_pollers()
            (stuck,) = await eventually(node.node.stuck_queries, timeout=10, message="a stuck query")
            assert stuck["topics"] == {"items:1": epoch} and stuck["feed"] == "items" and stuck["pid"] in pids
            assert await node.node.reap_query(stuck["id"])
            await eventually(lambda: not node.node.stuck_queries(), message="reaped")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await sub.stop()


async def test_equal_values_that_encode_differently_are_still_diffed(start_node, database_url):
    """Unchanged rows are not decoded again, but only where equal means equal frames: 1.0 -> 1.00 is a diff."""
    await db_execute(database_url, "CREATE TABLE m (id int PRIMARY KEY, grp int, x numeric, f float8, j jsonb);"
                                   "INSERT INTO m VALUES (1, 1, 1.0, 0.0, '1')")  # fmt: skip
    feed = {"sql": "SELECT id, x, f, j FROM m WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05}
    node = await start_node({"m": feed}, database_url=database_url)
    async with connect(node.ws_url) as client:
        (sub,) = await _subscribe_all(client, ["m:1"])
        # (0.0 -> -0.0 is no diff merged or not: the diff compares decoded values, which are equal.)
        for change, column, value in [("x = 1.00", "x", "1.00"), ("j = '1.0'", "j", 1.0), ("x = 1.000", "x", "1.000")]:
            await db_execute(database_url, f"UPDATE m SET {change}")
            diff = await sub.next_data()
            assert diff["type"] == "diff" and str(diff["updated"][0][column]) == str(value), (change, diff)
        await sub.stop()
