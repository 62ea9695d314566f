"""The ``subsys`` command line, as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from support import db_execute, free_port

pytestmark = pytest.mark.timeout(90)

SUBSYS = str(Path(sys.executable).with_name("subsys"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SUBSYS_") or k in ("DATABASE_URL", "CONSUL_HTTP_ADDR"))}
    env.update(extra)
    return env


async def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SUBSYS, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or _env()
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


GOOD_FEED = '[feeds.orders]\nsql = "select * from orders where id = $1"\nkey = "id"\n'


@pytest.mark.parametrize(
    "text, key",
    [
        ('[node]\nport = "eighty"\n' + GOOD_FEED, "node.port"),
        ("[node]\nport = {port}\nbogus = 1\n" + GOOD_FEED, "node.bogus"),
        ('[node]\nport = {port}\n[feeds.orders]\nsql = "select * from orders where id = $1 and b = $2"\nkey = "id"\n',
         "feeds.orders.sql"),
    ],
)
async def test_serve_with_a_broken_config_exits_before_listening(tmp_path, text, key):
    path = tmp_path / "broken.toml"
    port = free_port()
    path.write_text(text.replace("{port}", str(port)), encoding="utf-8")
    code, out, err = await _run("serve", "--config", str(path), env=_env(DATABASE_URL="postgresql://127.0.0.1:1/none"))
    assert code != 0
    message = " ".join((out + err).split())  # rich may wrap long lines
    assert str(path) in message.replace(" ", "") or str(path) in message, message
    assert key in message, message
    assert "Traceback" not in err
    assert "listening" not in message
    assert _port_is_free(port)


async def test_serve_without_feeds_or_database_is_a_config_error(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("[node]\nport = 9\n", encoding="utf-8")
    code, out, err = await _run("serve", "--config", str(path))
    assert code != 0 and "feeds" in out + err
    path.write_text('[feeds.t]\nsql = "select $1::int as id"\nkey = "id"\n', encoding="utf-8")
    code, out, err = await _run("serve", "--config", str(path))
    assert code != 0 and "database.url" in out + err


async def test_sub_prints_json_lines(start_node, database_url):
    await db_execute(
        database_url,
        "CREATE TABLE items (id int PRIMARY KEY, grp int, qty int); INSERT INTO items VALUES (1, 1, 10);",
    )
    node = await start_node(
        {"items": {"sql": "SELECT id, qty FROM items WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05}},
        database_url=database_url,
    )
    proc = await asyncio.create_subprocess_exec(
        SUBSYS, "sub", "items:1", "--json", "--count", "3", "--url", node.ws_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )
    try:
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))]
        assert lines[0]["type"] == "snapshot" and lines[0]["rows"] == [{"id": 1, "qty": 10}]
        await db_execute(database_url, "INSERT INTO items VALUES (2, 1, 20)")
        lines.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))
        await db_execute(database_url, "DELETE FROM items WHERE id = 1")
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += [json.loads(line) for line in rest.decode().splitlines()]
    assert proc.returncode == 0, err.decode()
    assert [line["type"] for line in lines] == ["snapshot", "diff", "diff"]
    assert lines[1]["inserted"] == [{"id": 2, "qty": 20}]
    assert lines[2]["deleted"] == [{"id": 1}]
    assert [line["seq"] for line in lines] == [lines[0]["seq"] + i for i in range(3)]


async def test_sub_reports_a_bad_topic_and_exits_nonzero(start_node, database_url):
    node = await start_node(
        {"items": {"sql": "SELECT $1::int AS id", "key": "id", "param": "int"}}, database_url=database_url
    )
    code, out, err = await _run("sub", "nosuch:1", "--json", "--count", "1", "--url", node.ws_url)
    assert code != 0
    assert json.loads(out.splitlines()[0])["code"] == "unknown_feed"


async def test_sub_cannot_connect(tmp_path):
    code, out, err = await _run("sub", "items:1", "--url", f"ws://127.0.0.1:{free_port()}/ws")
    assert code != 0 and "cannot connect" in err


ITEMS = "CREATE TABLE items (id int PRIMARY KEY, grp int, qty int); INSERT INTO items VALUES (1, 1, 10);"
ITEMS_FEED = {"items": {"sql": "SELECT id, qty FROM items WHERE grp = $1", "key": "id", "param": "int", "interval": 0.05}}


async def test_sub_takes_the_node_url_the_admin_commands_take(start_node, database_url):
    """The README's quick start exports SUBSYS_URL=http://host:port for the console; `subsys sub` takes it too."""
    await db_execute(database_url, ITEMS)
    node = await start_node(ITEMS_FEED, database_url=database_url)
    for url in (node.base_url, f"{node.base_url},http://127.0.0.1:{free_port()}"):
        code, out, err = await _run("sub", "items:1", "--json", "--count", "1", env=_env(SUBSYS_URL=url))
        assert code == 0, err
        assert json.loads(out.splitlines()[0])["rows"] == [{"id": 1, "qty": 10}]


async def test_sub_goes_on_through_the_next_node_when_its_node_goes_away(start_node, database_url):
    await db_execute(database_url, ITEMS)
    first = await start_node(ITEMS_FEED, database_url=database_url)
    later_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        SUBSYS, "sub", "items:1", "--json", "--count", "2",
        "--url", first.base_url, "--url", f"http://127.0.0.1:{later_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        snapshot = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert snapshot["type"] == "snapshot" and snapshot["rows"] == [{"id": 1, "qty": 10}]
        await first.stop()  # its clients are closed with 1001; nothing listens at either address for a while
        await asyncio.sleep(1.5)  # long enough for the sub to find both addresses refusing and back off
        await db_execute(database_url, "UPDATE items SET qty = 11 WHERE id = 1")
        await start_node(ITEMS_FEED, database_url=database_url, node={"port": later_port})
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    again = json.loads(out.decode().splitlines()[0])
    assert again["type"] == "snapshot" and again["rows"] == [{"id": 1, "qty": 11}], "the new node's current state"
    said = err.decode()
    assert "closed the connection (code 1001)" in said and "no node answers" in said, said
    assert f"reconnected to ws://127.0.0.1:{later_port}/ws" in said, said


async def test_sub_without_reconnect_exits_when_its_node_goes_away(start_node, database_url):
    await db_execute(database_url, ITEMS)
    node = await start_node(ITEMS_FEED, database_url=database_url)
    proc = await asyncio.create_subprocess_exec(
        SUBSYS, "sub", "items:1", "--json", "--no-reconnect", "--url", node.ws_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["type"] == "snapshot"
        await node.stop()
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1 and "connection closed by server (code 1001)" in err.decode()


async def test_follow_passes_over_a_node_that_accepts_and_never_answers(start_node, database_url):
    """A frozen process (SIGSTOP) still accepts connections: the handshake times out and the next node serves."""
    from subsys.client.ws import follow

    await db_execute(database_url, ITEMS)
    node = await start_node(ITEMS_FEED, database_url=database_url)
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    events: list[tuple[str, str]] = []
    try:
        messages = follow([silent_url, node.base_url], "items:1", timeout=1.0, on_event=lambda *e: events.append(e))
        first = await asyncio.wait_for(anext(messages), 30)
        await messages.aclose()
    finally:
        for writer in held:
            writer.close()
        silent.close()
    assert first["type"] == "snapshot" and first["rows"] == [{"id": 1, "qty": 10}]
    assert [kind for kind, _ in events] == ["lost"] and "cannot connect" in events[0][1], events
