"""The admin API, ``/admin/v1`` on every node (docs/operations.md).

``setup_admin(app)`` adds the routes, the auth middleware (bearer tokens,
read and operator roles), the event hub, the OpenAPI document and the
admin metrics. With ``node.admin_port`` set, the admin API is served only on
that listener (and the client routes not on it).
"""

from __future__ import annotations

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
from subsys.web.appkeys import HTTP, NODE
from subsys.web.health import EXTRA_COLLECTORS

__all__ = ["setup_admin", "EVENTS", "ADMIN_PORT"]

log = logging.getLogger(__name__)

EVENTS: web.AppKey[EventHub] = web.AppKey("subsys_admin_events", EventHub)
AUTH: web.AppKey[Authenticator] = web.AppKey("subsys_admin_auth", Authenticator)
METRICS: web.AppKey[AdminMetrics] = web.AppKey("subsys_admin_metrics", AdminMetrics)
ADMIN_PORT: web.AppKey[int] = web.AppKey("subsys_admin_port", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, detail: dict | None = None) -> web.Response:
    body = api.ErrorResponse(error=api.ErrorBody(code=code, message=message, detail=detail))
    headers = {"WWW-Authenticate": 'Bearer realm="subsys admin"'} if status == 401 else None
    return web.Response(text=body.model_dump_json(), status=status, content_type="application/json", headers=headers)


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if sockname else None


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    admin_port = request.app.get(ADMIN_PORT, 0)
    is_admin = request.path.startswith(api.API_PREFIX + "/") or request.path == api.API_PREFIX
    if admin_port:
        on_admin_listener = _local_port(request) == admin_port
        if is_admin != on_admin_listener and not request.path.startswith(("/health", "/metrics")):
            raise web.HTTPNotFound()
    if not is_admin:
        return await handler(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    response = await _admin(request, handler)
    request.app[METRICS].requests.labels(route=f"{request.method} {route}", status=str(response.status)).inc()
    return response


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
    app.middlewares.append(admin_middleware)
    for method, path, handler, _operator, _summary, _request, _response, _query in ALL_ROUTES:
        app.router.add_route(method, api.API_PREFIX + path, handler)
    setup_zombies(app)
    app.router.add_get(api.API_PREFIX + "/events", _events)
    app.router.add_get(api.API_PREFIX + "/openapi.json", _openapi)
    app.cleanup_ctx.append(_hub_ctx)
