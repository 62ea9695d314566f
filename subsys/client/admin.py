"""The typed admin-API client: what the CLI and the console use to talk to a cluster.

    async with AdminClient(["http://127.0.0.1:8080"], token=os.environ["SUBSYS_TOKEN"]) as admin:
        page = await admin.topics(sort="last_poll_ms", order="desc")
        result = await admin.failover("orders:42", to="node-2")
        found = await admin.zombies(kind="orphan_poller")

Responses are the models of :mod:`subsys.core.admin`. Errors are typed
(:class:`Unreachable`, :class:`Unauthorized`, :class:`Forbidden`,
:class:`NotFound`, :class:`Conflict`, :class:`AdminError`) and carry the
API's stable ``code``. Given several URLs, the client uses the first that
answers and moves on to the next when one stops answering.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Sequence, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel

from subsys.core import admin as api

__all__ = [
    "AdminClient",
    "AdminError",
    "Unreachable",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
]

M = TypeVar("M", bound=BaseModel)


class AdminError(Exception):
    """An error answer of the admin API (or none at all)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "error", url: str = "") -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.url = message, status, code, url


class Unreachable(AdminError):
    """No node answered."""


class Unauthorized(AdminError):
    """401: no token, a wrong token, or none configured on the node."""


class Forbidden(AdminError):
    """403: a read token on a mutating call."""


class NotFound(AdminError):
    """404: no such node, topic or zombie."""


class Conflict(AdminError):
    """409 (the state does not allow it), or 502/504 (the cluster could not do it in time)."""


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 502: Conflict, 504: Conflict}


