"""Local processes for ``subsys dev``, ``subsys bench`` and the cluster tests.

One implementation of each, all on loopback:

* ``NodeProcess``: ``subsys serve`` as a real process; the database URL and
  secrets reach it through its environment, never argv.
* ``ConsulAgent``: the binary ``consul/install.sh`` provides (built from
  Consul's Go module and cached on first use), as a single server on free
  ports. ``dev=True``: ``consul agent -dev`` with ``consul/dev.hcl``, in
  memory; otherwise a server with a data directory, so a restart keeps the
  Raft state (and epochs keep increasing).
* ``EmbeddedPostgres``: pgserver in a directory of ours (Unix socket only;
  in :mod:`subsys._embedded_pg`).
* ``to_toml`` / ``write_toml``: a ``subsys.toml`` from a dict.

The generic process handling (start, signals, stop with SIGKILL after a
timeout, logs, readiness polling, free ports) is in :mod:`subsys._procs`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import aiohttp

from ._embedded_pg import DataDirError, EmbeddedPostgres
from ._procs import LOOPBACK, ChildProcess, ProcessError, check_ports, exit_status, free_port

__all__ = [
    "LOOPBACK",
    "REPO",
    "ChildProcess",
    "ConsulAgent",
    "DataDirError",
    "EmbeddedPostgres",
    "NodeProcess",
    "ProcessError",
    "check_ports",
    "consul_binary",
    "exit_status",
    "find_consul",
    "free_port",
    "node_env",
    "to_toml",
    "write_toml",
]

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "consul" / "install.sh"
DEV_HCL = REPO / "consul" / "dev.hcl"

# What a harness decides for its nodes: inherited values would point them at
# someone else's database, Consul or ports.
HARNESS_ENV = (
    "DATABASE_URL",
    "SUBSYS_CONFIG",
    "SUBSYS_HOST",
    "SUBSYS_PORT",
    "SUBSYS_NODE_ID",
    "SUBSYS_ADVERTISE_URL",
    "SUBSYS_CLUSTER_SECRET",
    "SUBSYS_CONSUL_PREFIX",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_SSL",
)


# -- config files ------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # JSON's string escapes are valid TOML; DEL is the one control character JSON leaves raw.
        return json.dumps(os.fspath(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any], *, header: str = "") -> str:
    """A ``subsys.toml`` from a dict: nested dicts become tables (``[node]``, ``[feeds.orders]``).

    Values: strings, numbers, booleans and lists of them; ``header`` becomes comment lines.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def table(path: list[str], mapping: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in mapping.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in mapping.items() if isinstance(v, Mapping)]
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(map(_toml_key, path)) + "]")
        lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars)
        for key, value in tables:
            table([*path, key], value)

    table([], config)
    return "\n".join(lines) + "\n"


def write_toml(path: Path, config: Mapping[str, Any], *, header: str = "") -> Path:
    """Write :func:`to_toml` to ``path``. Keep secrets out of it: they go in the environment."""
    path.write_text(to_toml(config, header=header), encoding="utf-8")
    return path


# -- nodes -------------------------------------------------------------------


def node_env(overrides: Mapping[str, str] | None = None, *, isolate: bool = False) -> dict[str, str]:
    """This process's environment minus ``HARNESS_ENV`` (``isolate``: minus every ``SUBSYS_*``), plus ``overrides``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in HARNESS_ENV and not (isolate and key.startswith("SUBSYS_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


class NodeProcess(ChildProcess):
    """``subsys serve`` (``python -m cli.main serve``) on a loopback port.

    Output goes to ``workdir/<name>.log``, or line by line to ``on_line``.
    ``env`` comes on top of :func:`node_env` (``isolate``: inherit no ``SUBSYS_*`` setting).
    """

    def __init__(
        self,
        name: str,
        *,
        config: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        workdir: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        own_session: bool = False,
        isolate: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.config = Path(config)
        self.port = port or free_port()
        argv = [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config),
                "--host", LOOPBACK, "--port", str(self.port), "--node-id", name]  # fmt: skip
        super().__init__(
            name,
            argv,
            env=node_env(env, isolate=isolate),
            cwd=REPO,
            log_path=None if on_line is not None or workdir is None else Path(workdir) / f"{name}.log",
            on_line=on_line,
            own_session=own_session,
            report=report,
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    async def health(
        self, session: aiohttp.ClientSession | None = None, *, timeout: float = 5.0
    ) -> tuple[int, dict[str, Any]]:
        """``GET /health``: (HTTP status, body)."""
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, await resp.json(content_type=None)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/health`` answers 200; ``ProcessError`` (with the log) if it exits or times out."""

        async def probe(session: aiohttp.ClientSession) -> tuple[bool, str]:
            status, body = await self.health(session, timeout=2.0)
            return status == 200, f"HTTP {status}: {body}"

        await self.wait_until(probe, what="healthy", timeout=timeout)


