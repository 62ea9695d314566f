"""The admin commands' plumbing: where the cluster is, the token, exit codes, errors, confirmation.

Every admin command runs as ``run(urls, as_json, body)``: ``body`` gets an
open :class:`~subsys.client.admin.AdminClient` and returns an exit code;
``run`` turns the client's typed errors into one message and one exit code
(:class:`ExitCode`, documented in docs/operations.md). With ``--json`` stdout
carries exactly one JSON document, the answer or ``{"error": ...}``, and
everything for people (progress, prompts, warnings) goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Awaitable, Callable, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console, RenderableType
from rich.markup import escape

from subsys.client.admin import AdminClient, AdminError, Conflict, Forbidden, NotFound, Unauthorized, Unreachable
from subsys.core import admin as api
from subsys.cli import render

__all__ = ["ExitCode", "Stop", "Ctx", "DEFAULT_URL", "admin_urls", "run", "confirm", "cluster", "nodes", "topics",
           "topic"]  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_ENV = "SUBSYS_TOKEN"
URL_ENV = "SUBSYS_URL"
PAGE_MAX = 5000  # the API's largest page


class ExitCode(IntEnum):
    """The admin commands' exit codes: distinct, so scripts can tell what went wrong."""

    OK = 0
    ERROR = 1  # anything else (an unexpected answer, a bug)
    USAGE = 2  # a bad option or argument (Typer's), or one the API refused as invalid (400)
    UNREACHABLE = 3  # no node answered at any URL
    UNAUTHORIZED = 4  # 401: no token, a wrong one, or the node has none configured
    FORBIDDEN = 5  # 403: a read token on a mutating command
    NOT_FOUND = 6  # no such topic or node
    CONFLICT = 7  # refused (409) or not done in time (502/504), e.g. a failover of an unowned topic
    ABORTED = 8  # a confirmation declined or impossible (no TTY, no --yes): nothing done
    ZOMBIES = 9  # not an error: `subsys zombies` (and its --dry-run) found zombies (monitoring alerts on it)
    REAP_FAILED = 10  # `subsys zombies --reap` ran, and some reap action failed (the summary says which and why)


class Stop(Exception):
    """A command's own decision to end with ``exit`` (a refusal, a declined confirmation)."""

    def __init__(self, exit: ExitCode, code: str, message: str) -> None:
        super().__init__(message)
        self.exit, self.code, self.message = exit, code, message


@dataclass
class Ctx:
    urls: list[str]
    token: str
    as_json: bool
    out: Console = field(default_factory=lambda: Console(soft_wrap=False))
    err: Console = field(default_factory=lambda: Console(stderr=True))

    @property
    def interactive(self) -> bool:
        """Whether to animate progress: only for a person watching stderr."""
        return self.err.is_terminal

    def emit(self, model: BaseModel, renderable: Callable[[], RenderableType | None]) -> None:
        """The answer: the model as JSON (its field names: stable), or rendered for people."""
        if self.as_json:
            print(json.dumps(model.model_dump(mode="json"), indent=2), flush=True)
            return
        shown = renderable()
        if shown is not None:
            self.out.print(shown)
        note = render.partial_note(model) if isinstance(model, (api.NodeList, api.TopicPage, api.ClusterSummary,
                                                                  api.TopicDetail, api.ZombieList)) else None  # fmt: skip
        if note is not None:
            self.err.print(note)


def admin_urls(options: list[str] | None) -> list[str]:
    """``--url`` (repeatable) or ``$SUBSYS_URL``; either may hold comma-separated URLs, tried in order."""
    raw = options or [os.environ.get(URL_ENV, "")]
    urls = [url.strip() for item in raw for url in item.split(",") if url.strip()]
    return urls or [DEFAULT_URL]


def run(urls: list[str] | None, as_json: bool, body: Callable[[Ctx, AdminClient], Awaitable[int | None]]) -> NoReturn:
    """Run one admin command to its exit code (raises ``typer.Exit``)."""
    # The token comes from the environment only: on the command line it would be visible in `ps`.
    ctx = Ctx(urls=admin_urls(urls), token=os.environ.get(TOKEN_ENV, "").strip(), as_json=as_json)

    async def main() -> int:
        try:
            async with AdminClient(ctx.urls, token=ctx.token) as admin:
                return int(await body(ctx, admin) or ExitCode.OK)
        except AdminError as exc:
            return _failed(ctx, exit_code(exc), exc.code, _explain(ctx, exc), status=exc.status)
        except Stop as stop:
            return _failed(ctx, stop.exit, stop.code, stop.message)
        except ValidationError as exc:  # a node of another version answering something else
            return _failed(ctx, ExitCode.ERROR, "bad_answer", f"unexpected answer (another subsys version?): {exc}")

    raise typer.Exit(asyncio.run(main()))


def exit_code(exc: AdminError) -> ExitCode:
    for kind, code in ((Unreachable, ExitCode.UNREACHABLE), (Unauthorized, ExitCode.UNAUTHORIZED),
                       (Forbidden, ExitCode.FORBIDDEN), (NotFound, ExitCode.NOT_FOUND),
                       (Conflict, ExitCode.CONFLICT)):  # fmt: skip
        if isinstance(exc, kind):
            return code
    return ExitCode.USAGE if exc.status == 400 else ExitCode.ERROR


