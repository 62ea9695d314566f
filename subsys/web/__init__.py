"""The node's aiohttp surfaces: client WebSocket, peer link, health, metrics, admin API."""
