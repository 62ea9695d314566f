"""``subsys sub``: print a topic's messages."""

from __future__ import annotations

import contextlib
import json
from typing import AsyncIterator

import aiohttp
from rich.console import Console
from rich.table import Table

from subsys.client.ws import TopicView, connect, follow, ws_url

out = Console(soft_wrap=True)  # a row per line, also when piped
err = Console(stderr=True)


async def run_sub(topic: str, *, urls: list[str], as_json: bool, count: int, reconnect: bool) -> int:
    """Print ``topic``'s messages; with ``reconnect``, carry on through the next node when one is lost."""
    view = TopicView()

    def on_event(kind: str, detail: str) -> None:
        err.print(f"[yellow]{detail}[/]" if kind != "connected" else f"[green]reconnected to {detail}[/]")

    if not reconnect:
        return await _once(topic, ws_url(urls[0]), view, as_json=as_json, count=count)
    try:
        async with contextlib.aclosing(follow(urls, topic, on_event=on_event)) as messages:
            code = await _print_messages(messages, view, as_json=as_json, count=count)
    except ConnectionError as exc:
        err.print(f"[red]{exc}[/]")
        return 1
    return 1 if code is None else code  # None: not reached, follow() ends only when the caller stops


async def _once(topic: str, url: str, view: TopicView, *, as_json: bool, count: int) -> int:
    try:
        async with connect(url) as client:
            code = await _print_messages(client.subscribe(topic), view, as_json=as_json, count=count)
            if code is None:
                err.print(f"connection closed by server (code {client.close_code})")
            return 1 if code is None else code
    except (aiohttp.ClientError, OSError) as exc:
        err.print(f"[red]cannot connect to {url}:[/] {exc}")
        return 1


async def _print_messages(messages: AsyncIterator[dict], view: TopicView, *, as_json: bool, count: int) -> int | None:
    """Print until an error message (1), ``count`` messages (0), or the end of the stream (None)."""
    seen = 0
    async for frame in messages:
        seen += 1
        _print(frame, view, as_json)
        if frame.get("type") == "error":
            return 1
        if count and seen >= count:
            return 0
    return None


def _print(frame: dict, view: TopicView, as_json: bool) -> None:
    if as_json:
        print(json.dumps(frame), flush=True)
    else:
        _pretty(frame, view)


def _pretty(frame: dict, view: TopicView) -> None:
    kind = frame.get("type")
    view.apply(frame)
    head = f"[bold]{kind}[/] {frame.get('topic', '')} epoch={frame.get('epoch', '-')} seq={frame.get('seq', '-')}"
    if kind in ("snapshot", "resync"):
        out.print(head + f" rows={len(frame['rows'])}")
        if frame["rows"]:
            table = Table(*frame["rows"][0].keys())
            for row in frame["rows"][:50]:
                table.add_row(*(json.dumps(v) if not isinstance(v, str) else v for v in row.values()))
            out.print(table)
    elif kind == "diff":
        out.print(head)
        for row in frame["inserted"]:
            out.print(f"  [green]+[/] {json.dumps(row)}")
        for row in frame["updated"]:
            out.print(f"  [yellow]~[/] {json.dumps(row)}")
        for key in frame["deleted"]:
            out.print(f"  [red]-[/] {json.dumps(key)}")
    elif kind == "status":
        colour = "red" if frame.get("state") == "error" else "green"
        out.print(f"[{colour}]status {frame.get('state')}[/] {frame.get('code', '')} {frame.get('message', '')}")
    elif kind == "error":
        err.print(f"[red]error {frame.get('code')}:[/] {frame.get('message')}")
    else:
        out.print(json.dumps(frame))
