"""The command palette (ctrl+p): the console's actions, and "go to topic …" searched on the server."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from subsys.client.admin import AdminError

if TYPE_CHECKING:
    from .app import ConsoleApp

__all__ = ["ConsoleCommands"]

GOTO_LIMIT = 8


class ConsoleCommands(Provider):
    @property
    def console(self) -> "ConsoleApp":
        return cast("ConsoleApp", self.app)

    async def discover(self) -> Hits:
        for title, help_text, callback in self.console.palette_commands(self.screen):
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self.console.palette_commands(self.screen):
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, text=title, help=help_text)
        async for hit in self._topics(query):
            yield hit

    async def _topics(self, query: str) -> Hits:
        """Topics whose name contains what was typed (after an optional "go to" / "topic")."""
        text = query.strip()
        for prefix in ("go to ", "goto ", "topic "):
            if text.lower().startswith(prefix):
                text = text[len(prefix):].strip()
        backend = self.console.backend
        if len(text) < 2 or backend is None or not backend.connected:
            return
        try:
            page = await backend.topics(q=text, limit=GOTO_LIMIT)
        except (AdminError, asyncio.TimeoutError):
            return
        for topic in page.topics:
            title = f"Go to topic {topic.topic}"
            yield Hit(0.9 if topic.topic == text else 0.6, title, partial(self.console.open_topic, topic.topic),
                      text=title, help=f"owner {topic.owner or 'none'} · {topic.state} · {topic.subscribers} subscriber(s)")  # fmt: skip
