"""The shared local-process plumbing (``subsys.testing``): no database, no Consul."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import textwrap
import tomllib
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from subsys.testing import consul as consul_tools
from subsys.testing.nodes import node_env, to_toml
from subsys.testing.procs import ChildProcess, ProcessError, check_ports, free_port

# -- TOML ------------------------------------------------------------------------

_names = st.from_regex(r"[a-z_][a-z0-9_ .-]{0,12}", fullmatch=True)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
)
_values = st.one_of(_scalars, st.lists(st.integers(), max_size=4), st.lists(st.text(max_size=5), max_size=4))
_tables = st.dictionaries(_names, _values, max_size=5)


@given(st.dictionaries(_names, st.one_of(_tables, st.dictionaries(_names, _tables, min_size=1, max_size=3)), max_size=4))
def test_to_toml_round_trips(config: dict) -> None:
    assert tomllib.loads(to_toml(config, header="a header\nof two lines")) == config


def test_to_toml_layout() -> None:
    text = to_toml({"node": {"grace_period": 2.0}, "feeds": {"orders": {"key": ["id"], "sql": 'say "hi"'}}})
    assert text == '[node]\ngrace_period = 2.0\n\n[feeds.orders]\nkey = ["id"]\nsql = "say \\"hi\\""\n'
    with pytest.raises(TypeError):
        to_toml({"node": {"x": object()}})


# -- ports and environment ---------------------------------------------------------


def test_free_port_and_check_ports() -> None:
    port = free_port(udp_too=True)
    assert check_ports([port]) == []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert check_ports([port]) == [port]


def test_node_env_keeps_what_the_harness_does_not_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    monkeypatch.setenv("SUBSYS_LOG_LEVEL", "DEBUG")
    env = node_env({"DATABASE_URL": "postgresql://ours"})
    assert env["DATABASE_URL"] == "postgresql://ours" and "CONSUL_HTTP_TOKEN" not in env
    assert env["SUBSYS_LOG_LEVEL"] == "DEBUG" and env["PYTHONUNBUFFERED"] == "1"
    assert "SUBSYS_LOG_LEVEL" not in node_env(isolate=True)


# -- child processes ----------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def test_lines_go_to_the_callback_and_stop_escalates_to_sigkill() -> None:
    lines: list[str] = []
    reports: list[str] = []
    child = ChildProcess(
        "stubborn",
        _python("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(60)
        """),
        on_line=lines.append,
        report=reports.append,
    )
    await child.start()
    for _ in range(100):
        if lines:
            break
        await asyncio.sleep(0.05)
    assert lines == ["ready"] and child.running
    assert await child.stop(timeout=0.5) == -signal.SIGKILL
    assert len(reports) == 1 and "stubborn did not stop" in reports[0], reports
    assert child.log_tail() == "ready"


async def test_own_session_stop_sweeps_the_process_group(tmp_path: Path) -> None:
    child = ChildProcess(
        "parent",
        ["bash", "-c", "sleep 60 & echo $! > grandchild.pid; wait"],
        cwd=tmp_path,
        log_path=tmp_path / "parent.log",
        own_session=True,
    )
    await child.start()
    pid_file = tmp_path / "grandchild.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.05)
    grandchild = psutil.Process(int(pid_file.read_text()))
    await child.stop(timeout=5)
    grandchild.wait(5)  # raises TimeoutExpired if it survived
    assert not child.running


async def test_wait_until_fails_early_with_the_log(tmp_path: Path) -> None:
    child = ChildProcess("doomed", _python("print('bad config'); raise SystemExit(2)"), log_path=tmp_path / "d.log")
    await child.start()

    async def never(session):
        return False, "not yet"

    with pytest.raises(ProcessError, match=r"(?s)doomed .* exited before it was healthy \(exit code 2; .*bad config"):
        await child.wait_until(never, what="healthy", timeout=30)


async def test_cancelling_find_consul_stops_the_install_script(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "install.sh"
    script.write_text(f"echo building >&2\nsleep 60 & echo $! > {tmp_path}/build.pid\nwait\n")
    monkeypatch.setattr(consul_tools, "consul_material", lambda: tmp_path)
    progress: list[str] = []
    task = asyncio.create_task(consul_tools.find_consul(progress.append))
    pid_file = tmp_path / "build.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip() and "building" in progress:
            break
        await asyncio.sleep(0.05)
    build = psutil.Process(int(pid_file.read_text()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    build.wait(5)
