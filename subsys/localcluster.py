"""Local processes for ``subsys dev``, ``subsys bench`` and the cluster tests.

* ``ConsulAgent``: the binary ``consul/install.sh`` provides (built from
  Consul's Go module and cached on first use), run as a single *server* with
  a data directory on free loopback ports, so a restart keeps the Raft state
  (and epochs keep increasing).
* ``NodeProcess``: ``subsys serve`` as a real process, secrets in its
  environment, never in argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp


__all__ = ["ConsulAgent", "NodeProcess", "consul_binary", "free_port", "REPO"]

REPO = Path(__file__).resolve().parent.parent
_consul_path: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def consul_binary() -> str:
    """Path of a Consul binary from consul/install.sh (builds it on first use)."""
    global _consul_path
    if _consul_path is None:
        proc = subprocess.run(
            ["bash", str(REPO / "consul" / "install.sh")], capture_output=True, text=True, timeout=3000
        )
        if proc.returncode != 0:
            raise RuntimeError(f"consul/install.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        _consul_path = proc.stdout.strip().splitlines()[-1]
    return _consul_path


class ConsulAgent:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.ports = {name: free_port() for name in ("http", "serf_lan", "serf_wan", "server")}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "consul.log"

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "server": True,
            "bootstrap_expect": 1,
            "node_name": "subsys-test",
            "datacenter": "dc1",
            "bind_addr": "127.0.0.1",
            "advertise_addr": "127.0.0.1",
            "client_addr": "127.0.0.1",
            "data_dir": str(self.data_dir),
            "log_level": "warn",
            "ui_config": {"enabled": False},
            "performance": {"raft_multiplier": 1},
            "ports": {**self.ports, "dns": -1, "grpc": -1, "grpc_tls": -1},
            "disable_update_check": True,
        }
        config_path = self.workdir / "agent.json"
        config_path.write_text(json.dumps(config))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [consul_binary(), "agent", f"-config-file={config_path}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"consul exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(f"http://{self.http_addr}/v1/status/leader") as resp:
                        leader = (await resp.json()) if resp.status == 200 else ""
                    if leader:
                        # A leader exists; make sure KV writes go through.
                        async with session.put(f"http://{self.http_addr}/v1/kv/subsys-ready", data=b"1") as resp:
                            if resp.status == 200:
                                return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"consul not ready after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def kv(self, prefix: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{self.http_addr}/v1/kv/{prefix}", params={"recurse": ""}) as resp:
                if resp.status == 404:
                    return []
                return await resp.json()


class NodeProcess:
    """``subsys serve`` as a real process."""

    def __init__(
        self, *, name: str, config: Path, env: dict[str, str], workdir: Path, port: int | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.port = port or free_port()
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config),
             "--port", str(self.port), "--node-id", self.name],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status, await resp.json()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.logs()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                status, _body = await self.health()
                if status == 200:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.logs()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
