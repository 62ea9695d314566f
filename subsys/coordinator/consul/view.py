"""Reading a cluster's state out of Consul: the view every node keeps, and a one-shot read.

``apply_listing`` turns a prefix listing into the ``ClusterView`` parts the
coordinator watches; ``read_view`` reads all of it once, for tools that are
not nodes (the local-cluster harness, benches, the zombie scan) so that
nothing outside this package parses Consul's keys.
"""

from __future__ import annotations

from subsys.coordinator.base import (
    ClusterView, KeyFact, NodeRecord, OwnerRecord, Records, RegistrationFact, Reservation, SessionFact,
)  # fmt: skip
from subsys.coordinator.consul import keys as layout
from subsys.coordinator.consul.client import ConsulClient, KVEntry
from subsys.coordinator.consul.keys import PARTS, KeyLayout
from subsys.core.errors import CoordinatorError

__all__ = ["apply_listing", "read_view", "read_records", "registrations"]


def apply_listing(view: ClusterView, keys: KeyLayout, part: str, entries: list[KVEntry]) -> bool:
    """Rebuild one part of ``view`` from a listing of ``<prefix><part>/``; True if it changed."""
    if part == "owners":
        owners: dict[str, OwnerRecord] = {}
        reservations: dict[str, Reservation] = {}
        for entry in entries:
            value = entry.json() or {}
            topic = keys.split("owners", entry.key)
            if entry.session is None:
                # Released: nobody owns it. A handoff leaves it reserved for one node for a moment.
                if isinstance(value, dict) and value.get("reserved_for"):
                    reservations[topic] = Reservation(
                        topic=topic,
                        for_node=str(value["reserved_for"]),
                        until=float(value.get("until", 0) or 0),
                        reason=str(value.get("reason", "")),
                        from_node=str(value.get("node", "")),
                        from_epoch=int(value.get("from_epoch", 0) or 0),
                    )
                continue
            owners[topic] = OwnerRecord(
                topic=topic,
                node_id=str(value.get("node", "?")),
                address=str(value.get("address", "")),
                epoch=entry.modify_index,
                since=float(value.get("since", 0) or 0),
                holder=entry.session,
                incarnation=str(value.get("incarnation", "")),
                reason=str(value.get("reason", "")),
            )
        changed = owners != view.owners or reservations != view.reservations
        view.owners, view.reservations = owners, reservations
        return changed
    if part == "presence":
        presence: dict[str, set[str]] = {}
        for entry in entries:
            topic, node = keys.presence_parts(entry.key)
            if topic and node and entry.session is not None:
                presence.setdefault(topic, set()).add(node)
        changed = presence != view.presence
        view.presence = presence
        return changed
    if part != "nodes":
        raise ValueError(f"unknown part {part!r}")
    nodes: dict[str, NodeRecord] = {}
    for entry in entries:
        if entry.session is None:
            continue
        value = entry.json() or {}
        node_id = keys.split("nodes", entry.key)
        nodes[node_id] = NodeRecord(
            node_id=node_id,
            address=str(value.get("address", "")),
            version=str(value.get("version", "")),
            started=float(value.get("started", 0) or 0),
            incarnation=str(value.get("incarnation", "")),
            holder=entry.session,
            draining=bool(value.get("draining", False)),
        )
    changed = nodes != view.nodes
    view.nodes = nodes
    return changed


async def read_view(*, address: str, prefix: str, token: str = "", consistent: bool = True) -> ClusterView:
    """The cluster's owners, presence and nodes as one Consul read each."""
    keys = KeyLayout(prefix if prefix.endswith("/") else prefix + "/")
    client = ConsulClient(address=address, token=token)
    await client.open()
    try:
        view = ClusterView()
        for part in PARTS:
            entries, _index = await client.kv_list(keys.part(part), consistent=consistent)
            apply_listing(view, keys, part, entries)
        return view
    finally:
        await client.close()


async def registrations(client: ConsulClient, keys: KeyLayout) -> list[RegistrationFact]:
    """This cluster's subsys services on the local agent, with the states of their checks."""
    services = await client.agent_services()
    checks = await client.agent_checks()
    facts = []
    mine = keys.service_id("")
    for service_id, service in services.items():
        if service.get("Service") != layout.SERVICE_NAME or not service_id.startswith(mine):
            continue
        meta = service.get("Meta") or {}
        own = {cid: c.get("Status", "") for cid, c in checks.items() if c.get("ServiceID") == service_id}
        facts.append(RegistrationFact(service_id, str(meta.get("node", "")), str(meta.get("incarnation", "")), own))
    return facts


async def read_records(client: ConsulClient, keys: KeyLayout) -> Records:
    """Keys, sessions, check states and local registrations, each read fresh; a part that
    cannot be read leaves ``complete`` False rather than failing the whole scan."""
    records = Records()
    try:
        for part in PARTS:
            entries, _index = await client.kv_list(keys.part(part), consistent=True)
            for entry in entries:
                value = entry.json()
                value = value if isinstance(value, dict) else {}
                if part == "owners":
                    records.keys.append(KeyFact("owner", keys.split(part, entry.key), str(value.get("node", "")),
                                                entry.session, entry.modify_index, value))  # fmt: skip
                elif part == "presence":
                    topic, node = keys.presence_parts(entry.key)
                    records.keys.append(KeyFact("presence", topic, node, entry.session, entry.modify_index, value))
                else:
                    records.keys.append(KeyFact("node", "", keys.split(part, entry.key), entry.session,
                                                entry.modify_index, value))  # fmt: skip
        for session in await client.list_sessions():
            node = keys.node_of_session(str(session.get("Name", "")))
            if node is None:
                continue
            checks = tuple(c.get("ID", "") for c in session.get("ServiceChecks") or []) + tuple(
                session.get("NodeChecks") or session.get("Checks") or ()
            )
            records.sessions.append(SessionFact(session["ID"], node, checks, str(session.get("Node", ""))))
        records.check_status = {
            c["CheckID"]: c.get("Status", "") for c in await client.service_checks(layout.SERVICE_NAME)
        }
        records.registrations = await registrations(client, keys)
    except CoordinatorError:
        records.complete = False
    return records
