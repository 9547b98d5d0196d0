from __future__ import annotations

import bisect
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.pacing import Admit, Defer, PacerConfig, decide

CFG = PacerConfig(buffer_size=8, target_staleness=2.0, deadline_s=600.0)


def test_cap_is_k_times_target() -> None:
    assert CFG.max_concurrency == 16
    assert PacerConfig(buffer_size=3, target_staleness=0.5, deadline_s=1).max_concurrency == 2


def test_admits_below_cap_and_defers_at_cap() -> None:
    assert decide(CFG, active=15, waiting=0, expected_task_s=40, fastest_task_s=40) == Admit()
    outcome = decide(CFG, active=16, waiting=0, expected_task_s=40, fastest_task_s=40)
    assert isinstance(outcome, Defer)
    assert outcome.retry_after_s == pytest.approx(40 / 16)


def test_class_beyond_deadline_is_never_admitted() -> None:
    outcome = decide(CFG, active=0, waiting=0, expected_task_s=900, fastest_task_s=40)
    assert isinstance(outcome, Defer)
    assert outcome.retry_after_s == CFG.retry_after_max_s
    assert "deadline" in outcome.reason


@given(
    active=st.integers(min_value=0, max_value=10_000),
    task=st.floats(min_value=1, max_value=599),
    fastest=st.floats(min_value=1, max_value=599),
)
def test_concurrency_never_exceeds_cap(active: int, task: float, fastest: float) -> None:
    outcome = decide(CFG, active=active, waiting=0, expected_task_s=task, fastest_task_s=fastest)
    if active >= CFG.max_concurrency:
        assert isinstance(outcome, Defer)
        assert CFG.retry_after_min_s <= outcome.retry_after_s <= CFG.retry_after_max_s
    else:
        assert outcome == Admit()


@given(active=st.integers(min_value=16, max_value=200))
def test_slower_class_waits_at_least_as_long(active: int) -> None:
    fast = decide(CFG, active=active, waiting=0, expected_task_s=40, fastest_task_s=40)
    slow = decide(CFG, active=active, waiting=0, expected_task_s=120, fastest_task_s=40)
    assert isinstance(fast, Defer) and isinstance(slow, Defer)
    assert slow.retry_after_s >= fast.retry_after_s


def test_the_retry_after_grows_with_the_devices_already_waiting() -> None:
    # A slot frees every 40 / 16 = 2.5 s; the 11th in line comes back after 10 turns.
    first = decide(CFG, active=16, waiting=0, expected_task_s=40, fastest_task_s=40)
    eleventh = decide(CFG, active=16, waiting=10, expected_task_s=40, fastest_task_s=40)
    assert isinstance(first, Defer) and isinstance(eleventh, Defer)
    assert first.queued and eleventh.queued
    assert eleventh.retry_after_s == pytest.approx(11 * 2.5)
    assert "10 waiting" in eleventh.reason
    # Devices over the cap (a lowered cap, a race between replicas) are in line too.
    over = decide(CFG, active=20, waiting=0, expected_task_s=40, fastest_task_s=40)
    assert isinstance(over, Defer) and over.retry_after_s == pytest.approx(5 * 2.5)
    # A class that cannot meet the deadline waits for no slot: it joins no queue.
    never = decide(CFG, active=0, waiting=10, expected_task_s=900, fastest_task_s=40)
    assert isinstance(never, Defer) and not never.queued


@given(
    queued=st.integers(min_value=1, max_value=2000),
    task=st.floats(min_value=1, max_value=599),
    cap_k=st.integers(min_value=1, max_value=64),
)
def test_a_queue_of_any_size_comes_back_no_faster_than_slots_free(
    queued: int, task: float, cap_k: int
) -> None:
    # `queued` devices meet a full cap one after another at time 0, each counted by the
    # next. However many there are, no more of them are back by time t than the slots
    # freed by then (t × cap / task) plus the ones held at the minimum retry-after: a
    # large fleet does not poll hot, and none is told to wait past the maximum.
    cfg = PacerConfig(
        buffer_size=cap_k, target_staleness=1.0, deadline_s=600.0, retry_after_max_s=1e9
    )
    cap = cfg.max_concurrency
    retries = []
    for waiting in range(queued):
        outcome = decide(
            cfg, active=cap, waiting=waiting, expected_task_s=task, fastest_task_s=task
        )
        assert isinstance(outcome, Defer)
        retries.append(outcome.retry_after_s)
    assert retries == sorted(retries)
    at_min = sum(r == cfg.retry_after_min_s for r in retries)
    for t in retries:
        back = bisect.bisect_right(retries, t)
        assert back <= max(at_min, math.floor(t * cap / task * (1 + 1e-9)))
    default_max = PacerConfig(buffer_size=cap_k, target_staleness=1.0, deadline_s=600.0)
    capped = decide(
        default_max, active=cap, waiting=queued, expected_task_s=task, fastest_task_s=task
    )
    assert isinstance(capped, Defer) and capped.retry_after_s <= 300.0


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="^buffer_size:"):
        PacerConfig(buffer_size=0, target_staleness=1, deadline_s=1)
    with pytest.raises(ValueError, match="^active:"):
        decide(CFG, active=-1, waiting=0, expected_task_s=1, fastest_task_s=1)
    with pytest.raises(ValueError, match="^waiting:"):
        decide(CFG, active=0, waiting=-1, expected_task_s=1, fastest_task_s=1)
