"""An embedded PostgreSQL (pgserver) for ``subsys dev``, the benches, the tests and chaos runs.

Only pgserver's public API is used (``get_server``, ``pg_ctl``, the server's
``ensure_postgres_running``/``cleanup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import asyncpg
import psutil

from subsys.testing.procs import ProcessError

__all__ = ["DataDirError", "EmbeddedPostgres"]


class DataDirError(ProcessError):
    """The data directory cannot be used (not creatable, not PostgreSQL's, or in use)."""


class EmbeddedPostgres:
    """pgserver in ``data_dir`` (kept between runs), listening on a Unix socket only.

    ``start()`` takes an exclusive lock on the directory, reuses a postmaster an
    earlier run left behind, and ``stop()`` makes sure the postmaster is gone.
    """

    def __init__(self, data_dir: Path, *, report: Callable[[str], None] | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.report = report or (lambda message: None)
        self.pid: int | None = None
        self._server: Any = None
        self._lock_fd: int | None = None

    def url(self, database: str | None = None) -> str:
        if self._server is None:
            raise ProcessError("PostgreSQL not started")
        return self._server.get_uri(database)

    async def start(self) -> str:
        """Start (or reuse) the server; the URL of its ``postgres`` database."""
        self._claim()
        leftover = _running_postmaster(self.data_dir)
        if leftover:
            self.report(
                f"reusing the PostgreSQL (pid {leftover}) an earlier run left running on {self.data_dir};"
                " it is stopped at the end"
            )
        else:
            self.report(f"starting PostgreSQL (data in {self.data_dir}) ...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

        # Blocking (pg_ctl -w) in a thread that cannot be cancelled: wait for it even when
        # cancelled, so that stop() always knows what to stop.
        starting = asyncio.ensure_future(asyncio.to_thread(pgserver.get_server, self.data_dir, cleanup_mode="stop"))
        try:
            self._server = await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._server = await starting
            raise
        except Exception as exc:  # pgserver raises CalledProcessError, TimeoutExpired, OSError...
            raise ProcessError(f"PostgreSQL did not start: {exc}\n{_tail(self.data_dir / 'log')}") from None
        finally:
            if self._server is not None:
                self.pid = self._server.get_pid()
        return self.url()

    def _claim(self) -> None:
        data_dir = self.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
        if any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
            raise DataDirError(f"{data_dir} is neither empty nor a PostgreSQL data directory")
        fd = os.open(data_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirError(f"another process (e.g. another `subsys dev`) is using {data_dir}") from None
        self._lock_fd = fd
        _prune_stale_handles(data_dir)

    async def stop_fast(self) -> None:
        """``pg_ctl stop -m fast``: every backend is terminated, the socket goes away (half a restart)."""
        import pgserver

        server = self._require()
        await asyncio.to_thread(
            pgserver.pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60
        )

    async def start_again(self) -> None:
        """Start the stopped server again: same data directory, socket and URL."""
        server = self._require()
        await asyncio.to_thread(server.ensure_postgres_running)
        self.pid = server.get_pid()

    async def restart(self, *, down_for: float = 0.0) -> None:
        await self.stop_fast()
        await asyncio.sleep(down_for)
        await self.start_again()

    def _require(self) -> Any:
        if self._server is None:
            raise ProcessError("PostgreSQL not started")
        return self._server

    def running(self) -> bool:
        return self.pid is not None and _running_postmaster(self.data_dir) == self.pid

    async def wait_exit(self, interval: float = 1.0) -> None:
        """Returns when the postmaster is gone."""
        while self.running():
            await asyncio.sleep(interval)

    async def execute(self, sql: str, *args: Any, database: str | None = None) -> str:
        conn = await asyncpg.connect(self.url(database), timeout=10)
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def stop(self) -> bool:
        """Stop the postmaster (pg_ctl, then SIGTERM, then SIGKILL); False if it was not started."""
        server, self._server = self._server, None
        try:
            if server is None:
                return False
            await asyncio.to_thread(self._stop_blocking, server)
            return True
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _stop_blocking(self, server: Any) -> None:
        try:
            server.cleanup()  # pg_ctl -w stop (fast mode) when this is the last handle
        except Exception as exc:
            self.report(f"pgserver cleanup: {exc}")
        if self.pid is None:
            return
        try:
            postmaster = psutil.Process(self.pid)
            postmaster.wait(timeout=10)
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            # Someone else holds a pgserver handle on this directory, or the stop failed: it is ours.
            self.report(f"PostgreSQL (pid {self.pid}) still running: stopping it")
            with contextlib.suppress(psutil.NoSuchProcess):
                postmaster.terminate()  # SIGTERM: smart shutdown; our clients are gone
                try:
                    postmaster.wait(timeout=15)
                except psutil.TimeoutExpired:
                    postmaster.kill()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _running_postmaster(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        running = process.status() != psutil.STATUS_ZOMBIE and process.name() == "postgres"
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if running else None


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
