"""The bounded per-receiver send queue (subsys/web/outbox.py), with fake transports."""

from __future__ import annotations

import asyncio
import json

import pytest

from subsys.web.outbox import Outbox, SendFailed
from subsys.core.protocol import Publication

pytestmark = pytest.mark.timeout(30)
TOPIC = "t:1"


def snapshot(seq: int, epoch: int = 1, topic: str = TOPIC, rows=None) -> Publication:
    return Publication("snapshot", topic, epoch, seq, {"key": ["id"], "rows": rows if rows is not None else [{"id": seq}]})


def diff(seq: int, epoch: int = 1, topic: str = TOPIC) -> Publication:
    return Publication("diff", topic, epoch, seq, {"inserted": [{"id": seq}], "updated": [], "deleted": []})


def status(state: str, epoch: int = 1, topic: str = TOPIC) -> Publication:
    return Publication("status", topic, epoch, 0, {"state": state, "code": "x" if state == "error" else None,
                                                    "message": "m" if state == "error" else None})


class FakeTransport:
    """Records frames; ``gate`` blocks sends like a full socket buffer."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.blocked = asyncio.Event()
        self.fail_with: BaseException | None = None

    async def send(self, text: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if not self.gate.is_set():
            self.blocked.set()
            await self.gate.wait()
        self.frames.append(json.loads(text))

    def kinds(self) -> list[tuple]:
        return [(f["type"], f.get("topic"), f.get("epoch"), f.get("seq")) for f in self.frames]


class Current:
    """What the topic state would return: the latest snapshot and error status."""

    def __init__(self) -> None:
        self.snapshots: dict[str, Publication] = {}
        self.statuses: dict[str, Publication] = {}

    def __call__(self, topic: str):
        return self.snapshots.get(topic), self.statuses.get(topic)


@pytest.fixture
async def box():
    transport, current = FakeTransport(), Current()
    outbox = Outbox(send=transport.send, current=current, limit=8, send_timeout=5.0)
    task = asyncio.create_task(outbox.run())
    yield outbox, transport, current, task
    outbox.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def settle(outbox: Outbox, transport: FakeTransport) -> None:
    for _ in range(200):
        if not outbox.queued():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


async def test_in_order_delivery(box):
    outbox, transport, current, _ = box
    outbox.track(TOPIC)
    for pub in (snapshot(1), diff(2), diff(3), status("error"), diff(4)):
        outbox.deliver(pub)
    await settle(outbox, transport)
    assert transport.kinds() == [
        ("snapshot", TOPIC, 1, 1), ("diff", TOPIC, 1, 2), ("diff", TOPIC, 1, 3), ("status", TOPIC, 1, None),
        ("diff", TOPIC, 1, 4),
    ]
    assert outbox.sent == 5 and outbox.overflows == 0


async def test_untracked_topics_are_ignored(box):
    outbox, transport, current, _ = box
    outbox.deliver(snapshot(1))
    outbox.track(TOPIC)
    outbox.untrack(TOPIC)
    outbox.deliver(snapshot(2))
    await settle(outbox, transport)
    assert transport.frames == [] and outbox.topics == []


async def test_a_diff_before_any_snapshot_fetches_the_current_snapshot(box):
    outbox, transport, current, _ = box
    outbox.track(TOPIC)
    current.snapshots[TOPIC] = snapshot(5)
    outbox.deliver(diff(5))  # e.g. subscribed between the state's snapshot and this diff
    outbox.deliver(diff(6))
    await settle(outbox, transport)
    assert transport.kinds() == [("snapshot", TOPIC, 1, 5), ("diff", TOPIC, 1, 6)]


async def test_a_gap_in_seq_is_repaired_by_a_snapshot_not_a_wrong_diff(box):
    outbox, transport, current, _ = box
    outbox.track(TOPIC)
    outbox.deliver(snapshot(1))
    await settle(outbox, transport)
    current.snapshots[TOPIC] = snapshot(4)
    outbox.deliver(diff(4))  # 2 and 3 never arrived
    outbox.deliver(diff(3))  # stale: already covered by snapshot 4
    outbox.deliver(diff(5))
    await settle(outbox, transport)
    assert transport.kinds() == [("snapshot", TOPIC, 1, 1), ("snapshot", TOPIC, 1, 4), ("diff", TOPIC, 1, 5)]


async def test_overflow_drops_the_queue_and_resyncs_with_the_latest_state(box):
    outbox, transport, current, _ = box
    other = "t:2"
    outbox.track(TOPIC)
    outbox.track(other)
    outbox.deliver(snapshot(1))
    outbox.deliver(snapshot(1, topic=other))
    await settle(outbox, transport)
    sent_before = len(transport.frames)

    transport.gate.clear()  # the receiver stops reading
    outbox.deliver(diff(2))
    await asyncio.wait_for(transport.blocked.wait(), 5)  # the writer is stuck sending diff 2
    for seq in range(3, 40):
        outbox.deliver(diff(seq))
        assert outbox.queued() <= 8 + 1, "memory stays bounded"
    outbox.deliver(diff(2, topic=other))
    assert outbox.overflows >= 1
    current.snapshots[TOPIC] = snapshot(39, rows=[{"id": "latest"}])
    current.snapshots[other] = snapshot(2, topic=other)
    transport.gate.set()  # the receiver reads again
    await settle(outbox, transport)

    frames = transport.kinds()[sent_before:]
    assert frames[0] == ("diff", TOPIC, 1, 2)  # the one in flight
    assert ("snapshot", TOPIC, 1, 39) in frames and ("snapshot", other, 1, 2) in frames
    assert transport.frames[sent_before + frames.index(("snapshot", TOPIC, 1, 39))]["rows"] == [{"id": "latest"}]
    # Nothing stale after the resync, nothing out of order anywhere.
    for topic in (TOPIC, other):
        seqs = [seq for kind, t, _, seq in transport.kinds() if t == topic]
        assert seqs == sorted(set(seqs)), seqs
    assert ("diff", TOPIC, 1, 39) not in frames

    outbox.deliver(diff(40))
    await settle(outbox, transport)
    assert transport.kinds()[-1] == ("diff", TOPIC, 1, 40)


async def test_control_frames_go_before_queued_data(box):
    outbox, transport, current, _ = box
    outbox.track(TOPIC)
    transport.gate.clear()
    outbox.deliver(snapshot(1))
    await asyncio.wait_for(transport.blocked.wait(), 5)
    outbox.deliver(diff(2))
    outbox.deliver(diff(3))
    outbox.control(json.dumps({"type": "pong", "ref": 1}))
    transport.gate.set()
    await settle(outbox, transport)
    assert [f["type"] for f in transport.frames] == ["snapshot", "pong", "diff", "diff"]


async def test_fencing_never_goes_back_to_an_older_epoch(box):
    outbox, transport, current, _ = box
    outbox.track(TOPIC)
    outbox.deliver(snapshot(3, epoch=5))
    outbox.deliver(diff(4, epoch=5))
    outbox.deliver(diff(5, epoch=4))  # an old owner still talking
    outbox.deliver(snapshot(9, epoch=4))
    outbox.deliver(status("error", epoch=4))
    outbox.deliver(snapshot(1, epoch=7))  # a new owner: the client is told it is a resync
    outbox.deliver(diff(2, epoch=7))
    outbox.deliver(diff(5, epoch=5))
    await settle(outbox, transport)
    assert transport.kinds() == [
        ("snapshot", TOPIC, 5, 3), ("diff", TOPIC, 5, 4), ("resync", TOPIC, 7, 1), ("diff", TOPIC, 7, 2),
    ]


async def test_resync_type_none_keeps_snapshots_as_snapshots():
    transport = FakeTransport()
    outbox = Outbox(send=transport.send, current=Current(), limit=8, send_timeout=5.0, resync_type=None)
    task = asyncio.create_task(outbox.run())
    outbox.track(TOPIC)
    outbox.deliver(snapshot(3, epoch=1))
    outbox.deliver(snapshot(1, epoch=2))
    await settle(outbox, transport)
    outbox.close()
    await asyncio.wait_for(task, 5)
    assert [f["type"] for f in transport.frames] == ["snapshot", "snapshot"]


async def test_a_send_that_never_completes_fails_and_closes():
    transport = FakeTransport()
    transport.gate.clear()
    outbox = Outbox(send=transport.send, current=Current(), limit=8, send_timeout=0.2)
    outbox.track(TOPIC)
    outbox.deliver(snapshot(1))
    with pytest.raises(SendFailed):
        await asyncio.wait_for(outbox.run(), 10)
    assert outbox.closed and outbox.queued() == 0
    outbox.deliver(diff(2))
    outbox.control("{}")
    assert outbox.queued() == 0, "a closed outbox takes nothing"


@pytest.mark.parametrize("error", [ConnectionResetError("reset"), RuntimeError("closing transport")])
async def test_a_broken_transport_fails(error):
    transport = FakeTransport()
    transport.fail_with = error
    outbox = Outbox(send=transport.send, current=Current(), limit=8, send_timeout=5.0)
    outbox.control("{}")
    with pytest.raises(SendFailed):
        await asyncio.wait_for(outbox.run(), 10)
    assert outbox.closed


async def test_close_stops_the_writer():
    transport = FakeTransport()
    outbox = Outbox(send=transport.send, current=Current(), limit=8, send_timeout=5.0)
    task = asyncio.create_task(outbox.run())
    await asyncio.sleep(0.01)
    outbox.close()
    await asyncio.wait_for(task, 5)


async def test_control_replies_are_bounded():
    """Replies to a client that sends but never reads cannot grow without bound."""
    transport = FakeTransport()
    transport.gate.clear()
    outbox = Outbox(send=transport.send, current=Current(), limit=8, send_timeout=5.0, control_limit=10)
    task = asyncio.create_task(outbox.run())
    outbox.control(json.dumps({"n": -1}))
    await asyncio.wait_for(transport.blocked.wait(), 5)
    for n in range(100):
        outbox.control(json.dumps({"n": n}))
    assert outbox.queued() == 10
    transport.gate.set()
    await settle(outbox, transport)
    assert [f["n"] for f in transport.frames] == [-1] + list(range(90, 100))
    outbox.close()
    await asyncio.wait_for(task, 5)
