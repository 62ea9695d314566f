"""``subsys zombies`` (list, ``--dry-run``, ``--reap``) as real subprocesses against a live node.

As in test_cli_admin.py: each command runs as ``python -m subsys ...`` with
``SUBSYS_URL``/``SUBSYS_TOKEN``, awaited without blocking the node, which
runs in this event loop.

A real zombie on one embedded node: a poller stuck in a database call. The
PostgreSQL backend serving the node's poller is stopped (SIGSTOP), so the
poll hangs; a forced failover then tells the poller to stop, which it cannot
(its connection waits for a backend that does not run), so the node keeps it
as a stuck poller next to the new epoch's, and the scan reports a
``duplicate_poller``. Reaping stops it (cancelled again, its connection's
release abandoned). The backend is continued (SIGCONT) whatever happens.
The node runs without the janitor (``zombie_interval = 0``), which would
otherwise reap the zombie on its own before the CLI sees it.
"""

from __future__ import annotations

import os
import pty
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest

from subsys.cli import render
from subsys.cli.admin import ExitCode
from subsys.cli.zombies import reap_exit
from subsys.client.admin import AdminClient
from subsys.client.ws import connect
from subsys.core import admin as api

from support import (CliResult, Subscription, db_execute, eventually, free_port, frozen_poll_backend, run_cli,
                     still_stuck, stuck_call)

pytestmark = pytest.mark.timeout(240)

OPERATOR, READER = "op-token-for-zombie-tests", "read-token-for-zombie-tests"
SCHEMA = "create table items (id int primary key, grp int not null, v int not null); " \
         "insert into items values (1, 1, 0), (2, 1, 0), (3, 2, 0);"  # fmt: skip
# A long statement timeout: the hung poll must still be hanging when the failover stops the topic's polling.
FEED = {"sql": "select id, v from items where grp = $1 order by id", "key": ["id"], "param": "int", "interval": 0.1,
        "statement_timeout": 120}  # fmt: skip
KINDS = {"orphan_poller", "duplicate_poller", "stuck_query", "stuck_owner", "idle_owner", "stale_presence", "dead_session",
         "leaked_registration", "released_key"}  # fmt: skip


async def cli(*args: str, url: str | None, token: str | None = OPERATOR, stdin: int | bytes | None = None,
              timeout: float = 90) -> CliResult:  # fmt: skip
    return await run_cli(*args, url=url, token=token, stdin=stdin, timeout=timeout)


