from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estuary.clock import SYSTEM_CLOCK, VirtualClock


def test_virtual_clock_moves_only_when_advanced_or_slept_on() -> None:
    clock = VirtualClock(start=100.0)
    assert clock.time() == 100.0 and clock.monotonic() == 0.0
    assert clock.time() == 100.0  # reading does not move it
    clock.sleep(2.5)
    assert clock.time() == 102.5 and clock.monotonic() == 2.5
    asyncio.run(clock.sleep_async(0.5))
    assert clock.time() == 103.0
    assert clock.time_ms() == 103_000
    assert clock.advance_to(50.0) == 103.0  # never backwards
    assert clock.advance_to(110.0) == 110.0


def test_virtual_wait_returns_at_once_and_advances_only_when_it_times_out() -> None:
    clock = VirtualClock(start=0.0)
    event = threading.Event()
    assert clock.wait(event, 5.0) is False
    assert clock.time() == 5.0
    event.set()
    assert clock.wait(event, 5.0) is True
    assert clock.time() == 5.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_virtual_clock_refuses_time_running_backwards(bad: float) -> None:
    clock = VirtualClock()
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(bad)
    with pytest.raises(ValueError, match="start"):
        VirtualClock(start=bad)


@given(st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), max_size=50))
def test_virtual_time_is_the_sum_of_advances_and_never_decreases(steps: list[float]) -> None:
    clock = VirtualClock(start=0.0)
    last = clock.time()
    for step in steps:
        now = clock.advance(step)
        assert now >= last
        last = now
    assert clock.monotonic() == pytest.approx(sum(steps))


def test_system_clock_reads_the_machine() -> None:
    import time

    assert abs(SYSTEM_CLOCK.time() - time.time()) < 5.0
    a = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= a
    assert SYSTEM_CLOCK.wait(threading.Event(), 0.0) is False
