"""`subsys bench`: every bench runs end to end on a tiny scale.

Each run starts its own embedded PostgreSQL and real `subsys serve`
subprocesses (and its baseline and client processes), so these are slow-ish
(seconds) but self-contained. They prove a bench works and says what it
should: keys present, counts right, values sane. They never assert speeds.
"""

from __future__ import annotations

import asyncio
import contextlib

import psutil
import pytest

from subsys.bench import run_bench


def _bench_children() -> set[int]:
    """Node, baseline and client processes (what a bench starts besides PostgreSQL and Consul)."""
    me = psutil.Process()
    marks = (" serve ", "subsys.bench.loadclient", "subsys.bench.baselines")
    found = set()
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(child.cmdline() or []) + " "
            if any(mark in line for mark in marks):
                found.add(child.pid)
    return found


async def _run_small(what: str, **params) -> dict:
    """Run a bench; it must succeed, and all it started must have exited (nodes cleanly) and be gone."""
    before = _bench_children()
    result = await asyncio.wait_for(run_bench(what, **params), 180)
    assert "error" not in result, result
    assert result.get("node_exit_code", 0) == 0
    assert not _bench_children() - before  # the bench's node, baseline and client processes are gone
    return result


def _ratio_row(row: dict, base: dict, ratio: dict, key: str) -> None:
    if row.get(key) and base.get(key):
        assert ratio[key] == pytest.approx(row[key] / base[key], abs=0.01)


@pytest.mark.timeout(240)
async def test_bench_latency_small() -> None:
    result = await _run_small("latency", changes=5, interval=0.1)
    assert result["changes"] == 5
    assert result["count"] == 5
    assert result["lost"] == 0
    assert result["seq_gaps"] == 0
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p99_ms"] <= result["max_ms"]
    # one poll interval plus generous slack for a loaded CI machine
    assert result["median_ms"] < 2000


@pytest.mark.timeout(120)
async def test_bench_fanout_small() -> None:
    result = await _run_small("fanout", subscribers=12, rounds=3, client_procs=2, interval=0.1)
    assert result["subscribers"] == 12 and result["rounds"] == 3
    assert result["event_loop"] == "asyncio" and isinstance(result["uvloop_in_node"], bool)
    assert result["payload_bytes"] > 0
    rows = result["results"]
    for system in ("subsys", "baseline"):
        row = rows[system]
        assert row["lost"] == 0
        assert row["rounds"] + (result["unanchored_rounds"] if system == "subsys" else 0) == 3
        assert 0 < row["first_ms"] <= row["last_ms"] < 5000
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["frames_per_s"] > 0 and row["us_per_frame"] > 0 and row["cpu_us_per_frame"] >= 0
    for key in ("first_ms", "last_ms", "p99_ms", "frames_per_s"):
        _ratio_row(rows["subsys"], rows["baseline"], rows["ratio"], key)


async def test_bench_fanout_says_when_uvloop_is_missing(monkeypatch) -> None:
    import subsys.bench.fanout as fanout

    monkeypatch.setattr(fanout, "installed", lambda module: False)
    result = await run_bench("fanout", subscribers=1, rounds=1, event_loop="uvloop")
    assert "uvloop is not installed" in result["error"]


@pytest.mark.timeout(120)
async def test_bench_dbload_small() -> None:
    result = await _run_small("dbload", topics=6, interval=0.5, window=2, settle=0.5)
    assert result["topics"] == 6 and result["expected_per_topic_per_s"] == 12
    rows = result["results"]
    for phase in ("subsys_per_topic", "subsys_merged", "baseline"):
        row = rows[phase]
        # counts, not speeds; a 2 s window of lazily flushed counters is noisy, so only: present and sane
        assert isinstance(row["statements_per_s"], float) and row["window_s"] >= 2
        assert row["pg_backends"] >= 1
        assert row["process_cpu_pct"] >= 0 and row["pg_total_cpu_pct"] > 0
    assert rows["subsys_per_topic"]["statements_per_s"] > 0  # 6 topics polled twice a second
    assert set(rows["ratio_subsys_merged"]) == {"statements_per_s", "process_cpu_pct", "pg_backends_cpu_pct",
                                                 "pg_total_cpu_pct"}  # fmt: skip


