"""The verdict of a chaos run: per invariant the checks made, violations and the worst figure;
per fault kind the failover, convergence and zombie-clearing times (median, p95, max)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

__all__ = ["build_verdict", "render", "stats", "command_line"]


def stats(values: list[float | None]) -> dict[str, Any]:
    known = sorted(v for v in values if v is not None)
    if not known:
        return {"n": 0, "missing": len(values)}
    p95 = known[min(len(known) - 1, math.ceil(0.95 * len(known)) - 1)]  # nearest rank
    return {"n": len(known), "missing": len(values) - len(known), "median": round(statistics.median(known), 3),
            "p95": round(p95, 3), "max": round(known[-1], 3)}  # fmt: skip


def command_line(config: Any) -> str:
    argv = ["subsys", "chaos", "--rounds", str(config.rounds), "--seed", str(config.seed)]
    from subsys.chaos.faults import FAULTS

    if tuple(config.faults) != tuple(FAULTS):
        argv += ["--faults", ",".join(config.faults)]
    argv += ["--nodes", str(config.nodes), "--clients", str(config.clients), "--topics", str(config.topics),
             "--consul-servers", str(config.consul_servers)]  # fmt: skip
    return " ".join(argv)


def build_verdict(run: Any, *, plan: list[str], skipped: dict[str, str], duration: float) -> dict[str, Any]:
    config, inv = run.config, run.inv
    kinds: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(plan):
        records = [r for r in run.records if r.kind == kind]
        kinds[kind] = {
            "rounds": len(records),
            "failover_s": stats([r.failover for r in records]) if any(r.owned for r in records) else None,
            "convergence_s": stats([r.convergence for r in records]),
            "zombies_cleared_s": stats([r.zombies_cleared for r in records]),
        }
    pool = run.pool
    return {
        "passed": inv.violations == 0,
        "violations": inv.violations,
        "command": command_line(config),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "workdir")},
        "duration_s": round(duration, 1),
        "skipped_faults": skipped,
        "bounds": dataclasses.asdict(inv.bounds),
        "invariants": {name: tally.as_dict() for name, tally in inv.tallies.items()},
        "faults": kinds,
        "rounds": [dataclasses.asdict(r) for r in run.records],
        "zombies": {"seen": {k: len(v) for k, v in sorted(run.zombies.seen.items())},
                    "reaped": run.zombies.reaped_by_kind()},  # fmt: skip
        "overlaps": getattr(run, "overlap_episodes", []),
        "traffic": {
            "writer_commits": run.history.k,
            "writer_commits_in_doubt": run.writer.doubtful,
            "client_connections": sum(c.connections for c in pool.clients),
            "churn_connections": sum(c.connections for c in pool.churners),
            "resyncs": len(pool.resyncs),
            "error_frames": dict(sorted(pool.errors.items())),
            "view_checks": inv["view_in_history"].checks,
        },
    }


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _triple(s: dict[str, Any] | None) -> str:
    if not s:
        return "n/a"
    if not s.get("n"):
        return f"none measured ({s.get('missing', 0)} missing)"
    text = f"{s['median']:.2f} / {s['p95']:.2f} / {s['max']:.2f}"
    return text + (f" ({s['missing']} missing)" if s.get("missing") else "")


def render(verdict: dict[str, Any]) -> str:
    lines = [f"chaos verdict: {'PASS' if verdict['passed'] else 'FAIL'} "
             f"({verdict['violations']} violation(s)) in {verdict['duration_s']:.0f}s",
             f"reproduce: {verdict['command']}", ""]  # fmt: skip
    lines.append(f"{'invariant':<18} {'checks':>7} {'violations':>10} {'worst':>9}  unit / bound")
    for name, t in verdict["invariants"].items():
        lines.append(f"{name:<18} {t['checks']:>7} {t['violations']:>10} {_num(t['worst']):>9}  "
                     f"{t['unit']}: {t['description']}")  # fmt: skip
    lines += ["", f"{'fault':<19} {'rounds':>6}  {'failover s (med/p95/max)':<26} "
              f"{'convergence s (med/p95/max)':<28} zombies cleared s (med/p95/max)"]  # fmt: skip
    for kind, k in verdict["faults"].items():
        lines.append(f"{kind:<19} {k['rounds']:>6}  {_triple(k['failover_s']):<26} "
                     f"{_triple(k['convergence_s']):<28} {_triple(k['zombies_cleared_s'])}")  # fmt: skip
    for kind, why in verdict["skipped_faults"].items():
        lines.append(f"{kind:<19} {'-':>6}  skipped: {why}")
    z = verdict["zombies"]
    lines += ["", f"zombies seen (distinct, by kind): {_pairs(z['seen'])}",
              f"zombies reaped by the janitor (by kind): {_pairs(z['reaped'])}"]  # fmt: skip
    allowed = [e for e in verdict["overlaps"]]
    lines.append(f"concurrent-poll episodes (database side): {len(allowed)}"
                 + (f", longest {max(e['seconds'] for e in allowed):.2f}s" if allowed else ""))  # fmt: skip
    traffic = verdict["traffic"]
    lines.append("traffic: " + ", ".join(f"{k}={v}" for k, v in traffic.items()))
    bad = {name: t for name, t in verdict["invariants"].items() if t["violations"]}
    if bad:
        lines += ["", "violations (first ones, with evidence):"]
        for name, t in bad.items():
            for evidence in t["evidence"][:5]:
                lines.append(f"  {name}: {evidence}")
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"
