"""Session parameters and update values that would reveal inputs or silently corrupt them.

Each is refused up front with an error that names what was wrong: a session of fewer than
three clients, a threshold that two disjoint sets of unmask answers could both reach, and an
update that is not real and finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from secagg_harness import Harness

from secure_agg import FixedPoint, Server, SessionConfig, Stage, run_local
from secure_agg.messages import MaskedInput
from secure_agg.numerics import clip_update

FP = FixedPoint(bits=24, frac_bits=8, clip=1.0)


def _config(
    n: int, t: int, *, neighbours: int | None = None, active: bool = False
) -> SessionConfig:
    return SessionConfig(
        cohort=b"c",
        cohort_size=n,
        threshold=t,
        tensors=(("u", 4),),
        fixed_point=FP,
        neighbours=neighbours,
        active=active,
    )


@pytest.mark.parametrize("n", [1, 2])
def test_a_session_of_fewer_than_three_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match=rf"cohort_size must be >= 3, got {n}"):
        _config(n, n)


@pytest.mark.parametrize("n", [1, 2])
def test_run_local_refuses_to_reveal_a_lone_input(n: int) -> None:
    # Before: n = 1 completed and its "sum" was the client's own input.
    inputs = [np.full(3, 0.25)] * n
    with pytest.raises(ValueError, match="cohort_size"):
        run_local(inputs, threshold=n, clip=1.0, bits=24, seed=0)


def test_server_refuses_fewer_than_three_members() -> None:
    with pytest.raises(ValueError, match="members lists 2 ids; a session needs at least 3"):
        Server(_config(3, 2), members=[0, 1])


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize(
    ("n", "t", "k", "holders"),
    [(3, 1, None, 3), (4, 2, None, 4), (5, 2, None, 5), (100, 50, None, 100), (10, 2, 4, 5)],
)
def test_threshold_of_at_most_half_the_holders_is_refused(
    n: int, t: int, k: int | None, holders: int, active: bool
) -> None:
    with pytest.raises(ValueError, match=rf"half of the {holders} share holders.*got {t}"):
        _config(n, t, neighbours=k, active=active)


@pytest.mark.parametrize(("n", "t", "k"), [(3, 2, None), (4, 3, None), (5, 3, None), (10, 3, 4)])
def test_a_majority_threshold_is_accepted(n: int, t: int, k: int | None) -> None:
    config = _config(n, t, neighbours=k)
    assert 2 * config.threshold > config.share_holders


def test_share_holders_is_the_closed_neighbourhood() -> None:
    assert _config(10, 6).share_holders == 10
    assert _config(10, 3, neighbours=4).share_holders == 5
    assert _config(5, 3, neighbours=4).share_holders == 5  # k = n - 1: the complete graph


def _past_relay(h: Harness) -> None:
    relays = h.step(h.step_advertise())
    h.clients[0].handle(relays[0].encode())


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (np.array([0.1, 0.2, 0.3, 0.4]) + 0.5j, "dtype complex128: only real numbers"),
        (np.array([0.1, "x", 0.3, 0.4], dtype=object), "dtype object: only real numbers"),
        (np.array(["1", "2", "3", "4"]), "dtype <U1: only real numbers"),
        (np.array([0.1, np.nan, 0.3, 0.4]), "non-finite values"),
        (np.array([0.1, -np.inf, 0.3, 0.4]), "non-finite values"),
    ],
)
def test_client_refuses_an_update_that_is_not_real_and_finite(
    harness: Callable[..., Harness], value: npt.NDArray[np.generic], words: str
) -> None:
    # Before: the complex update was masked with its imaginary part silently dropped.
    h = harness(n=4, t=3, m=4)
    _past_relay(h)
    client = h.clients[0]
    with pytest.raises(ValueError, match=rf"update tensor 'update' has {words}"):
        client.submit(value, rng=np.random.default_rng(0))
    # Nothing was masked; the member can still send a proper update.
    assert client.stage is Stage.MASKED_INPUT
    assert isinstance(client.submit(h.updates[0], rng=np.random.default_rng(0)), MaskedInput)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_huge_finite_update_is_clipped_not_zeroed(per_tensor: bool) -> None:
    # Squares beyond 1e308 overflow: the clip factor clip / inf used to zero the update.
    update = {"a": np.array([3e200, -4e200]), "b": np.array([0.0])}
    clipped = clip_update(update, clip=2.0, per_tensor=per_tensor)
    assert clipped["a"].tolist() == pytest.approx([1.2, -1.6])
    assert math.isclose(float(np.sqrt(np.sum(clipped["a"] ** 2))), 2.0)
    assert clipped["b"].tolist() == [0.0]


def test_integer_and_bool_updates_are_real() -> None:
    update = {"i": np.array([3, 4], dtype=np.int16), "b": np.array([True, False])}
    clipped = clip_update(update, clip=10.0, per_tensor=False)
    assert clipped["i"].tolist() == [3.0, 4.0] and clipped["b"].tolist() == [1.0, 0.0]
