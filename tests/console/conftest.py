"""The console against a live node: a real PostgreSQL, a node with admin tokens, Pilot.

``console_node`` starts one node named ``node-1`` (stable names make stable
snapshots) with a small ``items`` feed; the tests run the Textual app in this
event loop (the node's), and ``until`` waits on what the screen shows.

``zombie_node`` is the same node without the janitor, and ``stuck_query``
makes a real zombie on it (the CLI's tests found the way): the PostgreSQL
backend serving the topic's poll is stopped (SIGSTOP), so the poll hangs;
a forced failover then stops the topic's polling, the hung call cannot end,
the node keeps it as a stuck query, and a scan reports a ``stuck_query``.
The backend is continued (SIGCONT) whatever happens.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import pytest

from subsys.client.admin import AdminClient

from support import Subscription, db_execute, frozen_poll_backend, stuck_call

OPERATOR, READER = "op-token-for-console", "read-token-for-console"
SECRETS = {"admin_token": OPERATOR, "admin_read_token": READER}
SCHEMA = (
    "create table items (id int primary key, grp int not null, name text not null, v int not null); "
    "insert into items select i, 1 + (i - 1) / 5, 'item-' || i, 0 from generate_series(1, 15) i;"
)
FEEDS = {"items": {"sql": "select id, name, v from items where grp = $1 order by id", "key": ["id"],
                   "param": "int", "interval": 0.1}}  # fmt: skip
SIZE = (150, 42)
# A long statement timeout: the hung poll must still hang when the failover tells the poller to stop.
ZOMBIE_FEEDS = {"items": {**FEEDS["items"], "statement_timeout": 120}}


@pytest.fixture
async def console_db(database_url: str) -> str:
    await db_execute(database_url, SCHEMA)
    return database_url


@pytest.fixture
async def console_node(start_node, console_db):
    return await start_node(FEEDS, database_url=console_db, secrets=SECRETS, node={"node_id": "node-1"})


@pytest.fixture
async def zombie_node(start_node, console_db):
    """``node-1`` without the janitor (``zombie_interval = 0``): it would reap the zombie before the console sees it."""
    node = await start_node(ZOMBIE_FEEDS, database_url=console_db, secrets=SECRETS,
                            node={"node_id": "node-1", "zombie_interval": 0})  # fmt: skip
    node.extra["database_url"] = console_db
    return node


@asynccontextmanager
async def stuck_query(node, sub: Subscription, topic: str = "items:1") -> AsyncIterator[tuple[int, int, dict]]:
    """Hang ``topic``'s poll in the database and force a failover: yields (old epoch, new epoch, the call).

    Nothing else may use the node's pool meanwhile (a zombie scan does: keep the console off the
    zombies view): the backend stopped is the one that ran the latest query, which the pool
    (last released, first reused) hands to the next poll.
    """
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        before = await admin.topic(topic)

        async def polls() -> int:
            return (await admin.topic(topic)).polls

        async with frozen_poll_backend(node, polls) as pid:
            moved = await admin.failover(topic)
            assert moved.epoch_before == before.epoch and moved.epoch_after > before.epoch
            await sub.until(lambda f: f["type"] == "resync" and f["epoch"] == moved.epoch_after)
            call = await stuck_call(node, topic, before.epoch)
            assert call["pid"] == pid, call
            yield before.epoch, moved.epoch_after, call


async def until(pilot, predicate: Callable[[], Any], timeout: float = 20.0, message: str = "", interval: float = 0.05) -> Any:
    """Let the app run until ``predicate()`` is truthy (it reads widgets, so it runs between frames)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the widget may not be mounted yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {message or predicate}" + (f" (last: {last!r})" if last else ""))
        await pilot.pause(interval)


def text_of(widget) -> str:
    """The plain text a Static shows."""
    content = widget.content
    return content.plain if hasattr(content, "plain") else str(content)
