"""The database goes away mid-stream and comes back.

A private embedded PostgreSQL (its own pgserver data directory) is stopped
with ``pg_ctl stop -m fast`` (every backend is terminated, the socket goes
away) and started again, so the shared test server is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from subsys.client.ws import connect
from subsys.testing.postgres import EmbeddedPostgres

from support import Subscription, create_database, db_execute, db_fetch, eventually, with_database

pytestmark = pytest.mark.timeout(120)

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items VALUES (1, 1, 10), (2, 1, 20);
"""
FEED = {"sql": "SELECT id, qty FROM items WHERE grp = $1 ORDER BY id", "key": "id", "param": "int", "interval": 0.1}


@pytest.fixture
async def private_pg() -> AsyncIterator[EmbeddedPostgres]:
    tmp = Path(tempfile.mkdtemp(prefix="subsys-pg-outage-"))
    server = EmbeddedPostgres(tmp / "data")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_database_outage_then_recovery(start_node, private_pg):
    url = with_database(private_pg.url(), await create_database(private_pg.url()))
    await db_execute(url, SCHEMA)
    node = await start_node(
        {"items": FEED}, database_url=url, database={"retry_initial": 0.1, "retry_max": 0.5}
    )

    # Liveness is probed all along: the node must never go down.
    live_results: list[object] = []
    probing = asyncio.Event()

    async def probe_liveness() -> None:
        async with aiohttp.ClientSession() as http:
            while not probing.is_set():
                try:
                    async with http.get(node.base_url + "/health/live", timeout=aiohttp.ClientTimeout(total=10)) as r:
                        live_results.append(r.status)
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    live_results.append(exc)
                await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe_liveness())

    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(connect(node.ws_url))
        sub = Subscription(client, "items:1")
        snapshot = await sub.next()
        assert snapshot["type"] == "snapshot"
        await db_execute(url, "UPDATE items SET qty = 11 WHERE id = 1")
        before = await sub.next()
        assert before["type"] == "diff" and before["seq"] == snapshot["seq"] + 1

        # -- outage ---------------------------------------------------------------
        await private_pg.stop_fast()
        status = await sub.until(lambda f: f["type"] == "status")
        assert status["state"] == "error", status
        assert status["code"] == "database_unavailable", status
        assert status["message"]
        assert status["epoch"] == 1 and status["topic"] == "items:1"

        state = node.node.registry.get("items:1")
        assert state.state == "error" and state.last_error["code"] == "database_unavailable"
        # It keeps retrying (with backoff) rather than giving up.
        failures = state.stats.failures
        await eventually(lambda: state.stats.failures >= failures + 2, message="poller retries")
        # Readiness reports the database; liveness does not depend on it.
        health = await eventually(lambda: _health_is(node, 503), message="/health goes 503")
        assert health["database"]["ok"] is False and health["live"] is True
        assert node.node.running_pollers() == {"items:1": 1}, "the poller survives the outage"

        # A client arriving during the outage is told at once, and gets no snapshot: a
        # snapshot says the topic is fine. Its data comes when the database is back.
        late_client = await stack.enter_async_context(connect(node.ws_url))
        late = Subscription(late_client, "items:1")
        first = await late.next()
        assert first["type"] == "status" and first["state"] == "error", first
        assert first["code"] == "database_unavailable"
        await asyncio.sleep(0.5)
        assert [f["type"] for f in late.frames] == ["status"], late.frames

        # -- recovery ---------------------------------------------------------
        await private_pg.start_again()
        fresh = await sub.until(lambda f: f["type"] in ("snapshot", "diff"), timeout=30)
        assert fresh["type"] == "snapshot", f"after recovery the first data frame is a snapshot: {fresh}"
        assert fresh["seq"] > before["seq"] and fresh["epoch"] == 1
        statuses = [f for f in sub.frames if f["type"] == "status"]
        assert statuses[-1]["state"] == "ok", "recovery is announced before the fresh snapshot"
        assert {r["id"]: r["qty"] for r in fresh["rows"]} == {1: 11, 2: 20}

        # Diffs flow again, in sequence.
        await db_execute(url, "INSERT INTO items VALUES (3, 1, 30)")
        after = await sub.next()
        assert after["type"] == "diff" and after["seq"] == fresh["seq"] + 1
        assert after["inserted"] == [{"id": 3, "qty": 30}]
        db_rows = {r["id"]: dict(r) for r in await db_fetch(url, "SELECT id, qty FROM items WHERE grp = 1")}
        assert {row["id"]: row for row in sub.view.rows.values()} == db_rows
        assert state.state == "ok" and state.last_error is None
        await eventually(lambda: _health_is(node, 200), message="/health back to 200")
        late_data = await late.until(lambda f: f["type"] in ("snapshot", "diff"), timeout=30)
        assert late_data["type"] == "snapshot" and late_data["seq"] >= fresh["seq"], late_data
        await late.stop()
        await sub.stop()

    probing.set()
    await prober
    assert live_results and all(r == 200 for r in live_results), [r for r in live_results if r != 200]
    assert not node.task.done(), "the node must never crash"


