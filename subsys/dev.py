"""``subsys dev``: a whole local cluster with live demo data, in one command.

What it starts, in order, and stops in reverse order on Ctrl-C / SIGTERM / SIGHUP:

1. an embedded PostgreSQL (pgserver) with its data in ``--data-dir``
   (default ``$XDG_DATA_HOME/subsys/dev-pg``, i.e. ``~/.local/share/subsys/dev-pg``),
   a ``subsys_dev`` database and the demo schema of :mod:`subsys._demo`; a
   PostgreSQL an earlier run left running on that directory is reused;
2. a loopback Consul dev agent (in memory, free ports) when a ``consul``
   binary is available (``consul/install.sh``, then ``PATH``, then the build
   cache), otherwise nothing: the embedded coordinator is used, and the
   reason is printed;
3. a writer task that keeps changing demo rows;
4. the nodes, as real ``subsys serve`` processes on consecutive ports from
   ``--base-port`` (three on Consul, one on the embedded coordinator). The
   database URL and the cluster secret reach them through the environment,
   never argv. Their output is printed here, prefixed with the node name;
   the Consul agent's log goes to a file in the run directory.

The processes are :mod:`subsys.localcluster`'s. Children run in their own
sessions, so a terminal's Ctrl-C (or hang-up) reaches only this process,
which then stops them in order (nodes first, so they can hand off while
Consul and PostgreSQL are still up). On Linux they also get
``PR_SET_PDEATHSIG``: if this process is killed outright, they die with it.
If any child dies on its own, that is reported and everything is stopped
with a non-zero exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, TypeVar

import asyncpg
from rich.console import Console
from rich.text import Text

from subsys.testing import demo as _demo
from subsys.testing.cluster import ClusterSpec, LocalCluster
from subsys.testing.consul import ConsulAgent, find_consul
from subsys.testing.nodes import NodeProcess
from subsys.testing.postgres import DataDirError, EmbeddedPostgres
from subsys.testing.procs import LOOPBACK, ProcessError, check_ports, exit_status

__all__ = ["run_dev", "default_data_dir", "find_consul", "check_ports"]

T = TypeVar("T")

CONSUL_PREFIX = "subsys-dev/"
HOST = LOOPBACK

NODE_STOP_TIMEOUT = 20.0
NODE_READY_TIMEOUT = 90.0
RESTART_DELAY = 1.0  # a node that dies is restarted after this long
CRASH_LOOP_UPTIME, CRASH_LOOP_RESTARTS = 10.0, 3  # that many exits this soon after a restart: give up
CONSUL_LEADER_TIMEOUT = 30.0

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_STYLES = ("cyan", "magenta", "green", "yellow", "blue", "bright_red")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich's default raises SystemExit; here the children must still be stopped.
        _silence(self)


def _silence(console: Console) -> None:
    """The terminal or pipe is gone: print nothing more, and let nothing fail on it."""
    console.quiet = True
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


out = _Console(highlight=False, soft_wrap=True)


def say(*objects: Any, **kwargs: Any) -> None:
    """Print to the terminal; if it is gone (closed pipe, hung-up tty), carry on silently.

    Shutting the children down matters more than telling anyone about it.
    """
    try:
        out.print(*objects, **kwargs)
    except OSError:
        _silence(out)


def _warn(message: str) -> None:
    say(Text(message, style="yellow"))


def _say_text(message: str) -> None:
    say(Text(message))


class DevError(Exception):
    """A problem that stops ``subsys dev``: printed as one clear message, no stack trace."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Stopped(Exception):
    """Ctrl-C / SIGTERM arrived while starting up."""


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        # As root, pgserver runs PostgreSQL as an unprivileged user and opens every parent
        # of the data dir to others (o+rx): keep that away from /root.
        return Path(tempfile.gettempdir()) / "subsys-dev-root" / "dev-pg"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "subsys" / "dev-pg"