# -- Consul ------------------------------------------------------------------


class ConsulAgent(ChildProcess):
    """A single-server Consul agent on free loopback ports; its log is ``workdir/consul.log``.

    ``dev=True``: ``consul agent -dev`` (in memory) with ``consul/dev.hcl``.
    Otherwise a server with ``workdir/data``: a restart keeps its Raft state.
    The binary is :func:`consul_binary`'s unless ``binary`` is given.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dev: bool = False,
        binary: str | None = None,
        node_name: str = "subsys-local",
        own_session: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.dev = dev
        self.binary = binary
        self.node_name = node_name
        # serf_lan gossips over UDP as well; serf_wan, DNS and gRPC are switched off.
        self.ports = {"http": free_port(), "server": free_port(), "serf_lan": free_port(udp_too=True)}
        super().__init__(
            "consul", log_path=self.workdir / "consul.log", own_session=own_session, report=report
        )

    @property
    def http_addr(self) -> str:
        """``host:port``, as ``CONSUL_HTTP_ADDR`` wants it."""
        return f"{LOOPBACK}:{self.ports['http']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

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
        if not self.dev:
            config.update(
                server=True,
                bootstrap_expect=1,
                datacenter="dc1",
                data_dir=str(self.workdir / "data"),
                log_level="warn",
                performance={"raft_multiplier": 1},
            )
        return config

    def command(self) -> list[str]:
        assert self.binary is not None
        argv = [self.binary, "agent"]
        if self.dev:
            argv.append("-dev")
            if DEV_HCL.is_file():
                argv += ["-config-file", str(DEV_HCL)]
        # Loaded last, so its ports and addresses win over dev.hcl's.
        return argv + ["-config-file", str(self.workdir / "agent.json")]

    async def start(self) -> None:
        if self.binary is None:
            self.binary = await consul_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "agent.json").write_text(json.dumps(self._config()), encoding="utf-8")
        await super().start()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until there is a leader and a KV write goes through."""

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
        """``GET /v1/<path>``; None on 404."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.http_url}/v1/{path}", params=params) as resp:
                if resp.status == 404:
                    return None
                resp.raise_for_status()
                return await resp.json()

    async def kv(self, prefix: str) -> list[dict[str, Any]]:
        """Every KV entry under ``prefix`` (Consul's JSON, values base64)."""
        return await self.get_json(f"kv/{prefix}", recurse="") or []

    async def owners(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Held owner keys of the cluster under ``prefix``: topic -> key value plus its ``epoch``."""
        base = f"{prefix}owners/"
        return {
            entry["Key"][len(base):]: {**json.loads(base64.b64decode(entry["Value"])), "epoch": entry["ModifyIndex"]}
            for entry in await self.kv(base)
            if entry.get("Session")
        }


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
    if INSTALL_SCRIPT.is_file():
        path, note = await _run_install_script(progress)
        if path:
            return path, f"from {os.path.relpath(INSTALL_SCRIPT, REPO)}"
        notes.append(note)
    else:
        notes.append(f"{INSTALL_SCRIPT} not found")
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
    progress(f"looking for Consul with {os.path.relpath(INSTALL_SCRIPT, REPO)} (the first run builds it: minutes)")
    proc = await asyncio.create_subprocess_exec(
        "bash", str(INSTALL_SCRIPT),
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
