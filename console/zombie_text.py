"""Zombies in words: their evidence, what a reap does, what a reap did.

The phrasing follows ``subsys zombies`` (the CLI's render module) so an
operator reads the same sentences in both; it is the console's own copy,
because the console may not import the CLI. Every volatile value (epochs,
indexes, session ids, counts, times) goes through the :class:`~.fmt.Formatter`,
so a snapshot of the zombies screen is stable.
"""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text

from subsys.core import admin as api

from .fmt import Formatter

__all__ = ["short_id", "action_text", "evidence_lines", "outcome_text", "reap_summary", "janitor_cell"]

def short_id(value: Any, fmt: Formatter) -> str:
    """A Consul session id (a UUID) shortened ("3fa2b1c4…"); anything else (a node, a topic, a call) as it is."""
    text = str(value)
    return fmt.ident(text) if api.is_session_id(text) else fmt.text(text)


def _holder(holder: Any, fmt: Formatter) -> str:
    return f"session {short_id(holder, fmt)}" if api.is_session_id(holder) else str(holder)


def _key(key: Any, fmt: Formatter) -> str:
    if not isinstance(key, dict):
        return "none: nobody holds it"
    holder, node, index = key.get("holder"), key.get("node"), fmt.epoch(key.get("index"))
    if not holder:
        return f"released (held by nobody) at index {index}" + (f", kept for {node}" if node else "")
    of = f" of {node}" if node and node != holder else ""
    return f"held by {_holder(holder, fmt)}{of} (index {index})"


def action_text(action: dict[str, Any], fmt: Formatter) -> str:
    """What one reap action does, in words."""
    do = action.get("do")
    try:
        if do == "destroy_session":
            return f"destroy session {short_id(action['session'], fmt)} of {action['node']}: Consul deletes its keys"
        if do == "delete_key":
            key = action["key"]
            what = f"{key['topic']}@{key['node']}" if key["kind"] == "presence" else key.get("topic") or key.get("node")
            return f"delete the {key['kind']} key of {what} at index {fmt.epoch(key['index'])} (only if unchanged since)"
        if do == "stop_poller":
            return (f"stop {action['node']}'s poller of {action['topic']} (epoch {fmt.epoch(action['epoch'])}), "
                    "closing its database connection if it hangs")  # fmt: skip
        if do == "terminate_query":
            return (f"end {action['node']}'s stuck database call {fmt.text(str(action['query']))} by terminating "
                    f"its connection (backend pid {fmt.pid(action.get('pid'))})")  # fmt: skip
        if do == "release":
            return f"make {action['node']} release {action['topic']} (epoch {fmt.epoch(action['epoch'])}): nobody subscribes"
        if do == "deregister":
            return f"deregister {action['service_id']} from {action['node']}'s Consul agent"
    except (KeyError, TypeError):
        pass
    return json.dumps(action, sort_keys=True)  # an action this console does not know (a newer node's)


def _values(name: str, value: Any, fmt: Formatter) -> list[str]:
    """One piece of evidence as lines, with its values."""
    if value is None:
        return ["unknown" if name == "db_connections" else "none"]
    if name == "pollers" and isinstance(value, list):
        return [f"{p.get('node')} polls at epoch {fmt.epoch(p.get('epoch'))}" for p in value]
    if name == "topics" and isinstance(value, list):
        return [f"{t.get('topic')} at epoch {fmt.epoch(t.get('epoch'))}"
                + ("" if t.get("held_by_node") else " (no longer owned there)") for t in value] or ["none"]  # fmt: skip
    if name == "pid":
        return [fmt.pid(value)]
    if name == "age" and isinstance(value, (int, float)):
        return [fmt.age(float(value))]
    if name == "since" and isinstance(value, (int, float)):
        return [fmt.ago(float(value))]
    if name in ("owner_key", "presence_key"):
        return [_key(value, fmt)]
    if name == "sessions" and isinstance(value, dict):
        return [f"{n} runs with {_holder(s, fmt)}" if s else f"{n} runs with no session" for n, s in value.items()]
    if name == "db_connections":
        if isinstance(value, dict):
            return [f"{n}: {'?' if c is None else fmt.volatile_count(c)} open" for n, c in value.items()] or ["none"]
        return [f"{fmt.volatile_count(value)} open"]
    if name == "session":
        return [short_id(value, fmt)]
    if name == "checks" and isinstance(value, dict):
        return [f"{c}: {s}" for c, s in value.items()] or ["none"]
    if name == "holds" and isinstance(value, list):
        return [", ".join(map(str, value)) or "no keys"]
    if name == "presence" and isinstance(value, list):
        return [", ".join(map(str, value)) or "no node has subscribers"]
    if name in ("hold_ended_ago", "last_poll_ago") and isinstance(value, (int, float)):
        return [fmt.age(float(value)) + " ago"]
    if name == "grace" and isinstance(value, (int, float)):
        return [f"{value:g}s"]
    if name == "registration" and isinstance(value, dict):
        incarnation = f" (incarnation {fmt.text(str(value['incarnation']))})" if value.get("incarnation") else ""
        return [f"{value.get('service_id')} of {value.get('node')}{incarnation}"]
    return [fmt.text(value if isinstance(value, str) else json.dumps(value, sort_keys=True))]


