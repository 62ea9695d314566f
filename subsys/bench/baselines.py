"""The yardsticks of ``subsys bench``: minimal programs doing the same job, in their own processes.

* ``broadcast``: a plain `websockets` broadcast server. Every connection
  gets a greeting frame and then whatever the bench publishes, sent with
  ``websockets.broadcast`` (the library's own fan-out: one synchronous
  write per connection, nothing queued per client). ``compression``:
  ``off`` (None) or ``deflate`` (the library's default permessage-deflate,
  negotiated when the client offers it). It always runs on the stock
  asyncio loop, so it stays a fixed yardstick across runs: a node on
  uvloop shows its gain as a better ratio.
* ``poller``: one ``SELECT ... WHERE id = ANY($1)`` per tick for all T
  parameters on one connection, rows grouped by parameter (the least any
  poller of T topics must do).

Run as ``python -m subsys.bench.baselines HOST PORT NAME KIND ...``: the
process connects back to the bench's control server
(:mod:`subsys.bench.clients`) and exits when that connection closes.
The database URL reaches the poller through ``DATABASE_URL``, never argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from subsys.bench.clients import ControlServer, Helper, spawn_helper

__all__ = ["BroadcastServer", "BaselinePoller", "GREETING", "POLLER_APP"]

GREETING = '{"type":"hello","server":"baseline"}'
POLLER_APP = "subsys-bench:baseline"


# -- bench side ----------------------------------------------------------------


class BroadcastServer:
    """The baseline broadcast server process, seen from the bench."""

    def __init__(self, helper: Helper) -> None:
        self.helper = helper

    @classmethod
    async def start(cls, control: ControlServer, *, compression: str = "off", name: str = "baseline") -> "BroadcastServer":
        return cls(await spawn_helper(control, name, "subsys.bench.baselines", ["broadcast", compression]))

    @property
    def pid(self) -> int:
        return self.helper.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.helper.hello['port']}/"

    def publish(self, payload: str) -> float:
        """Hand ``payload`` to the server; returns the wall-clock moment just before it went on the wire."""
        stamp = time.time()
        self.helper.post("publish", payload=payload)
        return stamp

    async def clients(self) -> int:
        return (await self.helper.request("clients"))["clients"]

    async def stop(self) -> None:
        await self.helper.stop()


class BaselinePoller:
    def __init__(self, helper: Helper) -> None:
        self.helper = helper

    @classmethod
    async def start(
        cls, control: ControlServer, *, database_url: str, table: str, topics: int, interval: float
    ) -> "BaselinePoller":
        helper = await spawn_helper(
            control, "baseline-poller", "subsys.bench.baselines", ["poller", table, str(topics), str(interval)],
            env={"DATABASE_URL": database_url},
        )  # fmt: skip
        return cls(helper)

    @property
    def pid(self) -> int:
        return self.helper.proc.pid

    async def ticks(self) -> int:
        return (await self.helper.request("ticks"))["ticks"]

    async def stop(self) -> None:
        await self.helper.stop()


# -- the programs ----------------------------------------------------------------


async def _control(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**24), 30)


def _say(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def broadcast_main(host: str, port: int, name: str, compression: str) -> None:
    from websockets.asyncio.server import broadcast, serve

    connections: set[Any] = set()

    async def handler(ws: Any) -> None:
        connections.add(ws)
        try:
            await ws.send(GREETING)
            async for _ in ws:  # keep reading: pings are answered by the library
                pass
        finally:
            connections.discard(ws)

    reader, writer = await _control(host, port)
    async with serve(handler, "127.0.0.1", 0, compression="deflate" if compression == "deflate" else None,
                     max_size=None) as server:  # fmt: skip
        ws_port = next(iter(server.sockets)).getsockname()[1]
        _say(writer, {"hello": name, "port": ws_port, "pid": os.getpid()})
        while line := await reader.readline():
            request = json.loads(line)
            cmd = request.get("cmd")
            if cmd == "publish":
                broadcast(connections, request["args"]["payload"])
            elif cmd == "clients":
                _say(writer, {"id": request.get("id"), "clients": len(connections)})
            elif cmd == "exit":
                break
    writer.close()


async def poller_main(host: str, port: int, name: str, table: str, topics: int, interval: float) -> None:
    import asyncpg

    reader, writer = await _control(host, port)
    conn = await asyncpg.connect(os.environ["DATABASE_URL"], server_settings={"application_name": POLLER_APP})
    params = list(range(1, topics + 1))
    # the same columns as the bench feed, for all parameters at once
    statement = await conn.prepare(f"SELECT id, v, note, changed FROM {table} WHERE id = ANY($1::int[])")
    ticks = 0

    async def poll() -> None:
        nonlocal ticks
        next_at = time.monotonic()
        while True:
            rows: dict[int, list[dict[str, Any]]] = {}
            for record in await statement.fetch(params, timeout=30):
                rows.setdefault(record["id"], []).append(dict(record))
            ticks += 1
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    poller = asyncio.create_task(poll())
    _say(writer, {"hello": name, "pid": os.getpid()})
    try:
        while line := await reader.readline():
            request = json.loads(line)
            if request.get("cmd") == "ticks":
                _say(writer, {"id": request.get("id"), "ticks": ticks})
            elif request.get("cmd") == "exit":
                break
            if poller.done():
                poller.result()  # a failed poll ends the process, with its error in the log
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await conn.close()
        writer.close()


def main(argv: list[str]) -> None:
    host, port, name, kind, *rest = argv
    if kind == "broadcast":
        coro = broadcast_main(host, int(port), name, rest[0] if rest else "off")
    elif kind == "poller":
        coro = poller_main(host, int(port), name, rest[0], int(rest[1]), float(rest[2]))
    else:
        raise SystemExit(f"unknown baseline {kind!r}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


if __name__ == "__main__":
    from subsys.bench.support import raise_fd_limit

    raise_fd_limit()
    main(sys.argv[1:])
