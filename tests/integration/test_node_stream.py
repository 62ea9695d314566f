"""One node, real PostgreSQL, real WebSockets: snapshot, then diffs in order."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from subsys.client.ws import connect

from support import Subscription, db_execute, db_fetch, rows_by_key

pytestmark = pytest.mark.timeout(90)

SCHEMA = """
CREATE TABLE items (
    id    int PRIMARY KEY,
    grp   int NOT NULL,
    name  text NOT NULL,
    qty   int
);
INSERT INTO items VALUES (1, 1, 'one', 10), (2, 1, 'two', 20), (100, 2, 'other', 0);
"""

ITEMS_FEED = {
    "sql": "SELECT id, name, qty FROM items WHERE grp = $1 ORDER BY id",
    "key": "id",
    "param": "int",
    "interval": 0.05,
}


async def db_rows(url: str, grp: int) -> dict[int, dict]:
    return {r["id"]: dict(r) for r in await db_fetch(url, "SELECT id, name, qty FROM items WHERE grp = $1", grp)}


async def test_snapshot_then_ordered_diffs(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": ITEMS_FEED}, database_url=database_url)

    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        snapshot = await sub.next()
        assert snapshot["type"] == "snapshot"
        assert snapshot["topic"] == "items:1"
        assert snapshot["epoch"] == 1
        assert snapshot["key"] == ["id"]
        assert snapshot["rows"] == [
            {"id": 1, "name": "one", "qty": 10},
            {"id": 2, "name": "two", "qty": 20},
        ]
        seq = snapshot["seq"]
        assert seq >= 1

        async def expect_diff(inserted=(), updated=(), deleted=()):
            nonlocal seq
            frame = await sub.next()
            assert frame["type"] == "diff", frame
            assert frame["topic"] == "items:1"
            assert frame["epoch"] == 1
            assert frame["seq"] == seq + 1, f"seq must grow by one per change: {frame}"
            seq = frame["seq"]
            assert sorted(frame["inserted"], key=lambda r: r["id"]) == list(inserted)
            assert sorted(frame["updated"], key=lambda r: r["id"]) == list(updated)
            assert sorted(frame["deleted"], key=lambda k: k["id"]) == list(deleted)

        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("INSERT INTO items VALUES (3, 1, 'three', 30)")
            await expect_diff(inserted=[{"id": 3, "name": "three", "qty": 30}])

            await conn.execute("UPDATE items SET qty = 11 WHERE id = 1")
            await expect_diff(updated=[{"id": 1, "name": "one", "qty": 11}])

            await conn.execute("DELETE FROM items WHERE id = 2")
            await expect_diff(deleted=[{"id": 2}])

            # NULLs are values like any other.
            await conn.execute("UPDATE items SET qty = NULL WHERE id = 3")
            await expect_diff(updated=[{"id": 3, "name": "three", "qty": None}])

            # Rows of another topic's parameter never show up here: the next frame
            # is the change made after them.
            await conn.execute("INSERT INTO items VALUES (101, 2, 'elsewhere', 1)")
            await conn.execute("UPDATE items SET grp = 2 WHERE id = 100")
            await conn.execute("UPDATE items SET name = 'uno' WHERE id = 1")
            await expect_diff(updated=[{"id": 1, "name": "uno", "qty": 11}])

            # One transaction with all three kinds: one diff.
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (4, 1, 'four', 40), (5, 1, 'five', 50)")
                await conn.execute("UPDATE items SET qty = 33 WHERE id = 3")
                await conn.execute("DELETE FROM items WHERE id = 1")
            await expect_diff(
                inserted=[{"id": 4, "name": "four", "qty": 40}, {"id": 5, "name": "five", "qty": 50}],
                updated=[{"id": 3, "name": "three", "qty": 33}],
                deleted=[{"id": 1}],
            )

            # A write that changes nothing the feed returns publishes nothing.
            await conn.execute("UPDATE items SET qty = qty WHERE grp = 1")
            await conn.execute("UPDATE items SET qty = 41 WHERE id = 4")
            await expect_diff(updated=[{"id": 4, "name": "four", "qty": 41}])
        finally:
            await conn.close()

        assert rows_by_key(list(sub.view.rows.values())) == await db_rows(database_url, 1)
        assert sub.view.seq == seq
        state = node.node.registry.get("items:1")
        assert state.seq == seq and state.epoch == 1 and state.state == "ok"
        await sub.stop()


async def test_second_subscriber_gets_current_state_and_same_stream(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": ITEMS_FEED}, database_url=database_url)
    async with connect(node.ws_url) as first, connect(node.ws_url) as second:
        a = Subscription(first, "items:1")
        await a.next()
        await db_execute(database_url, "UPDATE items SET qty = 12 WHERE id = 1")
        change = await a.next()
        assert change["type"] == "diff"

        b = Subscription(second, "items:1")
        snap = await b.next()
        assert snap["type"] == "snapshot"
        assert snap["seq"] == change["seq"], "a late subscriber gets the latest state at the current seq"
        assert rows_by_key(snap["rows"])[1]["qty"] == 12

        await db_execute(database_url, "INSERT INTO items VALUES (9, 1, 'nine', 9)")
        da, db = await a.next(), await b.next()
        assert da == db, "every subscriber sees the same diff"
        assert da["seq"] == change["seq"] + 1
        await a.stop()
        await b.stop()


ENCODING_SCHEMA = """
CREATE TABLE typed (
    id      int PRIMARY KEY,
    big     bigint,
    num     numeric(10, 2),
    dbl     double precision,
    ts      timestamp,
    tstz    timestamptz,
    d       date,
    dur     interval,
    u       uuid,
    raw     bytea,
    doc     jsonb,
    tags    text[],
    addr    inet,
    flag    boolean,
    nothing text
);
INSERT INTO typed VALUES (
    1, 9007199254740993, 12.50, 'NaN', '2024-05-06 07:08:09.5', '2024-05-06 07:08:09+00', '2024-05-06',
    '1 hour 30 seconds', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '\\x000102ff', '{"a": [1, null, "x"]}',
    ARRAY['x', 'y'], '10.0.0.1', true, NULL
);
"""


async def test_values_are_encoded_by_the_documented_mapping(start_node, database_url):
    """The mapping in subsys/core/encoding.py, end to end through asyncpg and the wire."""
    await db_execute(database_url, ENCODING_SCHEMA)
    node = await start_node(
        {"typed": {"sql": "SELECT * FROM typed WHERE id = $1", "key": "id", "param": "int", "interval": 0.1}},
        database_url=database_url,
    )
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "typed:1")
        snapshot = await sub.next()
        assert snapshot["type"] == "snapshot"
        (row,) = snapshot["rows"]
        await sub.stop()
    # Compare the timestamptz by value: the session time zone decides its offset.
    import datetime as dt

    tstz = dt.datetime.fromisoformat(row.pop("tstz"))
    assert tstz == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    assert tstz.tzinfo is not None
    assert row == {
        "id": 1,
        "big": "9007199254740993",  # beyond 2**53 - 1: a string
        "num": "12.50",  # exact
        "dbl": "NaN",
        "ts": "2024-05-06T07:08:09.500000",
        "d": "2024-05-06",
        "dur": 3630.0,
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "raw": "AAEC/w==",
        "doc": {"a": [1, None, "x"]},
        "tags": ["x", "y"],
        "addr": "10.0.0.1",
        "flag": True,
        "nothing": None,
    }


async def test_stopping_the_node_closes_clients_with_going_away_and_leaves_no_task_behind(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    before = asyncio.all_tasks()
    node = await start_node({"items": ITEMS_FEED}, database_url=database_url)
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        assert (await sub.next())["type"] == "snapshot"
        await node.stop()
        await asyncio.wait_for(client.closed.wait(), 15)
        assert client.close_code == 1001  # going away
        await sub.stop()
    # Every task a node starts has an owner that ends it. One left pending (say, a wait on the
    # node's own event) is destroyed pending when the node is collected: asyncio logs an error
    # in whatever runs then.
    for _ in range(3):
        await asyncio.sleep(0)  # let what was cancelled finish
    left = [task for task in asyncio.all_tasks() - before if not task.done() and task is not asyncio.current_task()]
    assert not left, "\n".join(f"{task.get_name()}: {task.get_coro()!r}" for task in left)


async def test_parameter_is_bound_verbatim(start_node, database_url):
    """The topic's parameter reaches PostgreSQL as a bound value of the feed's type, never as SQL."""
    node = await start_node(
        {
            "echo": {"sql": "SELECT 1 AS id, $1::text AS param, pg_typeof($1)::text AS kind", "key": "id"},
            "num": {"sql": "SELECT 1 AS id, $1 + 0 AS param", "key": "id", "param": "int"},
        },
        database_url=database_url,
    )
    async with connect(node.ws_url) as client:
        text = Subscription(client, "echo:a.b@c-d_e--1")
        num = Subscription(client, "num:-42")
        assert (await text.next())["rows"] == [{"id": 1, "param": "a.b@c-d_e--1", "kind": "text"}]
        assert (await num.next())["rows"] == [{"id": 1, "param": -42}]
        await text.stop()
        await num.stop()


async def test_a_large_snapshot_reaches_the_client_library(start_node, database_url):
    """A result of several MiB (well within max_rows) is delivered, not refused by the client."""
    await db_execute(
        database_url,
        "CREATE TABLE blobs (id int PRIMARY KEY, body text NOT NULL);"
        "INSERT INTO blobs SELECT g, repeat('x', 600000) FROM generate_series(1, 8) AS g;",
    )
    node = await start_node(
        {"blobs": {"sql": "SELECT id, body FROM blobs WHERE id > $1", "key": "id", "param": "int", "interval": 1.0}},
        database_url=database_url,
    )
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "blobs:0")
        snapshot = await sub.next(timeout=30)
        assert snapshot["type"] == "snapshot" and len(snapshot["rows"]) == 8
        assert all(len(row["body"]) == 600000 for row in snapshot["rows"])
        await sub.stop()

