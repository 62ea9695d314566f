"""Snapshots of the main screens against a live node, volatile values made stable.

``snap_compare`` runs the app with ``App.run`` (its own event loop), so it
runs in a thread while the node keeps serving in this test's loop. The
:class:`StableFormatter` pins times, ports, epochs and poll timings; node
names are fixed by the fixture (``node-1``). Update with ``--snapshot-update``.
"""

from __future__ import annotations

import asyncio

from subsys.client.admin import AdminClient
from subsys.client.ws import connect
from subsys.console.app import ConsoleApp
from subsys.console.fmt import StableFormatter
from subsys.console.screens.topic import TopicScreen
from subsys.console.screens.topics import TopicsScreen
from subsys.console.screens.zombies import ZombiesScreen
from subsys.console.widgets.rows import LiveRows
from subsys.console.widgets.table import InPlaceTable, PagedTable

from conftest import OPERATOR, SIZE, stuck_query, text_of, until
from support import Subscription, eventually


async def _subscribed(node, topics):
    client_cm = connect(node.ws_url)
    client = await client_cm.__aenter__()
    subs = [Subscription(client, t) for t in topics]
    await asyncio.gather(*(s.next() for s in subs))
    return client_cm, subs


async def _settled(pilot) -> None:
    """Two refreshes after the data is there, so every panel shows the same moment."""
    await pilot.pause(2.2)


async def test_overview_snapshot(console_node, snap_compare) -> None:
    cm, subs = await _subscribed(console_node, ["items:1", "items:2"])
    app = ConsoleApp([console_node.base_url], OPERATOR, fmt=StableFormatter())

    async def ready(pilot) -> None:
        await until(pilot, lambda: app.screen.query_one("#nodes").keys == ["node-1"])
        await until(pilot, lambda: "topics 2" in str(app.screen.query_one("#summary").content))
        await _settled(pilot)

    assert await asyncio.to_thread(snap_compare, app, terminal_size=SIZE, run_before=ready)
    for sub in subs:
        await sub.stop()
    await cm.__aexit__(None, None, None)


async def test_topics_snapshot(console_node, snap_compare) -> None:
    cm, subs = await _subscribed(console_node, ["items:1", "items:2", "items:3"])
    app = ConsoleApp([console_node.base_url], OPERATOR, fmt=StableFormatter())

    async def ready(pilot) -> None:
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, TopicsScreen)
                    and len(app.screen.query_one("#topics", PagedTable).keys) == 3)  # fmt: skip
        await pilot.press("s")
        await until(pilot, lambda: app.screen.query_one("#topics", PagedTable).keys[0] == "items:3")
        await _settled(pilot)

    assert await asyncio.to_thread(snap_compare, app, terminal_size=SIZE, run_before=ready)
    for sub in subs:
        await sub.stop()
    await cm.__aexit__(None, None, None)


async def test_topic_detail_snapshot(console_node, snap_compare) -> None:
    cm, subs = await _subscribed(console_node, ["items:1"])
    await eventually(lambda: console_node.node.running_pollers().get("items:1"), message="polled")
    app = ConsoleApp([console_node.base_url], OPERATOR, fmt=StableFormatter())

    async def ready(pilot) -> None:
        app.open_topic("items:1")
        await until(pilot, lambda: isinstance(app.screen, TopicScreen)
                    and len(app.screen.query_one("#rows", LiveRows).keys) == 5
                    and app.screen.detail is not None and app.screen.detail.presence.get("node-1") == 2)  # fmt: skip
        await _settled(pilot)

    assert await asyncio.to_thread(snap_compare, app, terminal_size=SIZE, run_before=ready)
    for sub in subs:
        await sub.stop()
    await cm.__aexit__(None, None, None)


async def test_zombies_snapshot(zombie_node, snap_compare) -> None:
    """A real zombie (a database call stuck in a frozen backend), its evidence beside it."""
    cm, [sub] = await _subscribed(zombie_node, ["items:1"])
    async with stuck_query(zombie_node, sub):
        async with AdminClient(zombie_node.base_url, token=OPERATOR) as admin:
            await eventually(lambda: _listed(admin), timeout=30, message="the stuck poller listed")
        app = ConsoleApp([zombie_node.base_url], OPERATOR, fmt=StableFormatter())

        async def ready(pilot) -> None:
            await pilot.press("4")
            await until(pilot, lambda: isinstance(app.screen, ZombiesScreen)
                        and len(app.screen.query_one("#zombies", InPlaceTable).keys) == 1
                        and "no longer owned there" in text_of(app.screen.query_one("#evidence-text")), timeout=30)  # fmt: skip
            await _settled(pilot)

        assert await asyncio.to_thread(snap_compare, app, terminal_size=SIZE, run_before=ready)
    await sub.stop()
    await cm.__aexit__(None, None, None)


async def _listed(admin: AdminClient) -> bool:
    return bool((await admin.zombies()).zombies)
