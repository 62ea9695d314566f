"""``subsys.web.ws._run_writer``: how a client writer's end is reported and handled."""

from __future__ import annotations

import asyncio
import logging

import pytest

from subsys.web.outbox import SendFailed
from subsys.web.ws import CLOSE_SLOW_CONSUMER, _run_writer


class FakeSocket:
    def __init__(self, closed: bool) -> None:
        self.closed = closed
        self.closes: list[int] = []

    async def close(self, *, code: int, message: bytes = b"", drain: bool = True) -> None:
        self.closes.append(code)


class FakeRequest:
    transport = None  # the connection is already gone: nothing to abort


class FakeOutbox:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def flush(self) -> None:
        raise self.exc


class FakeConnection:
    peer = "127.0.0.1"

    class limits:
        send_timeout = 0.1

    def __init__(self, exc: BaseException, ws: FakeSocket) -> None:
        self.outbox = FakeOutbox(exc)
        self.ws = ws
        self.request = FakeRequest()


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
    caplog.set_level(logging.DEBUG, logger="subsys.web.ws")
    await _run_writer(FakeConnection(_send_failed(cause), ws))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG], caplog.text
    assert "Traceback" not in caplog.text and ws.closes == []


async def test_a_slow_client_is_closed_with_a_warning(caplog) -> None:
    ws = FakeSocket(closed=False)
    await _run_writer(FakeConnection(_send_failed(asyncio.TimeoutError()), ws))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ws.closes == [CLOSE_SLOW_CONSUMER]


async def test_a_real_crash_is_an_error_with_its_traceback_and_closes_the_socket(caplog) -> None:
    ws = FakeSocket(closed=False)
    await _run_writer(FakeConnection(KeyError("bug"), ws))
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [
        "client writer crashed; closing the socket"
    ]
    assert "KeyError" in caplog.text
    assert ws.closes == [1011]
