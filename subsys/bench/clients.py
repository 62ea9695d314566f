"""The bench's side of its helper processes: a control server, and fleets of client processes.

Helper processes (:mod:`subsys.bench.loadclient`, the baselines in
:mod:`subsys.bench.baselines`) are :class:`~subsys.testing.procs.ChildProcess`
children: they get the parent-death signal, and they connect back to one
:class:`ControlServer` on loopback and exit when that connection closes.
So a bench that ends, fails or is interrupted (Ctrl-C) leaves none behind:
``async with`` stops them (SIGTERM, then SIGKILL after a timeout), and if
the bench itself is killed, the closed socket and the death signal do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import sys
from typing import Any, Sequence

from subsys.bench.support import BenchError
from subsys.testing.nodes import node_env
from subsys.testing.procs import LOOPBACK, ChildProcess

__all__ = ["ControlServer", "Helper", "ClientFleet", "spawn_helper"]

_LINE_LIMIT = 2**26  # a round event carries every arrival time of a client process


class Helper:
    """One helper process's control connection: requests with replies, and events."""

    def __init__(self, name: str, proc: ChildProcess) -> None:
        self.name = name
        self.proc = proc
        self.hello: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader_task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]) -> None:
        self._writer, self.hello = writer, hello
        self._reader_task = asyncio.create_task(self._read(reader), name=f"control {self.name}")
        self.connected.set()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                future = self._pending.pop(message.get("id"), None) if "id" in message else None
                if future is not None:
                    if not future.done():
                        future.set_result(message)
                elif "event" in message:
                    self.events.put_nowait(message)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BenchError(f"{self.name} went away:\n{self.proc.log_tail(10)}"))
            self._pending.clear()

    def post(self, cmd: str, **args: Any) -> None:
        """Send without waiting for the reply (the baseline's publish: nothing between the stamp and the wire)."""
        if self._writer is None:
            raise BenchError(f"{self.name} is not connected")
        self._writer.write(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")

    async def request(self, cmd: str, *, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        if self._writer is None or (self._reader_task is not None and self._reader_task.done()):
            raise BenchError(f"{self.name} is not connected:\n{self.proc.log_tail(10)}")
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        self._writer.write(json.dumps({"id": ident, "cmd": cmd, "args": args}).encode() + b"\n")
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"{self.name} did not answer {cmd!r} within {timeout:g}s") from None
        finally:
            self._pending.pop(ident, None)
        if "error" in reply:
            raise BenchError(f"{self.name}: {cmd}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(b'{"cmd": "exit"}\n')
                await asyncio.wait_for(self._writer.drain(), 2)
            self._writer.close()
            if self.proc.proc is not None:  # let it close its connections itself, briefly
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.proc.wait()), 3)
        await self.proc.stop(timeout=10)
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)


