"""Chaos runs: faults against a local cluster, invariants checked from a recorded history.

Tooling like :mod:`subsys.testing` (the runtime never imports it). ``subsys
chaos`` and ``tests/chaos`` drive :func:`subsys.chaos.runner.run_chaos`.
"""

from subsys.chaos.runner import ChaosConfig, run_chaos, schedule

__all__ = ["ChaosConfig", "run_chaos", "schedule"]
