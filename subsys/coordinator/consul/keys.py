"""Consul's key layout for one subsys cluster, in one place.

Under a prefix (``consul.prefix``, default ``subsys/``):

* ``owners/<topic>``          held by the owner node's session (``?acquire``);
  value ``{"node", "address", "since", "incarnation"}``; the epoch is the
  key's ModifyIndex at acquisition (a Raft index: strictly increasing);
* ``presence/<topic>/<node>`` held by a node's session while it has local
  subscribers to the topic;
* ``nodes/<node>``            held by a node's session; address, version,
  start time, incarnation.

Nothing outside ``subsys/coordinator/consul/`` builds or parses these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeyLayout", "PARTS", "SERVICE_NAME", "session_name", "service_id", "check_id"]

PARTS = ("owners", "presence", "nodes")
SERVICE_NAME = "subsys"


def service_id(node_id: str) -> str:
    """One service per node id: a restarted process re-registers (replaces) it, never adds one."""
    return f"{SERVICE_NAME}-{node_id}"


def check_id(node_id: str, incarnation: str) -> str:
    """One TTL check per process incarnation, so a restart never keeps a dead process's session alive."""
    return f"{SERVICE_NAME}-{node_id}-ttl-{incarnation}"


def session_name(node_id: str) -> str:
    return f"{SERVICE_NAME}-{node_id}"


def node_of_session_name(name: str) -> str | None:
    prefix = f"{SERVICE_NAME}-"
    return name[len(prefix):] if name.startswith(prefix) else None


def incarnation_of_check(node_id: str, check: str) -> str | None:
    prefix = f"{SERVICE_NAME}-{node_id}-ttl-"
    return check[len(prefix):] if check.startswith(prefix) else None


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str

    def part(self, part: str) -> str:
        return f"{self.prefix}{part}/"

    def owner(self, topic: str) -> str:
        return f"{self.prefix}owners/{topic}"

    def presence(self, topic: str, node_id: str) -> str:
        return f"{self.prefix}presence/{topic}/{node_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}nodes/{node_id}"

    def split(self, part: str, key: str) -> str:
        """The rest of ``key`` after ``<prefix><part>/``."""
        return key[len(self.part(part)):]

    def presence_parts(self, key: str) -> tuple[str, str]:
        """``(topic, node)`` of a presence key (topics may not contain '/', node ids neither)."""
        topic, _, node = self.split("presence", key).rpartition("/")
        return topic, node