class AdminClient:
    def __init__(self, urls: str | Sequence[str], *, token: str = "", timeout: float = 30.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one admin URL")
        self.urls = [_base(url) for url in self.urls]
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.current = 0  # index of the URL in use

    @property
    def url(self) -> str:
        return self.urls[self.current]

    async def __aenter__(self) -> "AdminClient":
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport --------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       body: Any = None, timeout: float | None = None) -> Any:  # fmt: skip
        await self.open()
        assert self._session is not None
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        last: Exception | None = None
        for attempt in range(len(self.urls)):
            index = (self.current + attempt) % len(self.urls)
            url = self.urls[index] + api.API_PREFIX + path
            try:
                async with self._session.request(
                    method, url, params=query, json=body,
                    timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
                ) as resp:  # fmt: skip
                    self.current = index
                    text = await resp.text()
                    if resp.status == 200:
                        return json.loads(text)
                    raise _error(resp.status, text, url)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
                last = exc  # this node is gone or slow: try the next one
        raise Unreachable(f"no admin API answered ({', '.join(self.urls)}): {last!r}", code="unreachable")

    async def _get(self, path: str, model: type[M], **params: Any) -> M:
        return model.model_validate(await self._request("GET", path, params=params))

    async def _post(self, path: str, model: type[M], body: Any = None, timeout: float | None = None) -> M:
        return model.model_validate(await self._request("POST", path, body=body, timeout=timeout))

    # -- the API ---------------------------------------------------------------------------

    async def whoami(self) -> api.WhoAmI:
        return await self._get("/whoami", api.WhoAmI)

    async def cluster(self) -> api.ClusterSummary:
        return await self._get("/cluster", api.ClusterSummary)

    async def nodes(self) -> api.NodeList:
        return await self._get("/nodes", api.NodeList)

    async def node(self, name: str) -> api.NodeInfo:
        return await self._get(f"/nodes/{quote(name, safe='')}", api.NodeInfo)

    async def topics(
        self, *, feed: str | None = None, node: str | None = None, owner: str | None = None,
        state: str | None = None, q: str | None = None, sort: str = "topic", order: str = "asc",
        offset: int = 0, limit: int = 100,
    ) -> api.TopicPage:  # fmt: skip
        return await self._get("/topics", api.TopicPage, feed=feed, node=node, owner=owner, state=state, q=q,
                               sort=sort, order=order, offset=offset, limit=limit)  # fmt: skip

    async def topic(self, name: str) -> api.TopicDetail:
        return await self._get(f"/topics/{quote(name, safe='')}", api.TopicDetail)

    async def failover(self, topic: str, *, to: str | None = None) -> api.FailoverResult:
        return await self._post(f"/topics/{quote(topic, safe='')}/failover", api.FailoverResult, {"to": to}, timeout=60)

    async def drain(self, node: str) -> api.DrainResult:
        return await self._post(f"/nodes/{quote(node, safe='')}/drain", api.DrainResult, timeout=90)

    async def undrain(self, node: str) -> api.DrainResult:
        return await self._post(f"/nodes/{quote(node, safe='')}/undrain", api.DrainResult)

    async def zombies(self, *, kind: str | None = None, topic: str | None = None,
                      node: str | None = None) -> api.ZombieList:  # fmt: skip
        """Confirmed zombies now (the node scans, twice ~1 s apart when it has no recent scan)."""
        return await self._get("/zombies", api.ZombieList, kind=kind, topic=topic, node=node)

    async def reap(
        self, *, ids: Sequence[str] | None = None, kind: str | None = None, topic: str | None = None,
        node: str | None = None, dry_run: bool = False,
    ) -> api.ReapResult:  # fmt: skip
        """Reap zombies: those in ``ids`` (default: every one) that match the filters; ``dry_run`` only says what.

        404 (:class:`NotFound`, code ``unknown_zombie``) when ``ids`` names only zombies that are gone.
        """
        request = api.ReapRequest(ids=list(ids) if ids is not None else None, kind=kind, topic=topic, node=node,
                                  dry_run=dry_run)  # fmt: skip
        return await self._post("/zombies/reap", api.ReapResult, request.model_dump(mode="json"), timeout=90)

    async def openapi(self) -> dict[str, Any]:
        return await self._request("GET", "/openapi.json")

    async def events(self, *, cursor: str | None = None) -> AsyncIterator[api.Event]:
        """Server-sent events: a snapshot, then deltas. Ends when the node closes the stream.

        Lines are split here, not by aiohttp's ``readline``: a snapshot is one ``data:`` line
        (about 100 bytes per topic), over aiohttp's 512 KiB line limit from ~5,000 topics.
        """
        await self.open()
        assert self._session is not None
        headers = {"Last-Event-ID": cursor} if cursor else {}
        url = self.url + api.API_PREFIX + "/events"
        try:
            async with self._session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None,
                                                                                             sock_connect=10)) as resp:  # fmt: skip
                if resp.status != 200:
                    raise _error(resp.status, await resp.text(), url)
                data: list[str] = []
                async for raw in _lines(resp.content):
                    line = raw.decode("utf-8").rstrip("\r")
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        yield api.Event.model_validate_json("\n".join(data))
                        data = []
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise Unreachable(f"event stream from {url} lost: {exc!r}", code="unreachable") from None


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines (without the newline), however long."""
    pending, scanned = bytearray(), 0
    async for chunk in stream.iter_any():
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", max(start, scanned))) >= 0:
            yield bytes(pending[start:end])
            start = end + 1
        del pending[:start]
        scanned = len(pending)  # a long line is not searched again from its beginning
    if pending:
        yield bytes(pending)


def _base(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.startswith("ws://"):
        url = "http://" + url[5:]
    elif url.startswith("wss://"):
        url = "https://" + url[6:]
    if url.endswith("/ws"):
        url = url[:-3]
    if "://" not in url:
        url = "http://" + url
    return url


def _error(status: int, text: str, url: str) -> AdminError:
    try:
        body = api.ErrorResponse.model_validate_json(text).error
        code, message = body.code, body.message
    except ValueError:
        code, message = "error", text[:500] or f"HTTP {status}"
    return _BY_STATUS.get(status, AdminError)(message, status=status, code=code, url=url)
