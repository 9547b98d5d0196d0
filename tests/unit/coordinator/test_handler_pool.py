"""The handler pool: refuses at once when saturated or while the store is known silent."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from coordinator.errors import Unavailable
from coordinator.handler_pool import STORE_UNAVAILABLE, HandlerPool

#: Bound on the real time a test waits for pool threads to finish (they finish in
#: microseconds once released; the bound only stops a broken pool hanging the suite).
_THREADS_DONE_S = 5.0


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _THREADS_DONE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="threads"):
        HandlerPool(threads=0, queue=1)
    with pytest.raises(ValueError, match="queue"):
        HandlerPool(threads=1, queue=-1)


def test_results_and_errors_come_back() -> None:
    async def scenario() -> None:
        pool = HandlerPool(threads=2, queue=0)
        try:
            assert await pool.run(divmod, 7, 2) == (3, 1)
            with pytest.raises(ZeroDivisionError):
                await pool.run(divmod, 1, 0)
            assert pool.in_flight == 0
        finally:
            pool.close()

    asyncio.run(scenario())


def test_a_saturated_pool_refuses_at_once_and_recovers() -> None:
    async def scenario() -> None:
        pool = HandlerPool(threads=1, queue=1)
        gate = threading.Event()
        try:
            running = asyncio.ensure_future(pool.run(gate.wait))
            queued = asyncio.ensure_future(pool.run(gate.wait))
            await _until(lambda: pool.in_flight == 2, "two calls in flight")
            with pytest.raises(Unavailable, match="overloaded: 1 handler threads busy and 1"):
                await pool.run(divmod, 1, 1)
            assert pool.in_flight == 2  # the refused call took no slot
            gate.set()
            assert await running is True and await queued is True
            assert await pool.run(divmod, 9, 4) == (2, 1)
        finally:
            gate.set()
            pool.close()

    asyncio.run(scenario())


def test_store_silence_answers_waiting_calls_and_drops_queued_ones() -> None:
    async def scenario() -> None:
        pool = HandlerPool(threads=1, queue=4)
        gate = threading.Event()
        ran: list[str] = []
        try:
            blocked = asyncio.ensure_future(pool.run(gate.wait))  # "hangs on the store"
            queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
            await _until(lambda: pool.in_flight == 2, "two calls in flight")
            pool.set_store_healthy(False)
            await asyncio.sleep(0)
            for call in (blocked, queued):
                assert call.done() and isinstance(call.exception(), Unavailable)
                assert str(call.exception()) == STORE_UNAVAILABLE
            with pytest.raises(Unavailable, match="state store unavailable"):
                await pool.run(ran.append, "new")
            # The blocked thread still counts until it returns; the queued call never runs.
            assert pool.in_flight == 1
            gate.set()
            await _until(lambda: pool.in_flight == 0, "the blocked call to end")
            assert ran == []
            pool.set_store_healthy(True)
            assert pool.store_healthy
            await pool.run(ran.append, "after")
            assert ran == ["after"]
        finally:
            gate.set()
            pool.close()

    asyncio.run(scenario())


def test_a_cancelled_request_drops_its_queued_call() -> None:
    async def scenario() -> None:
        pool = HandlerPool(threads=1, queue=4)
        gate = threading.Event()
        ran: list[str] = []
        try:
            blocked = asyncio.ensure_future(pool.run(gate.wait))
            queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
            await _until(lambda: pool.in_flight == 2, "two calls in flight")
            queued.cancel()  # the client gave up (deadline, disconnect)
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert pool.in_flight == 1
            gate.set()
            assert await blocked is True
            await _until(lambda: pool.in_flight == 0, "the blocked call to end")
            assert ran == []
        finally:
            gate.set()
            pool.close()

    asyncio.run(scenario())
