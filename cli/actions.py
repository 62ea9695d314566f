"""The mutating admin commands: failover, drain, undrain.

Each one reads the current state first, so its confirmation names exactly
what will happen (which node stops, which epoch, where the topic goes, how
many clients notice), then acts with a progress display on stderr, then
reports the result (new owner, epoch, time taken).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

from rich.markup import escape
from rich.text import Text

from subsys.client.admin import AdminClient, AdminError
from subsys.core import admin as api
from subsys.cli import render
from subsys.cli.admin import Ctx, ExitCode, Stop, confirm

__all__ = ["failover", "drain", "undrain"]

T = TypeVar("T")
POLL_EVERY = 0.5


async def failover(ctx: Ctx, admin: AdminClient, topic: str, *, to: str | None, yes: bool) -> int:
    detail = await admin.topic(topic)
    topic = detail.topic  # the API's spelling of it
    if detail.owner is None or detail.epoch is None:
        raise Stop(ExitCode.CONFLICT, "not_owned", f"{topic} has no owner right now: nothing to fail over.")
    owner, epoch = detail.owner, detail.epoch
    listing = await admin.nodes()
    if to is not None:
        target = next((n for n in listing.nodes if n.node == to), None)
        if target is None:
            raise Stop(ExitCode.NOT_FOUND, "unknown_node", f"no node {to!r} in the cluster.")
        if target.draining:
            raise Stop(ExitCode.CONFLICT, "draining", f"node {to!r} is draining: it takes no topics.")
        where = "restart it on the same node" if to == owner else f"hand the topic to {to}"
    else:
        where = _cluster_pick(detail, listing, owner)
    n = detail.subscribers
    clients = f"its {n} subscriber{'s get' if n != 1 else ' gets'} a resync" if n else "it has no subscribers"
    asked = confirm(ctx, f"Fail over {topic}: stop {owner}'s poller (epoch {epoch}) and {where}; {clients}.", yes)
    if asked:  # the operator agreed to *this* owner and epoch: do not act on a newer one
        now = await admin.topic(topic)
        if (now.owner, now.epoch) != (owner, epoch):
            raise Stop(ExitCode.CONFLICT, "changed",
                       f"{topic} changed while you were deciding (owner {now.owner or 'none'}, epoch {now.epoch}): "
                       "nothing done; run the command again.")  # fmt: skip
    result = await _progress(ctx, admin.failover(topic, to=to),
                             lambda s: f"Failing over {topic} (from {owner}, epoch {epoch}) {s:.1f}s")  # fmt: skip
    ctx.emit(result, lambda: _failed_over(result))
    return ExitCode.OK


def _cluster_pick(detail: api.TopicDetail, listing: api.NodeList, owner: str) -> str:
    """Where the cluster will send the topic, as the node does it: a node with subscribers, else the least loaded.

    Only a forecast (the cluster decides when it acts), and worded as one.
    """
    eligible = sorted(n.node for n in listing.nodes if n.node != owner and not n.draining and n.reachable)
    if not eligible:
        return "restart it on the same node (no other node can take it)"
    wanting = [n for n in eligible if detail.presence.get(n)]
    if wanting:
        return f"hand the topic to the node the cluster picks (now {wanting[0]}, which has subscribers to it)"
    load = {n.node: n.owned for n in listing.nodes if n.node in eligible}
    pick = min(eligible, key=lambda n: load.get(n, 0))
    return f"hand the topic to the node the cluster picks (now {pick}, the least loaded)"


def _failed_over(result: api.FailoverResult) -> Text:
    text = Text("✓ ", style="green")
    text.append(f"{result.topic} failed over: {result.from_node} → ")
    text.append(result.to_node, style="bold")
    text.append(f", epoch {result.epoch_before} → ")
    text.append(str(result.epoch_after), style="bold")
    text.append(f", in {render.millis(result.took_ms)}.")
    return text


async def drain(ctx: Ctx, admin: AdminClient, name: str, *, yes: bool) -> int:
    info = await admin.node(name)
    listing = await admin.nodes()
    others = [n.node for n in listing.nodes if n.node != name and not n.draining and n.reachable]
    topics = f"{info.owned} owned topic{'s' if info.owned != 1 else ''}"
    if not info.owned:
        moves = "it owns no topics"
    elif others:
        moves = f"hand its {topics} to {', '.join(others)}"
    else:
        moves = f"stop its {topics} (no other node can take them: they stay unowned until the drain ends)"
    again = f"{name} is already draining. " if info.draining else ""
    clients = f"{info.clients} connected client{'s' if info.clients != 1 else ''}"
    confirm(ctx, f"{again}Drain {name}: {moves}, and refuse new WebSocket clients on it (503); "
                 f"its {clients} stay connected.", yes)  # fmt: skip
    owned = {"now": info.owned}

    async def poll() -> None:  # the owned count going down while the drain runs
        owned["now"] = (await admin.node(name)).owned

    result = await _progress(ctx, admin.drain(name),
                             lambda s: f"Draining {name}: {owned['now']} topics still owned, {s:.1f}s", poll)  # fmt: skip
    incomplete = result.remaining > 0

    def done() -> Text:
        text = Text("! " if incomplete else "✓ ", style="yellow" if incomplete else "green")
        text.append(f"{name} {'drain incomplete' if incomplete else 'drained'}: {result.moved} moved, ")
        text.append(f"{result.remaining} still owned", style="yellow" if incomplete else "")
        text.append(f", in {render.millis(result.took_ms)}. It refuses new clients until `subsys undrain {name}`.")
        return text

    ctx.emit(result, done)
    # Topics still owned after the node's own deadline: the cluster could not do it in time.
    return ExitCode.CONFLICT if incomplete else ExitCode.OK


async def undrain(ctx: Ctx, admin: AdminClient, name: str, *, yes: bool) -> int:
    info = await admin.node(name)
    if info.draining:
        confirm(ctx, f"End the drain of {name}: it takes topics and new WebSocket clients again.", yes)
    elif not ctx.as_json:  # nothing to undo: no question, and the call below changes nothing
        ctx.err.print(f"{escape(name)} is not draining: nothing to undo.")
    result = await _progress(ctx, admin.undrain(name), lambda s: f"Ending the drain of {name} {s:.1f}s")
    ctx.emit(result, lambda: Text(f"✓ {name} takes topics and clients again.", style="green"))
    return ExitCode.OK


async def _progress(ctx: Ctx, call: Awaitable[T], describe: Callable[[float], str],
                    poll: Callable[[], Awaitable[None]] | None = None) -> T:  # fmt: skip
    """Await ``call`` with a spinner on stderr (people only) saying what is going on and for how long."""
    task = asyncio.ensure_future(call)
    started = time.monotonic()
    try:
        if not ctx.interactive:
            return await task
        with ctx.err.status(escape(describe(0.0))) as status:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_EVERY)
                if done:
                    return task.result()
                if poll is not None:
                    try:
                        await asyncio.wait_for(poll(), POLL_EVERY * 2)
                    except (AdminError, asyncio.TimeoutError):
                        pass  # progress is a nicety: the call in flight decides the outcome
                status.update(escape(describe(time.monotonic() - started)))
    except asyncio.CancelledError:  # Ctrl-C: we stop waiting, the node does not stop working
        task.cancel()
        ctx.err.print("[yellow]interrupted:[/] the request was sent; the cluster may still complete it "
                      "(check with `subsys nodes` / `subsys topic`).")  # fmt: skip
        raise
