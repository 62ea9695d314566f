"""Read-only consoles offer no action; a lost node shows a banner and the console finds another."""

from __future__ import annotations

import asyncio

import pytest
from textual.command import CommandPalette
from textual.widgets import OptionList

from subsys.client.ws import connect
from subsys.console.app import ConsoleApp
from subsys.console.screens.modals import ActionModal, HelpScreen, NodePicker
from subsys.console.screens.topics import TopicsScreen
from subsys.console.widgets.chrome import Banner
from subsys.console.widgets.table import PagedTable
from subsys.testing.procs import free_port

from conftest import FEEDS, OPERATOR, READER, SECRETS, SIZE, text_of, until
from support import Subscription


def footer_labels(app: ConsoleApp) -> list[str]:
    return [str(key.description) for key in app.screen.query("FooterKey")]


async def _footer_settles(pilot, app: ConsoleApp, label: str, shown: bool) -> None:
    """The footer is recomposed when the bindings change (it has no keys for a moment): wait for it."""
    await until(pilot, lambda: bool(footer_labels(app)), message="the footer's keys")
    if shown:
        await until(pilot, lambda: label in footer_labels(app), message=f"{label} in the footer")
    else:
        assert label not in footer_labels(app), footer_labels(app)


async def palette_offers(pilot, app: ConsoleApp, typed: str) -> list[str]:
    await pilot.press("ctrl+p")
    palette = await until(pilot, lambda: isinstance(app.screen, CommandPalette) and app.screen)
    await pilot.press(*typed)
    await pilot.pause(0.8)  # the palette searches in the background
    options = palette.query_one(OptionList)
    offered = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
    await pilot.press("escape")
    await until(pilot, lambda: not isinstance(app.screen, CommandPalette))
    return offered


@pytest.mark.parametrize("how", ["operator", "--read-only", "read token"])
async def test_read_only_consoles_offer_no_action(console_node, how: str) -> None:
    token, read_only = {"operator": (OPERATOR, False), "--read-only": (OPERATOR, True), "read token": (READER, False)}[how]
    async with connect(console_node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        app = ConsoleApp([console_node.base_url], token, read_only)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.connected and app.backend.whoami is not None)
            await pilot.pause(0.2)
            acting = how == "operator"
            assert app.can_act is acting and app.read_only is not acting
            assert app.screen.query_one("#badge").display is not acting, "the READ-ONLY badge"
            await until(pilot, lambda: app.screen.query_one("#nodes").keys == ["node-1"])
            await _footer_settles(pilot, app, "Drain", acting)
            await pilot.press("2")
            await until(pilot, lambda: isinstance(app.screen, TopicsScreen) and
                        app.screen.query_one("#topics", PagedTable).keys == ["items:1"])  # fmt: skip
            await _footer_settles(pilot, app, "Failover", acting)
            offered = await palette_offers(pilot, app, "Fail")
            assert any("Fail over items:1" in o for o in offered) is acting, offered
            offered = await palette_offers(pilot, app, "Drain")
            assert any("Drain node-1" in o for o in offered) is acting, offered
            assert any("View: topics" in o for o in await palette_offers(pilot, app, "View")), "views are always there"
            await pilot.press("question_mark")
            help_screen = await until(pilot, lambda: isinstance(app.screen, HelpScreen) and app.screen)
            listed = [k for _title, keys in help_screen.sections for _key, k in keys]
            assert ("Failover" in listed) is acting and "Filter" in listed and "Help" in listed, listed
            await pilot.press("escape")
            if not acting:  # the keys themselves do nothing
                for key in ("f", "F"):
                    await pilot.press(key)
                    await pilot.pause(0.5)
                    assert isinstance(app.screen, TopicsScreen), f"{key} opened {app.screen}"
                await pilot.press("1", "d", "u")
                await pilot.pause(0.5)
                assert not isinstance(app.screen, (ActionModal, NodePicker))
        await sub.stop()


async def test_losing_the_node_shows_a_banner_and_the_console_reconnects_to_the_next_url(start_node, console_db) -> None:
    spare = free_port()
    first = await start_node(FEEDS, database_url=console_db, secrets=SECRETS, node={"node_id": "node-1"})
    app = ConsoleApp([first.base_url, f"http://127.0.0.1:{spare}"], OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.backend.connected and app.backend.node == "node-1")
        banner = app.screen.query_one(Banner)
        assert not banner.display
        await pilot.press("2")
        await until(pilot, lambda: isinstance(app.screen, TopicsScreen))
        await first.stop()
        banner = app.screen.query_one(Banner)
        await until(pilot, lambda: banner.display, message="the banner")
        assert text_of(banner).startswith("lost node-1: reconnecting… (trying http://127.0.0.1:"), text_of(banner)
        assert "reconnecting" in text_of(app.screen.query_one("#conn"))
        await pilot.press("1", "2", "r")  # the UI stays usable while lost
        await pilot.pause(1.5)
        second = await start_node(FEEDS, database_url=console_db, secrets=SECRETS,
                                  node={"node_id": "node-2", "port": spare})  # fmt: skip
        await until(pilot, lambda: app.backend.connected and app.backend.node == "node-2", timeout=30,
                    message="reconnected to the second URL")  # fmt: skip
        await until(pilot, lambda: not app.screen.query_one(Banner).display, message="banner gone")
        assert "node-2" in text_of(app.screen.query_one("#conn"))
        await pilot.press("1")
        await until(pilot, lambda: app.screen.query_one("#nodes").keys == ["node-2"], message="the new node listed")
        assert any("lost node-1" in (e.data.get("message") or "") for e in app.backend.log)
        await pilot.press("q")
    assert app.return_code in (0, None)
    await second.stop()
    await asyncio.sleep(0)
