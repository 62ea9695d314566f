"""The coordinator: who owns which topic, who has subscribers where.

One interface (:mod:`subsys.coordinator.base`), two implementations:
:mod:`subsys.coordinator.embedded` (one process) and
:mod:`subsys.coordinator.consul` (a cluster). Nothing outside
``subsys/coordinator/consul/`` knows Consul's key layout.
"""

from subsys.coordinator.base import ClusterView, Coordinator, NodeRecord, OwnerRecord

__all__ = ["ClusterView", "Coordinator", "NodeRecord", "OwnerRecord"]
