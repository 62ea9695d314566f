"""Zombies: facts that disagree with the source of truth, live, with their evidence; reaped after a confirmation.

A listing is a scan on the node (the coordinator's records against every
node's own report and PostgreSQL): ~0.1 s after a recent scan, 1-2 s
otherwise (the node scans twice to confirm). So this view asks every
:attr:`ZombiesScreen.REFRESH_EVERY` seconds, in a worker, not at the 1 Hz
of the other views; between two scans the relative times still move on.

``space`` marks rows (``a`` all or none), ``x`` reaps the marked ones (or
the one under the cursor) after a modal that names every action, then says
per action what happened; ``X`` is the same as a dry run. Both, and the
marks, exist only for an operator token (hidden in read-only mode). Each
zombie is reaped by its own request, so the modal shows the progress and a
zombie healed meanwhile is "not needed any more", not an error.
"""

from __future__ import annotations

import asyncio
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from subsys.client.admin import AdminError, NotFound
from subsys.client.reaping import Reaping
from subsys.core import admin as api

from ..widgets.table import Col, InPlaceTable
from ..zombie_text import action_text, evidence_lines, janitor_cell, reap_summary, short_id
from .base import ConsoleScreen, while_shown
from .modals import ActionModal

__all__ = ["ZombiesScreen", "COLUMNS"]

COLUMNS = [Col("mark", " ", 1), Col("kind", "KIND", 19), Col("subject", "SUBJECT", 18), Col("nodes", "NODE(S)", 12),
           Col("since", "SINCE", 9), Col("scans", "SCANS", 5, right=True), Col("janitor", "JANITOR", 10, fill=True)]  # fmt: skip


