"""Property: for any database history, merged polling gives each topic exactly what per-topic polling gives.

Hypothesis draws a feed, a set of parameters (in any order, some matching no
rows), a batch size and a history of inserts, updates and deletes (NULLs,
duplicate keys, more rows than ``max_rows``). After each step every topic is
polled both ways against the same committed state, on a real PostgreSQL: the
per-topic query (``run_feed_query``, today's poller) and the merged statement
the node prepares (``prepare_merged``), split by ``split_merged``. Their
outcomes (rows, in order, or the error code) must be equal, and so must the
frames two topic streams publish from them.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subsys.config import DatabaseConfig, Feed
from subsys.core.errors import PollError
from subsys.node.database import Database, prepare_merged, run_feed_query, split_merged
from subsys.node.merge import MergeTemplate, plan_feed
from subsys.node.poller import deliver
from subsys.node.stream import TopicStream

from support import db_execute

pytestmark = pytest.mark.timeout(300)

SCHEMA = """
CREATE TABLE t (id serial PRIMARY KEY, grp int NOT NULL, name text, k int NOT NULL, v text, n numeric, j jsonb);
CREATE FUNCTION t_of(g int) RETURNS SETOF t LANGUAGE sql STABLE AS 'SELECT * FROM t WHERE grp = g ORDER BY k, id';
"""
FEEDS = {
    # key k: two rows with one k in a group are a duplicate key; v, n, j may be NULL
    "int": Feed(name="i", sql="SELECT k, v, n, j FROM t WHERE grp = $1 ORDER BY k DESC, id", key=("k",),
                param="int", max_rows=3),
    "func": Feed(name="f", sql="SELECT k, name, n FROM t_of($1)", key=("k",), param="int", max_rows=4),
    "text": Feed(name="x", sql="SELECT id, k, grp, n FROM t WHERE name = $1 OR ($1 = 'none' AND name IS NULL) ORDER BY id",
                 key=("id",), param="text", max_rows=3),
    "agg": Feed(name="a", sql="SELECT grp, count(*) AS c, max(v) AS top FROM t WHERE grp <= $1 GROUP BY grp ORDER BY grp",
                key=("grp",), param="int", max_rows=3),
}  # fmt: skip
NAMES = ["a", "b", "none", None]

values = st.fixed_dictionaries({
    "grp": st.integers(0, 4), "name": st.sampled_from(NAMES), "k": st.integers(0, 3),
    "v": st.one_of(st.none(), st.sampled_from(["x", "y", "é€"])),
    "n": st.one_of(st.none(), st.decimals(min_value=-100, max_value=100, places=2, allow_nan=False)),
    "j": st.one_of(st.none(), st.sampled_from([{"a": 1}, [1, 2], "s", 1.5])),
})  # fmt: skip
ops = st.one_of(
    st.tuples(st.just("insert"), values),
    st.tuples(st.just("update"), st.integers(0, 4), st.integers(0, 3), values),
    st.tuples(st.just("delete"), st.integers(0, 4), st.integers(0, 3)),
)
history = st.lists(st.lists(ops, min_size=0, max_size=4), min_size=1, max_size=5)


def _params(feed: Feed) -> st.SearchStrategy:
    one = st.sampled_from(["a", "b", "none", "zzz"]) if feed.param == "text" else st.integers(-1, 6)
    return st.lists(one, min_size=1, max_size=7, unique=True)


@pytest.fixture
async def pool(database_url):
    await db_execute(database_url, SCHEMA)
    database = Database(config=DatabaseConfig(url=database_url, max_pool=2), application_name="subsys:property")
    await database.open()
    try:
        yield database.pool
    finally:
        await database.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), feed_name=st.sampled_from(sorted(FEEDS)), steps=history, batch=st.integers(1, 4))
async def test_merged_outcomes_equal_per_topic_outcomes(pool, data, feed_name, steps, batch):
    feed = FEEDS[feed_name]
    params = data.draw(_params(feed), label="params")
    await pool.execute("TRUNCATE t RESTART IDENTITY")
    template = plan_feed(feed.sql)
    assert isinstance(template, MergeTemplate), template
    merged_sql = await prepare_merged(pool, feed, lambda array: template.render(array, feed.max_rows))
    streams = {how: [TopicStream(topic=f"{feed.name}:{p}", feed=feed, param=p) for p in params] for how in ("one", "all")}
    frames: dict[str, list] = {"one": [], "all": []}
    for how, group in streams.items():
        for stream in group:
            stream.local.add(_Recorder(frames[how]))
    for step in steps:
        async with pool.acquire() as conn:
            async with conn.transaction():
                for op in step:
                    await _apply(conn, op)
        alone = [await _alone(pool, feed, p) for p in params]
        merged: list = []
        for at in range(0, len(params), batch):
            chunk = params[at:at + batch]
            async with pool.acquire() as conn:
                records = await conn.fetch(merged_sql, chunk)
            merged += [_outcome(o) for o in split_merged(records, feed, len(chunk))]
        assert merged == alone, f"step {step}: params {params}"
        for how, outcomes in (("one", alone), ("all", merged)):
            for stream, outcome in zip(streams[how], outcomes):
                result = PollError("failed", code=outcome[1]) if outcome[0] == "error" else dict(outcome[1])
                assert deliver(stream, 1, result, 1.0, lambda _t, _e: True)
    assert frames["one"] == frames["all"]


class _Recorder:
    def __init__(self, into: list) -> None:
        self.into = into

    def deliver(self, publication) -> None:
        self.into.append((publication.kind, publication.topic, publication.seq, json.dumps(publication.body)))


async def _alone(pool, feed: Feed, param) -> tuple:
    try:
        return _outcome(await run_feed_query(pool, feed, param))
    except PollError as exc:
        return _outcome(exc)


def _outcome(result) -> tuple:
    if isinstance(result, PollError):
        return ("error", result.code)
    return ("rows", list(result.items()))  # in order: the order is part of a snapshot


async def _apply(conn, op) -> None:
    if op[0] == "insert":
        row = op[1]
        await conn.execute("INSERT INTO t (grp, name, k, v, n, j) VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",
                           row["grp"], row["name"], row["k"], row["v"], row["n"], _json(row["j"]))  # fmt: skip
    elif op[0] == "update":
        _, grp, k, row = op
        await conn.execute("UPDATE t SET name = $3, v = $4, n = $5, j = $6::text::jsonb WHERE grp = $1 AND k = $2",
                           grp, k, row["name"], row["v"], row["n"], _json(row["j"]))  # fmt: skip
    else:
        await conn.execute("DELETE FROM t WHERE grp = $1 AND k = $2", op[1], op[2])


def _json(value):
    return None if value is None else json.dumps(value)
