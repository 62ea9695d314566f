"""The admin API, ``/admin/v1`` on every node (docs/operations.md).

``setup_admin(app)`` adds the routes, each behind the admin guard (bearer
tokens, read and operator roles, JSON errors, request metrics), the event
hub, the OpenAPI document and the admin metrics. With ``node.admin_port``
set, the admin API is served only on that listener (and the client routes
not on it: ``subsys.web._net.on_admin_listener``).

The guard wraps each admin route rather than being an app-level middleware:
aiohttp keeps every middleware's frame alive for as long as its handler runs,
which for ``/ws`` is the whole life of a client connection (about 0.7 KB per
idle client, with the frame aiohttp adds whenever an app has middlewares).
"""

from __future__ import annotations

import functools
import logging
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp_sse import sse_response

from subsys.core import admin as api
from subsys.web.admin.auth import Authenticator, AuthFailure
from subsys.web.admin.events import EventHub
from subsys.web.admin.gather import GATHERS, forget
from subsys.web.admin.metrics import AdminMetrics
from subsys.web.admin.openapi import openapi_document
from subsys.web.admin.routes import PRINCIPAL, ROUTES, ApiError
from subsys.web.admin.zombies import ZOMBIE_ROUTES, setup_zombies
from subsys.web._net import on_admin_listener
from subsys.web.appkeys import ADMIN_PORT, HTTP, NODE
from subsys.web.health import EXTRA_COLLECTORS

__all__ = ["setup_admin", "EVENTS"]

log = logging.getLogger(__name__)

EVENTS: web.AppKey[EventHub] = web.AppKey("subsys_admin_events", EventHub)
AUTH: web.AppKey[Authenticator] = web.AppKey("subsys_admin_auth", Authenticator)
METRICS: web.AppKey[AdminMetrics] = web.AppKey("subsys_admin_metrics", AdminMetrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, detail: dict | None = None) -> web.Response:
    body = api.ErrorResponse(error=api.ErrorBody(code=code, message=message, detail=detail))
    headers = {"WWW-Authenticate": 'Bearer realm="subsys admin"'} if status == 401 else None
    return web.Response(text=body.model_dump_json(), status=status, content_type="application/json", headers=headers)


def _admin_route(handler: Handler) -> Handler:
    """``handler`` behind the admin guard: the listener, the token and role, errors as JSON, metrics."""

    @functools.wraps(handler)
    async def admin_route(request: web.Request) -> web.StreamResponse:
        if request.app[ADMIN_PORT] and not on_admin_listener(request):
            raise web.HTTPNotFound()  # on the client port the admin API does not exist, not even as a 401
        response = await _admin(request, handler)
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        request.app[METRICS].requests.labels(route=f"{request.method} {route}", status=str(response.status)).inc()
        return response

    return admin_route


async def _no_such_route(request: web.Request) -> web.StreamResponse:
    """Any other path under the prefix: 405 when the path exists with another method, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def _admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        principal = request.app[AUTH].authenticate(request)
    except AuthFailure as exc:
        return _error(exc.status, exc.code, exc.message)
    request[PRINCIPAL] = principal
    if request.method not in ("GET", "HEAD", "OPTIONS") and not principal.can_operate:
        return _error(403, "forbidden", f"{principal.token_id} has the read role; {request.method} needs an operator token")
    try:
        response = await handler(request)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            forget(request.app)  # the next answer must show what this call changed
        return response
    except ApiError as exc:
        return _error(exc.status, exc.code, exc.message, exc.detail)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, "not_found" if exc.status == 404 else "bad_request", exc.reason)
        raise
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.path)
        return _error(500, "internal_error", "the node failed to answer; see its log")


ALL_ROUTES = ROUTES + ZOMBIE_ROUTES


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(ALL_ROUTES))


async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    after = request.headers.get("Last-Event-ID") or request.query.get("cursor")
    async with sse_response(request) as response:
        response.ping_interval = 15
        try:
            async for event in hub.stream(after):
                await response.send(event.model_dump_json(), id=event.id, event=event.type)
        except ConnectionResetError:
            pass  # the client went away (a console closed): the end of its stream, not an error
    return response


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = aiohttp.ClientSession()
    hub = app[EVENTS]
    task = app[NODE].spawn(hub.run(), name="admin-events")
    auth = app[AUTH]
    if auth.insecure:
        log.warning("the admin API is OPEN (node.admin_insecure): any caller is an operator. Never in production.")
    elif not auth.configured:
        log.warning("no admin token configured: the admin API refuses every request (set SUBSYS_ADMIN_TOKEN)")
    try:
        yield
    finally:
        await hub.close()
        task.cancel()
        await app[HTTP].close()


def setup_admin(app: web.Application) -> None:
    node = app[NODE]
    app[AUTH] = Authenticator(node.settings)
    app[EVENTS] = EventHub(node)
    app[METRICS] = AdminMetrics()
    app[EXTRA_COLLECTORS].append(app[METRICS])
    app[ADMIN_PORT] = node.settings.node.admin_port
    app[GATHERS] = {}
    for method, path, handler, _operator, _summary, _request, _response, _query in ALL_ROUTES:
        app.router.add_route(method, api.API_PREFIX + path, _admin_route(handler))
    setup_zombies(app)
    app.router.add_get(api.API_PREFIX + "/events", _admin_route(_events), allow_head=False)
    app.router.add_get(api.API_PREFIX + "/openapi.json", _admin_route(_openapi), allow_head=False)
    # Registered last: the router tries the routes above first.
    app.router.add_route("*", api.API_PREFIX, _admin_route(_no_such_route))
    app.router.add_route("*", api.API_PREFIX + "/{tail:.*}", _admin_route(_no_such_route))
    app.cleanup_ctx.append(_hub_ctx)
