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

__all__ = ["KeyLayout", "PARTS", "SERVICE_NAME"]

PARTS = ("owners", "presence", "nodes")
SERVICE_NAME = "subsys"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Keys, and the names of agent registrations and sessions, of one cluster (one prefix).

    Registrations and sessions carry the cluster's tag (its prefix), so clusters that
    share a Consul (one prefix each) never mistake each other's node ``n1`` for their own.
    """

    prefix: str

    @property
    def tag(self) -> str:
        return self.prefix.strip("/").replace("/", ".") or "root"

    # -- KV -------------------------------------------------------------------------

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
        """``(topic, node)`` of a presence key (neither topics nor node ids contain '/')."""
        topic, _, node = self.split("presence", key).rpartition("/")
        return topic, node

    # -- agent registrations and sessions --------------------------------------------------

    def service_id(self, node_id: str) -> str:
        """One service per node id: a restarted process re-registers (replaces) it, never adds one."""
        return f"{SERVICE_NAME}:{self.tag}:{node_id}"

    def check_id(self, node_id: str, incarnation: str) -> str:
        """One TTL check per process incarnation, so a restart never keeps a dead process's session alive."""
        return f"{SERVICE_NAME}:{self.tag}:{node_id}:ttl:{incarnation}"

    def session_name(self, node_id: str) -> str:
        return f"{SERVICE_NAME}:{self.tag}:{node_id}"

    def node_of_session(self, name: str) -> str | None:
        """The node id a session name of this cluster names (None: not one of ours)."""
        prefix = f"{SERVICE_NAME}:{self.tag}:"
        return name[len(prefix):] if name.startswith(prefix) else None

    def incarnation_of_check(self, node_id: str, check: str) -> str | None:
        prefix = f"{SERVICE_NAME}:{self.tag}:{node_id}:ttl:"
        return check[len(prefix):] if check.startswith(prefix) else None