class ZombiesScreen(ConsoleScreen):
    VIEW = "zombies"
    HELP = "Zombies (what disagrees with the source of truth), their evidence; reap after a confirmation."
    REFRESH_EVERY = 5.0  # a scan reads every node and PostgreSQL: not once a second
    BINDINGS = [
        Binding("space", "mark", "Mark", key_display="space"),
        Binding("a", "mark_all", "Mark all/none"),
        Binding("x", "reap", "Reap"),
        Binding("X", "reap_dry_run", "Dry run", key_display="X"),
        Binding("escape", "unmark", "Clear marks", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listing: api.ZombieList | None = None
        self.marked: set[str] = set()
        self.error: str | None = None
        self.took_ms = 0.0

    def compose_body(self) -> ComposeResult:
        with Vertical(id="body"):
            yield Static(id="zsummary")
            with Horizontal(id="zpanels"):
                yield InPlaceTable(COLUMNS, id="zombies")
                with VerticalScroll(id="evidence", classes="panel"):
                    yield Static(id="evidence-text")

    def on_mount(self) -> None:
        table = self.table
        table.border_title = "zombies"
        table.border_subtitle = "scanning…"
        self.query_one("#evidence").border_title = "evidence"
        self.query_one("#evidence-text", Static).update(Text(
            "Scanning the cluster… (the node cross-checks the coordinator, every node's own report and "
            "PostgreSQL; a first scan takes a second or two: it scans twice to confirm)", style="dim"))  # fmt: skip
        table.focus()

    @property
    def table(self) -> InPlaceTable:
        return self.query_one("#zombies", InPlaceTable)

    # -- data --------------------------------------------------------------------------------

    def refresh_data(self, force: bool = False) -> None:
        """Every few seconds (a scan is heavy); in between, only the relative times move on."""
        if not force and self.listing is not None and time.monotonic() - self.last_refresh < self.REFRESH_EVERY:
            self.show()
            return
        super().refresh_data(force)

    @work(exclusive=True, group="zombies")
    @while_shown
    async def load(self) -> None:
        asked = time.monotonic()
        try:
            listing = await self.backend.zombies()
        except asyncio.CancelledError:
            raise
        except AdminError as exc:
            self.error = f"{exc.code}: {exc.message}"  # keep the last listing, say the scan failed
            self.show()
            self.loaded()
            return
        self.took_ms = (time.monotonic() - asked) * 1000
        self.listing, self.error = listing, None
        self.show()
        self.loaded()

    @property
    def zombies(self) -> list[api.Zombie]:
        return self.listing.zombies if self.listing is not None else []

    def show(self) -> None:
        listing, fmt = self.listing, self.fmt
        if listing is None:
            if self.error:
                self.query_one("#zsummary", Static).update(Text(f" scan failed: {fmt.text(self.error)}", style="bold red"))
            return
        self.marked &= {z.id for z in listing.zombies}  # a healed zombie's mark goes with it
        rows = []
        for z in listing.zombies:
            mark = Text("●", style="bold yellow") if z.id in self.marked else " "
            rows.append((z.id, (
                mark, Text(z.kind, style="bold red"), short_id(z.subject, fmt), ", ".join(z.nodes) or "—",
                fmt.ago(z.first_seen), fmt.volatile_count(z.scans), janitor_cell(z, listing),
            )))  # fmt: skip
        table = self.table
        table.set_rows(rows)
        sub = f"{len(rows)} zombie{'s' if len(rows) != 1 else ''}"
        if self.marked:
            sub += f" · {len(self.marked)} marked"
        table.border_subtitle = sub + f" · scanned {fmt.ago(listing.scanned_at)}, every {self.REFRESH_EVERY:g}s"
        self.query_one("#zsummary", Static).update(self._summary(listing))
        self.show_evidence()

    def _summary(self, listing: api.ZombieList) -> Text:
        line, fmt = Text(), self.fmt

        def stat(label: str, value: str, style: str = "bold") -> None:
            line.append(f" {label} ", style="dim")
            line.append(value, style=style)
            line.append("  ")

        n = len(listing.zombies)
        stat("zombies", str(n), "bold red" if n else "bold green")
        stat("janitor", listing.janitor or "none", "bold" if listing.janitor else "bold yellow")
        on_ = listing.auto_reap and bool(listing.janitor)
        stat("auto-reap", "on" if on_ else "off: nothing reaps them on its own", "bold green" if on_ else "bold yellow")
        reaped = ", ".join(f"{c} {k}" for k, c in sorted(listing.reaped.items())) or "none"
        stat(f"reaped so far by {listing.answered_by}", reaped)
        stat("scanned by", f"{listing.answered_by} {fmt.ago(listing.scanned_at)} in {fmt.took(self.took_ms)}", "")
        if listing.partial:
            stat("partial", ", ".join(p.node for p in listing.unavailable) + " did not answer", "bold yellow")
        if self.error:
            stat("last scan failed", fmt.text(self.error), "bold red")
        return line

    @property
    def selected(self) -> api.Zombie | None:
        key = self.table.selected_key
        return next((z for z in self.zombies if z.id == key), None)

    @on(DataTable.RowHighlighted, "#zombies")
    def show_evidence(self) -> None:
        """The evidence panel follows the cursor."""
        listing, panel = self.listing, self.query_one("#evidence-text", Static)
        if listing is None:
            return
        zombie = self.selected
        if zombie is not None:
            panel.update(evidence_lines(zombie, listing, self.fmt))
            return
        text = Text("No zombies: every source agrees.\n\n", style="bold green")
        text.append("What the scan looks for:\n", style="bold underline")
        for kind, meaning in listing.kinds.items():
            text.append(f" {kind}", style="bold")
            text.append(f"  {meaning}\n", style="dim")
        panel.update(text)

    # -- marks ---------------------------------------------------------------------------------

    def action_mark(self) -> None:
        zombie = self.selected
        if zombie is not None:
            self.marked ^= {zombie.id}
            self.show()

    def action_mark_all(self) -> None:
        everything = {z.id for z in self.zombies}
        self.marked = set() if self.marked >= everything else everything
        self.show()

    def action_unmark(self) -> None:
        if self.marked:
            self.marked.clear()
            self.show()

    def targets(self) -> list[api.Zombie]:
        """The marked zombies, in the table's order; none marked: the one under the cursor."""
        marked = [z for z in self.zombies if z.id in self.marked]
        if marked:
            return marked
        return [self.selected] if self.selected is not None else []

    # -- reaping ---------------------------------------------------------------------------------

    def _what(self, found: list[api.Zombie], dry_run: bool) -> Text:
        text = Text("What a reap would do (the node re-checks each action's evidence):\n" if dry_run else
                    "Each action is carried out only if its evidence still holds when the node acts:\n")  # fmt: skip
        for z in found:
            for action in z.actions:
                text.append(f" • {z.kind} {short_id(z.subject, self.fmt)}: ", style="bold")
                text.append(action_text(action, self.fmt) + "\n")
        return text

    def action_reap(self) -> None:
        found = self.targets()
        if not self.console.can_act:
            return
        if not found:
            self.notify("No zombie to reap.", severity="information")
            return
        backend, fmt = self.backend, self.fmt
        n = len(found)

        def progress(reaping: Reaping) -> None:
            zombie = reaping.current
            modal.progress(Text(f"Reaping {reaping.index + 1}/{n}: {zombie.kind} {short_id(zombie.subject, fmt)} "
                                f"({reaping.done} action(s) done so far)…", style="yellow"))  # fmt: skip

        async def run() -> Text:
            try:
                result = await Reaping(found, backend.reap, unsure_hint="the next scan tells", on_next=progress).run()
            finally:
                self.marked -= {z.id for z in found}
                self.refresh_data(force=True)
            return reap_summary(result, fmt)

        modal = ActionModal(f"Reap {n} zombie{'s' if n != 1 else ''}", self._what(found, False), "Reap", run)
        self.app.push_screen(modal)

    def action_reap_dry_run(self) -> None:
        found = self.targets()
        if not self.console.can_act or not found:
            return
        backend, fmt = self.backend, self.fmt

        async def run() -> Text:
            try:
                result = await backend.reap([z.id for z in found], dry_run=True)
            except NotFound:
                result = api.ReapResult(dry_run=True, outcomes=[], reaped=0, failed=0, skipped=0)
            return reap_summary(result, fmt)

        n = len(found)
        self.app.push_screen(ActionModal(f"Dry run: reap {n} zombie{'s' if n != 1 else ''} (nothing changes)",
                                         self._what(found, True), "Dry run", run, ask=False))  # fmt: skip
