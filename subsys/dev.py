"""``subsys dev``: a whole local cluster with live demo data, in one command.

What it starts, in order, and stops in reverse order on Ctrl-C / SIGTERM:

1. an embedded PostgreSQL (pgserver) with its data in ``--data-dir``
   (default ``$XDG_DATA_HOME/subsys/dev-pg``, i.e. ``~/.local/share/subsys/dev-pg``),
   a ``subsys_dev`` database and the demo schema of :mod:`subsys._demo`;
2. a loopback Consul dev agent (in-memory, free ports) when a ``consul``
   binary is available (``consul/install.sh``, then ``PATH``, then the build
   cache), otherwise nothing: the embedded coordinator is used, and the
   reason is printed;
3. a writer task that keeps changing demo rows;
4. the nodes, as real ``subsys serve`` processes on consecutive ports from
   ``--base-port`` (three on Consul, one on the embedded coordinator). The
   database URL and the cluster secret reach them through the environment,
   never argv. Their logs are streamed here, prefixed with the node name;
   the Consul agent's log goes to a file in the run directory.

Children run in their own sessions, so a terminal's Ctrl-C reaches only this
process, which then stops them in order (nodes first, so they can hand off
while Consul and PostgreSQL are still up). On Linux they also get
``PR_SET_PDEATHSIG``: if this process is killed outright, they die with it.
If any child dies on its own, that is reported and everything is stopped
with a non-zero exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, TypeVar

import aiohttp
import psutil
from rich.console import Console
from rich.text import Text

from . import _demo

__all__ = ["run_dev", "default_data_dir", "find_consul", "check_ports"]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO_ROOT / "consul" / "install.sh"
DEV_HCL = REPO_ROOT / "consul" / "dev.hcl"
CONSUL_PREFIX = "subsys-dev/"
HOST = "127.0.0.1"

NODE_STOP_TIMEOUT = 20.0
CONSUL_STOP_TIMEOUT = 10.0
NODE_READY_TIMEOUT = 90.0
CONSUL_LEADER_TIMEOUT = 30.0

# Settings the dev cluster decides itself: inherited values would point the
# nodes at someone else's Consul, database or ports.
_STRIPPED_ENV = (
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
_STYLES = ("cyan", "magenta", "green", "yellow", "blue", "bright_red")

out = Console(highlight=False, soft_wrap=True)


class DevError(Exception):
    """A problem that stops ``subsys dev``: printed as one clear message, no stack trace."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Stopped(Exception):
    """Ctrl-C / SIGTERM arrived while starting up."""


# -- small helpers (public ones are used by the tests) -----------------------


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "subsys" / "dev-pg"


def check_ports(ports: list[int], host: str = HOST) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``host`` (what the nodes will do)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Same options as the node's listener: a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    busy.append(port)
                else:
                    raise
    return busy


def _free_port(udp_too: bool = False) -> int:
    """An unused loopback port (TCP, and UDP as well for Serf's gossip ports)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        return port
    raise DevError("could not find a free loopback port")


def _pdeathsig() -> Any:
    """preexec_fn for children: die with SIGTERM if this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- finding Consul -----------------------------------------------------------


async def find_consul(log: Any = None, stop: asyncio.Event | None = None) -> tuple[str | None, str]:
    """Locate a ``consul`` binary: ``(path, how)`` or ``(None, why not)``.

    ``consul/install.sh`` first (it reuses ``PATH`` or its cache, or builds the
    pinned release: that can take minutes the first time, and its progress is
    shown). If the script is missing or fails: ``consul`` on ``PATH``, then the
    newest binary in ``~/.cache/subsys/consul/*/``.
    """
    log = log or (lambda message: None)
    notes = []
    if INSTALL_SCRIPT.is_file():
        path, note = await _run_install_script(log, stop)
        if path:
            return path, f"from {INSTALL_SCRIPT.relative_to(REPO_ROOT)}"
        notes.append(note)
    else:
        notes.append(f"{INSTALL_SCRIPT} not found")
    on_path = shutil.which("consul")
    if on_path:
        return on_path, "from PATH"
    cache_root = os.environ.get("SUBSYS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "subsys"
    cache = Path(cache_root) / "consul"
    cached = [p for p in glob.glob(str(cache / "*" / "consul")) if os.access(p, os.X_OK)]
    if cached:
        cached.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.lstrip("v").split(".")])
        return cached[-1], f"from the build cache {Path(cached[-1]).parent}"
    notes.append(f"no consul on PATH or in {cache}")
    return None, "; ".join(notes)


