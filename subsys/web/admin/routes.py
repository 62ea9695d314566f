"""The admin API's handlers (``/admin/v1``); see docs/operations.md and ``/admin/v1/openapi.json``.

Every route needs a bearer token (``auth``), answers JSON built from the
models in :mod:`subsys.core.admin`, and any node answers for the whole
cluster (``gather``). Mutating calls (failover, drain, undrain, reap) are
operator-only and each writes one audit line (logger ``subsys.audit``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from subsys.core import admin as api
from subsys.core.errors import TopicError
from subsys.core.topics import parse_topic
from subsys.web.admin.auth import Principal
from subsys.web.admin.gather import filter_sort_page, gather, merge_topics, node_infos, summary, topic_detail
from subsys.web.appkeys import NODE
from subsys.web.internal import PeerClient, PeerUnavailable

__all__ = ["ROUTES", "ApiError", "json_model", "PRINCIPAL", "audit"]

log = logging.getLogger(__name__)
audit_log = logging.getLogger("subsys.audit")

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("subsys_principal", Principal)
FAILOVER_TIMEOUT = 15.0
DRAIN_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def json_model(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"'{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, "bad_request", f"'{name}' must be between {lo} and {hi}")
    return value


def _topic_name(request: web.Request) -> str:
    try:
        return str(parse_topic(request.match_info["topic"]))
    except TopicError as exc:
        raise ApiError(400, exc.code, exc.message) from None


def audit(principal: Principal, action: str, target: str, result: str, started: float, **extra: Any) -> None:
    """One audit line per mutating call (logger ``subsys.audit``)."""
    entry = {
        "audit": action, "target": target, "token": principal.token_id, "result": result,
        "duration_ms": round((time.monotonic() - started) * 1000, 1), **extra,
    }  # fmt: skip
    audit_log.info(json.dumps(entry, sort_keys=True))


# -- reading ---------------------------------------------------------------------------


async def whoami(request: web.Request) -> web.Response:
    principal = _principal(request)
    return json_model(api.WhoAmI(
        role=principal.role, token_id=principal.token_id, read_only=not principal.can_operate,
        node=request.app[NODE].node_id,
    ))  # fmt: skip


async def cluster(request: web.Request) -> web.Response:
    gathered = await gather(request.app)
    return json_model(summary(request.app, gathered))


async def nodes(request: web.Request) -> web.Response:
    gathered = await gather(request.app, topics="none")
    return json_model(api.NodeList(**gathered.partial(), nodes=node_infos(request.app, gathered)))


async def one_node(request: web.Request) -> web.Response:
    name = request.match_info["node"]
    gathered = await gather(request.app, topics="none", only=name)
    info = next((i for i in node_infos(request.app, gathered) if i.node == name), None)
    if info is None:
        raise ApiError(404, "unknown_node", f"no node {name!r} in the cluster")
    return json_model(info)


async def topics(request: web.Request) -> web.Response:
    query = request.query
    sort = query.get("sort", "topic")
    if sort not in api.TOPIC_SORT_KEYS:
        raise ApiError(400, "bad_request", f"'sort' must be one of {', '.join(api.TOPIC_SORT_KEYS)}")
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "bad_request", "'order' must be asc or desc")
    state = query.get("state")
    if state is not None and state not in api.TOPIC_STATES:
        raise ApiError(400, "bad_request", f"'state' must be one of {', '.join(api.TOPIC_STATES)}")
    offset = _int(request, "offset", 0, 0, 10_000_000)
    limit = _int(request, "limit", 100, 1, 5000)
    gathered = await gather(request.app)
    page, total = filter_sort_page(
        merge_topics(request.app, gathered),
        feed=query.get("feed"), node=query.get("node"), owner=query.get("owner"), state=state,
        text=query.get("q"), sort=sort, descending=order == "desc", offset=offset, limit=limit,
    )  # fmt: skip
    return json_model(api.TopicPage(**gathered.partial(), topics=page, total=total, offset=offset, limit=limit))


async def one_topic(request: web.Request) -> web.Response:
    name = _topic_name(request)
    gathered = await gather(request.app, topics="full", topic=name)
    detail = topic_detail(request.app, gathered, name)
    if detail is None:
        raise ApiError(404, "unknown_topic", f"no node has or wants topic {name!r}")
    return json_model(detail)


# -- acting ------------------------------------------------------------------------------


async def read_body(request: web.Request, model: type[BaseModel]) -> Any:
    """The request's JSON body as *model*; a body that is not valid JSON or not the model is a 400."""
    if not request.can_read_body:
        return model()
    try:
        return model.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        raise ApiError(400, "bad_request", f"invalid body: {exc}") from None


