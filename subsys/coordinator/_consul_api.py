"""A thin asyncio client for the parts of Consul's HTTP API that subsys uses.

Written on aiohttp directly: we need blocking queries with their index
headers, ``?acquire``/``?release`` and session options (``NodeChecks``,
``ServiceChecks``) exactly as the HTTP API documents them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import CoordinatorError, CoordinatorUnavailable

__all__ = ["ConsulAPI", "KVEntry", "NotFound", "normalise_address"]


class NotFound(CoordinatorError):
    code = "not_found"


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int
    lock_index: int
    session: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.value or b"null")
        except ValueError:
            return None


def normalise_address(address: str) -> str:
    """``CONSUL_HTTP_ADDR`` may be ``host:port`` or a URL; return a base URL."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    return address


class ConsulAPI:
    def __init__(self, *, address: str, token: str = "", datacenter: str = "", timeout: float = 5.0) -> None:
        self.base = normalise_address(address)
        self._token = token
        self._dc = datacenter
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        # Requests sent, by "METHOD endpoint" (for /health and `subsys bench consul-writes`).
        self.requests: collections.Counter[str] = collections.Counter()

    async def open(self) -> None:
        if self._session is None:
            headers = {"X-Consul-Token": self._token} if self._token else {}
            self._session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        data: bytes | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        assert self._session is not None, "open() first"
        query = {k: ("" if v is True else str(v)) for k, v in (params or {}).items() if v is not None and v is not False}
        if self._dc:
            query["dc"] = self._dc
        kwargs: dict[str, Any] = {"params": query, "timeout": aiohttp.ClientTimeout(total=timeout or self._timeout)}
        self.requests[f"{method} {_endpoint(path)}"] += 1
        if body is not None:
            kwargs["data"] = json.dumps(body)
        elif data is not None:
            kwargs["data"] = data
        try:
            async with self._session.request(method, f"{self.base}/v1/{path}", **kwargs) as resp:
                text = await resp.text()
                if resp.status >= 500 and _looks_unavailable(text):
                    raise CoordinatorUnavailable(f"consul {method} /v1/{path}: {resp.status} {text.strip()}")
                if resp.status in (401, 403):
                    raise CoordinatorError(f"consul denied {method} /v1/{path}: {text.strip()}", code="forbidden")
                if resp.status == 404:
                    return 404, None, dict(resp.headers)
                if resp.status >= 400:
                    raise CoordinatorError(f"consul {method} /v1/{path}: {resp.status} {text.strip()}")
                payload = json.loads(text) if text and resp.content_type == "application/json" else text
                return resp.status, payload, dict(resp.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise CoordinatorUnavailable(f"consul unreachable at {self.base}: {exc!r}") from None

    # -- agent: service and TTL check -----------------------------------------

    async def register_service(self, definition: dict[str, Any]) -> None:
        await self._request("PUT", "agent/service/register", body=definition)

    async def deregister_service(self, service_id: str) -> None:
        await self._request("PUT", f"agent/service/deregister/{service_id}")

    async def pass_check(self, check_id: str, note: str = "") -> None:
        status, _payload, _ = await self._request("PUT", f"agent/check/pass/{check_id}", params={"note": note or None})
        if status == 404:
            raise NotFound(f"check {check_id} is not registered")

    # -- sessions --------------------------------------------------------------

    async def create_session(self, body: dict[str, Any]) -> str:
        _status, payload, _ = await self._request("PUT", "session/create", body=body)
        return payload["ID"]

    async def destroy_session(self, session_id: str) -> None:
        await self._request("PUT", f"session/destroy/{session_id}")

    async def session_info(self, session_id: str) -> dict[str, Any] | None:
        _status, payload, _ = await self._request("GET", f"session/info/{session_id}", params={"consistent": True})
        return payload[0] if payload else None

    # -- KV ----------------------------------------------------------------------

    async def kv_list(
        self, prefix: str, *, index: int = 0, wait: float | None = None, consistent: bool = False
    ) -> tuple[list[KVEntry], int]:
        params: dict[str, Any] = {"recurse": True, "consistent": consistent}
        timeout = None
        if index and wait:
            params["index"] = index
            params["wait"] = f"{int(wait)}s"
            timeout = wait + wait / 16 + 5
        status, payload, headers = await self._request("GET", f"kv/{prefix}", params=params, timeout=timeout)
        new_index = int(headers.get("X-Consul-Index", "0") or 0)
        entries = [] if status == 404 else [_entry(item) for item in payload or []]
        return entries, new_index

    async def kv_get(self, key: str, *, consistent: bool = True) -> KVEntry | None:
        status, payload, _ = await self._request("GET", f"kv/{key}", params={"consistent": consistent})
        if status == 404 or not payload:
            return None
        return _entry(payload[0])

    async def kv_acquire(self, key: str, session: str, value: Any) -> bool:
        _status, payload, _ = await self._request(
            "PUT", f"kv/{key}", params={"acquire": session}, data=json.dumps(value).encode()
        )
        return payload is True or payload == "true"

    async def kv_delete(self, key: str, *, cas: int | None = None) -> bool:
        _status, payload, _ = await self._request("DELETE", f"kv/{key}", params={"cas": cas})
        return payload is True or payload == "true" or payload is None


def _entry(item: dict[str, Any]) -> KVEntry:
    raw = item.get("Value")
    return KVEntry(
        key=item["Key"],
        value=base64.b64decode(raw) if raw else b"",
        modify_index=int(item.get("ModifyIndex", 0)),
        lock_index=int(item.get("LockIndex", 0)),
        session=item.get("Session") or None,
    )


def _looks_unavailable(text: str) -> bool:
    lowered = text.lower()
    return any(mark in lowered for mark in ("no cluster leader", "rpc error", "no path to datacenter", "timeout"))


def _endpoint(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "kv":
        return "kv"
    return "/".join(parts[:2])
