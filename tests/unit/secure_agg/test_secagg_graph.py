"""Neighbour graphs and the choice of k and t."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg.graph import (
    _log2_binom_tail_ge,
    choose_neighbours,
    choose_threshold,
    harary_neighbours,
)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 60), data=st.data())
def test_harary_graph_is_k_regular_and_symmetric(n: int, data: st.DataObject) -> None:
    k = data.draw(st.sampled_from([x for x in range(2, n - 1, 2)] or [2]))
    ids = list(range(100, 100 + n))
    graph = harary_neighbours(ids, k=k, session=b"s" * 32)
    expected_degree = min(k, n - 1)
    assert all(len(v) == expected_degree for v in graph.values())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)
    assert all(u not in vs for u, vs in graph.items())


def test_graph_is_a_function_of_the_session() -> None:
    ids = list(range(30))
    a = harary_neighbours(ids, k=4, session=b"a" * 32)
    assert a == harary_neighbours(list(reversed(ids)), k=4, session=b"a" * 32)
    assert a != harary_neighbours(ids, k=4, session=b"b" * 32)


def test_complete_graph_without_k() -> None:
    graph = harary_neighbours([1, 2, 3], k=None, session=b"")
    assert graph == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}


def test_odd_k_is_refused() -> None:
    with pytest.raises(ValueError, match="k"):
        harary_neighbours(list(range(10)), k=3, session=b"")


def test_threshold_bounds() -> None:
    # Passive: t > γn = 20 alone would allow t = 21, but two disjoint sets of 21 unmask
    # answers (one for a peer's seed, one for its key) exist: more than half is the floor.
    assert choose_threshold(100, dropout=0.3, corrupt=0.2) == 51
    assert choose_threshold(100, dropout=0.3, corrupt=0.6) == 61
    assert choose_threshold(100, dropout=0.3, corrupt=0.2, active=True) == 61
    with pytest.raises(ValueError, match="no threshold"):
        choose_threshold(100, dropout=0.5, corrupt=0.5)


def _meets(n: int, k: int, t: int, *, dropout: float, corrupt: float) -> bool:
    """Both SecAgg+ bounds (defaults σ = 40, η = 20), union-bounded over n neighbourhoods."""
    union = math.log2(n)
    holders = k + 1
    fail = _log2_binom_tail_ge(holders, dropout, holders - t + 1) + union
    leak = _log2_binom_tail_ge(holders, corrupt, t) + union
    return fail <= -20 and leak <= -40


def test_neighbours_meet_the_requested_probabilities() -> None:
    k, t = choose_neighbours(1000, dropout=0.1, corrupt=0.1)
    assert k % 2 == 0 and k < 999
    assert 1 <= t <= k + 1
    # P[fewer than t of the k + 1 holders survive] ≤ 2^-20, P[t or more collude] ≤ 2^-40.
    assert _meets(1000, k, t, dropout=0.1, corrupt=0.1)
    # And k is the smallest even degree for which some t meets both bounds.
    assert not any(_meets(1000, k - 2, u, dropout=0.1, corrupt=0.1) for u in range(1, k))
    # Smaller than the complete graph by a wide margin, as SecAgg+ promises (O(log n)).
    assert k <= 200


def test_neighbourhood_threshold_is_a_majority_of_its_holders() -> None:
    # Few colluders: t = 14 of 49 holders would meet both bounds at k = 48, but two disjoint
    # sets of 14 answers could then reveal both secrets of one client.
    k, t = choose_neighbours(1000, dropout=0.3, corrupt=0.01)
    assert 2 * t > k + 1
    assert _meets(1000, k, t, dropout=0.3, corrupt=0.01)
    assert not any(_meets(1000, k - 2, u, dropout=0.3, corrupt=0.01) for u in range(k // 2 + 1, k))
