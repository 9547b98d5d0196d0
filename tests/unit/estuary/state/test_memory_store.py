"""MemoryStore behaviour that needs a controlled clock (the contract suite uses real time)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estuary.state import FencingError, LeaseLost, MemoryStore


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_lease_expires_exactly_at_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    lease = store.acquire_lease("agg", holder="a", ttl_s=10)
    assert lease is not None and lease.expires_at == clock.now + 10
    clock.now += 9.999
    assert store.fenced_put("k", b"v", lease=lease) == 1
    assert store.acquire_lease("agg", holder="b", ttl_s=10) is None
    clock.now += 0.001
    with pytest.raises(FencingError):
        store.fenced_put("k", b"v", lease=lease)
    with pytest.raises(LeaseLost):
        store.renew_lease(lease, ttl_s=10)
    taken = store.acquire_lease("agg", holder="b", ttl_s=10)
    assert taken is not None and taken.token == lease.token + 1


def test_pending_idle_time_and_reclaim_follow_the_clock() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    job_id = store.stream_add("jobs", {"f": b"1"})
    store.ensure_group("jobs", "g")
    store.read_group("jobs", "g", "dead", count=1)
    clock.now += 42.5
    (pending,) = store.pending("jobs", "g")
    assert (pending.id, pending.consumer, pending.idle_s, pending.deliveries) == (
        job_id,
        "dead",
        42.5,
        1,
    )
    assert store.reclaim("jobs", "g", "live", min_idle_s=43, count=1) == []
    (job,) = store.reclaim("jobs", "g", "live", min_idle_s=42.5, count=1)
    assert job.deliveries == 2
    assert store.pending("jobs", "g")[0].idle_s == 0.0


def test_stream_ids_never_go_backwards() -> None:
    clock = FakeClock(now=2000.0)
    store = MemoryStore(clock=clock)
    first = store.stream_add("s", {"f": b"1"})
    clock.now = 1000.0  # the wall clock steps back
    second = store.stream_add("s", {"f": b"2"})
    assert first == "2000000-0" and second == "2000000-1"
    clock.now = 3000.0
    assert store.stream_add("s", {"f": b"3"}) == "3000000-0"


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError, match="clock"):
        MemoryStore(clock=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        MemoryStore(7)  # type: ignore[arg-type]


_MEMBERS = st.sampled_from(["a", "b", "é", "z", "aa", "n1", "n2", "\u00ff", "\u0100"])
_SCORES = st.one_of(
    st.floats(allow_nan=False, min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, -0.0, 1, 2.0, math.inf, -math.inf]),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.dictionaries(_MEMBERS, _SCORES, min_size=1, max_size=4)),
        st.tuples(st.just("rem"), st.lists(_MEMBERS, min_size=1, max_size=3)),
    ),
    max_size=30,
)


@given(ops=_OPS, bounds=st.tuples(_SCORES, _SCORES), limit=st.none() | st.integers(0, 5))
@settings(max_examples=200, deadline=None)
def test_sorted_sets_agree_with_a_scan_and_sort(
    ops: list[tuple[str, Any]], bounds: tuple[float, float], limit: int | None
) -> None:
    # The indexed sorted set against the plain model: member -> score, ranges by a scan
    # sorted by (score, UTF-8 member) as Redis orders them; the counts zadd / zrem return.
    store, model = MemoryStore(), {}
    for op, arg in ops:
        if op == "add":
            new = sum(1 for m in arg if m not in model)
            assert store.zadd("z", arg) == new
            model.update(arg)
        else:
            gone = sum(1 for m in set(arg) if m in model)
            assert store.zrem("z", *arg) == gone
            for m in arg:
                model.pop(m, None)
    lo, hi = min(bounds), max(bounds)
    expected = sorted(
        ((m, s) for m, s in model.items() if lo <= s <= hi),
        key=lambda item: (item[1], item[0].encode("utf-8")),
    )
    got = store.zrange_by_score("z", min_score=lo, max_score=hi, limit=limit)
    assert got == (expected if limit is None else expected[:limit])
    assert store.zcard("z") == len(model)
    assert store.zmax_many(["z"]) == [max(model.values()) if model else None]
