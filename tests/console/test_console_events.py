"""The console's event stream with a big cluster: a snapshot line of megabytes arrives whole.

At 10,000 topics the stream's first event (every owner and presence, one
``data:`` line of ~1.5 MB) was over aiohttp's 512 KiB line limit: the stream
broke at once, the console flipped between connected and lost twice a
second, and every reconnect cancelled the view's refresh in flight. A stub
node sends such a snapshot, in small TCP writes, then one more event.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from subsys.console.backend import Backend
from subsys.core import admin as api
from subsys.testing.procs import free_port

from support import eventually

TOPICS = 20_000


async def test_a_snapshot_of_20000_topics_on_one_line_arrives_whole() -> None:
    owners = {f"cheap:{i}": {"node": "node-1", "epoch": 5, "since": 1.7e9, "reason": "acquired (subscribed here)"}
              for i in range(TOPICS)}  # fmt: skip
    snapshot = {"id": "inc-1", "type": "snapshot", "at": 0.0,
                "data": {"owners": owners, "presence": {t: ["node-1"] for t in owners}, "nodes": {}}}  # fmt: skip
    moved = {"id": "inc-2", "type": "owner", "at": 0.0,
             "data": {"topic": "cheap:7", "from": owners["cheap:7"], "to": {"node": "node-2", "epoch": 6}}}  # fmt: skip
    body = b"".join(f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (snapshot, moved))
    assert len(body) > 2 * 512 * 1024
    served, stop = asyncio.Event(), asyncio.Event()

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"role": "operator", "token_id": "op", "read_only": False, "node": "node-1"})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for at in range(0, len(body), 7_000):  # lines split across many reads
            await response.write(body[at:at + 7_000])
        served.set()
        await stop.wait()  # the stream stays open
        return response

    app = web.Application()
    app.router.add_get(api.API_PREFIX + "/whoami", whoami)
    app.router.add_get(api.API_PREFIX + "/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    posted: list = []
    backend = Backend([f"http://127.0.0.1:{port}"], "op", posted.append)
    try:
        backend.start()
        await eventually(lambda: backend.cursor == "inc-2", timeout=20, message="both events arrived")
        assert len(backend.owners) == TOPICS and len(backend.presence) == TOPICS
        assert backend.owners["cheap:7"] == {"node": "node-2", "epoch": 6}
        assert backend.connected
        notes = [e.data["message"] for e in backend.log if e.type == "console"]
        assert len(notes) == 1 and notes[0].startswith("connected to node-1"), notes  # never "lost"
        assert served.is_set()
    finally:
        stop.set()
        await backend.close()
        await runner.cleanup()