class ControlServer:
    """A loopback TCP server that helper processes connect back to (first line: ``{"hello": name, ...}``)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._expected: dict[str, Helper] = {}

    async def __aenter__(self) -> "ControlServer":
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0, limit=_LINE_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.close()

    def expect(self, helper: Helper) -> None:
        self._expected[helper.name] = helper

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads(await asyncio.wait_for(reader.readline(), 30))
            helper = self._expected.pop(hello.get("hello"))
        except (asyncio.TimeoutError, ValueError, KeyError, AttributeError):
            writer.close()  # not one of ours
            return
        helper.attach(reader, writer, hello)


async def spawn_helper(
    control: ControlServer,
    name: str,
    module: str,
    args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Helper:
    """Start ``python -m module LOOPBACK PORT NAME *args`` and wait until it has connected back."""
    lines: collections.deque[str] = collections.deque(maxlen=200)
    proc = ChildProcess(
        name,
        [sys.executable, "-m", module, LOOPBACK, str(control.port), name, *args],
        env=node_env(env, isolate=True),
        on_line=lines.append,
    )
    helper = Helper(name, proc)
    control.expect(helper)
    await proc.start()
    try:
        waiter = asyncio.ensure_future(helper.connected.wait())
        exited = asyncio.ensure_future(proc.proc.wait())  # type: ignore[union-attr]
        await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not helper.connected.is_set():
            raise BenchError(f"{name} did not start within {timeout:g}s:\n{proc.log_tail(15)}")
    except BaseException:
        await proc.stop(timeout=5)
        raise
    return helper


class ClientFleet:
    """``procs`` client processes; a tag's connections are spread evenly over them."""

    def __init__(self, control: ControlServer, procs: int = 4) -> None:
        self.control = control
        self.count = max(1, int(procs))
        self.helpers: list[Helper] = []
        self._conns: dict[str, dict[str, int]] = {}  # tag -> helper name -> open connections

    async def __aenter__(self) -> "ClientFleet":
        started = await asyncio.gather(
            *(spawn_helper(self.control, f"client{i + 1}", "subsys.bench.loadclient") for i in range(self.count)),
            return_exceptions=True,
        )
        self.helpers = [helper for helper in started if isinstance(helper, Helper)]
        failed = [error for error in started if isinstance(error, BaseException)]
        if failed:  # stop the ones that did start (a failed one was stopped by spawn_helper)
            await self.stop()
            raise failed[0]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(helper.stop() for helper in self.helpers), return_exceptions=True)

    async def open(
        self,
        tag: str,
        url: str,
        subscriptions: list[list[str]],
        *,
        compress: int = 0,
        raw: bool = False,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Open one connection per entry of ``subscriptions`` (its topics); returns the totals."""
        shares = [subscriptions[i :: self.count] for i in range(self.count)]
        busy = [(helper, share) for helper, share in zip(self.helpers, shares) if share]
        replies = await asyncio.gather(
            *(helper.request("open", timeout=timeout, tag=tag, url=url, subscriptions=share, compress=compress,
                             raw=raw)
              for helper, share in busy)
        )  # fmt: skip
        for (helper, _share), reply in zip(busy, replies):
            counts = self._conns.setdefault(tag, {})
            counts[helper.name] = counts.get(helper.name, 0) + reply["connected"]
        errors = [error for reply in replies for error in reply["errors"]]
        return {
            "connected": sum(reply["connected"] for reply in replies),
            "failed": sum(reply["failed"] for reply in replies),
            "deflate": sum(reply["deflate"] for reply in replies),
            "first_error": errors[0] if errors else "",
        }

    async def arrivals(self, tag: str, value: int, *, timeout: float) -> list[float]:
        """Every arrival time of ``value`` on ``tag``'s connections (what came within ``timeout``)."""
        times: list[float] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def from_helper(helper: Helper) -> list[float]:
            while True:
                remaining = deadline - loop.time()
                try:
                    event = await asyncio.wait_for(helper.events.get(), max(0.0, remaining))
                except asyncio.TimeoutError:
                    return (await helper.request("collect", tag=tag, value=value))["times"]
                if event.get("tag") == tag and event.get("value") == value:
                    return event["times"]
                # an event of an earlier, timed-out round: it was collected already

        counts = self._conns.get(tag, {})
        busy = [helper for helper in self.helpers if counts.get(helper.name)]
        for part in await asyncio.gather(*(from_helper(helper) for helper in busy)):
            times.extend(part)
        return times

    async def sample(self, tag: str) -> str | None:
        for helper in self.helpers:
            text = (await helper.request("sample", tag=tag))["text"]
            if text:
                return text
        return None

    async def close(self, tag: str) -> int:
        replies = await asyncio.gather(*(helper.request("close", tag=tag, timeout=60) for helper in self.helpers))
        self._conns.pop(tag, None)
        return sum(reply["closed"] for reply in replies)

    async def cpu_seconds(self) -> float:
        replies = await asyncio.gather(*(helper.request("cpu") for helper in self.helpers))
        return sum(reply["cpu_s"] for reply in replies)
