"""The console application: views, global keys, routing backend messages, the actions.

Views are Textual modes (``1``-``4``), each with its own screen stack, so the
topic detail opened from the topics view is still there after a look at the
overview. The backend (:mod:`.backend`) posts messages; this class turns them
into refreshes of whatever view is visible, at most one in flight per view.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from rich.text import Text
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from subsys.client.admin import AdminError
from subsys.core import admin as api

from .backend import Backend
from .commands import ConsoleCommands
from .fmt import Formatter
from .messages import AuthFailed, ClusterChanged, Connected, EventsArrived, Lost, RowsChanged
from .screens.base import MUTATING, ConsoleScreen
from .screens.events import EventsScreen
from .screens.modals import ActionModal, HelpScreen, NodePicker
from .screens.overview import OverviewScreen
from .screens.topic import TopicScreen
from .screens.topics import TopicsScreen
from .screens.zombies import ZombiesScreen
from .widgets.chrome import VIEWS

__all__ = ["ConsoleApp"]

EVENT_REFRESH_GAP = 0.3  # an event refreshes the view at once, unless it was refreshed this recently
KEY_NAMES = {"slash": "/", "less_than_sign": "<", "greater_than_sign": ">", "question_mark": "?",
             "escape": "esc", "n,escape": "n / esc"}  # fmt: skip


class ConsoleApp(App):
    CSS_PATH = "console.tcss"
    TITLE = "subsys console"
    MODES = {"overview": OverviewScreen, "topics": TopicsScreen, "events": EventsScreen, "zombies": ZombiesScreen}
    DEFAULT_MODE = "overview"
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    BINDINGS = [
        *[Binding(key, f"view('{mode}')", label.capitalize(), show=False) for key, mode, label in VIEWS],
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        urls: list[str],
        token: str,
        read_only: bool = False,
        *,
        fmt: Formatter | None = None,
        backend_factory: Callable[..., Backend] = Backend,
    ) -> None:
        super().__init__()
        self.urls, self.token, self.read_only_arg = list(urls), token, read_only
        self.fmt = fmt or Formatter()
        self._backend_factory = backend_factory
        self.backend: Backend | None = None
        self.lost: tuple[str | None, str, str] | None = None
        self.auth_error: str | None = None
        self._connected_to: str | None = None

    # -- what the token may do ---------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        me = self.backend.whoami if self.backend else None
        return self.read_only_arg or bool(me and me.read_only)

    @property
    def can_act(self) -> bool:
        """Mutating actions exist only for an operator token, known as such, without --read-only."""
        me = self.backend.whoami if self.backend else None
        return not self.read_only_arg and me is not None and not me.read_only

    # -- life cycle ------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.backend = self._backend_factory(self.urls, self.token, self.post_message)
        self.backend.start()
        self.set_interval(1.0, self.tick)

    async def on_unmount(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    def view_screen(self) -> ConsoleScreen | None:
        """The view under any modal: the one to keep fresh."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ConsoleScreen):
                return screen
        return None

    def tick(self) -> None:
        screen = self.view_screen()
        if screen is not None:
            screen.refresh_data()

    def _sync_chrome(self) -> None:
        screen = self.view_screen()
        if screen is not None:
            screen.sync_chrome()
            screen.refresh_bindings()

    # -- backend messages ------------------------------------------------------------------------

    def on_connected(self, message: Connected) -> None:
        self.lost, self.auth_error = None, None
        self._sync_chrome()
        if self.screen_stack:  # the backend may answer before the first view is on screen (or after the last)
            self.refresh_bindings()
        screen = self.view_screen()
        if screen is not None:
            # Another node: what is on screen is another node's answer, ask again now. The same node
            # back (a torn event stream): a refresh in flight is still good, do not cancel it.
            screen.refresh_data(force=message.node != self._connected_to)
        self._connected_to = message.node

    def on_lost(self, message: Lost) -> None:
        self.lost = (message.node, message.url, message.reason)
        self._sync_chrome()

    def on_auth_failed(self, message: AuthFailed) -> None:
        self.auth_error = message.url
        self._sync_chrome()

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        screen = self.view_screen()
        if screen is not None and time.monotonic() - screen.last_refresh > EVENT_REFRESH_GAP:
            screen.refresh_data()

    def on_events_arrived(self, message: EventsArrived) -> None:
        screen = self.view_screen()
        if isinstance(screen, (OverviewScreen, EventsScreen)):
            screen.events_arrived()

    def on_rows_changed(self, message: RowsChanged) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, TopicScreen) and screen.topic == message.topic and screen.is_mounted:
                screen.rows_changed()

    # -- navigation ---------------------------------------------------------------------------------

    async def action_view(self, mode: str) -> None:
        if self.current_mode != mode:
            await self.switch_mode(mode)

    def action_refresh(self) -> None:
        screen = self.view_screen()
        if screen is not None:
            screen.refresh_data(force=True)

    def open_topic(self, name: str) -> None:
        self.push_screen(TopicScreen(name))

    async def show_topics(self, filter_line: str) -> None:
        await self.switch_mode("topics")
        for screen in self.screen_stack:
            if isinstance(screen, TopicsScreen):
                screen.apply_filter(filter_line)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_sections()))

    def help_sections(self) -> list[tuple[str, list[tuple[str, str]]]]:
        def keys(bindings: Iterable[Binding | tuple]) -> list[tuple[str, str]]:
            out = []
            for b in bindings:
                name = b.action.split("(")[0] if isinstance(b, Binding) else ""
                if not name or name == "view" or (name in MUTATING and not self.can_act):
                    continue  # views are listed once, from VIEWS
                out.append((b.key_display or KEY_NAMES.get(b.key, b.key), b.description or b.action))
            return out

        views = [(key, f"{label} view") for key, _mode, label in VIEWS]
        sections = [
            ("Everywhere", views + keys(self.BINDINGS) + [("ctrl+p", "command palette (actions, go to topic …)")]),
            ("Tables", [("↑ ↓", "move (past the edge: next page)"), ("pgup pgdn", "previous / next page"),
                        ("ctrl+home ctrl+end", "first / last page"), ("enter", "open the selected row")]),
        ]  # fmt: skip
        for title, screen in (("Overview", OverviewScreen), ("Topics", TopicsScreen), ("Topic detail", TopicScreen),
                              ("Events", EventsScreen), ("Zombies", ZombiesScreen)):  # fmt: skip
            sections.append((f"{title} — {screen.HELP}", keys(screen.BINDINGS)))
        if self.can_act:
            sections.append(("Confirmation", keys(ActionModal.BINDINGS)))
        else:
            sections.append(("Read-only", [("", "failover, drain, undrain and reaping zombies are not offered: " +
                                            ("--read-only" if self.read_only_arg else "a read token or not connected"))]))
        return sections

    # -- the command palette ---------------------------------------------------------------------

    def palette_commands(self, screen: Screen) -> list[tuple[str, str, Callable[[], object]]]:
        commands: list[tuple[str, str, Callable[[], object]]] = [
            (f"View: {label}", f"switch to the {label} view ({key})", lambda m=mode: self.run_action(f"view('{m}')"))
            for key, mode, label in VIEWS
        ]  # fmt: skip
        commands.append(("Help: keys", "every key of the console (?)", self.action_help))
        if not self.can_act:
            return commands
        topic = None
        view = self.view_screen()
        if isinstance(view, TopicScreen):
            topic = view.topic
        elif isinstance(view, TopicsScreen) and view.selected is not None:
            topic = view.selected.topic
        if topic:
            commands.append((f"Fail over {topic}", "move it to another node (confirm first)",
                             lambda: self.confirm_failover(topic)))  # fmt: skip
            commands.append((f"Fail over {topic} to…", "choose the node (confirm first)",
                             lambda: self.choose_failover_target(topic)))  # fmt: skip
        for name, record in sorted((self.backend.nodes if self.backend else {}).items()):
            if record.get("draining"):
                commands.append((f"Undrain {name}", "it takes topics and clients again", lambda n=name: self._drain_by_name(n, False)))
            else:
                commands.append((f"Drain {name}", "move its topics away (confirm first)", lambda n=name: self._drain_by_name(n, True)))
        return commands

    # -- actions (each confirmed in a modal that names exactly what happens) -----------------------

    @work(exclusive=True, group="prepare")
    async def confirm_failover(self, topic: str, to: str | None = None) -> None:
        if not self.can_act or self.backend is None:
            return
        backend = self.backend
        try:
            detail = await backend.topic(topic)
        except AdminError as exc:
            self.notify(f"{exc.code}: {exc.message}", title=f"cannot fail over {topic}", severity="error")
            return
        if detail.owner is None:
            self.notify(f"{topic} has no owner right now: nothing to fail over", severity="warning")
            return
        target = to or "a node the cluster chooses (one with subscribers first; the same node if it is alone)"
        what = (f"Fail over {topic} from {detail.owner} (epoch {self.fmt.epoch(detail.epoch)}) to {target}; "
                f"its clients get a resync.")  # fmt: skip

        async def run() -> Text:
            r: api.FailoverResult = await backend.failover(topic, to=to)
            screen = self.view_screen()
            if screen is not None:
                screen.refresh_data(force=True)
            return Text.assemble(("✓ ", "bold green"), (r.topic, "bold"), " now owned by ", (r.to_node, "bold"),
                                 f" · epoch {self.fmt.epoch(r.epoch_before)} → {self.fmt.epoch(r.epoch_after)}",
                                 f" · took {self.fmt.took(r.took_ms)}")  # fmt: skip

        self.push_screen(ActionModal(f"Fail over {topic}", what, "Fail over", run))

    @work(exclusive=True, group="prepare")
    async def choose_failover_target(self, topic: str) -> None:
        if not self.can_act or self.backend is None:
            return
        try:
            detail = await self.backend.topic(topic)
            nodes = await self.backend.node_list()
        except AdminError as exc:
            self.notify(f"{exc.code}: {exc.message}", title=f"cannot fail over {topic}", severity="error")
            return
        candidates = [
            (n.node, f"{n.owned} owned · {n.clients} clients · {self.fmt.address(n.address)}")
            for n in nodes.nodes if n.health == "ok" and n.reachable and not n.draining and n.node != detail.owner
        ]  # fmt: skip

        def picked(node: str | None) -> None:
            if node:
                self.confirm_failover(topic, node)

        self.push_screen(NodePicker(f"Fail over {topic} (owner {detail.owner or 'none'}) to:", candidates), picked)

    def _drain_by_name(self, name: str, drain: bool) -> None:
        self.confirm_drain(api.NodeInfo(node=name, address="", reachable=True, health="ok"), drain=drain, lookup=True)

    @work(exclusive=True, group="prepare")
    async def confirm_drain(self, node: api.NodeInfo, *, drain: bool, lookup: bool = False) -> None:
        if not self.can_act or self.backend is None:
            return
        backend = self.backend
        if lookup:
            try:
                node = await backend.call(backend.admin.node, node.node)
            except AdminError as exc:
                self.notify(f"{exc.code}: {exc.message}", severity="error")
                return
        name = node.node
        if drain:
            what = (f"Drain {name}: its {node.owned} owned topic(s) move to other nodes (their clients get a "
                    f"resync); it refuses new clients (503) and keeps serving the {node.clients} it has, until undrained.")  # fmt: skip
        else:
            what = f"Undrain {name}: it takes topics and new clients again."

        async def run() -> Text:
            r: api.DrainResult = await (backend.drain(name) if drain else backend.undrain(name))
            screen = self.view_screen()
            if screen is not None:
                screen.refresh_data(force=True)
            state = "draining" if r.draining else "undrained"
            warn = ("", "") if r.remaining == 0 else (f" · {r.remaining} still owned", "bold yellow")
            return Text.assemble(("✓ ", "bold green"), (name, "bold"), f" {state} · moved {r.moved}", warn,
                                 f" · took {self.fmt.took(r.took_ms)}")  # fmt: skip

        verb = "Drain" if drain else "Undrain"
        self.push_screen(ActionModal(f"{verb} {name}", what, verb, run))