@dataclass
class DevCluster:
    nodes: int = 3
    base_port: int = 8080
    interval: float = 0.5
    embedded: bool = False
    data_dir: Path | None = None

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""
    cluster: LocalCluster | None = None
    writer_task: asyncio.Task | None = None
    run_dir: Path | None = None
    _signals: int = 0
    _quick_exits: dict[str, int] = field(default_factory=dict)  # node -> exits soon after a restart

    # -- entry point --------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
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
                say(Text.assemble(("subsys dev:", "bold red"), " ", self.failure))
                code = code or 1
        finally:
            await self._shutdown(ok=code == 0)
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
        return code

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            self.stop.set()
            say(f"\n[bold]{signal.Signals(sig).name}: stopping everything[/] (again to hurry)")
        elif sig != signal.SIGHUP:
            for child in self._processes():
                child.kill()
            say("[bold]hurrying: killed what was left[/]")

    @property
    def children(self) -> list[NodeProcess]:
        return list(self.cluster.nodes.values()) if self.cluster is not None else []

    @property
    def consul(self) -> ConsulAgent | None:
        if self.cluster is None or self.cluster.consul is None:
            return None
        return self.cluster.consul.servers[0]

    @property
    def pg(self) -> EmbeddedPostgres | None:
        return self.cluster.pg if self.cluster is not None else None

    def _processes(self) -> list[NodeProcess | ConsulAgent]:
        return [*self.children, *([self.consul] if self.consul else [])]

    # -- start ----------------------------------------------------------------

    async def _start(self) -> None:
        self._validate()
        wanted = [self.base_port + i for i in range(1 if self.embedded else self.nodes)]
        busy = check_ports(wanted, HOST)
        if busy:
            raise DevError(
                f"port(s) {', '.join(map(str, busy))} on {HOST} already in use; nothing was started. "
                f"Stop what uses them or pick others with --base-port.",
                code=2,
            )

        consul_bin, how = (None, "--embedded given")
        if not self.embedded:
            consul_bin, how = await self._until_stopped(find_consul(lambda line: say(Text(line, style="dim"))))
            if consul_bin is None:
                _warn(f"no Consul binary: {how}.\nUsing the embedded coordinator: one node.")
                how = "no Consul binary available, see above"
        node_count = len(wanted) if consul_bin else 1

        self.run_dir = Path(tempfile.mkdtemp(prefix="subsys-dev-"))
        self.data_dir = (self.data_dir or default_data_dir()).expanduser().resolve()
        demo = _demo.config(interval=self.interval)
        spec = ClusterSpec(
            nodes=node_count,
            feeds=demo["feeds"],
            settings={"node": demo["node"]},
            consul="dev" if consul_bin else "none",
            database_name=_demo.DEMO_DATABASE,
            pg_data_dir=self.data_dir,
            prefix=CONSUL_PREFIX,
            secret=secrets.token_urlsafe(32),
            base_port=self.base_port,
            node_names=tuple(f"node-{i + 1}" for i in range(node_count)),
            own_session=True,
        )
        self.cluster = LocalCluster(spec, workdir=self.run_dir, on_line=self._print_line, report=_say_text)
        await self._start_postgres()
        db_url = self.cluster.database_url
        try:
            await self._until_stopped(_demo.ensure_schema(db_url))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DevError(f"could not set up the demo database: {type(exc).__name__}: {exc}") from None
        config = self.cluster.write_config()
        if consul_bin:
            await self._start_consul(how)

        writer = _demo.DemoWriter(db_url, report=_warn)
        self.writer_task = asyncio.create_task(writer.run(), name="demo-writer")

        try:
            await self.cluster.start_nodes(node_count, wait=False)
        except OSError as exc:
            raise DevError(f"cannot start the nodes: {exc}") from None
        await self._until_stopped(self._wait_all_ready())
        self._banner(how, db_url, config)

    def _print_line(self, name: str, line: str) -> None:
        index = int(name.rsplit("-", 1)[-1]) - 1 if name.rsplit("-", 1)[-1].isdigit() else 0
        say(Text.assemble((f"{name:<7}| ", _STYLES[index % len(_STYLES)]), line))

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

    async def _start_postgres(self) -> None:
        assert self.cluster is not None
        try:
            # Not cancelled by Ctrl-C (pg_ctl -w), so that it is always stopped after.
            await self.cluster.start_postgres()
        except DataDirError as exc:
            raise DevError(f"{exc}; pick another --data-dir") from None
        except ProcessError as exc:
            raise DevError(str(exc)) from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DevError(f"could not set up the demo database: {type(exc).__name__}: {exc}") from None
        self._check_stop()

    async def _start_consul(self, how: str) -> None:
        assert self.cluster is not None
        say(f"starting a Consul dev agent ({how}) ...")
        try:
            await self._until_stopped(asyncio.wait_for(self.cluster.start_consul(), CONSUL_LEADER_TIMEOUT))
        except (ProcessError, OSError, asyncio.TimeoutError) as exc:
            raise DevError(f"the Consul agent did not get ready: {exc}\n(run with --embedded to skip Consul)") from None

    async def _wait_all_ready(self) -> None:
        tasks = [asyncio.create_task(node.wait_ready(NODE_READY_TIMEOUT)) for node in self.children]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task in done and task.exception() is not None:
                raise DevError(str(task.exception()))

    def _banner(self, how: str, db_url: str, config: Path) -> None:
        assert self.pg is not None
        say()
        if self.consul is not None:
            say(
                f"[bold green]subsys dev is up[/]: {len(self.children)} nodes on [bold]Consul[/] "
                f"(dev agent at {self.consul.http_addr}, key prefix {CONSUL_PREFIX}, log {self.consul.log_path})"
            )
        else:
            say(f"[bold green]subsys dev is up[/]: 1 node on the [bold]embedded coordinator[/] ({how})")
        for node in self.children:
            say(f"  {node.name:<7} {node.url}   ws {node.ws_url}   pid {node.pid}")
        say(f"  postgres {db_url}   pid {self.pg.pid}   data {self.data_dir}")
        say(f"  config   {config}")
        say("  feeds    " + "\n           ".join(_demo.FEEDS_HELP.values()))
        assert self.cluster is not None
        urls = ",".join(node.url for node in self.children)
        say(f"  admin    operator token {self.cluster.admin_token}   (generated for this run; a dev cluster only)")
        say("\nTry:")
        say(f"  subsys sub orders:1 --url {self.children[0].ws_url}")
        if len(self.children) > 1:
            say(f"  subsys sub orders:1 --url {self.children[-1].ws_url}      (same topic through another node)")
        say(f"  export SUBSYS_URL={urls} SUBSYS_TOKEN={self.cluster.admin_token}")
        say("  subsys console        (then: subsys topics, subsys failover orders:1, subsys zombies ...)")
        say("Ctrl-C stops everything.\n")

    # -- run ------------------------------------------------------------------

    async def _watch(self) -> None:
        """Until Ctrl-C or until PostgreSQL, Consul or the writer dies.

        A node that dies is restarted, as a supervisor would (systemd, Kubernetes): kill one
        (``kill -9 <pid>``) to watch its topics fail over and the node come back.
        """
        assert self.writer_task is not None and self.pg is not None
        fatal: dict[asyncio.Future, Any] = {
            asyncio.ensure_future(self.stop.wait()): "stop",
            self.writer_task: "writer",
            asyncio.ensure_future(self.pg.wait_exit()): "postgres",
        }
        if self.consul is not None:
            fatal[asyncio.ensure_future(self.consul.wait())] = self.consul
        nodes = {asyncio.ensure_future(node.wait()): node for node in self.children}
        try:
            while True:
                done, _ = await asyncio.wait([*fatal, *nodes], return_when=asyncio.FIRST_COMPLETED)
                if any(future in fatal for future in done):
                    break
                for future in done:
                    node = nodes.pop(future)
                    if future.exception() is not None:  # a crash loop: give up, as a supervisor would
                        raise future.exception()  # type: ignore[misc]
                    nodes[asyncio.ensure_future(self._restart(node))] = node
        finally:
            for future, what in [*fatal.items(), *nodes.items()]:
                if what != "writer":
                    future.cancel()
        if self.stop.is_set():
            return
        what = fatal[next(f for f in done if f in fatal)]
        if what == "writer":
            exc = self.writer_task.exception() if not self.writer_task.cancelled() else None
            raise DevError(f"the demo writer stopped: {exc!r}")
        if what == "postgres":
            raise DevError(f"PostgreSQL (pid {self.pg.pid}) exited unexpectedly (log {self.data_dir}/log)")
        extra = f" (log {what.log_path}):\n{what.log_tail(15)}" if what is self.consul else ""
        raise DevError(f"{what.name} (pid {what.pid}) exited unexpectedly ({exit_status(what.returncode)}){extra}")

    async def _restart(self, node: NodeProcess) -> None:
        """Report a node's death, start it again after a moment, then watch it again (returns when it exits)."""
        status = exit_status(node.returncode)
        others = "; the other nodes take over its topics" if len(self.children) > 1 else ""
        say(Text(f"{node.name} (pid {node.pid}) exited ({status}){others}; restarting it in "
                 f"{RESTART_DELAY:g}s, as a supervisor would", style="yellow"))  # fmt: skip
        await asyncio.sleep(RESTART_DELAY)
        await node.start()
        started = time.monotonic()
        try:
            await node.wait_ready(NODE_READY_TIMEOUT)
        except ProcessError:
            pass  # it died (or hangs) while starting: counted below, with its log
        else:
            say(Text(f"{node.name} restarted (pid {node.pid}): ready", style="green"))
        await node.wait()
        quick = self._quick_exits.get(node.name, 0) + 1 if time.monotonic() - started < CRASH_LOOP_UPTIME else 0
        self._quick_exits[node.name] = quick
        if quick >= CRASH_LOOP_RESTARTS:
            raise DevError(f"{node.name} exited {quick} times within {CRASH_LOOP_UPTIME:g}s of a restart "
                           f"({exit_status(node.returncode)}); the last lines of its log:\n{node.log_tail(15)}")  # fmt: skip

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
                say(Text(f"while stopping {what}: {type(exc).__name__}: {exc}", style="red"))
                ok = False
        if self.run_dir is not None:
            if ok:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            else:
                say(f"run files kept in {self.run_dir}")
        if stopped:
            say(f"stopped: {', '.join(stopped)}")

    async def _stop_nodes(self) -> bool:
        if not self.children:
            return False
        running = [node.name for node in self.children if node.running]
        if running:
            say(f"stopping {', '.join(running)} ...")
        await asyncio.gather(*(node.stop(timeout=NODE_STOP_TIMEOUT) for node in self.children))
        return True

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
        await self.consul.stop()  # SIGINT: a graceful leave
        return True

    async def _stop_postgres(self) -> bool:
        return self.pg is not None and await self.pg.stop()


async def run_dev(
    *,
    nodes: int = 3,
    base_port: int = 8080,
    interval: float = 0.5,
    embedded: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Run the dev cluster until Ctrl-C / SIGTERM / SIGHUP; return the process exit code."""
    cluster = DevCluster(
        nodes=nodes,
        base_port=base_port,
        interval=interval,
        embedded=embedded,
        data_dir=Path(data_dir) if data_dir is not None else None,
    )
    return await cluster.run()
