"""Bugs the chaos run found, pinned by a test each (pure: no services).

1. A PostgreSQL restart under load: asyncpg's ``pool.release`` runs its reset query
   on a dying connection, terminates the connection itself, detaches it from the
   proxy and re-raises. ``subsys.node.database._release`` then called
   ``conn.terminate()`` on the detached proxy, which raises ``InterfaceError``
   ("connection has been released back to the pool") out of the ``finally`` of
   ``run_feed_query``: the poller logged "unexpected poll failure" with a traceback
   and clients got a ``poll_failed`` status instead of ``database_unavailable``
   (docs/protocol.md, ``status``).
"""

from __future__ import annotations

import asyncpg
import pytest

from subsys.config import Feed
from subsys.core.errors import PollError
from subsys.node.database import run_feed_query


class _DetachedProxy:
    """Behaves like asyncpg's PoolConnectionProxy once the pool has taken the connection back."""

    def __init__(self) -> None:
        self.detached = False

    async def fetch(self, *args, **kwargs):
        raise asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation: terminating connection due to administrator command"
        )

    def terminate(self) -> None:
        if self.detached:
            raise asyncpg.InterfaceError(
                "cannot call Connection.terminate(): connection has been released back to the pool"
            )


class _DyingPool:
    def __init__(self) -> None:
        self.proxy = _DetachedProxy()

    async def acquire(self, timeout=None):
        return self.proxy

    async def release(self, conn) -> None:
        # asyncpg's PoolConnectionHolder.release: the reset query fails on the dead connection,
        # the holder terminates it and detaches the proxy, then re-raises.
        conn.detached = True
        raise asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")


async def test_a_connection_dying_under_a_poll_is_database_unavailable_not_a_crash() -> None:
    feed = Feed(name="rows", sql="select 1", key=("id",), param="int")
    with pytest.raises(PollError) as caught:
        await run_feed_query(_DyingPool(), feed, 1)
    assert caught.value.code == "database_unavailable"
