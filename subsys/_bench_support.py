"""Building blocks for ``subsys bench``: an embedded PostgreSQL, a config
file, node processes, and the figures' arithmetic.

Every bench runs inside one ``BenchEnv`` (an async context manager): it owns
a temporary directory, the embedded PostgreSQL (pgserver, Unix socket only),
and every node process it started; leaving the block stops them all
(SIGTERM, then SIGKILL after a timeout) and deletes the directory, also on
error or Ctrl-C. Everything listens on loopback only.

The failover and consul-writes benches (issue 3) need three nodes on a
Consul agent: ``BenchEnv.start_node(env={"CONSUL_HTTP_ADDR": ...},
node_id=...)`` starts each one, ``NodeProcess.kill()`` is the SIGKILL, and
``NodeProcess.wait_healthy()`` the readiness gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import aiohttp
import asyncpg

__all__ = [
    "BenchEnv",
    "BenchFeed",
    "EmbeddedPostgres",
    "NodeProcess",
    "BenchError",
    "free_port",
    "raise_fd_limit",
    "summarize_ms",
    "percentile",
    "write_config",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """The bench could not set up or run what it measures."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def raise_fd_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- figures -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: Iterable[float]) -> dict[str, Any]:
    values = sorted(value * 1000 for value in seconds)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min_ms": round(values[0], 2),
        "median_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(values[-1], 2),
        "mean_ms": round(sum(values) / len(values), 2),
    }


# -- PostgreSQL ----------------------------------------------------------------


class EmbeddedPostgres:
    """pgserver in a directory of ours; listens on a Unix socket only (no TCP)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None
        self.uri = ""

    async def start(self, *, timeout: float = 60.0) -> str:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # heavy import: only when a bench needs it

        def _start() -> Any:
            return pgserver.get_server(self.pgdata, cleanup_mode="delete")

        self._server = await asyncio.wait_for(asyncio.to_thread(_start), timeout)
        self.uri = self._server.get_uri()
        return self.uri

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # pg_ctl stop -w; pgserver also registered this with atexit as a backstop.
            await asyncio.to_thread(server.cleanup)

    async def execute(self, sql: str, *args: Any) -> None:
        conn = await asyncpg.connect(self.uri, timeout=10)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()


# -- config --------------------------------------------------------------------


@dataclass(frozen=True)
class BenchFeed:
    name: str
    sql: str
    key: tuple[str, ...] = ("id",)
    param: str = "int"
    interval: float = 0.1
    statement_timeout: float = 5.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(
    path: Path,
    *,
    feeds: Sequence[BenchFeed],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a subsys.toml. The database URL and secrets go in the environment, not here."""
    lines: list[str] = ["# written by subsys bench"]
    for section, values in (sections or {}).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    for feed in feeds:
        lines.append(f"\n[feeds.{feed.name}]")
        lines.append(f"sql = {_toml_value(feed.sql)}")
        lines.append(f"key = {_toml_value(list(feed.key))}")
        lines.append(f"param = {_toml_value(feed.param)}")
        lines.append(f"interval = {_toml_value(float(feed.interval))}")
        lines.append(f"statement_timeout = {_toml_value(float(feed.statement_timeout))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- node processes ------------------------------------------------------------


@dataclass
class NodeProcess:
    """One ``subsys serve`` subprocess (``python -m cli.main serve``)."""

    node_id: str
    port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, *, config: Path, env: Mapping[str, str], cwd: Path) -> None:
        self._log_file = open(self.log_path, "ab")
        argv = [
            sys.executable, "-m", "cli.main", "serve",
            "--config", str(config),
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--node-id", self.node_id,
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd),
        )

    async def health(self, session: aiohttp.ClientSession, *, timeout: float = 2.0) -> tuple[int, dict]:
        async with session.get(f"{self.http_url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body

    async def wait_healthy(self, *, timeout: float = 30.0) -> dict:
        """Poll /health until it answers 200; fail early (with the log tail) if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.running:
                    raise BenchError(
                        f"node {self.node_id} exited with code {self.proc.returncode if self.proc else '?'}"
                        f" before it was healthy:\n{self.log_tail()}"
                    )
                try:
                    status, body = await self.health(session)
                    if status == 200:
                        return body
                    last = f"HTTP {status}: {body}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.1)
        raise BenchError(f"node {self.node_id} not healthy after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def kill(self) -> None:
        """SIGKILL (for failover benches)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        proc = self.proc
        try:
            if proc is None:
                return None
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except asyncio.TimeoutError:
                    log.warning("node %s ignored SIGTERM for %.0fs: killing it", self.node_id, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.wait_for(proc.wait(), 5.0)
            return proc.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class BenchEnv:
    """A temp dir, an embedded PostgreSQL, and the node processes of one bench run."""

    def __init__(self, *, prefix: str = "subsys-bench-") -> None:
        self._prefix = prefix
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.dir = Path()
        self.pg: EmbeddedPostgres | None = None
        self.nodes: list[NodeProcess] = []
        self.exit_codes: dict[str, int | None] = {}  # node id -> exit code, filled by close()

    async def __aenter__(self) -> "BenchEnv":
        self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix, ignore_cleanup_errors=True)
        self.dir = Path(self._tmp.name)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def database_url(self) -> str:
        if self.pg is None:
            raise BenchError("PostgreSQL not started")
        return self.pg.uri

    async def start_postgres(self, *setup_sql: str) -> str:
        self.pg = EmbeddedPostgres(self.dir / "pg")
        uri = await self.pg.start()
        for sql in setup_sql:
            await self.pg.execute(sql)
        return uri

    def write_config(
        self,
        feeds: Sequence[BenchFeed],
        *,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        name: str = "subsys.toml",
    ) -> Path:
        return write_config(self.dir / name, feeds=feeds, sections=sections)

    async def start_node(
        self,
        config: Path,
        *,
        node_id: str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> NodeProcess:
        """Start ``subsys serve`` on a free loopback port with DATABASE_URL set; wait for /health 200."""
        node_id = node_id or f"bench-{len(self.nodes) + 1}"
        node = NodeProcess(node_id=node_id, port=port or free_port(), log_path=self.dir / f"{node_id}.log")
        child_env = {
            key: value
            for key, value in os.environ.items()
            # the bench decides the node's setup: no stray overrides from the caller's shell
            if not key.startswith("SUBSYS_") and key not in ("DATABASE_URL", "CONSUL_HTTP_ADDR")
        }
        child_env["DATABASE_URL"] = self.database_url
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        self.nodes.append(node)
        await node.start(config=config, env=child_env, cwd=Path(__file__).resolve().parent.parent)
        if wait:
            await node.wait_healthy(timeout=timeout)
        return node

    async def close(self) -> None:
        try:
            results = await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
            for node, result in zip(self.nodes, results):
                if isinstance(result, BaseException):
                    log.warning("stopping node %s failed: %r", node.node_id, result)
                    result = None
                self.exit_codes[node.node_id] = result
            self.nodes.clear()
        finally:
            try:
                if self.pg is not None:
                    await self.pg.stop()
            finally:
                self.pg = None
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None
