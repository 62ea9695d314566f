"""The console against a live node: a real PostgreSQL, a node with admin tokens, Pilot.

``console_node`` starts one node named ``node-1`` (stable names make stable
snapshots) with a small ``items`` feed; ``run_console`` runs the Textual app
in this event loop (the node's), and ``until`` waits on what the screen shows.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from support import db_execute

OPERATOR, READER = "op-token-for-console", "read-token-for-console"
SECRETS = {"admin_token": OPERATOR, "admin_read_token": READER}
SCHEMA = (
    "create table items (id int primary key, grp int not null, name text not null, v int not null); "
    "insert into items select i, 1 + (i - 1) / 5, 'item-' || i, 0 from generate_series(1, 15) i;"
)
FEEDS = {"items": {"sql": "select id, name, v from items where grp = $1 order by id", "key": ["id"],
                   "param": "int", "interval": 0.1}}  # fmt: skip
SIZE = (150, 42)


@pytest.fixture
async def console_db(database_url: str) -> str:
    await db_execute(database_url, SCHEMA)
    return database_url


@pytest.fixture
async def console_node(start_node, console_db):
    return await start_node(FEEDS, database_url=console_db, secrets=SECRETS, node={"node_id": "node-1"})


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