async def with_pty(*args: str, answer: bytes, url: str) -> CliResult:
    """A person at a terminal (stdin only) who answers ``answer`` to the question."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer)
        return await cli(*args, url=url, stdin=secondary)
    finally:
        os.close(secondary)
        os.close(primary)


def fits_80(result: CliResult) -> bool:
    return max((len(line) for line in result.out.splitlines()), default=0) <= 80


@pytest.fixture
async def zombie_node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url, node={"zombie_interval": 0},
                            secrets={"admin_token": OPERATOR, "admin_read_token": READER})  # fmt: skip
    node.extra["database_url"] = database_url
    return node


async def _topic(node, name: str = "items:1") -> api.TopicDetail:
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        return await admin.topic(name)


# -- no zombies ------------------------------------------------------------------------------


async def test_no_zombies_is_exit_0_and_an_empty_list_and_a_reap_does_nothing(zombie_node) -> None:
    node = zombie_node
    url = node.base_url
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")  # a polled topic: its poller, key and presence are all rightful
        await sub.next()

        listed = await cli("zombies", "--json", url=url)
        assert listed.code == 0, listed.err
        answer = listed.json
        assert answer["zombies"] == [] and answer["answered_by"] == node.node_id and answer["partial"] is False
        assert set(answer["kinds"]) == KINDS and answer["auto_reap"] is False  # the janitor is off here

        shown = await cli("zombies", url=url)
        assert shown.code == 0 and "no zombies" in shown.out and f"scanned by {node.node_id}" in shown.shown, shown
        assert fits_80(shown), shown.out
        assert (await cli("zombies", "-v", url=url)).code == 0

        for args in (["--kind", "orphan_poller"], ["--topic", "items:1"], ["--node", node.node_id],
                     ["--id", "duplicate_poller:items:1"]):  # fmt: skip
            filtered = await cli("zombies", *args, "--json", url=url)
            assert filtered.code == 0 and filtered.json["zombies"] == [], (args, filtered.err)
        # An unknown kind would match nothing and say "none" forever: refused instead.
        unknown = await cli("zombies", "--kind", "orphan_polers", "--json", url=url)
        assert unknown.code == 2 and unknown.json["error"]["code"] == "unknown_kind", unknown.out
        assert "orphan_poller" in unknown.said

        dry = await cli("zombies", "--dry-run", "--json", url=url)
        assert dry.code == 0, dry.err
        assert dry.json == {"dry_run": True, "outcomes": [], "reaped": 0, "failed": 0, "skipped": 0}
        dry = await cli("zombies", "--dry-run", url=url)
        assert dry.code == 0 and "no zombies" in dry.out and "nothing to reap" in dry.out, dry

        # Nothing to reap: nothing to confirm either (stdin is not a terminal, no --yes: still fine).
        reaped = await cli("zombies", "--reap", "--json", url=url)
        assert reaped.code == 0, reaped.err
        assert reaped.json == {"dry_run": False, "outcomes": [], "reaped": 0, "failed": 0, "skipped": 0}
        reaped = await cli("zombies", "--reap", "--yes", url=url)
        assert reaped.code == 0 and "no zombies: nothing to reap." in reaped.out, reaped
        assert "Continue?" not in reaped.err
        detail = await _topic(node)
        assert detail.owner == node.node_id and detail.state == "ok"
        await sub.stop()


async def test_exit_codes_name_what_went_wrong(zombie_node) -> None:
    node = zombie_node
    url = node.base_url
    unreachable = await cli("zombies", "--json", url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.code == 3 and unreachable.json["error"]["code"] == "unreachable", unreachable.out
    assert "no node answered" in unreachable.said

    wrong = await cli("zombies", "--json", url=url, token="not-the-token")
    assert wrong.code == 4 and wrong.json["error"]["exit"] == 4, wrong.out
    missing = await cli("zombies", url=url, token=None)
    assert missing.code == 4 and "set SUBSYS_TOKEN" in missing.said, missing.err

    # A read token lists; reaping, even a dry run or with nothing to reap, needs an operator token.
    assert (await cli("zombies", "--json", url=url, token=READER)).code == 0
    for args in (["--reap", "--yes"], ["--dry-run"]):
        forbidden = await cli("zombies", *args, "--json", url=url, token=READER)
        assert forbidden.code == 5 and forbidden.json["error"]["code"] == "forbidden", (args, forbidden.out)
        assert "read token" in forbidden.said
    assert (await cli("zombies", "--nonsense", url=url)).code == 2  # Typer's usage error


# -- a real zombie: a database call stuck in a frozen backend ------------------------------------


@asynccontextmanager
async def stuck_query(node, sub: Subscription) -> AsyncIterator[tuple[int, int, dict]]:
    """Make the topic's poll hang in the database, force a failover: yields (old epoch, new epoch, the call).

    The backend the poll uses is the one that ran the latest query of the node's pool (asyncpg
    hands out the most recently released connection first, and nothing else queries meanwhile).
    The failover stops the topic's polling at once; what is left is the hung call itself, a
    stuck query. The backend is continued (SIGCONT) on the way out, whatever happened.
    """
    before = await _topic(node)

    async def polls() -> int:
        return (await _topic(node)).polls

    async with frozen_poll_backend(node, polls) as pid:
        moved = await cli("failover", "items:1", "--yes", "--json", url=node.base_url)
        assert moved.code == 0, moved.err
        new_epoch = moved.json["epoch_after"]
        assert moved.json["epoch_before"] == before.epoch and new_epoch > before.epoch
        await sub.until(lambda f: f["type"] == "resync" and f["epoch"] == new_epoch)
        assert node.node.running_pollers() == {"items:1": new_epoch}  # the topic polls on, once
        call = await stuck_call(node, "items:1", before.epoch)
        assert call["pid"] == pid and call["feed"] == "items", call
        yield before.epoch, new_epoch, call


async def _listed_zombie(url: str) -> CliResult | None:
    listed = await cli("zombies", "--json", url=url)
    return listed if listed.code == 9 and listed.json["zombies"] else None


async def test_a_call_stuck_in_the_database_is_listed_rehearsed_and_reaped(zombie_node) -> None:
    node = zombie_node
    url = node.base_url
    me = node.node_id
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()

        # -- round 1: the listing, its filters, a dry run, declined reaps, then `--reap --yes --json`
        async with stuck_query(node, sub) as (stuck, epoch, call):
            # A finding is confirmed on its second consecutive scan (the API scans twice when it must).
            listed = await eventually(lambda: _listed_zombie(url), timeout=60, interval=0.5,
                                      message="the stuck query listed as a zombie")  # fmt: skip
            [zombie] = listed.json["zombies"]
            kind, subject = zombie["kind"], f"{me}/{call['id']}"
            assert kind == "stuck_query" and zombie["subject"] == subject, zombie
            assert zombie["id"] == f"{kind}:{subject}" and zombie["nodes"] == [me] and zombie["auto"] is True
            assert zombie["scans"] >= 2 and zombie["first_seen"] <= time.time()
            evidence = zombie["evidence"]
            assert evidence["topics"] == [{"topic": "items:1", "epoch": stuck, "held_by_node": False}], evidence
            assert evidence["pid"] == call["pid"] and evidence["feed"] == "items" and evidence["node"] == me
            action = {"do": "terminate_query", "node": me, "query": call["id"], "pid": call["pid"]}
            assert zombie["actions"] == [action]
            said = f"end {me}'s stuck database call {call['id']}"

            # For people: a row (kind, subject, node, since, the reap), 80 columns; -v adds the evidence.
            shown = await cli("zombies", url=url)
            assert shown.code == 9, shown.err
            for text in ("KIND", "stuck_query", me, "ago", "terminate query", "1 zombie"):
                assert text in shown.out, (text, shown.out)
            assert fits_80(shown), shown.out
            verbose = await cli("zombies", "-v", url=url)
            assert verbose.code == 9 and fits_80(verbose), verbose.out
            for text in (f"items:1 epoch {stuck} (no longer owned there)", "the node's own report",
                         "backend pid", str(call["pid"]), "db connections", "a hung backend holding a connection",
                         said, "consecutive scans"):  # fmt: skip
                assert text in verbose.shown, (text, verbose.out)

            # Filters select it or not (a topic: any the call polled); the exit code follows what is listed.
            for args, code in ((["--kind", kind], 9), (["--kind", "orphan_poller"], 0), (["--topic", "items:1"], 9),
                               (["--topic", "items:2"], 0), (["--node", me], 9), (["--node", "no-such-node"], 0),
                               (["--id", zombie["id"]], 9), (["--id", "orphan_poller:items:1"], 0)):  # fmt: skip
                filtered = await cli("zombies", *args, "--json", url=url)
                assert filtered.code == code, (args, filtered.out, filtered.err)
                assert len(filtered.json["zombies"]) == (code == 9)

            # A dry run says what a reap would do, exits 9, and changes nothing.
            dry = await cli("zombies", "--dry-run", "--json", url=url)
            assert dry.code == 9, dry.err
            assert dry.json["dry_run"] is True and dry.json["reaped"] == 0
            [would] = dry.json["outcomes"]
            assert would["id"] == zombie["id"] and would["action"] == action and would["done"] is False
            dry = await cli("zombies", "--dry-run", url=url)
            assert dry.code == 9 and "Dry run, nothing changed. A reap would:" in dry.shown, dry.out
            assert said in dry.shown
            assert still_stuck(node, call)

            # No --yes and no terminal: refused at once, naming the action; a person's "n": nothing done.
            piped = await cli("zombies", "--reap", "--json", url=url, stdin=b"y\n")
            assert piped.code == 8 and piped.json["error"]["code"] == "aborted", piped.out
            assert said in piped.said and "Nothing done" in piped.said
            declined = await with_pty("zombies", "--reap", answer=b"n\n", url=url)
            assert declined.code == 8, declined.err
            assert "Reap 1 zombie" in declined.said and "Continue? [y/N]" in declined.said, declined.err
            assert f"stuck_query {subject}: {said}" in declined.said
            assert "aborted: nothing done." in declined.said
            assert still_stuck(node, call)

            reaped = await cli("zombies", "--reap", "--yes", "--json", url=url)
            assert reaped.code == 0, reaped.err
            result = reaped.json
            assert result["dry_run"] is False and result["reaped"] == 1 and result["failed"] == 0, result
            [outcome] = result["outcomes"]
            assert outcome["id"] == zombie["id"] and outcome["action"] == action and outcome["done"] is True
            assert "Continue?" not in reaped.err
            await eventually(lambda: not still_stuck(node, call), message="the stuck query gone")
            after = await cli("zombies", "--json", url=url)
            assert after.code == 0 and after.json["zombies"] == [], after.out

        # -- round 2: the same again, reaped by a person who agrees: the table, the question, the summary
        async with stuck_query(node, sub) as (stuck, epoch, call):
            await eventually(lambda: _listed_zombie(url), timeout=60, interval=0.5,
                             message="the second stuck query listed as a zombie")  # fmt: skip
            agreed = await with_pty("zombies", "--reap", answer=b"y\n", url=url)
            assert agreed.code == 0, agreed.err
            assert "stuck_query" in agreed.out and "Continue? [y/N]" in agreed.said
            assert f"✓ stuck_query {me}/{call['id']}: end {me}'s stuck database call" in agreed.shown
            assert "Reaped 1 of 1 zombie: 1 action done, 0 failed, 0 not needed any more." in agreed.shown
            assert fits_80(agreed), agreed.out
            await eventually(lambda: not still_stuck(node, call), message="the second stuck query gone")
            assert (await cli("zombies", url=url)).code == 0

        # The topic serves on at its latest epoch.
        await db_execute(node.extra["database_url"], "update items set v = 7 where id = 1")
        await eventually(lambda: sub.view.epoch == epoch and any(r["v"] == 7 for r in sub.view.rows.values()),
                         message="the change published at the latest epoch")  # fmt: skip
        assert (await _topic(node)).epoch == epoch
        await sub.stop()


# -- what a live single node cannot produce: a failed reap -------------------------------------------


def test_a_reap_with_a_failed_action_says_why_and_exits_10() -> None:
    from rich.console import Console

    session = "4f1c2a9e-1b2c-4d5e-8f90-a1b2c3d4e5f6"
    outcomes = [
        api.ReapOutcome(id="duplicate_poller:items:1", kind="duplicate_poller", subject="items:1",
                        action={"do": "stop_poller", "node": "web-1", "topic": "items:1", "epoch": 3}, done=True,
                        detail="stop web-1's poller of items:1 (epoch 3)"),
        api.ReapOutcome(id=f"dead_session:{session}", kind="dead_session", subject=session,
                        action={"do": "destroy_session", "session": session, "node": "web-2"}, done=False,
                        detail="failed: ConsulError: 500 rpc error"),
        api.ReapOutcome(id="stale_presence:items:1@web-2", kind="stale_presence", subject="items:1@web-2",
                        action={"do": "delete_key", "key": {"kind": "presence", "topic": "items:1", "node": "web-2",
                                                            "index": 12, "holder": session}},
                        done=False, detail="the key changed since it was judged: nothing done"),
    ]  # fmt: skip
    result = api.ReapResult(dry_run=False, outcomes=outcomes, reaped=1, failed=1, skipped=1)
    assert reap_exit(result) == ExitCode.REAP_FAILED == 10
    assert reap_exit(result.model_copy(update={"failed": 0})) == ExitCode.OK
    console = Console(width=80, record=True, color_system=None)
    console.print(render.reap_view(result))
    text = " ".join(console.export_text().split())
    assert "✓ duplicate_poller items:1: stop web-1's poller of items:1 (epoch 3)" in text
    assert "✗ dead_session 4f1c2a9e…: destroy session 4f1c2a9e… of web-2 (Consul deletes its keys)" in text
    assert "failed: ConsulError: 500 rpc error" in text
    assert "not done: the key changed since it was judged" in text
    assert "Reaped 1 of 3 zombies: 1 action done, 1 failed, 1 not needed any more." in text
    assert {code.value for code in ExitCode} == set(range(11)), "exit codes stay distinct and documented"
