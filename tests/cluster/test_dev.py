"""``subsys dev`` as a user runs it: a real subprocess, real PostgreSQL, real nodes.

Each test starts ``python -m subsys dev`` with its own data directory and
free loopback ports, waits for the ``subsys sub ...`` hint, talks to the
nodes with ``subsys sub`` (another real subprocess), then stops it the way a
user does (SIGINT) and checks that nothing it started is left running:
its child processes (nodes, Consul agent), the PostgreSQL postmaster (which
``pg_ctl`` detaches, so it is not a child) and anything else whose command
line names the test's data directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from subsys.testing import demo as _demo
from subsys.config import load_settings
from subsys.dev import check_ports

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 240.0  # a cold PostgreSQL initdb plus node start-up on a slow machine
STOP_TIMEOUT = 90.0
SUB_TIMEOUT = 90.0
HINT_RE = re.compile(r"subsys sub orders:1 --url (ws://\S+)")


# -- helpers -------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBSYS_", "CONSUL_HTTP"))}
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


def _free_base_port(count: int) -> int:
    """A port p such that p .. p+count-1 are all free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 45_000)
        if not check_ports(list(range(base, base + count))):
            return base
    raise RuntimeError("no free port range found")


class Dev:
    """A running ``subsys dev`` subprocess with its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "subsys", "dev", *args],
            cwd=REPO,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"subsys dev exited ({self.proc.returncode}) early:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern.pattern!r} within {timeout:.0f}s:\n{self.output}")
                self._cond.wait(min(left, 1.0))

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"subsys dev did not exit within {timeout:.0f}s of SIGINT:\n{self.output}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _snapshot_processes(dev: Dev, data_dir: Path) -> list[psutil.Process]:
    """Everything ``subsys dev`` started that should be gone after it exits."""
    procs = psutil.Process(dev.proc.pid).children(recursive=True)
    postmaster_pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    procs.append(psutil.Process(postmaster_pid))
    procs.extend(psutil.Process(postmaster_pid).children(recursive=True))
    return procs


def _alive(proc: psutil.Process) -> bool:
    try:
        # is_running() also compares the create time, so a recycled pid is not a false alarm.
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _leftovers(procs: list[psutil.Process], data_dir: Path) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [p for p in procs if _alive(p)]
        if not alive:
            break
        time.sleep(0.25)
    left = [f"{p.pid} {' '.join(p.cmdline())}" for p in procs if _alive(p)]
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmdline and _alive(p) and p.pid != os.getpid():
            left.append(f"{p.pid} {cmdline}")
    return left


def _cleanup_postgres(data_dir: Path) -> None:
    """Test teardown only: never leave a PostgreSQL behind, even when the test failed."""
    pid_file = data_dir / "postmaster.pid"
    try:
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return
    if str(data_dir) in " ".join(postmaster.cmdline()):
        postmaster.terminate()
        try:
            postmaster.wait(20)
        except psutil.TimeoutExpired:
            postmaster.kill()


def _assert_no_traceback(dev: Dev) -> None:
    """No stack trace from ``subsys dev`` itself, nor from anything once it was told to stop.

    (A node's log before the stop may hold tracebacks that are that node's
    business, e.g. a client leaving mid-send; this test is about ``dev``.)
    """
    lines = dev.output.splitlines()
    own = [line for line in lines if not re.match(r"node-\d+\s*\|", line)]
    assert not any("Traceback" in line for line in own), dev.output
    stop = next((i for i, line in enumerate(lines) if "stopping everything" in line), len(lines))
    assert not any("Traceback" in line for line in lines[stop:]), dev.output


def _stop_cleanly(dev: Dev, procs: list[psutil.Process], data_dir: Path, *, stopped: str) -> None:
    """Ctrl-C: exit code 0, everything it started gone, no traceback, the steps reported."""
    code = dev.stop()
    assert code == 0, dev.output
    assert _leftovers(procs, data_dir) == []
    _assert_no_traceback(dev)
    assert f"stopped: {stopped}" in dev.output


def _sub(url: str, topic: str = "orders:1", count: int = 3) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "subsys", "sub", topic, "--url", url, "--json", "--count", str(count)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUB_TIMEOUT,
    )
    assert proc.returncode == 0, f"subsys sub failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    frames = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(frames) == count, proc.stdout
    return frames


def _assert_live(frames: list[dict], topic: str = "orders:1") -> None:
    first, *rest = frames
    assert first["type"] == "snapshot" and first["topic"] == topic, first
    assert all(row["customer_id"] == 1 for row in first["rows"]), first
    diffs = [f for f in rest if f["type"] == "diff"]
    assert diffs, f"no diff after the snapshot: {frames}"
    for diff in diffs:
        assert diff["topic"] == topic
        assert diff["inserted"] or diff["updated"] or diff["deleted"], diff
    seqs = [f["seq"] for f in frames if f["type"] in ("snapshot", "diff")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


# -- tests ---------------------------------------------------------------------


def test_demo_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "subsys.toml"
    path.write_text(_demo.config_toml(interval=0.25))
    settings = load_settings(path, env={})
    assert set(settings.feeds) == {"orders", "stock", "by_status"}
    orders = settings.feeds["orders"]
    assert orders.param == "int" and orders.key == ("id",) and orders.interval == 0.25
    assert settings.feeds["stock"].key == ("sku",)
    assert settings.node.host == "127.0.0.1"


def test_busy_port_fails_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert check_ports([port]) == [port]
        proc = subprocess.run(
            [sys.executable, "-m", "subsys", "dev", "--embedded", "--base-port", str(port),
             "--data-dir", str(tmp_path / "pg")],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"{port}" in output and "already in use" in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "pg").exists(), "PostgreSQL was started despite the busy port"


def test_dev_embedded_serves_changing_data_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    port = _free_base_port(1)
    dev = Dev("--embedded", "--base-port", str(port), "--data-dir", str(data_dir), "--interval", "0.25")
    try:
        url = dev.wait_for(HINT_RE, START_TIMEOUT).group(1)
        assert url == f"ws://127.0.0.1:{port}/ws"
        assert "embedded coordinator" in dev.output
        procs = _snapshot_processes(dev, data_dir)
        assert any("serve" in p.cmdline() for p in procs), procs

        frames = _sub(url)
        _assert_live(frames)
        assert [f["type"] for f in frames] == ["snapshot", "diff", "diff"]
        # Another feed of the demo changes too.
        stock = _sub(url, "stock:ams", count=2)
        assert stock[0]["type"] == "snapshot" and stock[1]["type"] == "diff"

        _stop_cleanly(dev, procs, data_dir, stopped="nodes, writer, postgres")
    finally:
        dev.kill()
        _cleanup_postgres(data_dir)


def test_dev_restarts_a_dead_node_like_a_supervisor_and_gives_up_on_a_crash_loop(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    dev = Dev("--embedded", "--base-port", str(_free_base_port(1)), "--data-dir", str(data_dir))
    try:
        url = dev.wait_for(HINT_RE, START_TIMEOUT).group(1)
        procs = _snapshot_processes(dev, data_dir)
        node = next(p for p in procs if "serve" in p.cmdline())
        node.kill()
        dev.wait_for(re.compile(rf"node-1 \(pid {node.pid}\) exited \(killed by SIGKILL\); restarting it"), 30)
        pid = int(dev.wait_for(re.compile(r"node-1 restarted \(pid (\d+)\)"), 60).group(1))
        assert pid != node.pid
        _assert_live(_sub(url))  # serving again, same address

        # A node that keeps dying right after each restart: a crash loop, reported, and dev gives up.
        seen = {node.pid, pid}
        for attempt in range(3):
            psutil.Process(pid).kill()
            if attempt < 2:
                fresh = "|".join(map(str, seen))
                pid = int(dev.wait_for(re.compile(rf"node-1 restarted \(pid (?!(?:{fresh})\))(\d+)\)"), 60).group(1))
                seen.add(pid)
        try:
            code = dev.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"subsys dev kept restarting a crash-looping node:\n{dev.output}") from None
        dev._reader.join(10)
        assert code != 0, dev.output
        assert re.search(r"node-1 exited 3 times within 10s of a restart \(killed by SIGKILL\)", dev.output), dev.output
        assert _leftovers(procs, data_dir) == []
        _assert_no_traceback(dev)
    finally:
        dev.kill()
        _cleanup_postgres(data_dir)


@pytest.fixture(scope="module")
def consul_bin() -> str:
    """Consul is not optional here: the README's test command installs it (consul/install.sh)."""
    proc = subprocess.run(["bash", str(REPO / "consul" / "install.sh")], capture_output=True, text=True, timeout=3000)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        pytest.fail(f"consul/install.sh gave no consul binary: {proc.stderr.strip()[-500:]}")
    return lines[-1]


@pytest.mark.consul
@pytest.mark.timeout(3600)
def test_dev_on_consul_runs_three_nodes_and_stops_cleanly(tmp_path: Path, consul_bin: str) -> None:
    data_dir = tmp_path / "pg"
    port = _free_base_port(3)
    dev = Dev("--base-port", str(port), "--data-dir", str(data_dir), "--nodes", "3")
    try:
        url = dev.wait_for(HINT_RE, START_TIMEOUT).group(1)
        assert re.search(r"3 nodes on Consul \(dev agent at 127\.0\.0\.1:\d+", dev.output), dev.output
        procs = _snapshot_processes(dev, data_dir)
        assert sum("serve" in p.cmdline() for p in procs) == 3, procs
        assert any(Path(p.cmdline()[0]).name == "consul" for p in procs if p.cmdline()), procs

        _assert_live(_sub(url))
        # The same topic through the last node: it follows the owner over the peer link.
        _assert_live(_sub(f"ws://127.0.0.1:{port + 2}/ws"))

        _stop_cleanly(dev, procs, data_dir, stopped="nodes, writer, consul, postgres")
    finally:
        dev.kill()
        _cleanup_postgres(data_dir)
