"""``subsys bench``: measurements of this machine, each against its baseline in the same run.

``run_bench(name, **options)`` runs one bench and returns a flat dict of
figures (the CLI prints it, or ``--json``). Every bench starts what it needs
on loopback (a :class:`~subsys.testing.cluster.LocalCluster`), measures, and
stops it all; every wait is bounded.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from subsys.bench.cluster import bench_consul_writes, bench_failover
from subsys.bench.single import bench_latency, bench_memory
from subsys.bench.support import BenchError
from subsys.testing.procs import ProcessError

__all__ = ["run_bench", "BENCHES"]

BENCHES: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "latency": bench_latency,
    "memory": bench_memory,
    "failover": bench_failover,
    "consul-writes": bench_consul_writes,
}


def _accepted(func: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that ``func`` takes (all of them if it has ``**kwargs``).

    So a bench can be declared with just the options it uses, e.g.
    ``async def bench_failover(*, kills, interval)``.
    """
    signature = inspect.signature(func)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return params
    return {name: value for name, value in params.items() if name in signature.parameters}


async def run_bench(
    what: str,
    *,
    changes: int = 200,
    clients: int = 1000,
    kills: int = 20,
    topics: int = 100,
    interval: float = 0.1,
    check_ttl: float = 3.0,
) -> dict[str, Any]:
    """Run one bench and return its figures; setup failures come back as ``{"error": ...}``."""
    bench = BENCHES.get(what)
    if bench is None:
        return {"bench": what, "error": f"unknown bench {what!r}; choose one of {', '.join(BENCHES)}"}
    if not 0.01 <= interval <= 3600:
        return {"bench": what, "error": "interval must be between 0.01 and 3600 seconds"}
    if not 2 <= check_ttl <= 3600:
        return {"bench": what, "error": "check_ttl must be between 2 and 3600 seconds (consul.check_ttl)"}
    params = {
        "changes": changes,
        "clients": clients,
        "kills": kills,
        "topics": topics,
        "interval": interval,
        "check_ttl": check_ttl,
    }
    try:
        return await bench(**_accepted(bench, params))
    except (BenchError, ProcessError) as exc:
        return {"bench": what, "error": str(exc)}



