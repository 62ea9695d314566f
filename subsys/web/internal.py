"""Node-to-node calls under ``/internal`` (cluster secret required), used by the admin API.

Any node answers the admin API for the whole cluster: it asks each peer for
its own facts (``GET /internal/state``) and asks the node concerned to act
(hand a topic over, drain, undrain). The peer link (``/internal/peer``) is in
:mod:`subsys.web.peer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from subsys.node.inspect import local_state
from subsys.web.appkeys import HTTP, NODE
from subsys.web._net import authorised, on_admin_listener, peer_headers, refuses

__all__ = ["setup_internal", "PeerClient", "PeerUnavailable", "own_state", "refuses", "STATE_EXTRAS", "REAPER"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PeerUnavailable(Exception):
    """A peer did not answer (in time, or at all); the reason is the message.

    ``refused``: its address refused the connection, i.e. nothing listens there: the process
    is gone (a SIGSTOPped or partitioned process times out instead).
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if on_admin_listener(request):
            raise web.HTTPNotFound()
        node = request.app[NODE]
        if not authorised(request, node.settings.cluster_secret):
            log.warning("rejected internal call %s from %s: missing or wrong cluster secret", request.path, request.remote)
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "internal calls need the cluster secret"}}, status=401
            )
        return await handler(request)

    return guarded


async def own_state(app: web.Application, *, topics: str, topic: str | None = None) -> dict[str, Any]:
    """This node's facts for the admin API (and its async extras, e.g. its agent's registrations)."""
    state = local_state(app[NODE], topics=topics, topic=topic)
    for provide in app.get(STATE_EXTRAS, ()):
        state.update(await provide())
    return state


async def _state(request: web.Request) -> web.Response:
    topics = request.query.get("topics", "summary")
    if topics not in ("none", "summary", "full"):
        return web.json_response({"error": {"code": "bad_request", "message": "topics: none|summary|full"}}, status=400)
    return web.json_response(await own_state(request.app, topics=topics, topic=request.query.get("topic")))


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": {"code": "bad_request", "message": message}}), content_type="application/json"
    )


async def _json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 400 (a peer of another version, or a bug), never a 500."""
    if optional and not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the body is not a JSON object")
    return body


async def _hand_over(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _json_object(request)
    try:
        topic, epoch = str(body["topic"]), int(body["epoch"])
    except (KeyError, TypeError, ValueError):
        raise _bad_request("hand_over needs topic and an integer epoch") from None
    released = await node.hand_over(topic, epoch, to=body.get("to") or None, reason=str(body.get("reason", "")))
    return web.json_response({"released": released})


async def _drain(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _json_object(request, optional=True)
    moved = await node.handoff(why=str(body.get("reason", "drain")))
    return web.json_response({"moved": moved, "draining": node.draining})


async def _reap(request: web.Request) -> web.Response:
    """Act on a zombie finding that concerns this node, re-checking the evidence first."""
    node = request.app[NODE]
    body = await _json_object(request)
    do = body.get("do")
    try:
        if do in ("stop_poller", "release"):
            topic, epoch = str(body["topic"]), int(body["epoch"])
        elif do == "terminate_query":
            query = str(body["query"])
        elif do == "deregister":
            service_id, incarnation = str(body["service_id"]), str(body.get("incarnation", ""))
        else:
            raise _bad_request(f"unknown action {do!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad_request(f"{do}: missing or malformed field {exc}") from None
    if do == "stop_poller":
        done = await node.reap_poller(topic, epoch)
    elif do == "release":
        done = await node.release_idle(topic, epoch)
    elif do == "terminate_query":
        done = await node.reap_query(query)
    else:
        done = await request.app[REAPER](service_id, incarnation)
    return web.json_response({"done": done})


async def _undrain(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await node.undrain()
    return web.json_response({"draining": node.draining})


STATE_EXTRAS: web.AppKey[list] = web.AppKey("subsys_state_extras")
# Deregisters a leaked registration on this node's agent if it is still dead (set by the zombie service).
REAPER: web.AppKey[Callable[[str, str], Awaitable[bool]]] = web.AppKey("subsys_registration_reaper")


def setup_internal(app: web.Application) -> None:
    app.router.add_get("/internal/state", _guarded(_state))
    app.router.add_post("/internal/hand-over", _guarded(_hand_over))
    app.router.add_post("/internal/drain", _guarded(_drain))
    app.router.add_post("/internal/undrain", _guarded(_undrain))
    app.router.add_post("/internal/reap", _guarded(_reap))
    app.setdefault(STATE_EXTRAS, [])


class PeerClient:
    """Calls another node's ``/internal`` routes, with a short timeout and a reason when it fails."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    async def call(
        self, address: str, method: str, path: str, *, json: Any = None, timeout: float = 2.0
    ) -> dict[str, Any]:
        node = self._app[NODE]
        headers = peer_headers(node.settings.cluster_secret, node.node_id)
        try:
            async with self._app[HTTP].request(
                method, address.rstrip("/") + path, json=json, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    raise PeerUnavailable(f"HTTP {resp.status} from {path}")
                return await resp.json()
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"no answer within {timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            raise PeerUnavailable("connection refused" if refused else f"cannot connect: {exc.os_error}",
                                  refused=refused) from None  # fmt: skip
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise PeerUnavailable(f"{type(exc).__name__}: {exc}") from None
