"""The operator commands (``subsys nodes|topics|topic|cluster|failover|drain|undrain``) as real subprocesses.

Each command runs as ``python -m subsys ...`` against a live node of this
event loop (so the subprocess is awaited with ``asyncio.create_subprocess_exec``
and the node keeps serving meanwhile), with ``SUBSYS_URL`` and ``SUBSYS_TOKEN``
in its environment. What is checked: the ``--json`` answers, the exit codes
(cli/admin.py ``ExitCode``), that ``--yes`` asks nothing, and that a declined
or impossible confirmation changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import pty

import pytest

from subsys.client.admin import AdminClient
from subsys.client.ws import connect

from support import CliResult, Subscription, db_execute, eventually, free_port, run_cli

pytestmark = pytest.mark.timeout(180)

OPERATOR, READER = "op-token-for-cli-tests", "read-token-for-cli-tests"
SCHEMA = "create table items (id int primary key, grp int not null, v int not null); " \
         "insert into items values (1, 1, 0), (2, 1, 0), (3, 2, 0);"  # fmt: skip
FEED = {"sql": "select id, v from items where grp = $1 order by id", "key": ["id"], "param": "int", "interval": 0.1}


async def cli(*args: str, url: str | None, token: str | None = OPERATOR, stdin: int | bytes | None = None,
              timeout: float = 90, **env: str) -> CliResult:  # fmt: skip
    """``subsys ARGS`` as a subprocess, with an operator token unless told otherwise."""
    return await run_cli(*args, url=url, token=token, stdin=stdin, timeout=timeout, **env)


@pytest.fixture
async def admin_node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    return await start_node({"items": FEED}, database_url=database_url,
                            secrets={"admin_token": OPERATOR, "admin_read_token": READER})  # fmt: skip


async def _topic(node, name: str):
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        return await admin.topic(name)


async def _listed(node, count: int) -> bool:
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        page = await admin.topics()
    return page.total == count and all(t.state == "ok" for t in page.topics)


async def test_read_commands_answer_json_with_the_api_fields_and_tables_fit_80_columns(admin_node) -> None:
    node = admin_node
    url = node.base_url
    async with connect(node.ws_url) as client:
        subs = [Subscription(client, t) for t in ("items:1", "items:2")]
        await asyncio.gather(*(s.next() for s in subs))
        await eventually(lambda: _listed(node, 2), message="both topics listed and polled")

        summary = (await cli("cluster", "--json", url=url)).json
        assert summary["nodes"] == 1 and summary["topics"] == 2 and summary["clients"] == 1
        assert summary["answered_by"] == node.node_id and summary["partial"] is False

        listing = await cli("nodes", "--json", url=url)
        assert listing.code == 0, listing.err
        [info] = listing.json["nodes"]
        assert info["node"] == node.node_id and info["health"] == "ok" and info["owned"] == 2

        page = (await cli("topics", "--sort", "topic", "--desc", "--limit", "1", "--json", url=url)).json
        assert [t["topic"] for t in page["topics"]] == ["items:2"] and page["total"] == 2
        assert page["topics"][0]["owner"] == node.node_id and page["topics"][0]["state"] == "ok"
        page = (await cli("topics", "--q", "items:1", "--json", url=url)).json
        assert [t["topic"] for t in page["topics"]] == ["items:1"]
        page = (await cli("topics", "--text", "items", "--owner", node.node_id, "--feed", "items", "--json",
                          url=url)).json  # fmt: skip
        assert page["total"] == 2
        page = (await cli("topics", "--state", "error", "--json", url=url)).json
        assert page["total"] == 0 and page["topics"] == []
        page = (await cli("topics", "--all", "--limit", "1", "--json", url=url)).json
        assert [t["topic"] for t in page["topics"]] == ["items:1", "items:2"] and page["limit"] == 2

        detail = (await cli("topic", "items:1", "--json", url=url)).json
        assert detail["owner"] == node.node_id and detail["epoch"] >= 1
        assert detail["history"][0]["event"] == "acquired" and detail["nodes"][0]["role"] == "owner"

        # The same for people: tables at 80 columns, no line longer.
        for args, expected in ((["nodes"], [node.node_id, "ok"]), (["topics"], ["items:1", "items:2", "2 topics"]),
                               (["topic", "items:1"], ["ownership history", "acquired", node.node_id]),
                               (["cluster"], ["embedded", "2 owned"])):  # fmt: skip
            shown = await cli(*args, url=url)
            assert shown.code == 0, shown.err
            for text in expected:
                assert text in shown.out, (args, shown.out)
            assert max(len(line) for line in shown.out.splitlines()) <= 80, shown.out
        for sub in subs:
            await sub.stop()


async def test_urls_fall_back_in_order_and_accept_the_websocket_form(admin_node) -> None:
    node = admin_node
    dead = f"http://127.0.0.1:{free_port()}"
    shown = await cli("cluster", "--json", url=f"{dead},{node.base_url}")
    assert shown.code == 0 and shown.json["answered_by"] == node.node_id, shown.err
    shown = await cli("nodes", "--json", "--url", dead, "--url", node.ws_url, url=None)
    assert shown.code == 0 and shown.json["nodes"][0]["node"] == node.node_id, shown.err


async def test_exit_codes_name_what_went_wrong(admin_node) -> None:
    node = admin_node
    url = node.base_url
    unreachable = await cli("nodes", url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.code == 3 and "no node answered" in unreachable.said, unreachable.err

    wrong = await cli("nodes", "--json", url=url, token="not-the-token")
    assert wrong.code == 4 and wrong.json["error"]["code"] == "unauthorized" and wrong.json["error"]["exit"] == 4
    assert "SUBSYS_TOKEN" in wrong.said
    missing = await cli("cluster", url=url, token=None)
    assert missing.code == 4 and "set SUBSYS_TOKEN" in missing.said, missing.err
    # The token is never an option (it would show in `ps`): Typer refuses it as a usage error.
    assert (await cli("nodes", "--token", OPERATOR, url=url)).code == 2

    unknown = await cli("topic", "items:99", "--json", url=url)
    assert unknown.code == 6 and unknown.json["error"]["code"] == "unknown_topic"
    assert (await cli("drain", "no-such-node", "--yes", url=url)).code == 6
    assert (await cli("undrain", "no-such-node", "--yes", url=url)).code == 6
    assert (await cli("topic", "not a topic", url=url)).code == 2  # the API's 400
    assert (await cli("topics", "--sort", "nonsense", url=url)).code == 2  # Typer's

    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        assert (await cli("failover", "items:1", "--to", "no-such-node", "--yes", url=url)).code == 6
        forbidden = await cli("failover", "items:1", "--yes", "--json", url=url, token=READER)
        assert forbidden.code == 5 and forbidden.json["error"]["code"] == "forbidden", forbidden.out
        assert "read token" in forbidden.said
        assert (await _topic(node, "items:1")).epoch == first["epoch"]
        await sub.stop()


async def test_failover_with_yes_asks_nothing_moves_the_topic_and_subscribers_resync(admin_node) -> None:
    node = admin_node
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        done = await cli("failover", "items:1", "--yes", "--json", url=node.base_url)
        assert done.code == 0, done.err
        assert "Continue?" not in done.err
        result = done.json
        assert result["topic"] == "items:1" and result["from_node"] == result["to_node"] == node.node_id
        assert result["epoch_after"] > result["epoch_before"] == first["epoch"] and result["took_ms"] >= 0
        resync = await sub.until(lambda f: f["type"] == "resync")
        assert resync["epoch"] == result["epoch_after"]

        await eventually(lambda: _history_has_epoch_change(node), message="the new owner's gap recorded")
        shown = await cli("topic", "items:1", url=node.base_url)
        assert "forced failover by" in " ".join(shown.out.split()), shown.out
        assert f"{result['epoch_before']}→{result['epoch_after']}" in shown.out, shown.out

        again = await cli("failover", "items:1", "--yes", url=node.base_url)  # for people: the result line
        assert again.code == 0 and "failed over" in again.out and "epoch" in again.out, again.out
        await sub.stop()


async def _history_has_epoch_change(node) -> bool:
    return any(h.event == "epoch" for h in (await _topic(node, "items:1")).history)


async def test_without_yes_nothing_happens_unless_a_person_agrees(admin_node) -> None:
    node = admin_node
    url = node.base_url
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        epoch = first["epoch"]

        # stdin is not a terminal: refuse at once (no hanging on a prompt), whatever it holds.
        piped = await cli("failover", "items:1", "--json", url=url, stdin=b"y\n")
        assert piped.code == 8 and piped.json["error"]["code"] == "aborted", piped.out
        assert "--yes" in piped.said and "Nothing done" in piped.said
        piped = await cli("drain", node.node_id, url=url, stdin=b"n\n")
        assert piped.code == 8, piped.err

        # A person at a terminal answers "n": the question names owner and epoch, then nothing is done.
        for args in (["failover", "items:1"], ["drain", node.node_id]):
            primary, secondary = pty.openpty()
            try:
                os.write(primary, b"n\n")
                asked = await cli(*args, url=url, stdin=secondary)
            finally:
                os.close(secondary)
                os.close(primary)
            assert asked.code == 8, asked.err
            assert "Continue? [y/N]" in asked.said and "aborted: nothing done." in asked.said, asked.err
            assert asked.out == ""
            if args[0] == "failover":
                assert f"Fail over items:1: stop {node.node_id}'s poller (epoch {epoch})" in asked.said, asked.err
            else:
                assert f"Drain {node.node_id}: stop its 1 owned topic" in asked.said, asked.err

        detail = await _topic(node, "items:1")
        assert detail.epoch == epoch and detail.owner == node.node_id
        async with AdminClient(url, token=OPERATOR) as admin:
            assert not (await admin.node(node.node_id)).draining
        assert all(f["type"] != "resync" for f in sub.frames), sub.frames
        await sub.stop()


async def test_drain_moves_every_topic_and_undrain_ends_it(admin_node) -> None:
    node = admin_node
    url = node.base_url
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        drained = await cli("drain", node.node_id, "--yes", "--json", url=url)
        assert drained.code == 0, drained.err
        assert "Continue?" not in drained.err
        assert drained.json == {**drained.json, "node": node.node_id, "draining": True, "moved": 1, "remaining": 0}

        info = (await cli("nodes", "--json", url=url)).json["nodes"][0]
        assert info["draining"] and info["owned"] == 0
        assert "draining" in (await cli("nodes", url=url)).out
        # Alone in the cluster, the drained node's topic has no owner now: nothing to fail over.
        unowned = (await cli("topics", "--state", "unowned", "--json", url=url)).json
        assert [t["topic"] for t in unowned["topics"]] == ["items:1"]
        refused = await cli("failover", "items:1", "--yes", "--json", url=url)
        assert refused.code == 7 and refused.json["error"]["code"] == "not_owned", refused.out

        undrained = await cli("undrain", node.node_id, "--yes", url=url)
        assert undrained.code == 0 and "takes topics and clients again" in undrained.out, undrained.err
        async with AdminClient(url, token=OPERATOR) as admin:
            assert not (await admin.node(node.node_id)).draining
        await eventually(lambda: _owned_by(node, "items:1", node.node_id), message="the topic owned again")
        await sub.stop()


async def _owned_by(node, topic: str, owner: str) -> bool:
    return (await _topic(node, topic)).owner == owner


async def test_shell_completion_is_offered() -> None:
    shown = await cli("--help", url=None)
    assert shown.code == 0 and "--install-completion" in shown.out
