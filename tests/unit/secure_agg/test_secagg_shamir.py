"""Shamir sharing: exact-t reconstruction, and interpolation through any t points."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg import shamir
from secure_agg.constants import FIELD_PRIME, SECRET_CHUNKS


@settings(max_examples=40, deadline=None)
@given(holders=st.integers(1, 12), data=st.data())
def test_any_t_shares_rebuild_every_secret(holders: int, data: st.DataObject) -> None:
    # Prepare
    t = data.draw(st.integers(1, holders))
    secrets = [os.urandom(32), os.urandom(32)]
    xs = list(range(1, holders + 1))
    shares = shamir.split(secrets, xs=xs, threshold=t)  # (H, 2, 9)
    subset = sorted(data.draw(st.permutations(range(holders)))[:t])
    # Execute
    values = shamir.reconstruct(shares[subset], xs=[xs[i] for i in subset])
    # Assert
    assert [shamir.field_to_secret(v) for v in values.tolist()] == secrets


def test_reconstruct_interpolates_through_any_t_points() -> None:
    # Prepare: t - 1 real shares of one secret.
    t = 4
    secret = os.urandom(32)
    xs = [3, 5, 9, 11, 12]
    shares = shamir.split([secret], xs=xs, threshold=t)[:, 0, :]  # (H, 9)
    seen_x, seen = xs[: t - 1], shares[: t - 1]
    # Execute / Assert: reconstruct from the t - 1 shares plus one point of the degree < t
    # polynomial through them and (0, candidate) returns the candidate, for any candidate:
    # reconstruct is exact Lagrange interpolation through whichever t points it is given.
    for candidate in (bytes(32), b"\xff" * 32, os.urandom(32), secret):
        assert _secret_through(candidate, seen_x, seen, t) == candidate


def _secret_through(candidate: bytes, xs: list[int], shares: np.ndarray, t: int) -> bytes:
    """Build the polynomial through (0, candidate) and the shares, read it back at 0."""
    p = FIELD_PRIME
    target = shamir.secret_to_field(candidate)
    # Value of that polynomial at a fresh point x* = 1000, by Lagrange over (0, xs).
    nodes = [0, *xs]
    fresh = 1000
    at_fresh = []
    for chunk in range(SECRET_CHUNKS):
        ys = [target[chunk], *[int(v) for v in shares[:, chunk]]]
        total = 0
        for j, (xj, yj) in enumerate(zip(nodes, ys, strict=True)):
            num, den = 1, 1
            for m, xm in enumerate(nodes):
                if m != j:
                    num = num * (fresh - xm) % p
                    den = den * (xj - xm) % p
            total = (total + yj * num * pow(den, p - 2, p)) % p
        at_fresh.append(total)
    # Reconstruct at 0 from the t - 1 real shares plus the fresh point: must give the candidate.
    stacked = np.vstack([shares, np.array(at_fresh, dtype=np.uint64)])
    rebuilt = shamir.reconstruct(stacked, xs=[*xs, fresh])
    assert len(xs) + 1 == t
    return shamir.field_to_secret(rebuilt.tolist())


def test_fewer_than_t_shares_do_not_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split([secret], xs=[1, 2, 3, 4], threshold=3)[:, 0, :]
    rebuilt = shamir.reconstruct(shares[:2], xs=[1, 2])
    try:
        decoded = shamir.field_to_secret(rebuilt.tolist())
    except ValueError:
        decoded = None  # the wrong interpolation does not even fit in 256 bits
    assert decoded != secret


def test_split_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="threshold"):
        shamir.split([bytes(32)], xs=[1, 2], threshold=3)
    with pytest.raises(ValueError, match="xs"):
        shamir.split([bytes(32)], xs=[1, 1], threshold=1)
    with pytest.raises(ValueError, match="xs"):
        shamir.split([bytes(32)], xs=[0, 1], threshold=1)


def test_lagrange_coefficients_are_cached_and_sum_to_one() -> None:
    xs = tuple(range(1, 8))
    first = shamir.lagrange_at_zero(xs)
    assert shamir.lagrange_at_zero(xs) is first
    # Interpolating the constant polynomial 1 gives Σ λ_j = 1.
    assert sum(first) % FIELD_PRIME == 1


def test_secret_encoding_round_trips_and_rejects_out_of_range() -> None:
    for secret in (bytes(32), b"\xff" * 32, os.urandom(32)):
        chunks = shamir.secret_to_field(secret)
        assert len(chunks) == SECRET_CHUNKS and max(chunks) < FIELD_PRIME
        assert shamir.field_to_secret(chunks) == secret
    with pytest.raises(ValueError):
        shamir.field_to_secret([0] * 8 + [1 << 29])  # bit 269 set: more than 256 bits


def test_shares_of_independent_secrets_are_independent() -> None:
    shares = shamir.split([bytes(32), bytes(32)], xs=[1, 2, 3], threshold=2)
    # Same secret twice, fresh polynomials: the shares differ (probability 1 - 2^-279 of this).
    assert shares.shape == (3, 2, SECRET_CHUNKS)
    assert not np.array_equal(shares[:, 0, :], shares[:, 1, :])
