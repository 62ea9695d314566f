"""Small network helpers shared by the peer link and the internal calls: the cluster secret, death certificates."""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

from aiohttp import web

from subsys.web.appkeys import ADMIN_PORT

__all__ = ["peer_headers", "authorised", "refuses", "open_websocket", "departed", "on_admin_listener"]


async def open_websocket(ws: web.WebSocketResponse, request: web.Request) -> bool:
    """Complete the handshake; False when the other side left during it (a closed tab, a stopping peer)."""
    try:
        await ws.prepare(request)
    except ConnectionResetError:
        return False
    return True


def departed() -> web.Response:
    """What a handler returns after :func:`open_websocket` failed.

    Never the unprepared ``WebSocketResponse``: aiohttp would then try to close it and log
    a traceback. Nothing is written (the connection is gone); 499 is for the access log.
    """
    return web.Response(status=499, text="closed during the WebSocket handshake")


def on_admin_listener(request: web.Request) -> bool:
    """Whether ``request`` came in on the separate admin listener (``node.admin_port``), where
    only the admin API, /health and /metrics are served."""
    admin_port = request.app.get(ADMIN_PORT, 0)
    if not admin_port or request.transport is None:
        return False
    sockname = request.transport.get_extra_info("sockname")
    return bool(sockname) and sockname[1] == admin_port


def peer_headers(secret: str, node_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "X-Subsys-Node": node_id}


def authorised(request: web.Request, secret: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or not secret:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())


async def refuses(address: str, *, attempts: int = 2, gap: float = 0.2) -> bool:
    """A death certificate: ``address`` refused a TCP connection ``attempts`` times, ``gap`` apart.

    Nothing listens there, so the process that did is gone; a stopped, slow or
    partitioned process times out (or answers) instead, and never earns one.
    """
    parts = urlsplit(address)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(gap)
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except ConnectionRefusedError:
            continue
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return False
    return True