async def _run_install_script(log: Any, stop: asyncio.Event | None) -> tuple[str | None, str]:
    log(f"looking for Consul with {INSTALL_SCRIPT.relative_to(REPO_ROOT)} (the first run builds it: minutes)")
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(INSTALL_SCRIPT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_pdeathsig(),
    )
    last_stdout = last_stderr = ""

    async def pump(stream: asyncio.StreamReader, is_stdout: bool) -> None:
        nonlocal last_stdout, last_stderr
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            if is_stdout:
                last_stdout = line
            else:
                last_stderr = line
            out.print(Text(line, style="dim"))

    pumps = asyncio.gather(pump(proc.stdout, True), pump(proc.stderr, False))
    waiter = asyncio.ensure_future(proc.wait())
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait([w for w in (waiter, stopper) if w is not None], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await waiter
            raise _Stopped
    finally:
        if stopper is not None:
            stopper.cancel()
        await asyncio.wait({pumps}, timeout=5)
        pumps.cancel()
    if proc.returncode != 0:
        return None, f"consul/install.sh failed (exit {proc.returncode}: {last_stderr})"
    if last_stdout and os.access(last_stdout, os.X_OK) and Path(last_stdout).is_file():
        return last_stdout, ""
    return None, f"consul/install.sh did not print a usable binary path (last line: {last_stdout!r})"


# -- the cluster --------------------------------------------------------------


@dataclass
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    url: str = ""
    pump: asyncio.Task | None = None
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class DevCluster:
    nodes: int = 3
    base_port: int = 8080
    interval: float = 0.5
    embedded: bool = False
    data_dir: Path | None = None

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""
    children: list[_Child] = field(default_factory=list)
    consul: _Child | None = None
    consul_addr: str = ""
    consul_log: Path | None = None
    pg: Any = None
    pg_pid: int | None = None
    writer: _demo.DemoWriter | None = None
    writer_task: asyncio.Task | None = None
    run_dir: Path | None = None
    _lock_fd: int | None = None
    _signals: int = 0

    # -- entry point --------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        code = 0
        try:
            try:
                await self._start()
                await self._watch()
            except _Stopped:
                pass
            except DevError as exc:
                self.failure = str(exc)
                code = exc.code
            if self.failure:
                out.print(f"[bold red]subsys dev:[/] {self.failure}")
                code = code or 1
        finally:
            await self._shutdown(ok=code == 0)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return code

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            out.print(f"\n[bold]{signal.Signals(sig).name}: stopping everything[/] (again to hurry)")
            self.stop.set()
        else:
            out.print("[bold]hurrying: killing what is left[/]")
            for child in self.children + ([self.consul] if self.consul else []):
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()

    # -- start ----------------------------------------------------------------

    async def _start(self) -> None:
        self._validate()
        wanted = [self.base_port + i for i in range(1 if self.embedded else self.nodes)]
        busy = check_ports(wanted)
        if busy:
            raise DevError(
                f"port(s) {', '.join(map(str, busy))} on {HOST} already in use; nothing was started. "
                f"Stop what uses them or pick others with --base-port.",
                code=2,
            )

        consul_bin, how = (None, "--embedded given")
        if not self.embedded:
            consul_bin, how = await find_consul(lambda m: out.print(f"[dim]{m}[/]"), self.stop)
            self._check_stop()
            if consul_bin is None:
                out.print(f"[yellow]no Consul binary ({how}): using the embedded coordinator, one node[/]")
                wanted = wanted[:1]
        node_count = len(wanted) if consul_bin else 1

        self.run_dir = Path(tempfile.mkdtemp(prefix="subsys-dev-"))
        admin_url, db_url = await self._start_postgres()
        self._check_stop()
        await self._until_stopped(_demo.ensure_database(admin_url))
        await self._until_stopped(_demo.ensure_schema(db_url))
        config = self.run_dir / "subsys-dev.toml"
        config.write_text(_demo.config_toml(interval=self.interval), encoding="utf-8")

        env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
        env["DATABASE_URL"] = db_url
        env["PYTHONUNBUFFERED"] = "1"
        if consul_bin:
            await self._start_consul(consul_bin, how)
            env["CONSUL_HTTP_ADDR"] = self.consul_addr
            env["SUBSYS_CLUSTER_SECRET"] = secrets.token_urlsafe(32)
            env["SUBSYS_CONSUL_PREFIX"] = CONSUL_PREFIX

        self.writer = _demo.DemoWriter(db_url, report=lambda m: out.print(f"[yellow]{m}[/]"))
        self.writer_task = asyncio.create_task(self.writer.run(), name="demo-writer")

        for i in range(node_count):
            await self._start_node(i, config, env)
        await self._until_stopped(asyncio.gather(*(self._wait_ready(c) for c in self.children)))
        self._banner(consul_bin, how, db_url, config)

    def _validate(self) -> None:
        if self.nodes < 1 or self.nodes > 32:
            raise DevError("--nodes must be between 1 and 32", code=2)
        last = self.base_port + (self.nodes - 1)
        if self.base_port < 1 or last > 65535:
            raise DevError(f"--base-port {self.base_port} with {self.nodes} node(s) leaves 1-65535", code=2)
        if not 0.01 <= self.interval <= 3600:
            raise DevError("--interval must be between 0.01 and 3600 seconds", code=2)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    async def _until_stopped(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless Ctrl-C comes first (then cancel it and raise ``_Stopped``)."""
        self._check_stop()
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _Stopped

    async def _start_postgres(self) -> tuple[str, str]:
        data_dir = (self.data_dir or default_data_dir()).expanduser().resolve()
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
            raise DevError(f"{data_dir} is neither empty nor a PostgreSQL data directory; pick another --data-dir")
        self._lock_fd = os.open(data_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise DevError(f"another `subsys dev` is using {data_dir}; stop it or pass another --data-dir") from None
        _prune_stale_handles(data_dir)
        out.print(f"starting PostgreSQL (data in {data_dir}) ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

        try:
            # Blocking (pg_ctl -w); not cancelled by Ctrl-C so it is always stopped after.
            self.pg = await asyncio.to_thread(pgserver.get_server, data_dir, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises CalledProcessError, TimeoutExpired, OSError...
            raise DevError(f"PostgreSQL did not start: {exc}\n{_tail(data_dir / 'log')}") from None
        self.pg_pid = self.pg.get_pid()
        return self.pg.get_uri(), self.pg.get_uri(_demo.DEMO_DATABASE)

    async def _start_consul(self, binary: str, how: str) -> None:
        assert self.run_dir is not None
        http_port = _free_port()
        args = [binary, "agent", "-dev"]
        if DEV_HCL.is_file():
            # The project's loopback dev config (gRPC, DNS, WAN gossip, UI, update checks off);
            # only the ports it needs are overridden, with free ones.
            args += ["-config-file", str(DEV_HCL)]
        else:
            help_text = await _consul_agent_help(binary)
            args += ["-bind", HOST, "-client", HOST, "-advertise", HOST, "-dns-port", "-1"]
            args += ["-serf-wan-port", str(_free_port(udp_too=True))]
            for flag in ("-grpc-port", "-grpc-tls-port"):
                if flag in help_text:
                    args += [flag, "-1"]
            if "-hcl" in help_text:
                args += ["-hcl", "disable_update_check = true"]
        args += [
            "-node", f"subsys-dev-{os.getpid()}",
            "-http-port", str(http_port),
            "-server-port", str(_free_port()),
            "-serf-lan-port", str(_free_port(udp_too=True)),
        ]
        self.consul_log = self.run_dir / "consul.log"
        log_file = open(self.consul_log, "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig(),
            )
        finally:
            log_file.close()
        self.consul = _Child("consul", proc)
        self.consul_addr = f"{HOST}:{http_port}"
        out.print(f"starting a Consul dev agent ({binary}, {how}) on {self.consul_addr} ...")
        await self._until_stopped(self._wait_leader())

    async def _wait_leader(self) -> None:
        assert self.consul is not None and self.consul_log is not None
        deadline = time.monotonic() + CONSUL_LEADER_TIMEOUT
        url = f"http://{self.consul_addr}/v1/status/leader"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.consul.proc.returncode is not None:
                    raise DevError(
                        f"the Consul agent exited with code {self.consul.proc.returncode} "
                        f"(log {self.consul_log}):\n{_tail(self.consul_log)}\n(run with --embedded to skip Consul)"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with session.get(url) as response:
                        if response.status == 200 and await response.json(content_type=None):
                            return
                if time.monotonic() > deadline:
                    raise DevError(
                        f"the Consul agent at {self.consul_addr} elected no leader within "
                        f"{CONSUL_LEADER_TIMEOUT:.0f}s (log {self.consul_log}):\n{_tail(self.consul_log)}"
                    )
                await asyncio.sleep(0.2)

    async def _start_node(self, index: int, config: Path, env: dict[str, str]) -> None:
        name = f"node-{index + 1}"
        port = self.base_port + index
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "serve",
            "--config", str(config), "--port", str(port), "--node-id", name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_pdeathsig(),
        )  # fmt: skip
        child = _Child(name, proc, url=f"http://{HOST}:{port}")
        child.pump = asyncio.create_task(self._pump(child, _STYLES[index % len(_STYLES)]), name=f"log-{name}")
        self.children.append(child)

    async def _pump(self, child: _Child, style: str) -> None:
        assert child.proc.stdout is not None
        prefix = f"{child.name:<7}| "
        async for raw in child.proc.stdout:
            out.print(Text.assemble((prefix, style), raw.decode(errors="replace").rstrip()))

    async def _wait_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + NODE_READY_TIMEOUT
        detail = "no answer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if child.proc.returncode is not None:
                    raise DevError(f"{child.name} exited with code {child.proc.returncode} while starting (its log is above)")
                try:
                    async with session.get(child.url + "/health") as response:
                        if response.status == 200:
                            return
                        detail = f"HTTP {response.status}: {await response.text()}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    detail = str(exc) or type(exc).__name__
                if time.monotonic() > deadline:
                    raise DevError(f"{child.name} not healthy after {NODE_READY_TIMEOUT:.0f}s ({detail})")
                await asyncio.sleep(0.25)

    def _banner(self, consul_bin: str | None, how: str, db_url: str, config: Path) -> None:
        first = self.children[0]
        ws = first.url.replace("http://", "ws://") + "/ws"
        out.print()
        if consul_bin:
            out.print(
                f"[bold green]subsys dev is up[/]: {len(self.children)} nodes on [bold]Consul[/] "
                f"(dev agent at {self.consul_addr}, key prefix {CONSUL_PREFIX}, log {self.consul_log})"
            )
        else:
            out.print(f"[bold green]subsys dev is up[/]: 1 node on the [bold]embedded coordinator[/] ({how})")
        for child in self.children:
            out.print(f"  {child.name:<7} {child.url}   ws {child.url.replace('http://', 'ws://')}/ws   pid {child.pid}")
        out.print(f"  postgres {db_url}   pid {self.pg_pid}   data {self.data_dir}")
        out.print(f"  config   {config}")
        out.print("  feeds    " + "\n           ".join(_demo.FEEDS_HELP.values()))
        out.print("\nTry:")
        out.print(f"  subsys sub orders:1 --url {ws}")
        if len(self.children) > 1:
            other = self.children[-1].url.replace("http://", "ws://") + "/ws"
            out.print(f"  subsys sub orders:1 --url {other}      (same topic through another node)")
        out.print("later: subsys console")
        out.print("Ctrl-C stops everything.\n")

    # -- run ------------------------------------------------------------------

    async def _watch(self) -> None:
        """Until Ctrl-C or until something dies on its own."""
        watched: dict[asyncio.Future, str] = {asyncio.ensure_future(self.stop.wait()): "stop"}
        for child in self.children + ([self.consul] if self.consul else []):
            watched[asyncio.ensure_future(child.proc.wait())] = child.name
        assert self.writer_task is not None
        watched[self.writer_task] = "writer"
        watched[asyncio.ensure_future(self._watch_postgres())] = "postgres"
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future, what in watched.items():
                if what != "writer":
                    future.cancel()
        if self.stop.is_set():
            return
        what = watched[next(iter(done))]
        if what == "writer":
            exc = self.writer_task.exception() if not self.writer_task.cancelled() else None
            raise DevError(f"the demo writer stopped: {exc!r}")
        if what == "postgres":
            raise DevError(f"PostgreSQL (pid {self.pg_pid}) exited unexpectedly (log {self.data_dir}/log)")
        child = next(c for c in self.children + [self.consul] if c is not None and c.name == what)
        extra = f" (log {self.consul_log}):\n{_tail(self.consul_log)}" if child is self.consul else ""
        raise DevError(f"{what} (pid {child.pid}) exited unexpectedly with code {child.proc.returncode}{extra}")

    async def _watch_postgres(self) -> None:
        while self.pg_pid is not None and psutil.pid_exists(self.pg_pid):
            await asyncio.sleep(1.0)

    # -- stop -----------------------------------------------------------------

    async def _shutdown(self, *, ok: bool) -> None:
        """Stop everything that was started, in reverse order; each step runs even if another failed."""
        steps = [
            ("nodes", self._stop_nodes),
            ("writer", self._stop_writer),
            ("consul", self._stop_consul),
            ("postgres", self._stop_postgres),
        ]
        stopped = []
        for what, step in steps:
            try:
                if await step():
                    stopped.append(what)
            except Exception as exc:  # report and carry on: the next steps must still run
                out.print(f"[red]while stopping {what}: {type(exc).__name__}: {exc}[/]")
                ok = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.run_dir is not None:
            if ok:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            else:
                out.print(f"run files kept in {self.run_dir}")
        if stopped:
            out.print(f"stopped: {', '.join(stopped)}")

    async def _stop_nodes(self) -> bool:
        if not self.children:
            return False
        running = [c for c in self.children if c.proc.returncode is None]
        for child in running:
            child.stopping = True
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        if running:
            out.print(f"stopping {', '.join(c.name for c in running)} ...")
        await asyncio.gather(*(self._reap(c, NODE_STOP_TIMEOUT) for c in self.children))
        pumps = [c.pump for c in self.children if c.pump is not None]
        if pumps:
            await asyncio.wait(pumps, timeout=5)
        return True

    async def _reap(self, child: _Child, timeout: float) -> None:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except asyncio.TimeoutError:
            out.print(f"[yellow]{child.name} did not stop within {timeout:.0f}s: killing it[/]")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.proc.wait()
        # Its session (start_new_session) should be empty now; make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)

    async def _stop_writer(self) -> bool:
        if self.writer_task is None:
            return False
        self.writer_task.cancel()
        with contextlib.suppress(BaseException):
            await self.writer_task
        return True

    async def _stop_consul(self) -> bool:
        if self.consul is None:
            return False
        if self.consul.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.consul.proc.send_signal(signal.SIGINT)  # a graceful leave
        await self._reap(self.consul, CONSUL_STOP_TIMEOUT)
        return True

    async def _stop_postgres(self) -> bool:
        if self.pg is None:
            return False
        await asyncio.to_thread(self._stop_postgres_blocking)
        return True

    def _stop_postgres_blocking(self) -> None:
        try:
            self.pg.cleanup()  # pg_ctl -w stop (fast mode) when this is the last handle
        except Exception as exc:
            out.print(f"[yellow]pgserver cleanup: {exc}[/]")
        pid = self.pg_pid
        if pid is None:
            return
        try:
            postmaster = psutil.Process(pid)
            postmaster.wait(timeout=10)
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            # Someone else holds a pgserver handle on this directory, or the stop failed: it is ours.
            out.print(f"[yellow]PostgreSQL (pid {pid}) still running: stopping it[/]")
            with contextlib.suppress(psutil.NoSuchProcess):
                postmaster.terminate()  # SIGTERM: smart shutdown; our clients are gone
                try:
                    postmaster.wait(timeout=15)
                except psutil.TimeoutExpired:
                    postmaster.kill()


def _prune_stale_handles(data_dir: Path) -> None:
    """Drop dead pids from pgserver's handle list, or a crashed earlier run keeps PostgreSQL up forever."""
    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


async def _consul_agent_help(binary: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary, "agent", "-h",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DevError(f"{binary} agent -h did not answer within 20s") from None
    return output.decode(errors="replace")


async def run_dev(
    *,
    nodes: int = 3,
    base_port: int = 8080,
    interval: float = 0.5,
    embedded: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Run the dev cluster until Ctrl-C / SIGTERM; return the process exit code."""
    cluster = DevCluster(
        nodes=nodes,
        base_port=base_port,
        interval=interval,
        embedded=embedded,
        data_dir=Path(data_dir) if data_dir is not None else None,
    )
    return await cluster.run()
