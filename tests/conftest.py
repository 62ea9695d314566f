"""Fixtures for the node tests: a real PostgreSQL and real in-process nodes.

* ``pg_server`` (session): an admin DSN. The server named by
  ``SUBSYS_TEST_DATABASE_URL`` (a ``postgresql://`` URI whose role may
  CREATE DATABASE) if set, else an embedded pgserver in a temp dir, stopped
  and deleted at the end of the session.
* ``make_database`` / ``database_url``: a fresh ``subsys_t_<uuid>`` database
  per test (dropped afterwards), as an asyncpg DSN.
* ``start_node``: writes a ``subsys.toml`` in ``tmp_path`` and runs a node in
  this event loop with ``subsys.app.async_run`` on a free loopback port; it
  returns once ``GET /health`` answers 200, and is stopped (stop event,
  awaited) at teardown. The node's aiohttp app is captured so tests can read
  the node's own state (``running.node.running_pollers()``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

import subsys.web.app as subsys_app
from subsys.web.appkeys import NODE
from subsys.config import Settings, load_settings
from subsys.testing.postgres import EmbeddedPostgres

from support import create_database, drop_database, free_port, to_toml, with_database

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def pytest_configure(config) -> None:
    # pgserver asks platformdirs for a runtime dir; without XDG_RUNTIME_DIR it warns (harmlessly).
    config.addinivalue_line("filterwarnings", "ignore:XDG_RUNTIME_DIR is not set")


_KINDS = ("unit", "integration", "cluster", "console", "chaos", "bench")


def pytest_collection_modifyitems(config, items) -> None:
    """Each test is marked by its folder: ``pytest -m "not cluster and not chaos"`` runs the quick kinds."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in _KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so fixtures can print logs when a test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


# -- PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[str]:
    """Admin DSN of the PostgreSQL server the tests use."""
    url = os.environ.get("SUBSYS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="subsys-pg-"))
    server = EmbeddedPostgres(tmp / "data")
    try:
        yield await server.start()
    finally:
        await server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def make_database(pg_server: str) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await make_database(admin_url=pg_server)`` -> DSN of a fresh database, dropped at teardown."""
    created: list[tuple[str, str]] = []

    async def make(admin_url: str | None = None) -> str:
        admin = admin_url or pg_server
        name = await create_database(admin)
        created.append((admin, name))
        return with_database(admin, name)

    yield make
    for admin, name in reversed(created):
        await drop_database(admin, name)


@pytest.fixture
async def database_url(make_database) -> str:
    return await make_database()


# -- nodes -----------------------------------------------------------------------


@dataclass
class RunningNode:
    settings: Settings
    config_path: Path
    app: Any
    task: asyncio.Task
    stop_event: asyncio.Event
    http: aiohttp.ClientSession
    stopped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def port(self) -> int:
        return self.settings.node.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def node(self):
        return self.app[NODE]

    @property
    def connections(self) -> set:
        return self.node.clients

    @property
    def application_name(self) -> str:
        return f"subsys:{self.node_id}"

    async def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        async with self.http.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def stop(self) -> None:
        """Stop the node (like SIGTERM) and wait for it; re-raises if the node crashed."""
        if self.stopped:
            return
        self.stopped = True
        self.stop_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT)
        finally:
            await self.http.close()


def _base_config(database_url: str, node_id: str, port: int) -> dict[str, Any]:
    return {
        "node": {"host": "127.0.0.1", "port": port, "node_id": node_id, "grace_period": 1.0},
        "database": {"url": database_url, "retry_initial": 0.1, "retry_max": 1.0},
    }


@pytest.fixture
async def start_node(make_database, tmp_path: Path, monkeypatch) -> AsyncIterator[Callable[..., Awaitable[RunningNode]]]:
    """``await start_node(feeds, node=..., limits=..., database=..., database_url=...)`` -> RunningNode.

    Returns once ``ready_path`` (default ``/health``: database and coordinator
    ready) answers 200; pass ``ready_path="/health/live"`` for a node whose
    database is meant to be unreachable.

    ``feeds`` maps a feed name to its table (``sql``, ``key``, ``param``,
    ``interval``, ...). Other keyword tables are merged into the sections of
    the same name. Environment overrides are not applied (``env={}``).
    """
    apps: dict[str, Any] = {}
    original_make_app = subsys_app.make_app

    def capturing_make_app(settings: Settings, **kwargs: Any):
        app = original_make_app(settings, **kwargs)
        apps[settings.node_id] = app
        return app

    monkeypatch.setattr(subsys_app, "make_app", capturing_make_app)
    running: list[RunningNode] = []

    async def start(
        feeds: dict[str, dict[str, Any]],
        *,
        database_url: str | None = None,
        ready_path: str = "/health",
        **sections: dict[str, Any],
    ) -> RunningNode:
        url = database_url or await make_database()
        for attempt in range(3):
            try:
                node = await _start_once(url, feeds, ready_path, sections)
            except OSError as exc:  # the free port was taken meanwhile by another process: try another
                if exc.errno != errno.EADDRINUSE or attempt == 2:
                    raise
            else:
                running.append(node)
                return node
        raise AssertionError("unreachable")

    async def _start_once(url: str, feeds: dict, ready_path: str, sections: dict) -> RunningNode:
        node_id = f"t{len(running)}-{uuid.uuid4().hex[:8]}"
        port = free_port()
        config = _base_config(url, node_id, port)
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        config["feeds"] = feeds
        path = tmp_path / f"subsys-{node_id}.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        settings = load_settings(path, env={})
        stop = asyncio.Event()
        task = asyncio.create_task(
            subsys_app.async_run(settings, stop=stop, install_signals=False), name=f"node {node_id}"
        )
        http = aiohttp.ClientSession()
        node = None
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + START_TIMEOUT
            while True:
                if task.done():
                    task.result()  # raises the node's startup error
                    raise AssertionError("node stopped during startup")
                try:
                    probe = http.get(f"http://127.0.0.1:{settings.node.port}{ready_path}", timeout=aiohttp.ClientTimeout(total=5))
                    async with probe as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if loop.time() > deadline:
                    raise AssertionError(f"node {node_id} not ready ({ready_path}) within {START_TIMEOUT}s")
                await asyncio.sleep(0.05)
            node = RunningNode(settings, path, apps[settings.node_id], task, stop, http)  # node_id may be overridden
        finally:
            if node is None:
                stop.set()
                await asyncio.gather(asyncio.wait_for(task, STOP_TIMEOUT), return_exceptions=True)
                await http.close()
        return node

    yield start
    errors = []
    for node in reversed(running):
        try:
            await node.stop()
        except BaseException as exc:  # report every node, then fail
            errors.append(exc)
    if errors:
        raise errors[0]
