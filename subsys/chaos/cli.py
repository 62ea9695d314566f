"""``subsys chaos``: option checks, Ctrl-C, printing the verdict (cli/main.py stays thin)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from subsys.chaos.faults import FAULTS
from subsys.chaos.runner import ChaosConfig, run_chaos
from subsys.chaos.verdict import render

__all__ = ["run_chaos_command"]


def run_chaos_command(*, rounds: int, seed: int, faults: str | None, nodes: int, clients: int, topics: int,
                      consul_servers: int, workdir: Path | None, as_json: bool) -> int:  # fmt: skip
    kinds = tuple(k.strip() for k in faults.split(",") if k.strip()) if faults else tuple(FAULTS)
    unknown = [k for k in kinds if k not in FAULTS]
    problems = []
    if unknown:
        problems.append(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    if consul_servers not in (1, 3):
        problems.append("--consul-servers must be 1 or 3")
    if nodes < 2:
        problems.append("--nodes must be at least 2 (a failover needs a survivor)")
    if rounds < 1 or clients < 1 or topics < 1:
        problems.append("--rounds, --clients and --topics must be positive")
    if problems:
        print("subsys chaos: " + "; ".join(problems), file=sys.stderr)
        return 2
    config = ChaosConfig(rounds=rounds, seed=seed, faults=kinds, nodes=nodes, clients=clients, topics=topics,
                         consul_servers=consul_servers, workdir=workdir, own_session=True)  # fmt: skip
    try:
        # asyncio.run cancels the run on Ctrl-C: every client closes, LocalCluster stops every process.
        verdict = asyncio.run(run_chaos(config))
    except KeyboardInterrupt:
        print("subsys chaos: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    print(json.dumps(verdict, default=str) if as_json else render(verdict))
    return 0 if verdict["passed"] else 1