def _why(zombie: api.Zombie, fmt: Formatter) -> str | None:
    why = zombie.evidence.get("why")
    if why is None:
        return None
    text = fmt.text(str(why))
    head = text.split(":", 1)[0]
    return f"node {text}" if head in zombie.nodes else text  # "n1: its address refuses…" names a node


def janitor_cell(zombie: api.Zombie, listing: api.ZombieList) -> Text:
    """Does the janitor reap it on its own? yes / no: off (auto-reap is off) / no: manual (an operator decides)."""
    if not zombie.auto:
        return Text("no: manual", style="yellow")
    if listing.auto_reap and listing.janitor:
        return Text("yes", style="green")
    return Text("no: off", style="yellow")


def evidence_lines(zombie: api.Zombie, listing: api.ZombieList, fmt: Formatter) -> Text:
    """The evidence panel: what the kind means, why, each source and what it says, the reap, since when."""
    out = Text()
    out.append(zombie.kind, style="bold red")
    out.append("  ")
    out.append(short_id(zombie.subject, fmt), style="bold")
    out.append("\n")
    if zombie.kind in listing.kinds:
        out.append(listing.kinds[zombie.kind] + "\n", style="dim italic")
    why = _why(zombie, fmt)
    if why:
        out.append("\nwhy  ", style="bold")
        out.append(why + "\n", style="yellow")
    out.append("\nwhich sources say what\n", style="bold underline")
    for name, value in zombie.evidence.items():
        if name == "why":
            continue
        label, source = api.evidence_label(name)
        out.append(f" {label}", style="bold")
        out.append(f"  {source}\n" if source else "\n", style="dim")
        for line in _values(name, value, fmt):
            out.append(f"   {line}\n", style="bold yellow" if line.endswith("(no longer owned there)") else "")
    out.append("\na reap will\n", style="bold underline")
    for action in zombie.actions:
        out.append(f" • {action_text(action, fmt)}\n")
    out.append("\nseen\n", style="bold underline")
    out.append(f" first {fmt.ago(zombie.first_seen)}, on {fmt.volatile_count(zombie.scans)} consecutive scans\n")
    cell = janitor_cell(zombie, listing).plain
    if cell == "yes":
        out.append(f" the janitor ({listing.janitor}) reaps it on its own\n", style="green")
    elif cell == "no: off":
        out.append(" safe for the janitor to reap, but auto-reap is off: reap it here\n", style="yellow")
    else:
        out.append(" the janitor never reaps this on its own: an operator decides\n", style="yellow")
    return out


def outcome_text(outcome: api.ReapOutcome, fmt: Formatter, dry_run: bool = False) -> Text:
    """One action's outcome: ✓ done, · not needed any more (and why), ✗ failed (and why)."""
    line = Text()
    if dry_run:
        line.append(" - ", style="bold")
    elif outcome.done:
        line.append(" ✓ done ", style="bold green")
    elif outcome.detail.startswith("failed"):
        line.append(" ✗ failed ", style="bold red")
    else:
        line.append(" · not needed any more ", style="bold yellow")
    line.append(f"{outcome.kind} {short_id(outcome.subject, fmt)}: ", style="bold")
    line.append(action_text(outcome.action, fmt))
    if not dry_run and not outcome.done:
        line.append("\n     " + fmt.text(outcome.detail.removeprefix("failed: ")),
                    style="red" if outcome.detail.startswith("failed") else "yellow")  # fmt: skip
    return line


def reap_summary(result: api.ReapResult, fmt: Formatter) -> Text:
    """Every action's outcome, then the count (the CLI's summary line)."""
    out = Text()
    if result.dry_run:
        if not result.outcomes:
            return Text("Dry run: nothing to reap (the zombies are gone).", style="green")
        out.append("Dry run, nothing changed. A reap would:\n", style="bold")
        out.append_text(Text("\n").join(outcome_text(o, fmt, dry_run=True) for o in result.outcomes))
        return out
    if not result.outcomes:
        return Text("Nothing to reap: the zombies are gone.", style="green")
    out.append_text(Text("\n").join(outcome_text(o, fmt) for o in result.outcomes))
    ids = list(dict.fromkeys(o.id for o in result.outcomes))
    reaped = sum(1 for i in ids if any(o.done for o in result.outcomes if o.id == i))
    out.append(f"\n\nReaped {reaped} of {len(ids)} zombie{'s' if len(ids) != 1 else ''}: ",
               style="bold red" if result.failed else "bold")  # fmt: skip
    out.append(f"{result.reaped} action{'s' if result.reaped != 1 else ''} done, {result.failed} failed, "
               f"{result.skipped} not needed any more.")  # fmt: skip
    return out