async def failover(request: web.Request) -> web.Response:
    """Move a topic: its owner stops and releases it *for* the target, which takes it at once."""
    started = time.monotonic()
    principal = _principal(request)
    name = _topic_name(request)
    body: api.FailoverRequest = await read_body(request, api.FailoverRequest)
    node = request.app[NODE]
    view = node.coordinator.view
    owner = view.owners.get(name)
    try:
        if owner is None:
            raise ApiError(409, "not_owned", f"topic {name!r} has no owner right now: nothing to fail over")
        target = body.to
        if target is not None:
            record = view.nodes.get(target)
            if record is None:
                raise ApiError(404, "unknown_node", f"no node {target!r} in the cluster")
            if record.draining:
                raise ApiError(409, "draining", f"node {target!r} is draining: it takes no topics")
        else:
            # Another node if there is one (preferring one with subscribers); alone, the same node.
            target = node.handoff_target(name, exclude=frozenset({owner.node_id})) or owner.node_id
        reason = f"forced failover by {principal.token_id}"
        await _ask_owner(request.app, owner, "/internal/hand-over",
                         {"topic": name, "epoch": owner.epoch, "to": target, "reason": reason})  # fmt: skip
        moved = await _wait_for_owner(node, name, above=owner.epoch, timeout=FAILOVER_TIMEOUT)
        if moved is None:
            raise ApiError(504, "timeout", f"no new owner of {name!r} within {FAILOVER_TIMEOUT:g}s")
    except ApiError as exc:
        audit(principal, "failover", name, f"refused: {exc.code}", started, to=body.to)
        raise
    took = time.monotonic() - started
    result = api.FailoverResult(
        topic=name, from_node=owner.node_id, to_node=moved.node_id, epoch_before=owner.epoch,
        epoch_after=moved.epoch, took_ms=round(took * 1000, 1), reason=reason,
    )  # fmt: skip
    audit(principal, "failover", name, "ok", started, to=moved.node_id, epoch_before=owner.epoch, epoch_after=moved.epoch)
    return json_model(result)


async def _ask_owner(app: web.Application, owner: Any, path: str, payload: dict[str, Any]) -> None:
    node = app[NODE]
    if owner.node_id == node.node_id:
        if not await node.hand_over(payload["topic"], payload["epoch"], to=payload["to"], reason=payload["reason"]):
            raise ApiError(409, "conflict", "the ownership changed meanwhile; try again")
        return
    try:
        answer = await PeerClient(app).call(owner.address, "POST", path, json=payload, timeout=5.0)
    except PeerUnavailable as exc:
        raise ApiError(502, "owner_unreachable", f"the owner {owner.node_id} did not answer: {exc}") from None
    if not answer.get("released"):
        raise ApiError(409, "conflict", "the ownership changed meanwhile; try again")


async def _wait_for_owner(node: Any, topic: str, *, above: int, timeout: float):
    coordinator = node.coordinator
    deadline = time.monotonic() + timeout
    seen = coordinator.generation
    while True:
        record = coordinator.view.owners.get(topic)
        if record is not None and record.epoch > above:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        seen = await coordinator.wait_changed(seen, min(remaining, 0.25))


