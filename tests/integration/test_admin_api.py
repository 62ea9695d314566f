"""The admin API on one node (embedded coordinator): auth, every route, failover, drain, events.

Every response is validated against the node's own OpenAPI document
(openapi-core), so the document stays true. The Consul cluster side
(any node answers for all, failover between nodes, drain, a dead peer) is in
tests/cluster/test_admin_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from subsys.client.admin import AdminClient, Forbidden, NotFound, Unauthorized
from subsys.client.ws import connect
from subsys.testing.procs import free_port
from subsys.web.admin import EVENTS

from support import RawClient, Subscription, db_execute, eventually

OPERATOR, READER = "op-token-for-tests", "read-token-for-tests"
CLUSTER_SECRET = "cluster-secret-for-tests"
SCHEMA = "create table items (id int primary key, grp int not null, v int not null); " \
         "insert into items values (1, 1, 0), (2, 1, 0), (3, 2, 0);"
FEED = {"sql": "select id, v from items where grp = $1 order by id", "key": ["id"], "param": "int", "interval": 0.1}
GET_ROUTES = ["/whoami", "/cluster", "/nodes", "/topics", "/openapi.json"]
POST_ROUTES = ["/topics/items:1/failover", "/nodes/{node}/drain", "/nodes/{node}/undrain"]


class Checked:
    """Raw admin calls, each response validated against the OpenAPI document."""

    def __init__(self, base: str, spec: dict[str, Any]) -> None:
        self.base, self.openapi = base, OpenAPI.from_dict(spec)

    async def call(self, method: str, path: str, *, token: str | None = OPERATOR, body: Any = None,
                   params: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        async with aiohttp.ClientSession() as http:
            async with http.request(method, self.base + "/admin/v1" + path, headers=headers, params=params,
                                    **({"data": raw} if raw is not None else {"json": body})) as resp:  # fmt: skip
                data = await resp.read()
                status, content_type = resp.status, resp.content_type
        request = MockRequest(self.base, method.lower(), "/admin/v1" + path, args=params or {})
        self.openapi.validate_response(request, MockResponse(data, status_code=status, content_type=content_type))
        return status, json.loads(data)


@pytest.fixture
async def admin_node(start_node, database_url):
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url,
                            secrets={"admin_token": OPERATOR, "admin_read_token": READER,
                                     "cluster_secret": CLUSTER_SECRET})  # fmt: skip
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        spec = await admin.openapi()
    return node, Checked(node.base_url, spec)


async def test_every_route_refuses_a_missing_or_wrong_token_and_a_read_token_cannot_act(admin_node) -> None:
    node, checked = admin_node
    routes = [("GET", p) for p in GET_ROUTES + ["/topics/items:1", f"/nodes/{node.node_id}"]]
    routes += [("POST", p.format(node=node.node_id)) for p in POST_ROUTES]
    for method, path in routes:
        for token in (None, "wrong"):
            status, body = await checked.call(method, path, token=token)
            assert status == 401 and body["error"]["code"] == "unauthorized", (method, path, token, body)
    for method, path in routes:
        status, body = await checked.call(method, path, token=READER)
        if method == "POST":
            assert status == 403 and body["error"]["code"] == "forbidden", (path, body)
        else:
            assert status in (200, 404), (path, body)
    async with AdminClient(node.base_url, token=READER) as reader:
        assert (await reader.whoami()).read_only
        with pytest.raises(Forbidden):
            await reader.drain(node.node_id)
    async with AdminClient(node.base_url, token="nope") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.cluster()


async def test_a_node_without_a_token_refuses_and_says_how_to_configure_one(start_node, database_url) -> None:
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url)
    async with aiohttp.ClientSession() as http:
        async with http.get(node.base_url + "/admin/v1/cluster", headers={"Authorization": "Bearer x"}) as resp:
            body = await resp.json()
    assert resp.status == 401 and body["error"]["code"] == "admin_disabled"
    assert "SUBSYS_ADMIN_TOKEN" in body["error"]["message"]


async def test_the_insecure_dev_switch_opens_the_api(start_node, database_url) -> None:
    await db_execute(database_url, SCHEMA)
    node = await start_node({"items": FEED}, database_url=database_url, node={"admin_insecure": True})
    async with AdminClient(node.base_url) as admin:
        me = await admin.whoami()
    assert me.role == "operator" and me.token_id == "insecure-dev"


async def test_topics_show_what_clients_subscribed_with_filters_sort_and_paging(admin_node) -> None:
    node, checked = admin_node
    async with connect(node.ws_url) as client:
        subs = [Subscription(client, t) for t in ("items:1", "items:2")]
        await asyncio.gather(*(s.next() for s in subs))
        await eventually(lambda: _topic_count(checked, 2), message="both topics listed")
        status, page = await checked.call("GET", "/topics", params={"sort": "topic", "order": "desc", "limit": "1"})
        assert status == 200 and page["total"] == 2 and [t["topic"] for t in page["topics"]] == ["items:2"]
        first = page["topics"][0]
        assert first["owner"] == node.node_id and first["state"] == "ok" and first["subscribers"] == 1
        assert first["presence"] == {node.node_id: 1} and first["epoch"] >= 1 and first["seq"] >= 1
        status, page = await checked.call("GET", "/topics", params={"q": "items:1"})
        assert [t["topic"] for t in page["topics"]] == ["items:1"]
        status, page = await checked.call("GET", "/topics", params={"state": "error"})
        assert page["total"] == 0
        status, page = await checked.call("GET", "/topics", params={"sort": "nonsense"})
        assert status == 400 and page["error"]["code"] == "bad_request"
        status, detail = await checked.call("GET", "/topics/items:1")
        assert status == 200 and detail["owner"] == node.node_id
        assert [h["event"] for h in detail["history"]][:1] == ["acquired"]
        assert detail["nodes"][0]["role"] == "owner" and detail["recent_poll_ms"]
        status, body = await checked.call("GET", "/topics/items:99")
        assert status == 404 and body["error"]["code"] == "unknown_topic"
        status, body = await checked.call("GET", "/topics/not a topic")
        assert status == 400
        status, summary = await checked.call("GET", "/cluster")
        assert summary["topics"] == 2 and summary["nodes"] == 1 and summary["clients"] == 1 and not summary["partial"]
        for sub in subs:
            await sub.stop()


async def _topic_count(checked: Checked, expected: int) -> bool:
    _status, page = await checked.call("GET", "/topics")
    return page["total"] == expected


async def test_a_forced_failover_on_one_node_starts_a_new_epoch_and_clients_resync(admin_node) -> None:
    node, checked = admin_node
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        first = await sub.next()
        status, result = await checked.call("POST", "/topics/items:1/failover", body={})
        assert status == 200, result
        assert result["from_node"] == result["to_node"] == node.node_id
        assert result["epoch_after"] > result["epoch_before"] == first["epoch"]
        resync = await sub.until(lambda f: f["type"] == "resync")
        assert resync["epoch"] == result["epoch_after"]
        status, detail = await checked.call("GET", "/topics/items:1")
        reasons = [h.get("reason") or "" for h in detail["history"]]
        assert any(r.startswith("forced failover by operator:") for r in reasons), detail["history"]
        status, body = await checked.call("POST", "/topics/items:1/failover", body={"to": "nowhere"})
        assert status == 404 and body["error"]["code"] == "unknown_node"
        status, body = await checked.call("POST", "/topics/items:2/failover", body={})
        assert status == 409 and body["error"]["code"] == "not_owned"
        await sub.stop()


@pytest.mark.parametrize("raw", [b"\x00", b"{", b"[1]", b'"text"', b'{"dry_run": "maybe", "to": 7}', b'{"ids": "x"}'])
async def test_a_malformed_body_on_any_acting_route_is_a_400_never_a_500(admin_node, raw) -> None:
    node, checked = admin_node
    routes = [*POST_ROUTES, "/zombies/reap"]
    for path in routes:
        path = path.replace("{node}", node.node_id)
        status, body = await checked.call("POST", path, raw=raw)
        # a route that takes no body ignores it; one that takes a body names what is wrong with it
        assert status in (200, 400, 409), (path, raw, status, body)
        if status == 400:
            assert body["error"]["code"] == "bad_request", (path, raw, body)
    status, body = await checked.call("POST", "/zombies/reap", raw=raw)
    assert status == 400 and body["error"]["code"] == "bad_request", body


@pytest.mark.parametrize("path", ["/internal/hand-over", "/internal/drain", "/internal/reap"])
async def test_the_internal_routes_answer_a_malformed_peer_call_with_a_400(admin_node, path) -> None:
    node, _checked = admin_node
    headers = {"Authorization": f"Bearer {CLUSTER_SECRET}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for raw in (b"\x00", b"[1]", b'{"topic": "items:1", "epoch": "x"}', b'{"do": "stop_poller"}', b'{"do": "?"}'):
            async with http.post(node.base_url + path, data=raw, headers=headers) as resp:
                body = await resp.json()
            if path == "/internal/drain" and raw.startswith(b"{"):
                assert resp.status == 200, body  # drain takes an optional reason and ignores the rest
                async with http.post(node.base_url + "/internal/undrain", headers=headers) as undo:
                    assert undo.status == 200
                continue
            assert resp.status == 400 and body["error"]["code"] == "bad_request", (path, raw, resp.status, body)


async def test_drain_moves_everything_refuses_new_clients_and_undrain_ends_it(admin_node) -> None:
    node, checked = admin_node
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        status, result = await checked.call("POST", f"/nodes/{node.node_id}/drain")
        assert status == 200 and result["draining"] and result["remaining"] == 0 and result["moved"] == 1, result
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(node.ws_url)
        assert refused.value.status == 503
        status, info = await checked.call("GET", f"/nodes/{node.node_id}")
        assert info["draining"] and info["health"] == "unavailable"
        status, result = await checked.call("POST", f"/nodes/{node.node_id}/undrain")
        assert status == 200 and not result["draining"]
        raw = await RawClient.connect(node.ws_url)
        await raw.ping("back")
        await raw.close()
        await sub.stop()
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        with pytest.raises(NotFound):
            await admin.drain("no-such-node")


def _collect_events(admin: AdminClient, cursor: str | None = None) -> tuple[asyncio.Task, list]:
    """Read the event stream (after ``cursor``) into a list, in a task the test cancels."""
    events: list = []

    async def read() -> None:
        async for event in admin.events(cursor=cursor):
            events.append(event)

    return asyncio.create_task(read()), events


async def test_events_start_with_a_snapshot_then_follow_ownership(admin_node) -> None:
    node, _checked = admin_node
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        reader, seen = _collect_events(admin)
        await eventually(lambda: seen, message="the snapshot")
        assert seen[0].type == "snapshot" and node.node_id in seen[0].data["nodes"]
        async with connect(node.ws_url) as client:
            sub = Subscription(client, "items:3")
            await sub.next()
            await eventually(lambda: any(e.type == "owner" and e.data["topic"] == "items:3" for e in seen),
                             message="an owner event")  # fmt: skip
            cursor = seen[-1].id
            await sub.stop()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        again, resumed = _collect_events(admin, cursor=cursor)
        await eventually(lambda: any(e.type == "presence" for e in resumed), timeout=20,
                         message="resumed after the cursor, no snapshot")  # fmt: skip
        assert resumed[0].type != "snapshot"
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)


async def test_a_client_that_leaves_the_event_stream_ends_it_quietly(admin_node, caplog) -> None:
    """A console that closes is no error: the next event ends its stream, with nothing logged."""
    node, _checked = admin_node
    async with AdminClient(node.base_url, token=OPERATOR) as admin:
        reader, seen = _collect_events(admin)
        await eventually(lambda: seen, message="the snapshot")
        streams = node.app[EVENTS].streams
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    async with connect(node.ws_url) as client:  # events for the stream nobody reads any more
        for topic in ("items:1", "items:2"):
            sub = Subscription(client, topic)
            await sub.next()
            await sub.stop()
    await eventually(lambda: node.app[EVENTS].streams < streams, timeout=30,
                     message="the abandoned stream ended")  # fmt: skip
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_metrics_count_admin_requests_by_route_and_status(admin_node) -> None:
    node, checked = admin_node
    await checked.call("GET", "/cluster", token="wrong")
    await checked.call("GET", "/cluster")
    async with aiohttp.ClientSession() as http:
        async with http.get(node.base_url + "/metrics") as resp:
            text = await resp.text()
    assert 'subsys_admin_requests_total{route="GET /admin/v1/cluster",status="401"}' in text
    assert 'subsys_admin_requests_total{route="GET /admin/v1/cluster",status="200"}' in text


async def test_a_separate_admin_listener_serves_the_admin_api_and_nothing_else(start_node, database_url) -> None:
    await db_execute(database_url, SCHEMA)
    admin_port = free_port()
    node = await start_node({"items": FEED}, database_url=database_url, node={"admin_port": admin_port},
                            secrets={"admin_token": OPERATOR, "cluster_secret": CLUSTER_SECRET})  # fmt: skip
    admin_base = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    secret = {"Authorization": f"Bearer {CLUSTER_SECRET}"}

    async def status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers=headers) as resp:
                return resp.status, await resp.text()

    assert (await status(admin_base + "/admin/v1/cluster", auth))[0] == 200
    assert (await status(node.base_url + "/admin/v1/cluster", auth))[0] == 404, "the admin API is off the client port"
    assert (await status(node.base_url + "/admin/v1/cluster"))[0] == 404, "and says nothing there, not even 401"
    for path in ("/health", "/health/live", "/metrics"):
        assert (await status(admin_base + path))[0] == 200, path
        assert (await status(node.base_url + path))[0] == 200, path
    assert (await status(admin_base + "/internal/state", secret))[0] == 404, "node-to-node calls stay on the node's port"
    assert (await status(node.base_url + "/internal/state", secret))[0] == 200
    assert (await status(admin_base + "/ws"))[0] == 404, "clients stay on the node's port"
    async with connect(node.ws_url) as client:  # and are served there
        async for frame in client.subscribe("items:1"):
            assert frame["type"] == "snapshot"
            break

    unknown, body = await status(admin_base + "/admin/v1/no-such-route", auth)
    assert unknown == 404 and json.loads(body)["error"]["code"] == "not_found", body
    assert (await status(admin_base + "/admin/v1/no-such-route"))[0] == 401, "unknown routes need a token too"


async def test_a_known_path_with_another_method_is_a_405_and_no_route_is_an_app_middleware(admin_node) -> None:
    node, checked = admin_node
    async with aiohttp.ClientSession() as http:
        async with http.delete(node.base_url + "/admin/v1/cluster", headers={"Authorization": f"Bearer {OPERATOR}"}) as resp:
            assert resp.status == 405, await resp.text()
            assert (await resp.json())["error"]["code"] == "bad_request"
        async with http.get(node.base_url + "/admin/v1", headers={"Authorization": f"Bearer {READER}"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    # The admin guard wraps its own routes: an app-level middleware would stay on the stack of
    # every /ws handler, for the whole life of every client connection (memory per client).
    assert not node.app.middlewares


async def test_every_mutating_call_writes_one_audit_line_naming_the_token_by_its_id(admin_node, caplog) -> None:
    node, checked = admin_node
    caplog.set_level(logging.INFO, logger="subsys.audit")
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "items:1")
        await sub.next()
        calls = [
            ("/topics/items:1/failover", {}, "failover", "items:1", "ok"),
            ("/topics/items:1/failover", {"to": "nowhere"}, "failover", "items:1", "refused: unknown_node"),
            (f"/nodes/{node.node_id}/drain", None, "drain", node.node_id, "ok"),
            (f"/nodes/{node.node_id}/undrain", None, "undrain", node.node_id, "ok"),
            ("/nodes/no-such-node/drain", None, "drain", "no-such-node", "refused: unknown_node"),
        ]
        for path, body, *_ in calls:
            await checked.call("POST", path, body=body)
        await checked.call("GET", "/topics/items:1")  # reading writes no audit line
        await sub.stop()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "subsys.audit"]
    assert [(a["audit"], a["target"], a["result"]) for a in lines] == [c[2:] for c in calls], lines
    for line in lines:
        assert line["token"].startswith("operator:") and line["duration_ms"] >= 0, line
    assert lines[0]["epoch_after"] > lines[0]["epoch_before"]
    assert OPERATOR not in caplog.text and READER not in caplog.text, "a token never reaches the log"
