"""The change signal the coordinator's view and the admin event hub use: waits that are cancelled
from outside (a supervisor's ``wait({kick, change})`` race) must never wedge later notifies.

With an ``asyncio.Condition`` waited on through ``wait_for`` (the code before), this pattern left
the condition's lock held on Python 3.11 within milliseconds, every notify then blocked forever,
and a node's Consul watch stopped updating its view: found by ``subsys bench failover``.
"""

from __future__ import annotations

import asyncio
import random

from subsys.coordinator.embedded import EmbeddedCoordinator
from subsys.core.changes import ChangeSignal


async def _race_waits_against_kicks(wait_changed, current, stop: asyncio.Event, seed: int) -> int:
    rnd, woken = random.Random(seed), 0
    while not stop.is_set():
        change = asyncio.ensure_future(wait_changed(current(), rnd.random() * 0.003))
        kick = asyncio.ensure_future(asyncio.sleep(rnd.random() * 0.003))
        done, pending = await asyncio.wait({change, kick}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        woken += change in done
    return woken


async def test_waits_cancelled_from_outside_never_block_a_notify() -> None:
    signal, stop = ChangeSignal(), asyncio.Event()
    racers = [asyncio.create_task(_race_waits_against_kicks(signal.wait, lambda: signal.count, stop, seed))
              for seed in range(5)]  # fmt: skip
    rnd = random.Random(99)
    for _ in range(2000):
        signal.notify()
        await asyncio.sleep(rnd.random() * 0.002)
    stop.set()
    woken = await asyncio.wait_for(asyncio.gather(*racers), 10)
    assert signal.count == 2000 and sum(woken) > 0
    # and a plain wait still wakes on the next change
    waiter = asyncio.create_task(signal.wait(signal.count, 10))
    await asyncio.sleep(0)
    signal.notify()
    assert await asyncio.wait_for(waiter, 2) == 2001


async def test_a_wait_returns_at_once_when_the_count_moved_and_times_out_otherwise() -> None:
    signal = ChangeSignal()
    signal.notify()
    assert await signal.wait(0, 10) == 1
    assert await signal.wait(1, 0.01) == 1


async def test_the_coordinators_change_signal_survives_the_supervisor_race() -> None:
    coordinator = EmbeddedCoordinator(node_id="n1", address="http://127.0.0.1:1", incarnation="i")
    stop, rnd = asyncio.Event(), random.Random(1)
    racers = [asyncio.create_task(_race_waits_against_kicks(coordinator.wait_changed, lambda: coordinator.generation,
                                                            stop, seed)) for seed in range(5)]  # fmt: skip
    for _ in range(2000):
        await asyncio.wait_for(coordinator._notify(), 2)  # wedged before: a lock held by a cancelled wait
        await asyncio.sleep(rnd.random() * 0.002)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*racers), 10)
    assert coordinator.generation == 2000