def _explain(ctx: Ctx, exc: AdminError) -> str:
    """The API's message, plus what to do about it where the operator can do something."""
    if isinstance(exc, Unreachable):
        return (f"no node answered at {', '.join(ctx.urls)} ({_why_unreachable(exc.message)}); "
                f"point --url or {URL_ENV} at a node's admin address")  # fmt: skip
    if isinstance(exc, Unauthorized):
        if exc.code == "admin_disabled":
            return exc.message  # the node has no admin token: its message says how to configure one
        if not ctx.token:
            return f"the admin API needs a token: set {TOKEN_ENV} to an operator or read token ({exc.message})"
        return f"the node refused the token in {TOKEN_ENV} ({exc.message})"
    if isinstance(exc, Forbidden):
        return f"the token in {TOKEN_ENV} is a read token; this command needs an operator token ({exc.message})"
    return exc.message


def _why_unreachable(message: str) -> str:
    """The gist of the client's message, which ends with the last connection error's repr."""
    for marker, gist in (("ConnectionRefused", "connection refused"), ("TimeoutError", "timed out"),
                         ("gaierror", "unknown host"), ("Name or service not known", "unknown host"),
                         ("ServerDisconnected", "the server closed the connection"),
                         ("SSL", "TLS error")):  # fmt: skip
        if marker in message:
            return gist
    return message.split("): ", 1)[-1]


def _failed(ctx: Ctx, exit: ExitCode, code: str, message: str, status: int = 0) -> int:
    if ctx.as_json:
        error = {"code": code, "message": message, "status": status or None, "exit": int(exit)}
        print(json.dumps({"error": error}, indent=2), flush=True)
    ctx.err.print(f"[bold red]{exit.name.lower().replace('_', ' ')}:[/] {escape(message)}", highlight=False)
    return int(exit)


def confirm(ctx: Ctx, what: str, yes: bool) -> bool:
    """Ask before doing ``what`` (naming exactly what will happen); True if asked and agreed.

    ``what`` is one sentence, or a heading and a list (lines): then the
    question gets a line of its own.

    With ``--yes`` nothing is asked (and False returned: nobody waited, so
    nothing can have changed meanwhile). Without a terminal on stdin there
    is nobody to answer: refuse rather than hang or read a script's input.
    """
    if yes:
        return False
    if not sys.stdin.isatty():
        raise Stop(ExitCode.ABORTED, "aborted",
                   f"not confirmed (stdin is not a terminal; pass --yes to skip the question): {what.rstrip()} "
                   "Nothing done.")  # fmt: skip
    # Our own prompt rather than click.confirm: the question goes to stderr and nothing to stdout,
    # which stays the answer's alone (one JSON document with --json).
    separator = "\n" if "\n" in what else " "
    ctx.err.print(escape(f"{what.rstrip()}{separator}Continue? [y/N] "), end="", highlight=False)
    # asyncio.run's SIGINT handler only cancels the main task, which a blocking read never notices:
    # for the prompt, Ctrl-C raises here again, and declines.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    finally:
        signal.signal(signal.SIGINT, previous)
    if not answer.endswith("\n"):  # end of input or Ctrl-C: end the prompt's line
        ctx.err.print()
    agreed = answer.strip().lower() in ("y", "yes")
    if not agreed:
        raise Stop(ExitCode.ABORTED, "aborted", "nothing done.")
    return True


# -- reading -------------------------------------------------------------------------------


async def cluster(ctx: Ctx, admin: AdminClient) -> int:
    summary = await admin.cluster()
    ctx.emit(summary, lambda: render.cluster_view(summary))
    return ExitCode.OK


async def nodes(ctx: Ctx, admin: AdminClient) -> int:
    listing = await admin.nodes()
    ctx.emit(listing, lambda: render.nodes_table(listing))
    return ExitCode.OK


async def topics(ctx: Ctx, admin: AdminClient, *, every: bool, offset: int, limit: int, **filters: Any) -> int:
    if not every:
        page = await admin.topics(offset=offset, limit=limit, **filters)
    else:
        page = await _all_topics(admin, **filters)
    ctx.emit(page, lambda: render.topics_table(page))
    return ExitCode.OK


async def _all_topics(admin: AdminClient, **filters: Any) -> api.TopicPage:
    """Every matching topic, page by page, as one page (``offset`` 0, ``limit`` the number returned)."""
    first = await admin.topics(offset=0, limit=PAGE_MAX, **filters)
    found = list(first.topics)
    unavailable = {p.node: p for p in first.unavailable}
    while len(found) < first.total:
        # Topics come and go between pages; an empty page means the list shrank: stop there.
        page = await admin.topics(offset=len(found), limit=PAGE_MAX, **filters)
        if not page.topics:
            break
        found += page.topics
        unavailable.update({p.node: p for p in page.unavailable})
    return first.model_copy(update={"topics": found, "total": max(first.total, len(found)), "offset": 0,
                                    "limit": len(found), "unavailable": list(unavailable.values()),
                                    "partial": bool(unavailable)})  # fmt: skip


async def topic(ctx: Ctx, admin: AdminClient, name: str) -> int:
    detail = await admin.topic(name)
    ctx.emit(detail, lambda: render.topic_view(detail))
    return ExitCode.OK
