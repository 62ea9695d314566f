"""``subsys zombies``: list the cluster's zombies, rehearse a reap (``--dry-run``), or reap them (``--reap``).

A zombie is a fact that disagrees with the source of truth (a poller whose
node does not hold the topic, an owner key of a dead session, ...): the API
returns each with its evidence and the actions that fix it. The exit code
says whether there are any (:attr:`ExitCode.ZOMBIES`), so monitoring can
run the listing as it is; a reap that leaves failures exits with
:attr:`ExitCode.REAP_FAILED`.

A reap asks first, naming every action; then reaps exactly the zombies it
showed, one API call each (the node re-checks each one's evidence when it
acts), so it can show its progress and say, per action, what was done, what
failed and why, and what was no longer needed (healed meanwhile, or fixed
by an earlier action of the same reap, e.g. a destroyed session whose keys
went with it).
"""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

from rich.console import Group
from rich.markup import escape

from subsys.client.admin import AdminClient, NotFound
from subsys.client.reaping import Reaping
from subsys.core import admin as api
from subsys.cli import render
from subsys.cli.admin import Ctx, ExitCode, Stop, confirm

__all__ = ["zombies", "reap_exit"]

TICK = 0.25


async def zombies(
    ctx: Ctx, admin: AdminClient, *, kind: str | None, topic: str | None, node: str | None,
    ids: Sequence[str] | None, verbose: bool, reap: bool, dry_run: bool, yes: bool,
) -> int:  # fmt: skip
    listing = await admin.zombies(kind=kind, topic=topic, node=node)
    if kind is not None and listing.kinds and kind not in listing.kinds:
        # The API filters on any string: an unknown kind would always answer "none" (exit 0), silently.
        raise Stop(ExitCode.USAGE, "unknown_kind", f"no zombie kind {kind!r}; the kinds: {', '.join(listing.kinds)}")
    if ids:
        wanted = set(ids)
        listing = listing.model_copy(update={"zombies": [z for z in listing.zombies if z.id in wanted]})
    found = listing.zombies
    if (dry_run or reap) and not ctx.as_json and (note := render.partial_note(listing)) is not None:
        ctx.err.print(note)  # the listing's own answer says it through emit(); a reap's answer cannot
    if dry_run:  # with --reap too: a dry run changes nothing, whatever else was asked
        result = await _reap_all(admin, found, dry_run=True)
        ctx.emit(result, lambda: Group(render.zombies_view(listing, verbose=verbose), render.reap_view(result)))
        return ExitCode.ZOMBIES if result.outcomes else ExitCode.OK
    if not reap:
        ctx.emit(listing, lambda: render.zombies_view(listing, verbose=verbose))
        return ExitCode.ZOMBIES if found else ExitCode.OK
    if not found:
        # Nothing to reap; the node is asked anyway, so a read token fails here too (exit 5), not only
        # on the day there is something to reap.
        result = await _reap_all(admin, found, dry_run=False)
        ctx.emit(result, lambda: render.reap_view(result))
        return ExitCode.OK
    if not ctx.as_json:
        ctx.out.print(render.zombies_view(listing, verbose=verbose))
    confirm(ctx, render.reap_question(found), yes)
    result = await _reap_each(ctx, admin, found)
    ctx.emit(result, lambda: render.reap_view(result))
    return reap_exit(result)


def reap_exit(result: api.ReapResult) -> ExitCode:
    """A reap's exit code: any failed action is REAP_FAILED; actions no longer needed are not failures."""
    return ExitCode.REAP_FAILED if result.failed else ExitCode.OK


async def _reap_all(admin: AdminClient, found: list[api.Zombie], *, dry_run: bool) -> api.ReapResult:
    """One call for the listed zombies (none: an empty list, which reaps nothing)."""
    try:
        return await admin.reap(ids=[z.id for z in found], dry_run=dry_run)
    except NotFound:  # every listed zombie healed since the listing
        return api.ReapResult(dry_run=dry_run, outcomes=[], reaped=0, failed=0, skipped=0)


async def _reap_each(ctx: Ctx, admin: AdminClient, found: list[api.Zombie]) -> api.ReapResult:
    """Reap the confirmed zombies one by one, with a progress line on stderr (people at a terminal)."""
    reaping = Reaping(found, lambda ids: admin.reap(ids=ids), unsure_hint="check with `subsys zombies`")
    started = time.monotonic()

    def describe() -> str:
        zombie = reaping.current
        return (f"Reaping {reaping.index + 1}/{len(found)}: {zombie.kind} {render.short_id(zombie.subject)} "
                f"({reaping.done} done, {reaping.failed} failed) {time.monotonic() - started:.1f}s")  # fmt: skip

    run = asyncio.ensure_future(reaping.run())
    status = ctx.err.status("Reaping") if ctx.interactive else None
    try:
        if status is not None:
            status.start()
        while not run.done():
            if status is not None:
                status.update(escape(describe()))
            await asyncio.wait({run}, timeout=TICK)
        return run.result()
    except asyncio.CancelledError:  # Ctrl-C: we stop waiting; what was sent may still be done
        run.cancel()
        ctx.err.print(f"[yellow]interrupted:[/] {reaping.done} action(s) done; the reap of "
                      f"{escape(reaping.current.id)} was sent and may still complete; the rest not attempted "
                      "(check with `subsys zombies`).")  # fmt: skip
        raise
    finally:
        if status is not None:
            status.stop()
