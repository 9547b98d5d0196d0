from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.pacing import Admit, Defer, PacerConfig, decide

CFG = PacerConfig(buffer_size=8, target_staleness=2.0, deadline_s=600.0)


def test_cap_is_k_times_target() -> None:
    assert CFG.max_concurrency == 16
    assert PacerConfig(buffer_size=3, target_staleness=0.5, deadline_s=1).max_concurrency == 2


def test_admits_below_cap_and_defers_at_cap() -> None:
    assert decide(CFG, active=15, expected_task_s=40, fastest_task_s=40) == Admit()
    outcome = decide(CFG, active=16, expected_task_s=40, fastest_task_s=40)
    assert isinstance(outcome, Defer)
    assert outcome.retry_after_s == pytest.approx(40 / 16)


def test_class_beyond_deadline_is_never_admitted() -> None:
    outcome = decide(CFG, active=0, expected_task_s=900, fastest_task_s=40)
    assert isinstance(outcome, Defer)
    assert outcome.retry_after_s == CFG.retry_after_max_s
    assert "deadline" in outcome.reason


@given(
    active=st.integers(min_value=0, max_value=10_000),
    task=st.floats(min_value=1, max_value=599),
    fastest=st.floats(min_value=1, max_value=599),
)
def test_concurrency_never_exceeds_cap(active: int, task: float, fastest: float) -> None:
    outcome = decide(CFG, active=active, expected_task_s=task, fastest_task_s=fastest)
    if active >= CFG.max_concurrency:
        assert isinstance(outcome, Defer)
        assert CFG.retry_after_min_s <= outcome.retry_after_s <= CFG.retry_after_max_s
    else:
        assert outcome == Admit()


@given(active=st.integers(min_value=16, max_value=200))
def test_slower_class_waits_at_least_as_long(active: int) -> None:
    fast = decide(CFG, active=active, expected_task_s=40, fastest_task_s=40)
    slow = decide(CFG, active=active, expected_task_s=120, fastest_task_s=40)
    assert isinstance(fast, Defer) and isinstance(slow, Defer)
    assert slow.retry_after_s >= fast.retry_after_s


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="^buffer_size:"):
        PacerConfig(buffer_size=0, target_staleness=1, deadline_s=1)
    with pytest.raises(ValueError, match="^active:"):
        decide(CFG, active=-1, expected_task_s=1, fastest_task_s=1)
