from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.staleness import StalenessPolicy, StaleUpdate

policies = st.builds(
    StalenessPolicy,
    kind=st.sampled_from(["constant", "polynomial", "hinge"]),
    a=st.floats(min_value=0, max_value=5),
    b=st.integers(min_value=0, max_value=10),
    max_staleness=st.integers(min_value=0, max_value=100),
)


@given(policy=policies, s=st.integers(min_value=0, max_value=99))
def test_weight_in_unit_interval_and_non_increasing(policy: StalenessPolicy, s: int) -> None:
    w, w_next = policy.weight(s), policy.weight(s + 1)
    assert 0 < w <= 1
    assert w_next <= w
    assert policy.weight(0) == 1.0


@pytest.mark.parametrize(
    ("kind", "s", "expected"),
    [
        ("constant", 7, 1.0),
        ("polynomial", 3, 0.5),  # (1+3)^-0.5
        ("hinge", 4, 1.0),  # at the knee b=4
        ("hinge", 6, 1.0 / (0.5 * 2 + 1)),
    ],
)
def test_known_values(kind: str, s: int, expected: float) -> None:
    policy = StalenessPolicy(kind=kind, a=0.5, b=4)  # type: ignore[arg-type]
    assert policy.weight(s) == pytest.approx(expected)


def test_staleness_bounds() -> None:
    policy = StalenessPolicy(max_staleness=3)
    assert policy.staleness(trained_on=7, current=10) == 3
    with pytest.raises(StaleUpdate, match="4 versions stale"):
        policy.staleness(trained_on=6, current=10)
    with pytest.raises(StaleUpdate, match="newer than the current"):
        policy.staleness(trained_on=11, current=10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "linear"}, "kind"),
        ({"a": -1.0}, "a"),
        ({"b": -1}, "b"),
        ({"max_staleness": -2}, "max_staleness"),
        ({"a": float("nan")}, "a"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        StalenessPolicy(**kwargs)  # type: ignore[arg-type]
