"""Many WebSocket clients in the runner's process, each recording and checking every frame.

The clients run in the runner's own event loop (aiohttp, one shared session):
the CPU figures the run judges are the nodes' (sampled per process), so the
clients' CPU does not blur them; the cost is that a frame's receive time
includes this loop's latency (milliseconds at these rates).

A :class:`ChaosClient` holds one connection at a time to its home node (or,
while that is down, to another running node, as a load balancer would),
subscribes to its topics, and on every data frame runs the protocol's stream
checks and checks its view of the topic against the database's history. A
connection that drops is re-opened after a short pause: epoch and seq are
per connection, so each connection starts a fresh check. Churners connect,
subscribe, unsubscribe and disconnect at random for a while, and leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from subsys.chaos.history import RowHistory
from subsys.chaos.invariants import Invariants, StreamCheck
from subsys.client.ws import TopicView
from subsys.testing.nodes import NodeProcess

__all__ = ["ChaosClient", "ClientPool"]


def topic_param(topic: str) -> int:
    return int(topic.rpartition(":")[2])


@dataclass
class Sub:
    """One subscription on one connection."""

    topic: str
    check: StreamCheck
    view: TopicView = field(default_factory=TopicView)
    spans: list[tuple[int, float]] = field(default_factory=list)
    has_data: bool = False
    leaving: bool = False  # unsubscribe sent, `unsubscribed` not yet received


class ChaosClient:
    def __init__(self, pool: "ClientPool", name: str, home: str, topics: list[str], *, churn: bool = False) -> None:
        self.pool, self.name, self.home, self.topics, self.churn = pool, name, home, list(topics), churn
        self.rng = random.Random(f"{pool.seed}:{name}")
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.node = ""
        self.subs: dict[str, Sub] = {}
        self.connections = 0
        self._ref = 0
        self.task: asyncio.Task | None = None

    # -- connection ----------------------------------------------------------------

    async def _open(self, node: NodeProcess) -> bool:
        try:
            self.ws = await self.pool.session.ws_connect(
                node.ws_url, heartbeat=10, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2),
            )  # fmt: skip
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False
        self.connections += 1
        self.node = node.name
        self.subs = {}
        return True

    async def subscribe(self, topic: str) -> None:
        assert self.ws is not None
        where = f"{self.name}#{self.connections}@{self.node} {topic}"
        self.subs[topic] = Sub(topic, StreamCheck(self.pool.inv, where))
        self._ref += 1
        await self.ws.send_str(json.dumps({"type": "subscribe", "topic": topic, "ref": self._ref}))

    async def unsubscribe(self, topic: str) -> None:
        sub = self.subs.get(topic)
        if sub is not None and self.ws is not None and not sub.leaving:
            sub.leaving = True
            await self.ws.send_str(json.dumps({"type": "unsubscribe", "topic": topic}))

    async def run(self) -> None:
        """Stay connected and subscribed until cancelled."""
        while True:
            node = self.pool.pick(self.home, self.rng)
            if node is not None and await self._open(node):
                try:
                    for topic in self.topics:
                        await self.subscribe(topic)
                    await self._read()
                except (aiohttp.ClientError, OSError, ConnectionError):
                    pass
                finally:
                    await self._close()
            await asyncio.sleep(0.2 + 0.3 * self.rng.random())

    async def run_churn(self, until: float, topics: list[str]) -> None:
        """Connect, subscribe, unsubscribe, disconnect at random until ``until`` (monotonic), then leave."""
        while time.monotonic() < until:
            node = self.pool.pick(self.rng.choice(list(self.pool.nodes())), self.rng)
            if node is None or not await self._open(node):
                await asyncio.sleep(0.2)
                continue
            reader = asyncio.create_task(self._read())
            try:
                for _ in range(self.rng.randint(1, 6)):
                    if reader.done() or time.monotonic() >= until:
                        break
                    topic = self.rng.choice(topics)
                    if topic in self.subs and not self.subs[topic].leaving:
                        await self.unsubscribe(topic)
                    elif topic not in self.subs:
                        await self.subscribe(topic)
                    await asyncio.sleep(self.rng.uniform(0.05, 0.8))
            except (aiohttp.ClientError, OSError, ConnectionError):
                pass
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await self._close()
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))

    async def _close(self) -> None:
        ws, self.ws = self.ws, None
        self.subs = {}
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            self._frame(json.loads(msg.data), time.monotonic())

    def _frame(self, frame: dict[str, Any], at: float) -> None:
        kind, topic = frame.get("type"), frame.get("topic")
        if kind == "error":
            self.pool.errors[frame.get("code", "?")] = self.pool.errors.get(frame.get("code", "?"), 0) + 1
            if topic in self.subs and frame.get("ref") is not None:
                self.subs.pop(topic, None)  # the subscribe was refused (e.g. shutting_down): ask again
                if not self.churn:
                    asyncio.get_running_loop().call_later(0.5, self._resubscribe, topic, self.ws)
            return
        sub = self.subs.get(topic) if topic else None
        if kind == "unsubscribed":
            if sub is not None and sub.leaving:
                del self.subs[topic]
            return
        if sub is None or sub.leaving or kind not in ("snapshot", "resync", "diff", "status"):
            return  # data still queued before our unsubscribe was read: the protocol allows it
        sub.check.frame(frame)
        if kind == "status":
            return
        sub.view.apply(frame)
        sub.has_data = True
        rows = {row["id"]: row["v"] for row in sub.view.rows.values()}
        sub.spans = self.pool.history.versions(topic_param(topic), rows)
        sub.check.view(sub.spans, rows, frame)
        if kind == "resync":
            self.pool.resyncs.append((at, self.node, topic, frame["epoch"]))

    def _resubscribe(self, topic: str, ws: aiohttp.ClientWebSocketResponse | None) -> None:
        if ws is not None and ws is self.ws and not ws.closed and topic not in self.subs:
            self.pool.spawn_quiet(self.subscribe(topic))

    def caught_up(self, k: int) -> bool:
        """Connected, every topic subscribed with data, each view a version at or after commit ``k``."""
        if self.ws is None or self.ws.closed or set(self.subs) != set(self.topics):
            return False
        return all(sub.has_data and sub.spans and max(b for _a, b in sub.spans) > k for sub in self.subs.values())


class ClientPool:
    """The run's clients and what they saw (resyncs for failover times, error codes)."""

    def __init__(self, history: RowHistory, inv: Invariants, nodes: Callable[[], dict[str, NodeProcess]],
                 *, seed: int) -> None:  # fmt: skip
        self.history, self.inv, self.nodes, self.seed = history, inv, nodes, seed
        self.clients: list[ChaosClient] = []
        self.churners: list[ChaosClient] = []
        self.down: set[str] = set()  # nodes the runner has stopped or paused: no new connections there
        self.resyncs: list[tuple[float, str, str, int]] = []  # (monotonic, node, topic, epoch)
        self.errors: dict[str, int] = {}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "ClientPool":
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def pick(self, home: str, rng: random.Random) -> NodeProcess | None:
        nodes = self.nodes()
        up = [n for n in nodes.values() if n.running and n.name not in self.down]
        if home in nodes and nodes[home] in up:
            return nodes[home]
        return rng.choice(up) if up else None

    def start(self, count: int, topics: list[str], per_client: int) -> None:
        rng = random.Random(self.seed)
        names = list(self.nodes())
        for i in range(count):
            chosen = sorted(rng.sample(topics, min(per_client, len(topics))), key=topic_param)
            client = ChaosClient(self, f"c{i + 1}", names[i % len(names)], chosen)
            self.clients.append(client)
            self._spawn(client, client.run())

    def _spawn(self, client: ChaosClient, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"chaos client {client.name}")
        client.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_quiet(self, coro: Any) -> None:
        """A short task whose failure (a socket closing under it) does not matter."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), t.cancelled() or t.exception()))

    async def churn(self, count: int, topics: list[str], duration: float) -> None:
        """``count`` churners for ``duration`` seconds; returns once all have left."""
        until = time.monotonic() + duration
        new = [ChaosClient(self, f"churn{len(self.churners) + i + 1}", "", [], churn=True) for i in range(count)]
        self.churners += new
        tasks = [self._spawn(c, c.run_churn(until, topics)) for c in new]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _resubscribe(self, topic: str, ws: aiohttp.ClientWebSocketResponse | None) -> None:
        if ws is not None and ws is self.ws and not ws.closed and topic not in self.subs:
            self.pool.spawn_quiet(self.subscribe(topic))

    def caught_up(self, k: int) -> bool:
        return all(client.caught_up(k) for client in self.clients)

    def behind(self, k: int) -> list[str]:
        return [f"{c.name}@{c.node or '-'}" for c in self.clients if not c.caught_up(k)]

    async def stop(self) -> None:
        """Every client leaves (their tasks end, their sockets close); also on Ctrl-C."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in [*self.clients, *self.churners]:
            await client._close()
        if self.session is not None:
            await self.session.close()
            self.session = None
