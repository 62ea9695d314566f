"""Clients of a node: the protocol-v1 WebSocket client, and the typed admin-API client."""

from subsys.client.ws import Client, TopicView, connect, follow, ws_url

__all__ = ["Client", "TopicView", "connect", "follow", "ws_url"]
