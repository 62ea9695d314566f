"""Cluster test support lives in the package (``subsys.localcluster``): dev and bench use it too."""

from subsys.localcluster import REPO, ConsulAgent, NodeProcess, consul_binary, free_port

__all__ = ["REPO", "ConsulAgent", "NodeProcess", "consul_binary", "free_port"]
