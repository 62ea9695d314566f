"""The console against a live node: topics, sorting and filtering, live rows, failover."""

from __future__ import annotations

import asyncio

from subsys.client.admin import AdminClient
from subsys.client.ws import connect
from subsys.console.app import ConsoleApp
from subsys.console.screens.modals import ActionModal
from subsys.console.screens.topic import TopicScreen
from subsys.console.screens.topics import TopicsScreen
from subsys.console.widgets.rows import LiveRows
from subsys.console.widgets.table import PagedTable
from subsys.testing.procs import free_port

from conftest import FEEDS, OPERATOR, SECRETS, SIZE, text_of, until
from support import Subscription, db_execute


def topics_shown(app: ConsoleApp) -> list[str]:
    return list(app.screen.query_one("#topics", PagedTable).keys)


def empty_hint(app: ConsoleApp) -> str:
    hint = app.screen.query_one("#topics-empty")
    return text_of(hint) if hint.display else ""


async def test_an_empty_cluster_says_how_a_topic_comes_to_be_and_the_first_one_appears(console_node) -> None:
    app = ConsoleApp([console_node.base_url], OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.connected, message="connected")
        await pilot.press("2")
        await until(pilot, lambda: "No topics." in empty_hint(app), message="the hint, in place of an empty table")
        assert "subsys sub FEED:PARAM" in empty_hint(app)
        async with connect(console_node.ws_url) as client:
            sub = Subscription(client, "items:1")
            await sub.next()
            await until(pilot, lambda: topics_shown(app) == ["items:1"], message="the first topic", timeout=15)
            assert app.screen.query_one("#topics", PagedTable).display and empty_hint(app) == ""
            await sub.stop()


async def test_a_subscribed_topic_appears_and_the_table_sorts_and_filters(console_node) -> None:
    async with connect(console_node.ws_url) as client:
        subs = [Subscription(client, t) for t in ("items:1", "items:2", "items:3")]
        await asyncio.gather(*(s.next() for s in subs))
        app = ConsoleApp([console_node.base_url], OPERATOR)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.connected, message="connected")
            await pilot.press("2")
            await until(pilot, lambda: isinstance(app.screen, TopicsScreen))
            await until(pilot, lambda: topics_shown(app) == ["items:1", "items:2", "items:3"], message="all three, by name")
            table = app.screen.query_one("#topics", PagedTable)
            row = table.plain_rows()[0]
            assert row[:3] == ["items:1", "items", "node-1"] and row[5] == "ok" and row[6].strip() == "1", row
            assert "1–3 of 3" in str(table.border_subtitle)

            await pilot.press("s")  # descending, by the server
            await until(pilot, lambda: topics_shown(app) == ["items:3", "items:2", "items:1"], message="descending")
            assert "▼" in table.columns["topic"].label.plain
            await pilot.press(">")  # next column: feed (ties broken by topic, server-side)
            await until(pilot, lambda: app.screen.sort == "feed" and "▼" in table.columns["feed"].label.plain)

            await pilot.press("slash", *"items:2")
            await until(pilot, lambda: topics_shown(app) == ["items:2"], message="filtered to items:2")
            assert 'filter "items:2"' in str(table.border_subtitle)
            await pilot.press("enter")  # the filter stays, the table has the keys again
            await pilot.press("slash", "ctrl+u", *"state:error")
            await until(pilot, lambda: topics_shown(app) == [], message="no failing topic")
            await until(pilot, lambda: "No topic matches" in empty_hint(app), message="the empty list says why")
            assert "state:error" in empty_hint(app)
            await pilot.press("escape")
            await until(pilot, lambda: len(topics_shown(app)) == 3, message="filter cleared")
            assert table.display and not app.screen.query_one("#topics-empty").display
        for sub in subs:
            await sub.stop()


async def test_topic_detail_shows_rows_changing_live_with_the_change_highlighted(console_node, console_db) -> None:
    app = ConsoleApp([console_node.base_url], OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.connected)
        await pilot.press("2", "g", *"items:2", "enter")  # go to a topic nobody else subscribed to
        await until(pilot, lambda: isinstance(app.screen, TopicScreen))
        rows = app.screen.query_one("#rows", LiveRows)
        await until(pilot, lambda: len(rows.plain_rows()) == 5, message="the snapshot's 5 rows")
        assert [r[1] for r in rows.plain_rows()] == ["6", "7", "8", "9", "10"]
        assert not rows.highlighted, "a first snapshot is not a change"
        assert text_of(app.screen.query_one("#live-status")).strip().startswith("LIVE")

        await db_execute(console_db, "update items set v = 42 where id = 8")
        changed = '[8]'
        await until(pilot, lambda: changed in rows.highlighted, message="row 8 highlighted")
        row = next(r for r in rows.plain_rows() if r[1] == "8")
        assert row[0] == "▌" and row[3] == "42", row
        assert all(r[0] == " " for r in rows.plain_rows() if r[1] != "8"), "only the changed row lights up"
        await until(pilot, lambda: not rows.highlighted, timeout=5, message="the highlight fades")
        await until(pilot, lambda: app.screen.detail is not None and app.screen.detail.presence.get("node-1") == 1,
                    message="the console's own subscription counts")  # fmt: skip
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, TopicsScreen))
        await until(pilot, lambda: "items:2" not in app.backend.live, message="unsubscribed on leaving")


