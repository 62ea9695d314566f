"""Typed application state keys shared by the node's aiohttp modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .node import Node
    from .web_ws import ClientConnection

__all__ = ["NODE", "CONNECTIONS"]

NODE: web.AppKey["Node"] = web.AppKey("subsys_node")
CONNECTIONS: web.AppKey[set["ClientConnection"]] = web.AppKey("subsys_connections")
