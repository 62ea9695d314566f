"""``subsys bench``: measurements of this machine, each against its baseline in the same run.

``run_bench(name, **options)`` runs one bench and returns a dict of figures
with stable keys (the CLI prints it as tables, or ``--json``). Comparisons
sit under ``results``: one row per system or mode, and ``ratio*`` rows that
divide by the baseline measured in the same invocation, so a figure holds on
a noisy machine. Every bench starts what it needs on loopback (a
:class:`~subsys.testing.cluster.LocalCluster`; baselines and clients are
helper processes of :mod:`subsys.bench.clients`), measures, and stops it
all, also on error or Ctrl-C; every wait is bounded.

| bench | module | baseline |
| --- | --- | --- |
| latency | single | (the poll interval: expected median) |
| fanout | fanout | a plain websockets broadcast server |
| dbload | dbload | one ``= ANY($1)`` statement per tick |
| memory | memory | a plain websockets server |
| failover | failover | ``consul.fast_failover = false`` |
| consul-writes | cluster | |
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from subsys.bench.cluster import bench_consul_writes
from subsys.bench.dbload import bench_dbload
from subsys.bench.failover import bench_failover
from subsys.bench.fanout import bench_fanout
from subsys.bench.memory import bench_memory
from subsys.bench.single import bench_latency
from subsys.bench.support import BenchError
from subsys.testing.procs import ProcessError

__all__ = ["run_bench", "BENCHES"]

BENCHES: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "latency": bench_latency,
    "fanout": bench_fanout,
    "dbload": bench_dbload,
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


async def run_bench(what: str, **options: Any) -> dict[str, Any]:
    """Run one bench and return its figures; setup failures come back as ``{"error": ...}``.

    Options a bench does not take are ignored; options left out (or None) get
    the bench's own default (``topics`` is 1000 for dbload, 100 for
    consul-writes; ``interval`` 1 s for dbload, 0.1 s elsewhere).
    """
    bench = BENCHES.get(what)
    if bench is None:
        return {"bench": what, "error": f"unknown bench {what!r}; choose one of {', '.join(BENCHES)}"}
    params = {name: value for name, value in options.items() if value is not None}
    interval = params.get("interval")
    if interval is not None and not 0.01 <= interval <= 3600:
        return {"bench": what, "error": "interval must be between 0.01 and 3600 seconds"}
    check_ttl = params.get("check_ttl")
    if check_ttl is not None and not 2 <= check_ttl <= 3600:
        return {"bench": what, "error": "check_ttl must be between 2 and 3600 seconds (consul.check_ttl)"}
    lock_delay = params.get("lock_delay")
    if lock_delay is not None and not 0 <= lock_delay <= 60:
        return {"bench": what, "error": "lock_delay must be between 0 and 60 seconds (consul.lock_delay)"}
    try:
        return await bench(**_accepted(bench, params))
    except (BenchError, ProcessError) as exc:
        return {"bench": what, "error": str(exc)}
