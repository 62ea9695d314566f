"""Modals: confirming an action (and showing its result), picking a node, the help screen."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, OptionList, Static
from textual.widgets.option_list import Option

__all__ = ["ActionModal", "NodePicker", "HelpScreen"]


class ActionModal(ModalScreen[bool]):
    """Says exactly what will happen, does it on ``y``, then shows what happened.

    ``run`` returns the result line or raises; whatever it raises is shown
    (the API's error code and message), never re-raised into the app.
    """

    BINDINGS = [
        Binding("y", "confirm", "Yes, do it"),
        Binding("n,escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, what: str | Text, verb: str, run: Callable[[], Awaitable[Text]], *,
                 ask: bool = True) -> None:  # fmt: skip
        """``ask=False``: nothing to confirm (a dry run): ``run`` starts at once and its answer is shown."""
        super().__init__(classes="modal")
        self.title_text, self.what, self.verb, self.run, self.ask = title, what, verb, run, ask
        self.state = "ask"  # ask | working | done | failed
        self.outcome: Text | None = None
        self._started, self._said = 0.0, Text()
        self._clock: Timer | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(self.title_text, style="bold"), id="dialog-title")
            with VerticalScroll(id="dialog-body"):  # a reap of many zombies lists many actions
                yield Static(self.what, id="dialog-what")
                yield Static("", id="dialog-result")
            with Horizontal(id="dialog-buttons"):
                yield Button(f"{self.verb} (y)", variant="error", id="confirm")
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#dialog-result").display = False
        self.query_one("#cancel", Button).focus()  # the safe choice is the default one
        if not self.ask:
            self.query_one("#confirm").display = False
            self.action_confirm()

    def progress(self, text: Text) -> None:
        """What a long ``run`` is doing now (one reap after another)."""
        self._said = text
        self._tick()

    def _tick(self) -> None:
        """While working: what it does, and for how long (a slow answer is not a hung console)."""
        if self.state == "working" and self.is_mounted:
            elapsed = time.monotonic() - self._started
            line = self._said.copy()
            if elapsed >= 1:
                line.append(f" {elapsed:.0f}s", style="dim")
            self.query_one("#dialog-result", Static).update(line)

    @on(Button.Pressed, "#confirm")
    def action_confirm(self) -> None:
        if self.state == "ask":
            self.state = "working"
            self.query_one("#confirm", Button).disabled = True
            result = self.query_one("#dialog-result", Static)
            result.display = True
            result.update(Text(f"{self.verb}…", style="yellow"))
            self._started, self._said = time.monotonic(), Text(f"{self.verb}…", style="yellow")
            self._clock = self.set_interval(0.5, self._tick)  # a drain of the last node waits its 30 s out
            self.execute()
        elif self.state in ("done", "failed"):
            self.dismiss(self.state == "done")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.state == "working":
            return  # the request is on its way; closing now would hide its answer
        self.dismiss(self.state == "done")

    @work(exclusive=True, group="action")
    async def execute(self) -> None:
        try:
            outcome = await self.run()
            self.state = "done"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API's refusal is an answer to show, not a crash
            code = getattr(exc, "code", type(exc).__name__)
            message = getattr(exc, "message", str(exc))
            outcome = Text.assemble(("✗ failed: ", "bold red"), (f"{code}", "bold"), f": {message}")
            self.state = "failed"
        self.outcome = outcome
        if self._clock is not None:
            self._clock.stop()
        self.query_one("#dialog-result", Static).update(outcome)
        self.query_one("#dialog-body", VerticalScroll).scroll_end(animate=False)
        self.query_one("#confirm").display = False
        cancel = self.query_one("#cancel", Button)
        cancel.label = "Close (esc)"
        cancel.focus()


class NodePicker(ModalScreen[str | None]):
    """Choose the node a topic should move to: only live nodes that take topics are offered."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, nodes: Iterable[tuple[str, str]]) -> None:
        super().__init__(classes="modal")
        self.title_text = title
        self.nodes = list(nodes)  # (node, what to say about it)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text(self.title_text, style="bold"), id="dialog-title")
            if self.nodes:
                yield OptionList(*[Option(Text.assemble((n, "bold"), "  ", (about, "dim")), id=n) for n, about in self.nodes],
                                 id="picker")  # fmt: skip
            else:
                yield Static(Text("No other live node that takes topics (all draining or unreachable).", style="yellow"))
            yield Static(Text("enter picks · esc cancels", style="dim"))

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every key, by where it works; generated from the bindings, so it cannot drift."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__(classes="modal")
        self.sections = sections

    def compose(self) -> ComposeResult:
        parts: list = []
        for title, keys in self.sections:
            parts.append(Text(title, style="bold underline"))
            table = Table.grid(padding=(0, 2))
            table.add_column(style="bold cyan", no_wrap=True, min_width=20)
            table.add_column()
            for key, description in keys:
                table.add_row(key, description)
            parts += [table, Text("")]
        with Vertical(id="help"):
            yield Static(Text("subsys console — keys", style="bold"), id="dialog-title")
            with VerticalScroll():
                yield Static(Group(*parts))
            yield Static(Text("esc closes", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)