async def drain(request: web.Request) -> web.Response:
    """The node hands every topic over, stops taking clients (503), keeps serving the ones it has."""
    return await _drain_or_undrain(request, drain=True)


async def undrain(request: web.Request) -> web.Response:
    return await _drain_or_undrain(request, drain=False)


async def _drain_or_undrain(request: web.Request, *, drain: bool) -> web.Response:
    started = time.monotonic()
    principal = _principal(request)
    name = request.match_info["node"]
    app, node = request.app, request.app[NODE]
    action = "drain" if drain else "undrain"
    record = node.coordinator.view.nodes.get(name)
    if record is None:
        audit(principal, action, name, "refused: unknown_node", started)
        raise ApiError(404, "unknown_node", f"no node {name!r} in the cluster")
    reason = f"drain by {principal.token_id}"
    owned_before = {t for t, o in node.coordinator.view.owners.items() if o.node_id == name}
    moved = 0
    if name == node.node_id:
        if drain:
            moved = await node.handoff(why=reason)
        else:
            await node.undrain()
    else:
        try:
            answer = await PeerClient(app).call(
                record.address, "POST", f"/internal/{action}", json={"reason": reason}, timeout=DRAIN_TIMEOUT
            )
        except PeerUnavailable as exc:
            audit(principal, action, name, "failed: node_unreachable", started)
            raise ApiError(502, "node_unreachable", f"node {name} did not answer: {exc}") from None
        moved = int(answer.get("moved", 0))
    remaining = 0
    if drain:  # done when it owns nothing and every topic it had (still wanted) has a new owner
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            view = node.coordinator.view
            remaining = sum(1 for o in view.owners.values() if o.node_id == name)
            landing = [t for t in owned_before if t not in view.owners and view.presence.get(t)]
            if (remaining == 0 and not landing) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    took = time.monotonic() - started
    audit(principal, action, name, "ok" if remaining == 0 else "incomplete", started, moved=moved, remaining=remaining)
    return json_model(api.DrainResult(node=name, draining=drain, moved=moved, remaining=remaining,
                                      took_ms=round(took * 1000, 1)))  # fmt: skip


# -- the table -----------------------------------------------------------------------------

# (method, path, handler, needs operator, summary, request model, response model, query parameters)
ROUTES: list[tuple[str, str, Any, bool, str, type[BaseModel] | None, type[BaseModel], list[tuple[str, str, str]]]] = [
    ("GET", "/whoami", whoami, False, "The caller's role and token id", None, api.WhoAmI, []),
    ("GET", "/cluster", cluster, False, "Cluster summary", None, api.ClusterSummary, []),
    ("GET", "/nodes", nodes, False, "Every node with its health and load", None, api.NodeList, []),
    ("GET", "/nodes/{node}", one_node, False, "One node", None, api.NodeInfo, []),
    ("POST", "/nodes/{node}/drain", drain, True, "Drain a node: its topics move elsewhere", None, api.DrainResult, []),
    ("POST", "/nodes/{node}/undrain", undrain, True, "End a drain", None, api.DrainResult, []),
    ("GET", "/topics", topics, False, "Topics, filtered, sorted and paged", None, api.TopicPage, [
        ("feed", "string", "only this feed"), ("node", "string", "owned by, or with subscribers on, this node"),
        ("owner", "string", "owned by this node"), ("state", "string", "ok | error | starting | unowned"),
        ("q", "string", "text the topic contains"), ("sort", "string", "a column: " + ", ".join(api.TOPIC_SORT_KEYS)),
        ("order", "string", "asc | desc"), ("offset", "integer", "default 0"), ("limit", "integer", "1-5000, default 100"),
    ]),  # fmt: skip
    ("GET", "/topics/{topic}", one_topic, False, "One topic with its ownership history", None, api.TopicDetail, []),
    ("POST", "/topics/{topic}/failover", failover, True, "Force a topic's failover (optionally to a node)",
     api.FailoverRequest, api.FailoverResult, []),  # fmt: skip
]
