"""Typed application state keys shared by the node's aiohttp modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from subsys.node.node import Node
    from subsys.web.peer import PeerLinks

__all__ = ["NODE", "PEERS"]

NODE: web.AppKey["Node"] = web.AppKey("subsys_node")
PEERS: web.AppKey["PeerLinks"] = web.AppKey("subsys_peer_links")
