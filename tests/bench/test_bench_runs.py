"""`subsys bench`: the latency and memory benches run end to end on a small scale.

Each run starts its own embedded PostgreSQL and a real `subsys serve`
subprocess, so these are slow-ish (seconds) but self-contained.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest

from subsys.bench import run_bench


def _serve_children() -> set[int]:
    me = psutil.Process()
    return {
        child.pid
        for child in me.children(recursive=True)
        if " serve " in " ".join(child.cmdline() or []) + " "
    }


async def _run_small(what: str, **params) -> dict:
    """Run a bench; it must succeed, and its node processes must have exited cleanly and be gone."""
    before = _serve_children()
    result = await asyncio.wait_for(run_bench(what, **params), 180)
    assert "error" not in result, result
    assert result.get("node_exit_code", 0) == 0
    assert not _serve_children() - before  # the bench's node processes are gone
    return result


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


@pytest.mark.timeout(240)
async def test_bench_memory_small() -> None:
    result = await _run_small("memory", clients=20, interval=0.1)
    assert result["connected"] == 20
    assert result["failed"] == 0
    assert result["node_reports_clients"] == 20
    assert result["topics"] == 10
    assert result["rss_baseline_mib"] > 0
    assert result["rss_mib"] > 0


@pytest.mark.consul
@pytest.mark.timeout(300)
async def test_bench_failover_small() -> None:
    result = await _run_small("failover", kills=1, interval=0.1, check_ttl=2.0)
    assert result["bench"] == "failover" and result["kills"] == 1
    assert result["check_ttl_s"] == 2.0
    # SIGKILL -> check TTL expires -> session invalidated -> a survivor acquires -> resync
    assert 0 < result["best_s"] <= result["median_s"] <= result["worst_s"] < 30


async def test_bench_rejects_a_check_ttl_consul_would_refuse() -> None:
    result = await run_bench("failover", kills=1, check_ttl=1.0)
    assert "check_ttl" in result["error"]


async def test_bench_unknown() -> None:
    result = await run_bench("nope", changes=1, clients=1, kills=1, topics=1, interval=0.1)
    assert "unknown bench" in result["error"]
