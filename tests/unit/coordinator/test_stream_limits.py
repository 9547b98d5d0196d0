"""Upload stream limits: chunk count, idle time and total time, on a clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from manual_clock import ManualClock

from coordinator.errors import DeadlineExceeded, ResourceExhausted
from coordinator.stream_limits import LimitedStream, StreamLimits
from estuary.config.models import ServerSettings

_END = object()


async def _messages(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not _END:
        yield item


async def _settle() -> None:
    """Let every ready task run until all wait again (they only wait on the queue or clock)."""
    for _ in range(10):
        await asyncio.sleep(0)


def _stream(limits: StreamLimits) -> tuple[LimitedStream[Any], asyncio.Queue[Any], ManualClock]:
    clock = ManualClock()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    return LimitedStream(_messages(queue), limits=limits, clock=clock), queue, clock


def test_limits_come_from_the_server_settings_and_are_checked() -> None:
    server = ServerSettings(upload_max_chunks=7, upload_idle_s=3.0, upload_max_s=9.0)
    assert StreamLimits.from_settings(server) == StreamLimits(max_chunks=7, idle_s=3.0, max_s=9.0)
    with pytest.raises(ValueError, match="max_chunks"):
        StreamLimits(max_chunks=0, idle_s=1.0, max_s=2.0)
    with pytest.raises(ValueError, match="idle_s"):
        StreamLimits(max_chunks=1, idle_s=0.0, max_s=2.0)
    with pytest.raises(ValueError, match="max_s"):
        StreamLimits(max_chunks=1, idle_s=3.0, max_s=2.0)
    with pytest.raises(ValueError, match="upload_idle_s"):
        ServerSettings(upload_idle_s=10.0, upload_max_s=5.0)


def test_a_stalled_stream_is_cut_exactly_at_the_idle_limit() -> None:
    async def scenario() -> None:
        stream, queue, clock = _stream(StreamLimits(max_chunks=10, idle_s=5.0, max_s=60.0))
        await queue.put("header")
        assert await stream.next() == "header"
        clock.advance(3.0)
        await queue.put("chunk")  # a message restarts the idle time
        assert await stream.next() == "chunk"
        reading = asyncio.ensure_future(stream.next())
        await _settle()
        clock.advance(4.999)
        await _settle()
        assert not reading.done()
        clock.advance(0.001)
        await _settle()
        assert reading.done()
        with pytest.raises(DeadlineExceeded, match=r"no chunk for 5 s \(server.upload_idle_s\)"):
            reading.result()

    asyncio.run(scenario())


def test_a_trickling_stream_is_cut_at_the_total_limit() -> None:
    async def scenario() -> None:
        stream, queue, clock = _stream(StreamLimits(max_chunks=100, idle_s=5.0, max_s=12.0))
        for _ in range(3):  # t = 0, 4, 8: each within the idle limit
            reading = asyncio.ensure_future(stream.next())
            await _settle()
            await queue.put("m")
            await _settle()
            assert reading.result() == "m"
            clock.advance(4.0)
        # t = 12: the stream has been open 12 s, though the last message came 4 s ago.
        with pytest.raises(DeadlineExceeded, match=r"longer than 12 s \(server.upload_max_s\)"):
            await stream.next()

    asyncio.run(scenario())


def test_the_total_limit_cuts_a_wait_short_of_the_idle_limit() -> None:
    async def scenario() -> None:
        stream, queue, clock = _stream(StreamLimits(max_chunks=100, idle_s=5.0, max_s=7.0))
        await queue.put("header")
        assert await stream.next() == "header"
        clock.advance(4.0)
        reading = asyncio.ensure_future(stream.next())  # 3 s of the stream are left
        await _settle()
        clock.advance(3.0)
        await _settle()
        with pytest.raises(DeadlineExceeded, match="longer than 7 s"):
            reading.result()

    asyncio.run(scenario())


def test_one_chunk_too_many_is_resource_exhausted() -> None:
    async def scenario() -> None:
        stream, queue, _ = _stream(StreamLimits(max_chunks=3, idle_s=5.0, max_s=60.0))
        for item in ("header", b"1", b"2", b"3", b"4"):
            await queue.put(item)
        assert [await stream.next() for _ in range(4)] == ["header", b"1", b"2", b"3"]
        assert stream.data_chunks == 3
        with pytest.raises(
            ResourceExhausted, match=r"more than 3 data chunks \(server.upload_max_chunks\)"
        ):
            await stream.next()

    asyncio.run(scenario())


def test_the_end_of_the_stream_is_none() -> None:
    async def scenario() -> None:
        stream, queue, _ = _stream(StreamLimits(max_chunks=3, idle_s=5.0, max_s=60.0))
        await queue.put("header")
        await queue.put(_END)
        assert await stream.next() == "header"
        assert await stream.next() is None

    asyncio.run(scenario())


def _expected(gaps: list[int], limits: StreamLimits) -> tuple[int, str | None]:
    """How many messages the stream accepts, and the refusal that ends it (None: none)."""
    last = 0.0
    for i, gap in enumerate(gaps):
        left = limits.max_s - last
        if left <= 0:
            return i, "total"
        wait = min(limits.idle_s, left)
        if gap >= wait:  # the timer fires at last + wait, before (or as) the message comes
            return i, "idle" if limits.idle_s <= left else "total"
        last += gap
        if i > limits.max_chunks:  # message i is data chunk i (the header is message 0)
            return i, "chunks"
    return len(gaps), None


@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.integers(0, 7), min_size=1, max_size=10))
def test_every_message_gap_sequence_ends_as_the_limits_say(gaps: list[int]) -> None:
    """Accepted messages and the refusal, for any arrival times, match the rule exactly."""
    limits = StreamLimits(max_chunks=4, idle_s=5.0, max_s=20.0)

    async def scenario() -> tuple[int, str | None]:
        stream, queue, clock = _stream(limits)
        accepted = 0
        for i, gap in enumerate(gaps):
            reading = asyncio.ensure_future(stream.next())
            await _settle()
            if not reading.done():
                clock.advance(gap)
                await _settle()
            if not reading.done():
                await queue.put(i)
                await _settle()
            error = reading.exception()
            if error is not None:
                kind = (
                    "chunks"
                    if isinstance(error, ResourceExhausted)
                    else "idle"
                    if "upload_idle_s" in str(error)
                    else "total"
                )
                return accepted, kind
            assert reading.result() == i
            accepted += 1
        return accepted, None

    assert asyncio.run(scenario()) == _expected(gaps, limits)
