"""The short chaos run CI makes: the most important faults, every invariant checked, zero violations.

``subsys chaos --rounds 20`` runs the full set longer; these are the same runner
with fewer rounds. The verdict is printed (pytest -s, or on failure) so a failure
names the invariant, the round and the evidence, and the command to reproduce it.
"""

from __future__ import annotations

import json

import pytest

from subsys.chaos import ChaosConfig, run_chaos
from subsys.chaos.verdict import render
from subsys.testing.consul import consul_binary
from subsys.testing.procs import ProcessError

pytestmark = pytest.mark.consul

# Every kind that a one-server Consul allows, once each (the leader loss has its own test).
SHORT = ("kill_now", "kill_late", "pause", "sigterm", "consul_outage", "pg_restart", "slow_query", "churn")


@pytest.fixture(autouse=True)
async def _consul_built() -> None:
    try:
        await consul_binary()
    except ProcessError as exc:
        pytest.fail(f"cannot provide a Consul agent: {exc}")


def _assert_clean(verdict: dict, kinds: tuple[str, ...], workdir) -> None:
    text = render(verdict)
    print(text)
    # Kept beside the node logs, so a failure can be studied after the fact.
    (workdir / "verdict.json").write_text(json.dumps(verdict, default=str, indent=1))
    assert verdict["passed"], text
    assert set(verdict["faults"]) == set(kinds), text
    idle = [name for name, t in verdict["invariants"].items() if not t["checks"]]
    assert not idle, f"invariants never checked: {idle}\n{text}"


@pytest.mark.timeout(420)
async def test_a_short_chaos_run_breaks_no_invariant(tmp_path) -> None:
    config = ChaosConfig(rounds=len(SHORT), seed=11, faults=SHORT, clients=30, workdir=tmp_path / "run")
    verdict = await run_chaos(config)
    _assert_clean(verdict, SHORT, config.workdir)
    for kind in ("kill_now", "kill_late", "pause", "sigterm"):
        assert verdict["faults"][kind]["failover_s"]["n"] == 1, verdict["faults"][kind]


@pytest.mark.timeout(300)
async def test_losing_the_consul_leader_of_three_servers_breaks_no_invariant(tmp_path) -> None:
    kinds = ("consul_leader_loss", "consul_restart", "kill_now")
    config = ChaosConfig(rounds=3, seed=3, faults=kinds, clients=30, consul_servers=3, workdir=tmp_path / "run")
    verdict = await run_chaos(config)
    _assert_clean(verdict, kinds, config.workdir)
