"""One small adapter over py-consul's asyncio client (``consul.aio``).

It exists for four reasons, each a caveat of the library checked against a
real Consul 1.16 agent:

* errors: an agent that is down raises aiohttp's connector errors, a server
  without a leader a bare ``ConsulException("500 ...")``; both become
  :class:`CoordinatorUnavailable`, ACL refusals ``CoordinatorError(forbidden)``;
* every call has a timeout (a blocking query: its wait plus Consul's jitter);
* ``CONSUL_HTTP_TOKEN`` in the environment would override an explicit token:
  the token from the settings is set after construction;
* sessions need ``NodeChecks``/``ServiceChecks`` (py-consul only sends the
  older ``Checks``), so session creation uses the low-level ``http.put``.

It also counts requests by endpoint (for ``/health`` and
``subsys bench consul-writes``). The client must be created inside the
running event loop: call :meth:`open` from a coroutine.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Awaitable, TypeVar

import aiohttp
import consul
import consul.aio
from consul.callback import CB

from subsys.core.errors import CoordinatorError, CoordinatorUnavailable

__all__ = ["ConsulClient", "KVEntry", "NotFound", "normalise_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_TIMEOUT = 5.0


class NotFound(CoordinatorError):
    code = "not_found"


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int
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


def _entry(item: dict[str, Any]) -> KVEntry:
    return KVEntry(
        key=item["Key"],
        value=item.get("Value") or b"",  # py-consul decodes the base64 for us
        modify_index=int(item.get("ModifyIndex", 0)),
        session=item.get("Session") or None,
    )


def _looks_unavailable(text: str) -> bool:
    lowered = text.lower()
    return any(
        mark in lowered for mark in ("no cluster leader", "rpc error", "no path to datacenter", "timeout", "eof")
    )


class ConsulClient:
    def __init__(self, *, address: str, token: str = "", datacenter: str = "", timeout: float = _DEFAULT_TIMEOUT) -> None:
        self.base = normalise_address(address)
        parts = urllib.parse.urlsplit(self.base)
        self._scheme = parts.scheme or "http"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._scheme == "https" else 8500)
        self._token = token
        self._dc = datacenter or None
        self._timeout = timeout
        self._consul: consul.aio.Consul | None = None
        # Requests sent, by "METHOD endpoint".
        self.requests: collections.Counter[str] = collections.Counter()

    async def open(self) -> None:
        if self._consul is None:
            # Plain HTTP needs no TLS context (py-consul would build one, with a deprecation warning).
            verify = False if self._scheme == "http" else None
            self._consul = consul.aio.Consul(
                host=self._host, port=self._port, scheme=self._scheme, dc=self._dc, verify=verify
            )
            self._consul.token = self._token or None  # the settings' token wins over the environment

    async def close(self) -> None:
        if self._consul is not None:
            client, self._consul = self._consul, None
            await client.close()

    @property
    def api(self) -> consul.aio.Consul:
        if self._consul is None:
            raise CoordinatorUnavailable("consul client not open")
        return self._consul

    async def _call(self, what: str, call: Awaitable[T], *, timeout: float | None = None) -> T:
        self.requests[what] += 1
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await call
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.Timeout) as exc:
            raise CoordinatorUnavailable(f"consul unreachable at {self.base} ({what}): {exc!r}") from None
        except (consul.ACLPermissionDenied, consul.ACLDisabled) as exc:
            raise CoordinatorError(f"consul denied {what}: {exc}", code="forbidden") from None
        except consul.ConsulException as exc:
            text = str(exc)
            if text.startswith("5") or _looks_unavailable(text):
                raise CoordinatorUnavailable(f"consul {what}: {text.strip()}") from None
            raise CoordinatorError(f"consul {what}: {text.strip()}") from None

    # -- agent: service and TTL check ------------------------------------------

    async def register_service(
        self, *, service_id: str, name: str, meta: dict[str, str], check: dict[str, Any]
    ) -> None:
        """Register (or replace) a service; ``replace-existing-checks`` drops checks of earlier registrations."""
        await self._call(
            "PUT agent/service",
            self.api.agent.service.register(
                name, service_id=service_id, meta=meta, check=check, replace_existing_checks=True
            ),
        )

    async def deregister_service(self, service_id: str) -> None:
        await self._call("PUT agent/service", self.api.agent.service.deregister(service_id))

    async def deregister_check(self, check_id: str) -> None:
        await self._call("PUT agent/check", self.api.agent.check.deregister(check_id))

    async def pass_check(self, check_id: str, *, timeout: float | None = None) -> None:
        """Agent-local: answered by the local agent even while the servers have no leader."""
        ok = await self._call("PUT agent/check", self.api.agent.check.ttl_pass(check_id), timeout=timeout)
        if not ok:
            raise NotFound(f"check {check_id} is not registered on the agent")

    async def agent_services(self) -> dict[str, dict[str, Any]]:
        return await self._call("GET agent/services", self.api.agent.services()) or {}

    async def agent_checks(self) -> dict[str, dict[str, Any]]:
        return await self._call("GET agent/checks", self.api.agent.checks()) or {}

    async def service_checks(self, service: str) -> list[dict[str, Any]]:
        """The catalog's health checks of ``service`` on every agent (needs the servers)."""
        _index, checks = await self._call("GET health/checks", self.api.health.checks(service))
        return checks or []

    # -- sessions ----------------------------------------------------------------

    async def create_session(
        self, *, name: str, service_checks: list[str], node_checks: list[str], lock_delay: float, behavior: str
    ) -> str:
        body = {
            "Name": name,
            "Behavior": behavior,
            "LockDelay": f"{int(round(lock_delay * 1000))}ms",
            "NodeChecks": node_checks,
            "ServiceChecks": [{"ID": check} for check in service_checks],
        }
        params = [("dc", self._dc)] if self._dc else None
        return await self._call(
            "PUT session/create",
            self.api.http.put(
                CB.json(is_id=True),
                "/v1/session/create",
                params=params,
                headers=self.api.prepare_headers(),
                data=json.dumps(body),
            ),
        )

    async def destroy_session(self, session_id: str) -> None:
        await self._call("PUT session/destroy", self.api.session.destroy(session_id))

    async def session_info(
        self, session_id: str, *, consistent: bool = True, timeout: float | None = None
    ) -> dict[str, Any] | None:
        _index, info = await self._call(
            "GET session/info",
            self.api.session.info(session_id, consistency="consistent" if consistent else "default"),
            timeout=timeout,
        )
        return info

    async def list_sessions(self) -> list[dict[str, Any]]:
        _index, sessions = await self._call("GET session/list", self.api.session.list())
        return sessions or []

    # -- KV ------------------------------------------------------------------------

    async def kv_list(
        self, prefix: str, *, index: int = 0, wait: float | None = None, consistent: bool = False
    ) -> tuple[list[KVEntry], int]:
        """Every entry under ``prefix``; with ``index`` and ``wait``, a blocking query."""
        timeout = None
        kwargs: dict[str, Any] = {"recurse": True, "consistency": "consistent" if consistent else None}
        if index and wait:
            # py-consul drops index=0, and a blocking query must outlive its wait plus Consul's jitter (wait/16).
            kwargs.update(index=str(max(int(index), 1)), wait=f"{int(wait)}s")
            timeout = wait + wait / 16 + 5
        raw_index, items = await self._call("GET kv", self.api.kv.get(prefix, **kwargs), timeout=timeout)
        return [_entry(item) for item in items or []], int(raw_index or 0)

    async def kv_get(self, key: str, *, consistent: bool = True) -> KVEntry | None:
        _index, item = await self._call(
            "GET kv", self.api.kv.get(key, consistency="consistent" if consistent else None)
        )
        return _entry(item) if item else None

    async def kv_acquire(self, key: str, session: str, value: Any) -> bool:
        return bool(await self._call("PUT kv", self.api.kv.put(key, json.dumps(value), acquire=session)))

    async def kv_release_at(self, key: str, *, session: str, index: int, value: Any) -> bool:
        """Release ``key`` held by ``session`` and set its value, only if its ModifyIndex is ``index``.

        One transaction (check-index + unlock), so a release can never touch a later acquisition.
        """
        ops = [
            {"KV": {"Verb": "check-index", "Key": key, "Index": int(index)}},
            {"KV": {"Verb": "unlock", "Key": key, "Session": session,
                    "Value": base64.b64encode(json.dumps(value).encode()).decode()}},
        ]  # fmt: skip
        try:
            await self._call("PUT txn", self.api.txn.put(ops))
        except CoordinatorError as exc:
            if "409" in str(exc):  # the transaction was rolled back: someone else's acquisition now
                log.debug("release of %s at index %d refused: %s", key, index, exc)
                return False
            raise
        return True

    async def kv_delete(self, key: str, *, cas: int | None = None) -> bool:
        return bool(await self._call("DELETE kv", self.api.kv.delete(key, cas=cas)))
