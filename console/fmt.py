"""How the console writes values: relative times, durations, counts, volatile ids.

Everything the screens show that changes from run to run (times, ports,
epochs, poll timings, session ids) goes through a :class:`Formatter`, so a
snapshot test can inject :class:`StableFormatter` and get the same picture
every time while the real console keeps showing real values.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Sequence

__all__ = ["Formatter", "StableFormatter"]

DASH = "—"


class Formatter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    # -- times -------------------------------------------------------------------

    def ago(self, at: float | None) -> str:
        """A wall-clock timestamp as "3s ago" (operators compare, they rarely need the date)."""
        if at is None:
            return DASH
        seconds = max(0.0, self.clock() - at)
        return "just now" if seconds < 1 else self.age(seconds) + " ago"

    def age(self, seconds: float | None) -> str:
        if seconds is None:
            return DASH
        if seconds < 1:
            return f"{seconds:.1f}s"
        if seconds < 60:
            return f"{int(seconds)}s"
        if seconds < 3600:
            return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
        if seconds < 86400:
            return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
        return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600)}h"

    def confirmed(self, seconds: float | None) -> str:
        """Consul's confirmed_ago is already an age (monotonic on the node), not a timestamp."""
        return DASH if seconds is None else self.age(seconds) + " ago"

    def ms(self, value: float | None) -> str:
        if value is None:
            return DASH
        return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"

    def took(self, value_ms: float) -> str:
        return self.ms(value_ms) if value_ms < 1000 else f"{value_ms / 1000:.2f} s"

    def interval(self, seconds: float | None) -> str:
        if seconds is None:
            return DASH
        return f"{seconds:g}s"

    # -- counters and ids ----------------------------------------------------------

    def count(self, value: int | None) -> str:
        return DASH if value is None else f"{value:,}"

    def volatile_count(self, value: int | None) -> str:
        """Counters that grow by themselves (polls)."""
        return self.count(value)

    def epoch(self, value: int | None) -> str:
        return DASH if value is None else str(value)

    def seq(self, value: int | None) -> str:
        return DASH if value is None else str(value)

    def address(self, value: str | None) -> str:
        return value or DASH

    def ident(self, value: str | None) -> str:
        """Sessions, incarnations: long uuids, shortened (the full one is in the API)."""
        if not value:
            return DASH
        return value if len(value) <= 12 else value[:8] + "…"

    def series(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def version(self, value: str) -> str:
        return value

    def pid(self, value: int | None) -> str:
        """A PostgreSQL backend's process id."""
        return DASH if value is None else str(value)

    def text(self, value: str) -> str:
        """Free text from the node (reasons, errors) may embed addresses and ids."""
        return value


class StableFormatter(Formatter):
    """Replaces every volatile value by a fixed, plausible one (snapshot tests)."""

    _PORT = re.compile(r"(127\.0\.0\.1|localhost):\d+")
    _HEX = re.compile(r"\b[0-9a-f]{8,}\b")
    _CALL = re.compile(r"\b[0-9a-f]{6}-q\d+\b")  # a stuck database call's id: the process's prefix, a number

    def __init__(self) -> None:
        super().__init__(clock=lambda: 1_700_000_000.0)

    def ago(self, at: float | None) -> str:
        return DASH if at is None else "2s ago"

    def age(self, seconds: float | None) -> str:
        return DASH if seconds is None else "1m05s"

    def confirmed(self, seconds: float | None) -> str:
        return DASH if seconds is None else "1s ago"

    def ms(self, value: float | None) -> str:
        return DASH if value is None else "1.5 ms"

    def took(self, value_ms: float) -> str:
        return "120 ms"

    def volatile_count(self, value: int | None) -> str:
        return DASH if value is None else "42"

    def epoch(self, value: int | None) -> str:
        return DASH if value is None else "7"

    def address(self, value: str | None) -> str:
        return self._PORT.sub(r"\1:8080", value) if value else DASH

    def ident(self, value: str | None) -> str:
        return "5f3a9c1e…" if value else DASH

    def version(self, value: str) -> str:
        return "1.0.0"  # a release must not change every snapshot

    def pid(self, value: int | None) -> str:
        return DASH if value is None else "4242"

    def series(self, values: Sequence[float]) -> list[float]:
        return [1, 2, 3, 2, 4, 3, 5, 2, 3, 4, 6, 3, 2, 3, 4, 3][: max(len(values), 0)] or []

    def text(self, value: str) -> str:
        return self._CALL.sub("5f3a9c-q7", self._HEX.sub("5f3a9c1e", self._PORT.sub(r"\1:8080", value)))