async def test_behind_a_separate_admin_listener_the_live_rows_come_through_the_client_port(
    start_node, console_db
) -> None:
    admin_port = free_port()
    node = await start_node(FEEDS, database_url=console_db, secrets=SECRETS,
                            node={"node_id": "node-1", "admin_port": admin_port})  # fmt: skip
    app = ConsoleApp([f"http://127.0.0.1:{admin_port}"], OPERATOR)  # the operator knows only the admin port
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.connected)
        await pilot.press("2", "g", *"items:2", "enter")
        await until(pilot, lambda: isinstance(app.screen, TopicScreen))
        rows = app.screen.query_one("#rows", LiveRows)
        await until(pilot, lambda: len(rows.plain_rows()) == 5, message="the rows, through the client port")
        assert app.backend.ws_url() == node.ws_url


async def _failover_modal(pilot, app: ConsoleApp) -> ActionModal:
    """Open the topics view once items:1 is listed and press ``f``: the failover's confirmation."""
    await until(pilot, lambda: app.backend.connected and app.can_act)
    await pilot.press("2")
    await until(pilot, lambda: topics_shown(app) == ["items:1"])
    await pilot.press("f")
    return await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)


async def test_failover_through_the_confirmation_modal_moves_the_topic(console_node) -> None:
    async with connect(console_node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        app = ConsoleApp([console_node.base_url], OPERATOR)
        async with app.run_test(size=SIZE) as pilot:
            modal = await _failover_modal(pilot, app)
            what = text_of(modal.query_one("#dialog-what"))
            assert what.startswith(f"Fail over items:1 from node-1 (epoch {first['epoch']}) to "), what
            assert what.endswith("its clients get a resync."), what
            await pilot.press("y")
            await until(pilot, lambda: modal.state == "done", message=f"failover done ({modal.outcome})")
            outcome = modal.outcome.plain
            assert outcome.startswith("✓ items:1 now owned by node-1 · epoch ") and "took" in outcome, outcome
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, TopicsScreen))
        async with AdminClient(console_node.base_url, token=OPERATOR) as admin:
            detail = await admin.topic("items:1")
        assert detail.epoch > first["epoch"] and detail.owner == "node-1"
        assert f"→ {detail.epoch}" in outcome
        assert any((h.reason or "").startswith("forced failover") for h in detail.history)
        resync = await sub.until(lambda f: f["type"] == "resync")
        assert resync["epoch"] == detail.epoch
        await sub.stop()


async def test_cancel_does_nothing_and_errors_are_shown_not_raised(console_node) -> None:
    async with connect(console_node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        app = ConsoleApp([console_node.base_url], OPERATOR)
        async with app.run_test(size=SIZE) as pilot:
            await _failover_modal(pilot, app)
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, TopicsScreen))
            # Drain the only node from the overview: its topic has nowhere to go and ends up ownerless.
            await pilot.press("1")
            await until(pilot, lambda: app.screen.query_one("#nodes").keys == ["node-1"])
            await pilot.press("d")
            modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
            assert text_of(modal.query_one("#dialog-what")).startswith("Drain node-1: its 1 owned topic(s) move")
            await pilot.press("y")
            # The drain waits for its topic to land elsewhere (DRAIN_TIMEOUT, 30 s): here it cannot.
            await until(pilot, lambda: modal.state in ("done", "failed"), timeout=45, message="drain answered")
            await pilot.press("escape")
            # A failover now has nothing to move: the console says so instead of asking.
            app.confirm_failover("items:1")
            await until(pilot, lambda: any("no owner" in str(n.message) for n in app._notifications),
                        message="told there is no owner")  # fmt: skip
            assert not isinstance(app.screen, ActionModal)
            await pilot.press("1")
            await until(pilot, lambda: app.screen.query_one("#nodes").keys == ["node-1"])
            await pilot.press("u")
            modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
            await pilot.press("y")
            await until(pilot, lambda: modal.state == "done", message="undrained")
        async with AdminClient(console_node.base_url, token=OPERATOR) as admin:
            assert not (await admin.node("node-1")).draining
        assert first["epoch"] >= 1
        await sub.stop()


async def test_a_failing_feed_marks_the_live_rows_stale_and_they_recover(console_node, console_db) -> None:
    app = ConsoleApp([console_node.base_url], OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.connected)
        await pilot.press("2", "g", *"items:3", "enter")
        await until(pilot, lambda: isinstance(app.screen, TopicScreen))
        rows = app.screen.query_one("#rows", LiveRows)
        status = app.screen.query_one("#live-status")
        await until(pilot, lambda: len(rows.plain_rows()) == 5)
        await db_execute(console_db, "alter table items rename to items_away")
        await until(pilot, lambda: text_of(status).strip().startswith("STALE"), message="stale")
        assert "query_failed" in text_of(status) and "last good" in text_of(status), text_of(status)
        assert len(rows.plain_rows()) == 5, "the last good rows stay"
        await db_execute(console_db, "alter table items_away rename to items")
        await until(pilot, lambda: text_of(status).strip().startswith("LIVE"), message="live again")
