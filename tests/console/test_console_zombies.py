"""The zombies screen: a real zombie on a live node, listed with its evidence and reaped through the modal.

The live zombie is a database call stuck in a frozen backend (``stuck_query``
in conftest.py). What one live node cannot produce (several zombies of other
kinds, a failed action, a zombie healed before its turn) is played by a
backend that answers like the API (``ScriptedBackend``), through the same
screen and modal.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from subsys.client.admin import AdminClient, AdminError, NotFound
from subsys.client.ws import connect
from subsys.console.app import ConsoleApp
from subsys.console.backend import Backend
from subsys.console.screens.modals import ActionModal
from subsys.console.screens.zombies import ZombiesScreen
from subsys.console.widgets.table import InPlaceTable
from subsys.core import admin as api
from subsys.node.zombies import KINDS

from conftest import OPERATOR, READER, SIZE, stuck_query, text_of, until
from support import Subscription, eventually, still_stuck

pytestmark = pytest.mark.timeout(240)


def footer_labels(app: ConsoleApp) -> list[str]:
    return [str(key.description) for key in app.screen.query("FooterKey")]


def zombie_rows(app: ConsoleApp) -> list[list[str]]:
    return app.screen.query_one("#zombies", InPlaceTable).plain_rows()


def evidence(app: ConsoleApp) -> str:
    return text_of(app.screen.query_one("#evidence-text"))


async def open_zombies(pilot, app: ConsoleApp) -> ZombiesScreen:
    await pilot.press("4")
    return await until(pilot, lambda: isinstance(app.screen, ZombiesScreen) and app.screen.listing is not None
                       and app.screen, message="the first listing")  # fmt: skip


# -- a real zombie -----------------------------------------------------------------------------------


async def test_a_stuck_query_is_listed_with_its_evidence_and_reaped_through_the_modal(zombie_node) -> None:
    node = zombie_node
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        app = ConsoleApp([node.base_url], OPERATOR)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.backend.connected and app.can_act)
            screen = await open_zombies(pilot, app)
            assert zombie_rows(app) == [] and "No zombies: every source agrees." in evidence(app)
            assert all(kind in evidence(app) for kind in KINDS), "an empty list explains what is looked for"
            summary = text_of(screen.query_one("#zsummary"))
            assert "zombies 0" in summary and "janitor node-1" in summary and "auto-reap off" in summary, summary
            assert {"Mark", "Reap", "Dry run"} <= set(footer_labels(app)), footer_labels(app)

            await pilot.press("1")  # no scan while the zombie is made: a scan uses the node's pool too
            await pilot.pause(1.0)
            async with stuck_query(node, sub) as (stuck, epoch, call):
                subject = f"node-1/{call['id']}"
                zombie_id = f"stuck_query:{subject}"
                said = (f"end node-1's stuck database call {call['id']} by terminating its connection "
                        f"(backend pid {call['pid']})")  # fmt: skip
                await pilot.press("4")
                await until(pilot, lambda: len(zombie_rows(app)) == 1, timeout=60, interval=0.2,
                            message="the stuck query listed (a finding is confirmed on its second scan)")  # fmt: skip
                mark, kind, shown_subject, nodes, since, scans, janitor = zombie_rows(app)[0]
                assert (mark, kind, shown_subject, nodes, janitor) == (" ", "stuck_query", subject, "node-1", "no: off")
                assert since.endswith("ago") and int(scans) >= 2, (since, scans)
                shown = evidence(app)
                for text in ("a hung backend holding a connection", "why  cancelled (its topics stopped) and still running",
                             "topics it polled  the node's own report and the coordinator",
                             f"items:1 at epoch {stuck} (no longer owned there)", "feed  the node's own report\n   items",
                             f"backend pid  the node's own report\n   {call['pid']}", "running for", "stuck since",
                             "db connections  PostgreSQL's pg_stat_activity", said, "consecutive scans",
                             "auto-reap is off: reap it here"):  # fmt: skip
                    assert text in shown, (text, shown)

                # A dry run says what a reap would do and changes nothing.
                await pilot.press("X")
                modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
                await until(pilot, lambda: modal.state == "done", message=f"dry run answered ({modal.outcome})")
                assert modal.outcome.plain.startswith("Dry run, nothing changed. A reap would:"), modal.outcome.plain
                assert said in modal.outcome.plain
                await pilot.press("escape")
                await until(pilot, lambda: isinstance(app.screen, ZombiesScreen))
                assert still_stuck(node, call)

                # The marked row is the one reaped; the modal names the action; "n" does nothing.
                await pilot.press("space")
                await until(pilot, lambda: zombie_rows(app)[0][0] == "●" and screen.marked == {zombie_id})
                await pilot.press("x")
                modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
                what = text_of(modal.query_one("#dialog-what"))
                assert modal.title_text == "Reap 1 zombie", modal.title_text
                assert what.startswith("Each action is carried out only if its evidence still holds"), what
                assert f"stuck_query {subject}: {said}" in what, what
                await pilot.press("n")
                await until(pilot, lambda: isinstance(app.screen, ZombiesScreen))
                assert still_stuck(node, call), "cancelled: nothing done"

                await pilot.press("x")
                modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
                await pilot.press("y")
                await until(pilot, lambda: modal.state == "done", timeout=60, message=f"reaped ({modal.outcome})")
                outcome = modal.outcome.plain
                assert f"✓ done stuck_query {subject}: {said}" in outcome, outcome
                assert outcome.endswith("Reaped 1 of 1 zombie: 1 action done, 0 failed, 0 not needed any more."), outcome
                await eventually(lambda: not still_stuck(node, call), message="the stuck query gone")
                await pilot.press("escape")
                await until(pilot, lambda: isinstance(app.screen, ZombiesScreen))
                await until(pilot, lambda: zombie_rows(app) == [] and not screen.marked, message="the row goes")
                await until(pilot, lambda: "reaped so far by node-1 1 stuck_query" in
                            text_of(screen.query_one("#zsummary")), message="counted")  # fmt: skip
        async with AdminClient(node.base_url, token=OPERATOR) as admin:
            assert (await admin.zombies()).zombies == []
            assert (await admin.topic("items:1")).epoch == epoch, "the topic serves on at its latest epoch"
        await sub.stop()


@pytest.mark.parametrize("how", ["read token", "--read-only"])
async def test_a_read_only_console_shows_the_zombie_and_offers_no_reap(zombie_node, how: str) -> None:
    node = zombie_node
    token, read_only = (READER, False) if how == "read token" else (OPERATOR, True)
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        async with stuck_query(node, sub) as (stuck, _epoch, call):
            app = ConsoleApp([node.base_url], token, read_only)
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: app.backend.connected and app.read_only)
                screen = await open_zombies(pilot, app)
                await until(pilot, lambda: len(zombie_rows(app)) == 1, timeout=60, interval=0.2, message="listed")
                assert f"items:1 at epoch {stuck} (no longer owned there)" in evidence(app), "the evidence is for everyone"
                labels = footer_labels(app)
                assert not {"Mark", "Mark all/none", "Reap", "Dry run"} & set(labels), labels
                for key in ("space", "a", "x", "X"):
                    await pilot.press(key)
                    await pilot.pause(0.3)
                    assert isinstance(app.screen, ZombiesScreen), f"{key} opened {app.screen}"
                assert not screen.marked and zombie_rows(app)[0][0] == " "
            assert still_stuck(node, call), "nothing reaped"
        await sub.stop()


# -- what one live node cannot produce ------------------------------------------------------------

SESSION = "4f1c2a9e-1b2c-4d5e-8f90-a1b2c3d4e5f6"
ZOMBIES = [
    api.Zombie(id="duplicate_poller:items:1", kind="duplicate_poller", subject="items:1", nodes=["n1", "n2"],
               first_seen=0, scans=3, auto=True,
               evidence={"pollers": [{"node": "n1", "epoch": 3, "stuck": False}, {"node": "n2", "epoch": 2, "stuck": False}],
                         "owner_key": {"holder": SESSION, "index": 3, "node": "n1"}, "db_connections": {"n1": 2, "n2": None}},
               actions=[{"do": "stop_poller", "node": "n2", "topic": "items:1", "epoch": 2}]),
    api.Zombie(id=f"dead_session:{SESSION}", kind="dead_session", subject=SESSION, nodes=["n1"], first_seen=0, scans=2,
               auto=True, evidence={"session": SESSION, "node": "n1", "why": "n1: its address refuses connections (refused)",
                                    "holds": ["owner:orders:7"], "checks": {"subsys:n1": "critical"}},
               actions=[{"do": "destroy_session", "session": SESSION, "node": "n1"}]),
    api.Zombie(id="stale_presence:items:1@n3", kind="stale_presence", subject="items:1@n3", nodes=["n3"], first_seen=0,
               scans=2, auto=True, evidence={"presence_key": {"holder": SESSION, "index": 812, "node": "n3"},
                                             "why": "n3 has no local subscribers to items:1"},
               actions=[{"do": "delete_key", "key": {"kind": "presence", "topic": "items:1", "node": "n3", "index": 812,
                                                     "holder": SESSION}}]),
    api.Zombie(id="stuck_owner:orders:9", kind="stuck_owner", subject="orders:9", nodes=["n2"], first_seen=0, scans=2,
               auto=False, evidence={"owner_key": {"holder": "x", "index": 5, "node": "n2"},
                                     "why": "n2 holds it but runs no poller for it", "last_poll_ago": 95.0},
               actions=[{"do": "delete_key", "key": {"kind": "owner", "topic": "orders:9", "node": "n2", "index": 5}}]),
]  # fmt: skip


class ScriptedBackend(Backend):
    """Answers like the API: a fixed listing; a reap answers from ``answers``: (done, detail) or an error."""

    listing = api.ZombieList(answered_by="n1", zombies=ZOMBIES, scanned_at=0, janitor="n1", auto_reap=True,
                             reaped={"dead_session": 4}, kinds=KINDS)  # fmt: skip
    answers: dict[str, Any] = {
        "duplicate_poller:items:1": (True, "stop n2's poller of items:1 (epoch 2)"),
        f"dead_session:{SESSION}": (False, "failed: ConsulError: 500 rpc error"),
        "stale_presence:items:1@n3": NotFound("no such zombie now", status=404, code="unknown_zombie"),
        "stuck_owner:orders:9": AdminError("boom", status=500, code="internal"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reaps: list[tuple[list[str], bool]] = []

    def start(self) -> None:
        self._set_connected(api.WhoAmI(role="operator", token_id="op", read_only=False, node="n1"))

    async def zombies(self) -> api.ZombieList:
        await asyncio.sleep(0.05)
        return self.listing

    async def reap(self, ids: list[str], *, dry_run: bool = False) -> api.ReapResult:
        self.reaps.append((list(ids), dry_run))
        await asyncio.sleep(0.05)
        outcomes = []
        for zombie in (z for z in ZOMBIES if z.id in ids):
            answer = self.answers[zombie.id]
            if isinstance(answer, Exception):
                raise answer
            done, detail = (False, "dry run") if dry_run else answer
            outcomes += [api.ReapOutcome(id=zombie.id, kind=zombie.kind, subject=zombie.subject, action=action,
                                         done=done, detail=detail) for action in zombie.actions]  # fmt: skip
        return api.ReapResult(dry_run=dry_run, outcomes=outcomes, reaped=sum(o.done for o in outcomes),
                              failed=sum(o.detail.startswith("failed") for o in outcomes), skipped=0)  # fmt: skip


async def test_marked_zombies_are_reaped_one_by_one_and_every_outcome_is_said() -> None:
    app = ConsoleApp(["http://127.0.0.1:1"], OPERATOR, backend_factory=ScriptedBackend)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.can_act)
        screen = await open_zombies(pilot, app)
        await until(pilot, lambda: len(zombie_rows(app)) == 4)
        assert [r[1:4] for r in zombie_rows(app)] == [["duplicate_poller", "items:1", "n1, n2"],
                                                      ["dead_session", "4f1c2a9e…", "n1"],
                                                      ["stale_presence", "items:1@n3", "n3"],
                                                      ["stuck_owner", "orders:9", "n2"]]  # fmt: skip
        assert [r[6] for r in zombie_rows(app)] == ["yes", "yes", "yes", "no: manual"]
        summary = text_of(screen.query_one("#zsummary"))
        assert "auto-reap on" in summary and "reaped so far by n1 4 dead_session" in summary, summary

        # The evidence follows the cursor, in words, with the values.
        assert "held by session 4f1c2a9e… of n1 (index 3)" in evidence(app) and "n2: ? open" in evidence(app)
        await pilot.press("down")
        await until(pilot, lambda: "node n1: its address refuses connections" in evidence(app), message=evidence(app))
        assert "owner:orders:7" in evidence(app) and "subsys:n1: critical" in evidence(app)
        await pilot.press("down")
        await until(pilot, lambda: "presence key  the coordinator" in evidence(app))
        assert "held by session 4f1c2a9e… of n3 (index 812)" in evidence(app)
        await pilot.press("down")
        await until(pilot, lambda: "an operator decides" in evidence(app))
        assert "last poll  the node's own report\n   1m35s ago" in evidence(app), evidence(app)

        # space toggles a mark, a marks all (or none), esc clears.
        marks = lambda: [r[0] for r in zombie_rows(app)]  # noqa: E731
        await pilot.press("space")
        await until(pilot, lambda: marks() == [" ", " ", " ", "●"])
        await pilot.press("space")
        await until(pilot, lambda: marks() == [" "] * 4)
        await pilot.press("a")
        await until(pilot, lambda: marks() == ["●"] * 4)
        assert "4 marked" in str(screen.table.border_subtitle)
        await pilot.press("escape")
        await until(pilot, lambda: marks() == [" "] * 4)
        await pilot.press("a")
        await until(pilot, lambda: marks() == ["●"] * 4)

        await pilot.press("x")
        modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
        what = text_of(modal.query_one("#dialog-what"))
        assert modal.title_text == "Reap 4 zombies" and what.startswith("Each action is carried out only if"), what
        for line in ("duplicate_poller items:1: stop n2's poller of items:1 (epoch 2), closing its database connection",
                     "dead_session 4f1c2a9e…: destroy session 4f1c2a9e… of n1: Consul deletes its keys",
                     "stale_presence items:1@n3: delete the presence key of items:1@n3 at index 812",
                     "stuck_owner orders:9: delete the owner key of orders:9 at index 5 (only if unchanged since)"):
            assert line in what, (line, what)
        await pilot.press("y")
        await until(pilot, lambda: modal.state == "done", message=str(modal.outcome))
        assert app.backend.reaps == [([z.id], False) for z in ZOMBIES], "one request per zombie, in the table's order"
        lines = modal.outcome.plain.splitlines()
        assert lines[0].startswith(" ✓ done duplicate_poller items:1: stop n2's poller of items:1 (epoch 2)"), lines
        assert lines[1] == " ✗ failed dead_session 4f1c2a9e…: destroy session 4f1c2a9e… of n1: Consul deletes its keys"
        assert lines[2].strip() == "ConsulError: 500 rpc error"
        assert lines[3].startswith(" · not needed any more stale_presence items:1@n3: delete the presence key")
        assert lines[4].strip().startswith("gone before its turn (healed meanwhile")
        assert lines[5].startswith(" ✗ failed stuck_owner orders:9: delete the owner key of orders:9 at index 5")
        assert lines[6].strip() == "internal: boom"
        assert lines[-1] == "Reaped 1 of 4 zombies: 1 action done, 2 failed, 1 not needed any more.", lines
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ZombiesScreen) and not screen.marked)

        # No mark: the row under the cursor. The dry run asks nothing and sends one request.
        await pilot.press("ctrl+home", "X")
        modal = await until(pilot, lambda: isinstance(app.screen, ActionModal) and app.screen)
        await until(pilot, lambda: modal.state == "done", message=f"{modal.state} {modal.outcome}")
        assert app.backend.reaps[-1] == (["duplicate_poller:items:1"], True)
        assert modal.outcome.plain.splitlines() == ["Dry run, nothing changed. A reap would:",
                                                    " - duplicate_poller items:1: stop n2's poller of items:1 (epoch 2), "
                                                    "closing its database connection if it hangs"]  # fmt: skip
