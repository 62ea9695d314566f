"""One local-cluster harness for ``subsys dev``, ``subsys bench``, the tests and ``subsys chaos``.

``LocalCluster`` is an async context manager that owns everything a local
cluster needs, on loopback, and stops it all (in reverse order) on exit,
also on error or Ctrl-C:

* PostgreSQL: an embedded pgserver (a temporary or a kept data directory),
  or a server you name (``database_url``);
* Consul: one server (``consul="server"``), a dev agent (``"dev"``), a
  cluster of servers with one client agent per node (``consul_servers=3``,
  ``consul_clients=N``), or none (``"none"``: one node, embedded coordinator);
* N ``subsys serve`` processes with one config file, secrets in their
  environment, logs in files (or line by line to ``on_line``);
* faults: kill / pause / resume / terminate / restart a node, restart
  PostgreSQL, restart or stop a Consul agent, kill the Consul leader;
* reading the cluster's ownership through the coordinator's own reader
  (never by parsing Consul keys here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import asyncpg

from subsys.coordinator.base import ClusterView, OwnerRecord
from subsys.testing.consul import ConsulCluster
from subsys.testing.nodes import NodeProcess, write_toml
from subsys.testing.postgres import EmbeddedPostgres
from subsys.testing.procs import ProcessError

__all__ = ["ClusterSpec", "LocalCluster"]

log = logging.getLogger(__name__)


@dataclass
class ClusterSpec:
    """What to start. Settings sections (``node``, ``consul``, ``limits``, ``database``) go in the config file."""

    nodes: int = 3
    feeds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    schema: tuple[str, ...] = ()  # SQL run once the database exists
    consul: str = "server"  # server | dev | none
    consul_servers: int = 1
    consul_clients: int = 0
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    database_url: str | None = None  # an existing server's database; else an embedded one
    database_name: str | None = None  # create (if needed) and use this database on the embedded server
    pg_data_dir: Path | None = None  # keep the embedded PostgreSQL here (else a temporary directory)
    prefix: str | None = None  # Consul key prefix (default: a fresh one per cluster)
    secret: str | None = None
    base_port: int | None = None  # consecutive node ports (default: free ports)
    node_names: tuple[str, ...] = ()  # default n1, n2, ...
    node_env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    own_session: bool = False  # children in their own session (a terminal's Ctrl-C reaches only us)
    insecure_admin: bool = False  # start nodes with the admin API open (dev only)
    admin_token: str | None = None  # SUBSYS_ADMIN_TOKEN for the nodes (operator role; default: a fresh one)
    admin_read_token: str | None = None  # SUBSYS_ADMIN_READ_TOKEN (read role; default: a fresh one)


class LocalCluster:
    def __init__(
        self,
        spec: ClusterSpec,
        *,
        workdir: Path | None = None,
        on_line: Callable[[str, str], None] | None = None,
        report: Callable[[str], None] | None = None,
        consul: ConsulCluster | None = None,
    ) -> None:
        """``consul``: an already running Consul to use (and leave running), e.g. one per test module."""
        self.spec = spec
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pg_tmp: tempfile.TemporaryDirectory | None = None
        self._given_workdir = workdir
        self.workdir = Path(workdir) if workdir is not None else Path()
        self.on_line = on_line  # (node name, line) for node output; else log files in the workdir
        self.report = report or log.warning
        self.prefix = spec.prefix or f"t{uuid.uuid4().hex[:8]}/"
        self.secret = spec.secret or secrets.token_urlsafe(24)
        self.admin_token = spec.admin_token or secrets.token_urlsafe(24)
        self.admin_read_token = spec.admin_read_token or secrets.token_urlsafe(24)
        self.pg: EmbeddedPostgres | None = None
        self.database_url = spec.database_url or ""
        self.consul: ConsulCluster | None = consul
        self._owns_consul = consul is None
        self.nodes: dict[str, NodeProcess] = {}
        self.exit_codes: dict[str, int | None] = {}  # node name -> exit code, filled by close()
        self.config: Path | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> "LocalCluster":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self, *, nodes: bool = True) -> None:
        """PostgreSQL, Consul, the config, then the nodes (``nodes=False``: everything but them)."""
        if self._given_workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="subsys-cluster-", ignore_cleanup_errors=True)
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.start_postgres()
        if self.spec.consul != "none" and self.consul is None:
            await self.start_consul()
        self.write_config()
        if nodes:
            await self.start_nodes(self.spec.nodes if self.spec.consul != "none" else 1)

    async def close(self) -> None:
        """Stop the nodes, then Consul, then PostgreSQL; each step runs even if one before failed."""
        try:
            results = await asyncio.gather(*(node.stop() for node in self.nodes.values()), return_exceptions=True)
            for node, result in zip(self.nodes.values(), results):
                if isinstance(result, BaseException):
                    self.report(f"stopping {node.name} failed: {result!r}")
                    result = None
                self.exit_codes[node.name] = result
        finally:
            try:
                if self.consul is not None and self._owns_consul:
                    await self.consul.stop()
            finally:
                try:
                    if self.pg is not None:
                        await self.pg.stop()
                finally:
                    self.pg = None
                    if self._pg_tmp is not None:
                        self._pg_tmp.cleanup()
                        self._pg_tmp = None
                    if self._tmp is not None:
                        self._tmp.cleanup()
                        self._tmp = None

    # -- services ------------------------------------------------------------------

    async def start_postgres(self) -> str:
        if not self.database_url:
            data_dir = self.spec.pg_data_dir
            if data_dir is None:
                # Not under the workdir: as root, pgserver runs PostgreSQL as another user, which
                # must be able to reach the directory (a pytest tmp_path is 0700).
                self._pg_tmp = tempfile.TemporaryDirectory(prefix="subsys-pg-", ignore_cleanup_errors=True)
                data_dir = Path(self._pg_tmp.name) / "data"
            self.pg = EmbeddedPostgres(data_dir, report=self.report)
            await self.pg.start()
            if self.spec.database_name:
                await _ensure_database(self.pg.url(), self.spec.database_name)
                self.database_url = self.pg.url(self.spec.database_name)
            else:
                self.database_url = self.pg.url()
        for sql in self.spec.schema:
            await self.execute(sql)
        return self.database_url

    async def start_consul(self) -> ConsulCluster:
        spec = self.spec
        self.consul = ConsulCluster(
            self.workdir / "consul", servers=max(1, spec.consul_servers), clients=spec.consul_clients,
            dev=spec.consul == "dev", name=f"subsys-{uuid.uuid4().hex[:6]}",
            own_session=spec.own_session, report=self.report,
        )  # fmt: skip
        await self.consul.start()
        return self.consul

    def write_config(self) -> Path:
        config: dict[str, Any] = {name: dict(values) for name, values in self.spec.settings.items()}
        config["feeds"] = {name: dict(feed) for name, feed in self.spec.feeds.items()}
        self.config = write_toml(self.workdir / "subsys.toml", config, header="written by subsys.testing.cluster")
        return self.config

    # -- nodes ---------------------------------------------------------------------

    def node_env(self, index: int) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.database_url,
            "SUBSYS_LOG_LEVEL": self.spec.log_level,
            "SUBSYS_ADMIN_TOKEN": self.admin_token,
            "SUBSYS_ADMIN_READ_TOKEN": self.admin_read_token,
        }
        if self.spec.insecure_admin:
            env["SUBSYS_ADMIN_INSECURE"] = "1"
        if self.consul is not None:
            env.update(
                CONSUL_HTTP_ADDR=self.consul.agent_for(index).http_addr,
                SUBSYS_CLUSTER_SECRET=self.secret,
                SUBSYS_CONSUL_PREFIX=self.prefix,
            )
        env.update(self.spec.node_env)
        return env

    async def start_nodes(
        self, count: int, *, wait: bool = True, timeout: float = 90.0, env: Mapping[str, str] | None = None
    ) -> list[NodeProcess]:
        """Start ``count`` more nodes (``env``: extra environment for these, e.g. a setting of their own)."""
        assert self.config is not None, "start() first"
        new = []
        for _ in range(count):
            index = len(self.nodes)
            names = self.spec.node_names
            name = names[index] if index < len(names) else f"n{index + 1}"
            port = self.spec.base_port + index if self.spec.base_port else None
            on_line = (lambda line, name=name: self.on_line(name, line)) if self.on_line else None
            node = NodeProcess(
                name, config=self.config, env={**self.node_env(index), **(env or {})}, port=port,
                workdir=None if on_line else self.workdir, on_line=on_line,
                own_session=self.spec.own_session, isolate=True, report=self.report,
            )  # fmt: skip
            self.nodes[name] = node
            new.append(node)
            await node.start()
        if wait:
            await asyncio.gather(*(node.wait_ready(timeout) for node in new))
        return new

    def node(self, name: str) -> NodeProcess:
        return self.nodes[name]

    def running(self) -> list[NodeProcess]:
        return [node for node in self.nodes.values() if node.running]

    def index_of(self, name: str) -> int:
        return list(self.nodes).index(name)

    def kill(self, name: str) -> None:
        self.nodes[name].kill()

    def pause(self, name: str) -> None:
        self.nodes[name].signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.nodes[name].signal(signal.SIGCONT)

    async def terminate(self, name: str, timeout: float = 30.0) -> int | None:
        return await self.nodes[name].stop(signal.SIGTERM, timeout)

    async def restart(self, name: str, *, after: float = 0.0, kill: bool = True, wait: bool = True) -> NodeProcess:
        """Kill (or SIGTERM) a node, then start it again with the same node id after ``after`` seconds."""
        node = self.nodes[name]
        if node.running:
            if kill:
                node.kill()
                await node.wait(timeout=30)
            else:
                await node.stop()
        if after:
            await asyncio.sleep(after)
        await node.start()
        if wait:
            await node.wait_ready()
        return node

    # -- reading ---------------------------------------------------------------------

    async def view(self) -> ClusterView:
        """Owners, presence and nodes, read through the coordinator's own reader."""
        if self.consul is None:
            raise ProcessError("no Consul in this cluster: ask a node's admin API instead")
        from subsys.coordinator.consul.view import read_view

        agent = next((a for a in self.consul.agents if a.running), None)
        if agent is None:
            raise ProcessError("no Consul agent is running")
        return await read_view(address=agent.http_addr, prefix=self.prefix)

    async def owners(self) -> dict[str, OwnerRecord]:
        return (await self.view()).owners

    async def owner_of(self, topic: str) -> OwnerRecord | None:
        return (await self.owners()).get(topic)

    async def execute(self, sql: str, *args: Any) -> str:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            return await conn.fetch(sql, *args, timeout=30)  # a hung read fails the check, never hangs it
        finally:
            await conn.close(timeout=5)

    def logs(self, tail: int = 4000) -> str:
        parts = [f"===== {node.name}\n{node.logs()[-tail:]}" for node in self.nodes.values()]
        if self.consul is not None:
            parts += [f"===== consul {agent.node_name}\n{agent.logs()[-tail:]}" for agent in self.consul.agents]
        return "\n".join(parts)


async def _ensure_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("select 1 from pg_database where datname = $1", name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'create database "{name}"')  # our own constant name, quoted
    finally:
        await conn.close()
