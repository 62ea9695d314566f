"""Child processes that are always stopped: the generic part of :mod:`subsys.localcluster`.

``ChildProcess`` runs one command under asyncio. Its output goes either to a
log file (appended, so a restarted process keeps one log) or, line by line,
to a callback (``subsys dev`` prints the lines with the node's name in
front); either way the last lines are at hand for error messages.

Every child gets ``PR_SET_PDEATHSIG`` on Linux: if this process is killed
outright, its children die with it. With ``own_session`` the child also
runs in a session of its own, so a terminal's Ctrl-C or hang-up reaches
only this process, which then stops its children in the order it wants;
``stop()`` and ``kill()`` then also sweep the child's process group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from signal import SIGCONT, SIGKILL, SIGTERM
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import aiohttp

__all__ = [
    "LOOPBACK",
    "ChildProcess",
    "ProcessError",
    "check_ports",
    "exit_status",
    "free_port",
    "pdeathsig",
]

log = logging.getLogger("subsys.localcluster")

LOOPBACK = "127.0.0.1"
_TAIL_LINES = 200


class ProcessError(RuntimeError):
    """A local process could not be started, did not get ready, or died."""


def free_port(host: str = LOOPBACK, *, udp_too: bool = False) -> int:
    """A TCP port that is free on ``host`` now (and for UDP as well with ``udp_too``, as Serf needs)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise ProcessError(f"could not find a free port on {host}")


def check_ports(ports: Sequence[int], host: str = LOOPBACK) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``host`` (what a node will do)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Same options as the node's listener: a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                busy.append(port)
    return busy


def exit_status(returncode: int | None) -> str:
    """``killed by SIGKILL`` or ``exit code 3``."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


Probe = Callable[[aiohttp.ClientSession], Awaitable[tuple[bool, str]]]


class ChildProcess:
    """One child process: start, signal, wait, stop (a signal, then SIGKILL after a timeout)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        own_session: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        if (log_path is None) == (on_line is None):
            raise ValueError("give exactly one of log_path and on_line")
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        self.on_line = on_line
        self.own_session = own_session
        self.report = report or log.warning
        self.proc: asyncio.subprocess.Process | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._pump: asyncio.Task | None = None

    def command(self) -> list[str]:
        return self.argv

    # -- state ------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError(f"{self.name} was not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def rss(self) -> int:
        """Resident set size in bytes."""
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    # -- start / stop -----------------------------------------------------------

    async def start(self) -> None:
        """Start (again, after it exited: a file log is appended to)."""
        if self.running:
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        kwargs: dict[str, Any] = dict(
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=None if self.cwd is None else str(self.cwd),
            start_new_session=self.own_session,
            preexec_fn=pdeathsig(),
        )
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log_file:  # the child has its own copy of the fd
                self.proc = await asyncio.create_subprocess_exec(*self.command(), stdout=log_file, **kwargs)
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), stdout=asyncio.subprocess.PIPE, **kwargs
            )
            self._pump = asyncio.create_task(self._read_lines(self.proc.stdout), name=f"output of {self.name}")

    async def _read_lines(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None and self.on_line is not None
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._lines.append(line)
            self.on_line(line)

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)  # type: ignore[union-attr]

    def kill(self) -> None:
        """SIGKILL, to its process group too when it has its own session."""
        self.signal(SIGKILL)
        self._sweep()

    def _sweep(self) -> None:
        if self.own_session and self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, SIGKILL)

    async def wait(self, timeout: float | None = None) -> int:
        """Its exit code once it has exited (and its output has been read)."""
        if self.proc is None:
            raise ProcessError(f"{self.name} was not started")
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._drain_output()
        return code

    async def _drain_output(self, timeout: float = 5.0) -> None:
        if self._pump is not None:
            await asyncio.wait({self._pump}, timeout=timeout)
            if not self._pump.done():
                self._pump.cancel()

    async def stop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        """``sig`` (after a SIGCONT, in case it is stopped), then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.running:
            self.signal(SIGCONT)
            self.signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.report(f"{self.name} did not stop within {timeout:.0f}s: killing it")
                self.kill()
                await self.proc.wait()
        self._sweep()  # whatever it left in its session
        await self._drain_output()
        return self.proc.returncode

    # -- output -------------------------------------------------------------------

    def logs(self) -> str:
        if self.log_path is None:
            return "\n".join(self._lines)
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:]) or "(no output)"

    def _where_output_is(self) -> str:
        if self.log_path is None:
            return "its output is above"
        return f"log {self.log_path}:\n{self.log_tail(15)}"

    # -- readiness -----------------------------------------------------------------

    async def wait_until(self, probe: Probe, *, what: str, timeout: float, interval: float = 0.2) -> None:
        """Call ``probe`` until it answers ``(True, _)``; fail early if the process exits.

        ``probe`` answers ``(ok, detail)``; the last detail is in the timeout's message.
        """
        deadline = time.monotonic() + timeout
        detail = "no answer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if not self.running:
                    raise ProcessError(
                        f"{self.name} (pid {self.pid}) exited before it was {what} "
                        f"({exit_status(self.returncode)}; {self._where_output_is()})"
                    )
                try:
                    ok, detail = await probe(session)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    ok, detail = False, str(exc) or type(exc).__name__
                if ok:
                    return
                if time.monotonic() > deadline:
                    raise ProcessError(
                        f"{self.name} not {what} after {timeout:.0f}s ({detail}; {self._where_output_is()})"
                    )
                await asyncio.sleep(interval)
