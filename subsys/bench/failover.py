"""``subsys bench failover``: how long a topic is without an owner after its owner fails.

Timed, every round: from the fault (the signal to the topic's owner) to the
first ``resync`` with a higher epoch at a client on another node (each of
the three nodes has one subscribed client; the victim's own client does
not count). The bench's clock is read right before the signal is sent and
as the client task sees the frame, in the bench process: error a few
milliseconds, far below the figures (seconds).

Fault kinds, each ``kills`` times:

* ``kill``: SIGKILL, the victim stays dead until the round is measured, then
  it is restarted (same node id) and the bench waits until it is healthy;
* ``kill-restart``: SIGKILL and, as soon as the process is reaped, a restart
  of the same node id (what a supervisor does): its new incarnation may
  prove the old one dead;
* ``stop``: SIGSTOP (the process is frozen, not dead: no death certificate
  is possible, this is the ordinary check-TTL failover); SIGCONT after the
  round, then the bench waits until the node is healthy and registered
  with Consul again (a new session);
* ``forced``: an operator's forced failover through the admin API (``POST
  /admin/v1/topics/items:1/failover``, the cluster picks the target): the
  same clock, from the call to the first resync, side by side with the
  faults; ``api_took`` is the API's own figure.

``lock_delay`` sets the nodes' ``consul.lock_delay`` (0.5 s by default): the
wait Consul imposes before a key whose session was invalidated can be taken
again, part of every failover; ``--lock-delay 0`` measures what it costs.

``restart_after`` (the defects issue): SIGKILL, then a restart of the same
node id ``d`` seconds after the kill, for d in e.g. 0, 1, TTL/2, TTL,
``restart_runs`` times each.

Every kind runs with ``consul.fast_failover = true`` and ``false`` in the
same invocation (the nodes are restarted on the rewritten config between
the two), so ``ratio.<kind>`` (fast / slow) shows the gain. A round that sees
no resync within its bound counts as a timeout, not as a figure; a round
whose fault could not be made (a forced failover the API refused) is listed
under ``failed`` with the error and a file holding the nodes' logs.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from typing import Any

from subsys.bench.cluster import LOCK_DELAY, cluster_spec, wait_for
from subsys.bench.support import BenchError, progress, ratio, reconfigure, summarize_s
from subsys.client.admin import AdminClient, AdminError
from subsys.client.ws import connect
from subsys.testing.cluster import LocalCluster
from subsys.testing.nodes import NodeProcess

__all__ = ["bench_failover", "KINDS", "parse_delays"]

KINDS = ("kill", "kill-restart", "stop", "forced")
TOPIC = "items:1"


def parse_delays(text: str, check_ttl: float) -> list[tuple[str, float]]:
    """``"0,1,ttl/2,ttl"`` -> [("0", 0.0), ("1", 1.0), ("ttl/2", 1.5), ("ttl", 3.0)]; "" or "none" -> []."""
    delays = []
    for token in (t.strip().lower() for t in (text or "").split(",")):
        if not token or token == "none":
            continue
        if token == "ttl":
            value = check_ttl
        elif token == "ttl/2":
            value = check_ttl / 2
        else:
            try:
                value = float(token)
            except ValueError:
                raise BenchError(f"restart_after: {token!r} is not a number of seconds, ttl or ttl/2") from None
        if not 0 <= value <= 3600:
            raise BenchError(f"restart_after: {token!r} must be 0-3600 seconds")
        delays.append((token, value))
    return delays


def _modes(fast_failover: str) -> list[bool]:
    choice = str(fast_failover).lower()
    if choice == "both":
        return [True, False]
    if choice in ("true", "on", "1", "yes"):
        return [True]
    if choice in ("false", "off", "0", "no"):
        return [False]
    raise BenchError("fast_failover must be both, true or false")


async def bench_failover(
    *,
    kills: int = 20,
    interval: float = 0.1,
    check_ttl: float = 3.0,
    kinds: str = ",".join(KINDS),
    fast_failover: str = "both",
    restart_after: str = "0,1,ttl/2,ttl",
    restart_runs: int = 5,
    lock_delay: float = LOCK_DELAY,
    **_: Any,
) -> dict[str, Any]:
    kills, restart_runs = max(0, int(kills)), max(0, int(restart_runs))
    chosen = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else []
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise BenchError(f"unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    modes = _modes(fast_failover)
    delays = parse_delays(restart_after, check_ttl) if restart_runs else []
    bound = 3 * check_ttl + lock_delay + 20  # no resync by then: a timeout
    started = time.monotonic()
    times: dict[str, list[float]] = {}
    api_times: dict[str, list[float]] = {}  # forced failovers: the admin API's own "took"
    timeouts: dict[str, int] = {}
    failures: dict[str, list[dict[str, str]]] = {}  # rounds whose fault could not be made (the API call failed)
    progress("starting PostgreSQL, Consul and three nodes")
    # INFO: a failed round's logs then show each node's ownership changes (a few lines per round)
    spec = cluster_spec(nodes=3, interval=interval, check_ttl=check_ttl, lock_delay=lock_delay, log_level="INFO",
                        consul={"fast_failover": modes[0]})  # fmt: skip
    async with LocalCluster(spec) as cluster:
        for index, mode in enumerate(modes):
            label = "fast" if mode else "slow"
            if index:
                progress(f"restarting the nodes with consul.fast_failover = {str(mode).lower()}")
                await reconfigure(cluster, consul={"fast_failover": mode})
            plan = [(kind, kind, 0.0, kills) for kind in chosen]
            plan += [(f"restart_after_{token}", "restart-after", value, restart_runs) for token, value in delays]
            for name, kind, delay, runs in plan:
                key = f"{name}.{label}"
                times[key], timeouts[key] = [], 0
                for run in range(runs):
                    progress(f"{key}: {run + 1} of {runs}")
                    try:
                        elapsed = await _round(cluster, kind, delay=delay, bound=bound,
                                               api_took=api_times.setdefault(key, []))  # fmt: skip
                    except _RoundFailed as exc:
                        failures.setdefault(key, []).append(exc.record(cluster))
                        continue
                    if elapsed is None:
                        timeouts[key] += 1
                    else:
                        times[key].append(elapsed)

    results: dict[str, dict[str, Any]] = {}
    names = [*chosen, *(f"restart_after_{token}" for token, _ in delays)]
    delay_of = {f"restart_after_{token}": value for token, value in delays}
    for name in names:
        for label in ("fast", "slow"):
            key = f"{name}.{label}"
            if key in times:
                results[key] = {
                    "fault": name,
                    "fast_failover": label == "fast",
                    **({"restart_after_s": delay_of[name]} if name in delay_of else {}),
                    **summarize_s(times[key]),
                    "timeouts": timeouts[key],
                    **({"failed": failures[key]} if key in failures else {}),
                    **({"api_took": summarize_s(api_times[key])} if api_times.get(key) else {}),
                }
        fast, slow = results.get(f"{name}.fast"), results.get(f"{name}.slow")
        if fast and slow:
            results[f"ratio.{name}"] = {
                "fault": name,
                **{k: ratio(fast.get(k), slow.get(k)) for k in ("median_s", "p95_s", "p99_s", "max_s")},
            }
    return {
        "bench": "failover",
        "what": "fault of a topic's owner -> first resync (higher epoch) at a client on another node",
        "setup": "3 node subprocesses on a loopback Consul server, embedded PostgreSQL; a client per node",
        "method": "bench clock before the signal -> bench clock when the client task sees the resync;"
        " ratio = fast_failover true / false",
        "kills": kills,
        "kinds": chosen,
        "restart_runs": restart_runs if delays else 0,
        "check_ttl_s": float(check_ttl),
        "lock_delay_s": float(lock_delay),
        "interval_s": interval,
        "results": results,
        "duration_s": round(time.monotonic() - started, 1),
    }


class _RoundFailed(Exception):
    """The round's fault could not be made; recorded with the nodes' logs, and the bench goes on."""

    def record(self, cluster: LocalCluster) -> dict[str, str]:
        with tempfile.NamedTemporaryFile("w", prefix="subsys-bench-failover-", suffix=".log", delete=False) as out:
            out.write(cluster.logs(200_000))
        progress(f"a round failed: {self}; the nodes' logs: {out.name}")
        return {"error": str(self), "logs": out.name}


async def _restart(victim: NodeProcess, *, at: float) -> None:
    """Start the victim again (same node id) at monotonic time ``at``, once its process is reaped."""
    await victim.wait(timeout=30)
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    await victim.start()


async def _settled_owner(cluster: LocalCluster, *, settle: float = 0.5, timeout: float = 60.0) -> Any:
    """The topic's owner once it has stayed the same (node and epoch) for ``settle`` seconds.

    A node that just came back, or a takeover still going on, must not be
    mistaken for the failover of the next fault: a settled cluster, like production.
    """
    deadline = time.monotonic() + timeout
    owner = await wait_for(lambda: cluster.owner_of(TOPIC), timeout=timeout, what=f"an owner of {TOPIC}")
    while True:
        await asyncio.sleep(settle)
        again = await wait_for(lambda: cluster.owner_of(TOPIC), timeout=timeout, what=f"an owner of {TOPIC}")
        if (again.node_id, again.epoch) == (owner.node_id, owner.epoch):
            return again
        if time.monotonic() > deadline:
            raise BenchError(f"the owner of {TOPIC} did not settle within {timeout:g}s")
        owner = again


async def _round(
    cluster: LocalCluster, kind: str, *, delay: float, bound: float, api_took: list[float]
) -> float | None:
    nodes = cluster.nodes
    resynced: dict[str, float] = {}
    base_epoch: dict[str, int] = {}
    ready = asyncio.Event()
    victim_name: list[str] = []
    fault: list[tuple[float, int]] = []  # (bench clock at the fault, the owner's epoch then)

    async def watch(node: NodeProcess) -> None:
        async with connect(node.ws_url) as client:
            async for frame in client.subscribe(TOPIC):
                now = time.monotonic()
                if frame["type"] in ("snapshot", "resync") and node.name not in base_epoch:
                    base_epoch[node.name] = frame["epoch"]
                    if len(base_epoch) == len(nodes):
                        ready.set()
                elif frame["type"] == "resync" and fault and node.name not in victim_name:
                    # a client on a surviving node, after the fault, at a higher epoch than the victim's
                    faulted_at, epoch = fault[0]
                    if now >= faulted_at and frame["epoch"] > epoch:
                        resynced.setdefault(node.name, now)

    tasks = [asyncio.create_task(watch(node)) for node in nodes.values()]
    restarter: asyncio.Task | None = None
    try:
        try:
            await asyncio.wait_for(ready.wait(), 60)
        except asyncio.TimeoutError:
            raise BenchError(f"not every node's client got a snapshot within 60s:\n{cluster.logs(1500)}") from None
        owner = await _settled_owner(cluster)
        victim = nodes[owner.node_id]
        victim_name.append(victim.name)
        holder = ""
        if kind == "stop":
            record = (await cluster.view()).nodes.get(victim.name)
            holder = record.holder if record else ""
        faulted_at = time.monotonic()
        fault.append((faulted_at, owner.epoch))
        if kind == "forced":
            asked = next(n for n in nodes if n != victim.name)
            try:
                async with AdminClient(nodes[asked].url, token=cluster.admin_token) as admin:
                    moved = await admin.failover(TOPIC)
            except AdminError as exc:
                raise _RoundFailed(f"POST {TOPIC}/failover to {asked} (owner {victim.name}, epoch {owner.epoch}) "
                                   f"failed after {time.monotonic() - faulted_at:.1f}s: {exc.code}: {exc.message}")
            api_took.append(moved.took_ms / 1000)
        elif kind == "stop":
            victim.signal(signal.SIGSTOP)
        else:
            victim.kill()
        if kind in ("kill-restart", "restart-after"):
            restarter = asyncio.create_task(_restart(victim, at=faulted_at + delay))

        async def any_resync() -> bool:
            return bool(resynced)

        try:
            await wait_for(any_resync, timeout=bound, what="a resync on a surviving node")
            elapsed: float | None = min(resynced.values()) - faulted_at
        except BenchError:
            elapsed = None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # put the victim back for the next round, and wait until it is part of the cluster again
    if kind == "forced":
        pass  # nothing died
    elif kind == "stop":
        victim.signal(signal.SIGCONT)
        await victim.wait_ready()

        async def registered_again() -> bool:
            record = (await cluster.view()).nodes.get(victim.name)
            return record is not None and record.holder != holder

        await wait_for(registered_again, timeout=60, what=f"{victim.name} to register again after SIGCONT")
    elif restarter is not None:
        await restarter
        await victim.wait_ready()
    else:
        await victim.wait(timeout=30)
        await victim.start()
        await victim.wait_ready()
    return elapsed
