"""What every console screen shares: the frame, the refresh cycle, read-only actions."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, cast

from textual.app import ComposeResult
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer

from ..widgets.chrome import Banner, TopBar

if TYPE_CHECKING:
    from ..app import ConsoleApp
    from ..backend import Backend
    from ..fmt import Formatter

__all__ = ["ConsoleScreen", "MUTATING", "while_shown"]

# Actions that change the cluster (and the zombie marks and dry run that only serve a reap, which
# need an operator token too): hidden and inert in read-only mode.
MUTATING = frozenset({"failover", "failover_to", "drain", "undrain", "reap", "reap_dry_run", "mark", "mark_all"})


def while_shown(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """For a screen's worker: a screen closed while its call was out has no widgets left to fill.

    Popping a screen removes its widgets before its workers are cancelled, so the worker's
    ``query_one`` finds nothing: the work is moot, not an error. A screen still shown re-raises.
    """

    @functools.wraps(method)
    async def run(self: ConsoleScreen, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except NoMatches:
            if self.is_attached and self.app.screen is self:
                raise
            return None

    return run


class ConsoleScreen(Screen):
    """A view: top bar, banner, the view's body, footer; refreshed at 1 Hz and on events.

    Refreshes never pile up: a refresh asked for while one is running is
    remembered and done right after it (``_dirty``), so a node that answers in
    300 ms is asked again at once, not three times over.
    """

    VIEW: ClassVar[str] = ""
    HELP: ClassVar[str] = ""  # one line for the help screen

    def __init__(self) -> None:
        super().__init__()
        self._loading = False
        self._dirty = False
        self.last_refresh = 0.0

    @property
    def console(self) -> "ConsoleApp":
        return cast("ConsoleApp", self.app)

    @property
    def backend(self) -> "Backend":
        backend = self.console.backend
        assert backend is not None
        return backend

    @property
    def fmt(self) -> "Formatter":
        return self.console.fmt

    def compose(self) -> ComposeResult:
        yield TopBar(self.VIEW)
        yield Banner()
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_screen_resume(self) -> None:
        self.sync_chrome()
        self.refresh_data(force=True)

    def sync_chrome(self) -> None:
        for bar in self.query(TopBar):
            bar.sync()
        for banner in self.query(Banner):
            banner.sync()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MUTATING and not self.console.can_act:
            return False  # hidden from the footer and the key does nothing
        return True

    # -- refreshing -------------------------------------------------------------------------

    def refresh_data(self, force: bool = False) -> None:
        """Ask for fresh data; ``force`` (the user changed what to show) cancels the one in flight."""
        if self.console.backend is None:
            return
        if self._loading and not force:
            self._dirty = True
            return
        self._loading, self._dirty = True, False
        self.last_refresh = time.monotonic()
        self.load()

    def load(self) -> None:
        """Start the screen's exclusive worker; it must end with :meth:`loaded`."""
        self.loaded()

    def loaded(self) -> None:
        self._loading = False
        if self._dirty:
            self.refresh_data()
