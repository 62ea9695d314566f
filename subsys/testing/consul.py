"""Consul agents on loopback, and finding (or building) the Consul binary.

* ``ConsulAgent``: the binary ``consul/install.sh`` provides (built from
  Consul's Go module and cached on first use), as a single server on free
  ports. ``dev=True``: ``consul agent -dev`` with ``consul/dev.hcl``, in
  memory; otherwise a server with a data directory, so a restart keeps the
  Raft state (and epochs keep increasing).
* ``find_consul`` / ``consul_binary``: the install script (from the source
  checkout, or the copy installed as package data), ``PATH``, the build cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import aiohttp

from subsys.testing.procs import LOOPBACK, ChildProcess, ProcessError, free_port

__all__ = ["ConsulAgent", "ConsulCluster", "consul_binary", "consul_material", "find_consul"]


def consul_material() -> Path:
    """The ``consul/`` folder: the source checkout's, or the copy installed with the package."""
    checkout = Path(__file__).resolve().parents[2] / "consul"
    if (checkout / "install.sh").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("subsys._consul")))


# -- agents --------------------------------------------------------------------


class ConsulAgent(ChildProcess):
    """A Consul agent on free loopback ports; its log is ``workdir/consul.log``.

    ``role``:

    * ``"server"`` (default): a server with ``workdir/data``, so a restart keeps
      its Raft state; alone (``bootstrap_expect=1``) or one of several;
    * ``"client"``: a client agent joined to ``join`` (servers' serf addresses),
      the shape production uses: each node talks to its local client agent;
    * ``"dev"``: ``consul agent -dev`` (in memory) with ``consul/dev.hcl``.

    The binary is :func:`consul_binary`'s unless ``binary`` is given.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        role: str = "server",
        dev: bool = False,
        bootstrap_expect: int = 1,
        join: list[str] | None = None,
        binary: str | None = None,
        node_name: str = "subsys-local",
        own_session: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.role = "dev" if dev else role
        if self.role not in ("server", "client", "dev"):
            raise ValueError(f"unknown Consul agent role {role!r}")
        self.bootstrap_expect = bootstrap_expect
        self.join = list(join or [])
        self.binary = binary
        self.node_name = node_name
        # serf_lan gossips over UDP as well; serf_wan, DNS and gRPC are switched off.
        self.ports = {"http": free_port(), "server": free_port(), "serf_lan": free_port(udp_too=True)}
        super().__init__(
            node_name if role != "server" or bootstrap_expect > 1 else "consul",
            log_path=self.workdir / "consul.log", own_session=own_session, report=report,
        )  # fmt: skip

    @property
    def dev(self) -> bool:
        return self.role == "dev"

    @property
    def http_addr(self) -> str:
        """``host:port``, as ``CONSUL_HTTP_ADDR`` wants it."""
        return f"{LOOPBACK}:{self.ports['http']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def serf_addr(self) -> str:
        return f"{LOOPBACK}:{self.ports['serf_lan']}"

    @property
    def server_addr(self) -> str:
        """The server RPC address, as ``/v1/status/leader`` names the leader."""
        return f"{LOOPBACK}:{self.ports['server']}"

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "node_name": self.node_name,
            "bind_addr": LOOPBACK,
            "advertise_addr": LOOPBACK,
            "client_addr": LOOPBACK,
            "ports": {**self.ports, "serf_wan": -1, "dns": -1, "grpc": -1, "grpc_tls": -1},
            "ui_config": {"enabled": False},
            "disable_update_check": True,
        }
        if self.role != "dev":
            config.update(
                datacenter="dc1",
                data_dir=str(self.workdir / "data"),
                log_level="warn",
                performance={"raft_multiplier": 1},
            )
            if self.join:
                config["retry_join"] = self.join
                config["retry_interval"] = "1s"
        if self.role == "server":
            config.update(server=True, bootstrap_expect=self.bootstrap_expect)
        return config

    def command(self) -> list[str]:
        assert self.binary is not None
        argv = [self.binary, "agent"]
        if self.dev:
            argv.append("-dev")
            dev_hcl = consul_material() / "dev.hcl"
            if dev_hcl.is_file():
                argv += ["-config-file", str(dev_hcl)]
        # Loaded last, so its ports and addresses win over dev.hcl's.
        return argv + ["-config-file", str(self.workdir / "agent.json")]

    async def start(self) -> None:
        if self.binary is None:
            self.binary = await consul_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "agent.json").write_text(json.dumps(self._config()), encoding="utf-8")
        await super().start()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until there is a leader and a KV write goes through this agent."""

        async def probe(session: aiohttp.ClientSession) -> tuple[bool, str]:
            async with session.get(f"{self.http_url}/v1/status/leader") as resp:
                leader = await resp.json(content_type=None) if resp.status == 200 else ""
            if not leader:
                return False, "no leader elected"
            async with session.put(f"{self.http_url}/v1/kv/subsys-localcluster-ready", data=b"1") as resp:
                return resp.status == 200, f"KV write answered HTTP {resp.status}"

        await self.wait_until(probe, what="ready (a leader, KV writes)", timeout=timeout)

    async def stop(self, sig: int | None = None, timeout: float | None = None) -> int | None:
        """``-dev``: SIGINT (a graceful leave), else SIGTERM (a server keeps its Raft membership)."""
        if sig is None:
            sig = signal.SIGINT if self.dev else signal.SIGTERM
        return await super().stop(sig, timeout if timeout is not None else (10.0 if self.dev else 20.0))

    async def get_json(self, path: str, **params: str) -> Any:
        """``GET /v1/<path>`` on this agent; None on 404."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.http_url}/v1/{path}", params=params) as resp:
                if resp.status == 404:
                    return None
                resp.raise_for_status()
                return await resp.json()

    async def leader(self) -> str:
        """The leader's server address as this agent knows it ('' while there is none)."""
        try:
            return await self.get_json("status/leader") or ""
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return ""


