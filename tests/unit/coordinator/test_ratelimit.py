from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.ratelimit import RateLimiter
from estuary.clock import VirtualClock


def test_burst_then_sustained_rate() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(2.0, burst=3, clock=clock)
    assert [limiter.allow("d") for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)  # one token back at 2/s
    assert limiter.allow("d") and not limiter.allow("d")
    assert limiter.allow("other")  # buckets are per device


@given(
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200),
    rate=st.floats(min_value=0.5, max_value=20),
    burst=st.integers(min_value=1, max_value=10),
)
def test_never_more_than_burst_plus_rate_times_time(
    gaps: list[float], rate: float, burst: int
) -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rate, burst=burst, clock=clock)
    allowed = 0
    for gap in gaps:
        clock.advance(gap)
        allowed += limiter.allow("d")
    assert allowed <= burst + rate * clock.monotonic() + 1e-9


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(1.0, burst=1, max_keys=10, clock=VirtualClock())
    for i in range(1000):
        limiter.allow(f"fake-{i}")
    assert len(limiter._buckets) == 10


def test_invalid_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1, burst=0)