async def _health_is(node, status: int):
    got, body = await node.get("/health")
    return body if got == status else None


KNOB_SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, qty int NOT NULL);
INSERT INTO items VALUES (1, 1, 10), (2, 1, 20);
CREATE TABLE knob (mode text NOT NULL);
INSERT INTO knob VALUES ('normal');
CREATE FUNCTION feed_rows(p int) RETURNS TABLE (id int, qty int) LANGUAGE plpgsql VOLATILE AS $$
DECLARE m text := (SELECT mode FROM knob);
BEGIN
    IF m = 'sleep' THEN PERFORM pg_sleep(5); END IF;
    IF m = 'fail' THEN RAISE EXCEPTION 'feed is broken'; END IF;
    IF m = 'dup' THEN RETURN QUERY SELECT 1, 1 UNION ALL SELECT 1, 2; RETURN; END IF;
    IF m = 'many' THEN RETURN QUERY SELECT g, g FROM generate_series(1, 10) AS g; RETURN; END IF;
    RETURN QUERY SELECT i.id, i.qty FROM items i WHERE i.grp = p ORDER BY i.id;
END
$$;
"""


@pytest.mark.parametrize(
    "mode, code",
    [("sleep", "query_timeout"), ("fail", "query_failed"), ("dup", "duplicate_key"), ("many", "row_limit_exceeded")],
)
async def test_feed_errors_are_reported_then_recovered(start_node, database_url, mode, code):
    """Timeouts and query failures: a status with the code, the state shows it, then a fresh snapshot."""
    await db_execute(database_url, KNOB_SCHEMA)
    feed = {"sql": "SELECT * FROM feed_rows($1)", "key": "id", "param": "int", "interval": 0.05,
            "statement_timeout": 1.0, "max_rows": 5}
    node = await start_node({"items": feed}, database_url=database_url,
                            database={"retry_initial": 0.05, "retry_max": 0.2})
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        assert first["type"] == "snapshot"

        await db_execute(database_url, "UPDATE knob SET mode = $1", mode)
        status = await sub.until(lambda f: f["type"] == "status")
        assert status["state"] == "error" and status["code"] == code, status
        state = node.node.registry.get("items:1")
        assert state.state == "error" and state.last_error["code"] == code
        await eventually(lambda: state.stats.failures >= 2, message="retried with backoff")
        # Told once per error kind, not once per failed poll.
        await asyncio.sleep(0.5)
        assert [f for f in sub.drain_nowait() if f["type"] == "status"] == []

        await db_execute(database_url, "UPDATE knob SET mode = 'normal'; UPDATE items SET qty = 11 WHERE id = 1")
        fresh = await sub.until(lambda f: f["type"] in ("snapshot", "diff"), timeout=20)
        assert fresh["type"] == "snapshot" and fresh["seq"] > first["seq"]
        assert fresh["rows"] == [{"id": 1, "qty": 11}, {"id": 2, "qty": 20}]
        assert [f["state"] for f in sub.frames if f["type"] == "status"] == ["error", "ok"]
        assert state.state == "ok"
        await sub.stop()


async def test_an_unresponsive_database_server_is_database_unavailable(start_node):
    """A server that accepts TCP but never answers (a hung or blackholed database) is not a query timeout."""
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        node = await start_node(
            {"items": dict(FEED, statement_timeout=0.5)},
            database_url=f"postgresql://nobody@127.0.0.1:{port}/nothing",
            database={"retry_initial": 0.1, "retry_max": 0.5},
            ready_path="/health/live",
        )
        status, health = await node.get("/health")
        assert status == 503 and health["database"]["ok"] is False
        async with connect(node.ws_url) as client:
            sub = Subscription(client, "items:1")
            frame = await sub.next(timeout=20)
            assert frame["type"] == "status" and frame["state"] == "error"
            assert frame["code"] == "database_unavailable", frame
            await sub.stop()
        assert accepted, "the node did try to connect"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