class ConsulCluster:
    """``servers`` Consul servers (1 or 3, say) and ``clients`` client agents, all on loopback.

    With client agents, nodes talk to a client agent each (``agent_for``), as
    in production; the servers hold the Raft state in their data directories.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        servers: int = 1,
        clients: int = 0,
        dev: bool = False,
        binary: str | None = None,
        name: str = "subsys",
        own_session: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.servers: list[ConsulAgent] = []
        self.clients: list[ConsulAgent] = []
        if dev:  # one in-memory agent (``consul agent -dev``)
            self.servers.append(ConsulAgent(self.workdir, dev=True, binary=binary, node_name=name,
                                            own_session=own_session, report=report))  # fmt: skip
            return
        for index in range(servers):
            self.servers.append(
                ConsulAgent(self.workdir / f"server-{index + 1}", role="server", bootstrap_expect=servers,
                            binary=binary, node_name=f"{name}-server-{index + 1}")  # fmt: skip
            )
        joins = [server.serf_addr for server in self.servers]
        for server in self.servers:
            server.join = [addr for addr in joins if addr != server.serf_addr]
        self.clients = [
            ConsulAgent(self.workdir / f"client-{index + 1}", role="client", join=joins, binary=binary,
                        node_name=f"{name}-client-{index + 1}")  # fmt: skip
            for index in range(clients)
        ]

    @property
    def agents(self) -> list[ConsulAgent]:
        return [*self.servers, *self.clients]

    def agent_for(self, index: int) -> ConsulAgent:
        """The agent node ``index`` should talk to: its own client agent if there are any."""
        pool = self.clients or self.servers
        return pool[index % len(pool)]

    async def start(self, timeout: float = 90.0) -> None:
        for agent in self.agents:
            await agent.start()
        await asyncio.gather(*(agent.wait_ready(timeout) for agent in self.agents))

    async def leader(self) -> ConsulAgent | None:
        for server in self.servers:
            if server.running:
                address = await server.leader()
                return next((s for s in self.servers if s.server_addr == address), None)
        return None

    async def wait_leader(self, timeout: float = 60.0, *, not_: ConsulAgent | None = None) -> ConsulAgent:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            leader = await self.leader()
            if leader is not None and leader is not not_ and leader.running:
                return leader
            await asyncio.sleep(0.1)
        raise ProcessError(f"no Consul leader (other than {not_.name if not_ else '-'}) within {timeout:g}s")

    async def stop(self) -> None:
        await asyncio.gather(*(agent.stop() for agent in self.clients), return_exceptions=True)
        await asyncio.gather(*(agent.stop() for agent in self.servers), return_exceptions=True)


_consul_path: str | None = None


async def consul_binary() -> str:
    """The Consul binary of :func:`find_consul`, found once per process; ``ProcessError`` if there is none."""
    global _consul_path
    if _consul_path is None:
        path, why = await find_consul()
        if path is None:
            raise ProcessError(f"no Consul binary: {why}")
        _consul_path = path
    return _consul_path


async def find_consul(progress: Callable[[str], None] | None = None) -> tuple[str | None, str]:
    """Locate a ``consul`` binary: ``(path, how)`` or ``(None, why not)``.

    ``consul/install.sh`` first (it reuses ``PATH`` or its cache, or builds the
    pinned release: minutes the first time; ``progress`` gets its output). If
    the script is missing or fails: ``consul`` on ``PATH``, then the newest
    binary in ``~/.cache/subsys/consul/*/``. Cancelling stops the build.
    """
    progress = progress or (lambda line: None)
    notes = []
    script = consul_material() / "install.sh"
    if script.is_file():
        path, note = await _run_install_script(progress)
        if path:
            return path, f"from {script}"
        notes.append(note)
    else:
        notes.append(f"{script} not found")
    on_path = shutil.which("consul")
    if on_path:
        return on_path, "from PATH"
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = Path(os.environ.get("SUBSYS_CACHE_DIR") or xdg_cache / "subsys") / "consul"
    cached = [p for p in glob.glob(str(cache / "*" / "consul")) if os.access(p, os.X_OK)]
    if cached:
        cached.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.lstrip("v").split(".")])
        return cached[-1], f"from the build cache {Path(cached[-1]).parent}"
    notes.append(f"no consul on PATH or in {cache}")
    return None, "; ".join(notes)


async def _run_install_script(progress: Callable[[str], None]) -> tuple[str | None, str]:
    script = consul_material() / "install.sh"
    progress(f"looking for Consul with {script} (the first run builds it: minutes)")
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    last = {"stdout": "", "stderr": ""}  # stdout's last line is the path; stderr: the first ERROR line wins

    async def pump(stream: asyncio.StreamReader | None, name: str) -> None:
        assert stream is not None
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                if name == "stdout" or "ERROR" in line or not last["stderr"].startswith("consul/install.sh: ERROR"):
                    last[name] = line
                progress(line)

    pumps = asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
    try:
        await proc.wait()
        await asyncio.wait({pumps}, timeout=5)
    finally:
        if proc.returncode is None:  # cancelled: stop the build and all it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        pumps.cancel()
    path = last["stdout"]
    if proc.returncode != 0:
        reason = last["stderr"].removeprefix("consul/install.sh: ").removeprefix("ERROR: ")
        return None, f"consul/install.sh failed with exit code {proc.returncode}: {reason}"
    if path and os.access(path, os.X_OK) and Path(path).is_file():
        return path, ""
    return None, f"consul/install.sh did not print a usable binary path (last line: {path!r})"
