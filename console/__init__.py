"""The Textual operator console: ``subsys console``.

The CLI calls :func:`run_console`; everything the console knows of the
cluster it learns through :mod:`subsys.client` (the admin API and the client
WebSocket), never from a node's internals.
"""

from __future__ import annotations

__all__ = ["run_console"]


def run_console(urls: list[str], token: str, read_only: bool) -> int:
    """Run the console full-screen until the operator quits (``q`` / ctrl+c); the exit code."""
    from .app import ConsoleApp  # Textual loads only when the console is actually started

    app = ConsoleApp(urls, token, read_only)
    app.run()
    return app.return_code or 0