@pytest.mark.timeout(150)
async def test_bench_memory_small() -> None:
    result = await _run_small("memory", clients=12, interval=0.1, settle=0.4)
    assert result["connected"] == 12
    assert result["failed"] == 0
    assert result["node_reports_clients"] == 12
    assert result["topics"] == 10
    assert result["rss_baseline_mib"] > 0 and result["rss_mib"] > 0
    rows = result["results"]
    for mode in ("plain", "browser", "deflate"):
        for system in ("subsys", "baseline"):
            row = rows[f"{system}_{mode}"]
            assert row["connected"] == 12 and row["failed"] == 0, row
            assert row["rss_mib"] > 0
        assert "per_client_kib" in rows[f"ratio_{mode}"]
    # plain clients offer no extension; the baseline accepts it when it is on
    assert rows["subsys_plain"]["deflate_negotiated"] == rows["baseline_plain"]["deflate_negotiated"] == 0
    assert rows["baseline_browser"]["deflate_negotiated"] == 0
    assert rows["baseline_deflate"]["deflate_negotiated"] == 12
    assert result["node_reports_clients_by_row"]["subsys_deflate"] == 12


@pytest.mark.consul
@pytest.mark.timeout(120)
async def test_bench_failover_kinds_small() -> None:
    result = await _run_small(
        "failover", kills=1, fast_failover="true", restart_after="0", restart_runs=1, interval=0.1, check_ttl=2.0
    )
    assert result["check_ttl_s"] == 2.0 and result["kinds"] == ["kill", "kill-restart", "stop", "forced"]
    rows = result["results"]
    for name in ("kill", "kill-restart", "stop", "forced", "restart_after_0"):
        row = rows[f"{name}.fast"]
        assert row["n"] + row["timeouts"] == 1, row
        # a fault -> check TTL (or a death certificate) -> a survivor acquires -> resync
        assert row["n"] == 0 or 0 < row["min_s"] <= row["median_s"] <= row["max_s"] < 30
    assert rows["restart_after_0.fast"]["restart_after_s"] == 0
    assert not any(key.endswith(".slow") for key in rows)


@pytest.mark.consul
@pytest.mark.timeout(120)
async def test_bench_failover_both_modes_small() -> None:
    result = await _run_small("failover", kills=1, kinds="kill", restart_after="none", check_ttl=2.0, lock_delay=0)
    assert result["lock_delay_s"] == 0.0  # consul.lock_delay reaches the nodes' sessions; 0 is a valid delay
    rows = result["results"]
    assert rows["kill.fast"]["fast_failover"] is True and rows["kill.slow"]["fast_failover"] is False
    assert rows["kill.fast"]["n"] == rows["kill.slow"]["n"] == 1
    _ratio_row(rows["kill.fast"], rows["kill.slow"], rows["ratio.kill"], "median_s")


async def test_bench_failover_delays() -> None:
    from subsys.bench.failover import parse_delays

    assert parse_delays("0, 1,ttl/2,TTL", 3.0) == [("0", 0.0), ("1", 1.0), ("ttl/2", 1.5), ("ttl", 3.0)]
    assert parse_delays("none", 3.0) == [] == parse_delays("", 3.0)
    result = await run_bench("failover", kills=1, restart_after="soon")
    assert "restart_after" in result["error"]


async def test_bench_rejects_a_check_ttl_consul_would_refuse() -> None:
    result = await run_bench("failover", kills=1, check_ttl=1.0)
    assert "check_ttl" in result["error"]
    result = await run_bench("failover", kills=1, lock_delay=61)
    assert "lock_delay" in result["error"]


async def test_bench_unknown() -> None:
    result = await run_bench("nope", changes=1, clients=1, kills=1, topics=1, interval=0.1)
    assert "unknown bench" in result["error"]


def test_report_renders_rows_and_ratios() -> None:
    import io

    from rich.console import Console

    from subsys.bench.report import render

    out = io.StringIO()
    result = {
        "bench": "fanout",
        "subscribers": 3,
        "results": {"subsys": {"first_ms": 2.0, "lost": 0}, "baseline": {"first_ms": 1.0, "lost": 0},
                    "ratio": {"first_ms": 2.0}},
        "by_endpoint_per_min": {"PUT /v1/agent/check/pass": 60.0},
    }  # fmt: skip
    render(result, Console(file=out, width=120))
    text = out.getvalue()
    for word in ("subsys bench fanout", "subscribers", "first_ms", "baseline", "ratio", "PUT /v1/agent/check/pass"):
        assert word in text
