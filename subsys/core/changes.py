"""A change counter that tasks can wait on, safe to cancel at any moment.

The coordinator's view and the admin event hub each tell their readers
"something changed" this way. It replaces an ``asyncio.Condition`` waited on
with ``wait_for``: on Python 3.11, cancelling such a wait from outside (as a
supervisor does with a ``wait({kick, change})`` race) can leave the
condition's lock held by a task that is gone. Every later notify then blocks
forever; in a cluster that froze a node's Consul watch, so its view of the
owners stopped changing while it went on serving. An :class:`asyncio.Event`
has no lock to leak: each change sets the current event and installs a fresh
one, and a waiter only ever reads.
"""

from __future__ import annotations

import asyncio

__all__ = ["ChangeSignal"]


class ChangeSignal:
    """``count`` goes up on every :meth:`notify`; :meth:`wait` returns once it has moved past what was seen."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.count += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int, timeout: float) -> int:
        """Wait until ``count != seen`` or ``timeout`` seconds pass; the count then."""
        if self.count == seen:
            event = self._event
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass
        return self.count
