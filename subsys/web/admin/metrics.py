"""The admin API's own metrics: requests by route and status (per app, not process-global)."""

from __future__ import annotations

from typing import Iterable

from prometheus_client import Counter

__all__ = ["AdminMetrics"]


class AdminMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "subsys_admin_requests", "Admin API requests, by route and HTTP status", ["route", "status"], registry=None
        )

    def collect(self) -> Iterable:
        yield from self.requests.collect()
