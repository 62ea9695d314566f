"""What the backend tells the UI: small dataclass messages, posted to the app.

Messages that only say "something changed, look again" can be replaced by a
newer one of the same kind still in the queue (``can_replace``): a burst of
a thousand ownership events costs the UI one refresh, not a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

__all__ = ["Connected", "Lost", "ClusterChanged", "EventsArrived", "RowsChanged", "AuthFailed"]


@dataclass
class Connected(Message):
    """The console reached a node (again): the node's name, the URL, and what the token may do."""

    node: str
    url: str
    role: str
    read_only: bool


@dataclass
class Lost(Message):
    """The node in use stopped answering; the backend is trying every URL again."""

    node: str | None
    url: str
    reason: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Lost)


@dataclass
class AuthFailed(Message):
    """The token was refused (401): retrying will not help until the operator fixes it."""

    url: str
    reason: str


@dataclass
class ClusterChanged(Message):
    """Ownership, presence or nodes changed (from the event stream): refresh what is visible."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ClusterChanged)


@dataclass
class EventsArrived(Message):
    """New entries in the backend's event log."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsArrived)


@dataclass
class RowsChanged(Message):
    """The live rows of a watched topic changed (snapshot, diff, resync or status)."""

    topic: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RowsChanged) and message.topic == self.topic
