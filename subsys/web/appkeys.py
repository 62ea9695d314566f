"""Typed application state keys shared by the node's aiohttp modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from subsys.node.node import Node
    from subsys.web.peer import PeerLinks

__all__ = ["NODE", "PEERS", "HTTP", "ADMIN_PORT"]

NODE: web.AppKey["Node"] = web.AppKey("subsys_node")
PEERS: web.AppKey["PeerLinks"] = web.AppKey("subsys_peer_links")
# An HTTP client session owned by the app (admin calls to peers), closed with it.
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("subsys_http")
# node.admin_port (0: the admin API shares the node's port).
ADMIN_PORT: web.AppKey[int] = web.AppKey("subsys_admin_port", int)
