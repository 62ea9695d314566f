"""``subsys.web_ws._writer_done``: how a client writer's end is reported."""

from __future__ import annotations

import asyncio
import logging

import pytest

from subsys._outbox import SendFailed
from subsys.web_ws import CLOSE_SLOW_CONSUMER, _writer_done


class FakeSocket:
    def __init__(self, closed: bool) -> None:
        self.closed = closed
        self.closes: list[int] = []

    async def close(self, *, code: int, message: bytes) -> None:
        self.closes.append(code)


async def _failed_writer(exc: BaseException) -> asyncio.Task:
    async def run() -> None:
        raise exc

    task = asyncio.create_task(run())
    await asyncio.gather(task, return_exceptions=True)
    return task


def _send_failed(cause: BaseException) -> SendFailed:
    try:
        raise SendFailed(f"send failed: {cause!r}") from cause
    except SendFailed as exc:
        return exc


@pytest.mark.parametrize(
    "closed, cause",
    [
        (True, ConnectionResetError("Cannot write to closing transport")),  # the client closed normally
        (False, ConnectionResetError("Cannot write to closing transport")),  # the transport is already closing
        (True, asyncio.TimeoutError()),
    ],
)
async def test_a_client_that_left_is_logged_at_debug_only(caplog, closed, cause) -> None:
    ws = FakeSocket(closed)
    caplog.set_level(logging.DEBUG, logger="subsys.web_ws")
    _writer_done(await _failed_writer(_send_failed(cause)), ws)
    await asyncio.sleep(0)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert "Traceback" not in caplog.text and ws.closes == []


async def test_a_slow_client_is_closed_with_a_warning(caplog) -> None:
    ws = FakeSocket(closed=False)
    _writer_done(await _failed_writer(_send_failed(asyncio.TimeoutError())), ws)
    await asyncio.sleep(0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ws.closes == [CLOSE_SLOW_CONSUMER]


async def test_a_real_crash_is_an_error_with_its_traceback(caplog) -> None:
    _writer_done(await _failed_writer(KeyError("bug")), FakeSocket(closed=True))
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == ["client writer crashed"]
    assert "KeyError" in caplog.text
