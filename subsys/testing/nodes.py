"""Node processes and their config files: ``subsys serve`` as a real process on loopback.

* ``NodeProcess``: ``python -m subsys serve``; the database URL and secrets
  reach it through its environment, never argv.
* ``to_toml`` / ``write_toml``: a ``subsys.toml`` from a dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import aiohttp

from subsys.testing.procs import LOOPBACK, ChildProcess, free_port

__all__ = ["HARNESS_ENV", "NodeProcess", "node_env", "to_toml", "write_toml"]


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
    # `python -m subsys` would put the current directory first on sys.path: started from another
    # checkout (say, the main worktree) a child would run that checkout's code, not this install's.
    env["PYTHONSAFEPATH"] = "1"
    env.update(overrides or {})
    return env


class NodeProcess(ChildProcess):
    """``subsys serve`` (``python -m subsys serve``) on a loopback port.

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
        argv = [sys.executable, "-m", "subsys", "serve", "--config", str(self.config),
                "--host", LOOPBACK, "--port", str(self.port), "--node-id", name]  # fmt: skip
        super().__init__(
            name,
            argv,
            env=node_env(env, isolate=isolate),
            cwd=None,
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


