"""Shamir secret sharing of 32-byte secrets over GF(2^31 - 1), vectorised with numpy.

A 256-bit secret is cut into nine 30-bit chunks; each chunk gets its own random polynomial of
degree t - 1 with coefficients drawn from ``os.urandom`` (never from a numpy generator). The
share of holder x is the vector of the nine polynomials evaluated at x. Reconstruction uses
exactly t shares and Lagrange coefficients at zero, cached per set of x-coordinates because a
server reconstructs hundreds of secrets from the same responders.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from secure_agg.constants import FIELD_PRIME, SECRET_CHUNK_BITS, SECRET_CHUNKS, SEED_BYTES

U64Array = npt.NDArray[np.uint64]

_PRIME = np.uint64(FIELD_PRIME)
_CHUNK_MASK = (1 << SECRET_CHUNK_BITS) - 1
_LAGRANGE_CACHE_SIZE = 4096
"""Distinct responder sets remembered; a SecAgg+ server sees one per neighbourhood (≤ n)."""


def secret_to_field(secret: bytes) -> list[int]:
    """Cut a 32-byte secret into nine 30-bit field elements (little-endian order)."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"secret must be {SEED_BYTES} bytes, got {len(secret)}")
    value = int.from_bytes(secret, "little")
    return [(value >> (SECRET_CHUNK_BITS * i)) & _CHUNK_MASK for i in range(SECRET_CHUNKS)]


def field_to_secret(chunks: Sequence[int]) -> bytes:
    """Inverse of :func:`secret_to_field`.

    Raises
    ------
    ValueError
        If a chunk is out of range or the value needs more than 256 bits (a wrong reconstruction).
    """
    value = 0
    for i, chunk in enumerate(chunks):
        if not 0 <= chunk <= _CHUNK_MASK:
            raise ValueError("reconstructed chunk out of range")
        value |= int(chunk) << (SECRET_CHUNK_BITS * i)
    if value >> (8 * SEED_BYTES):
        raise ValueError("reconstructed secret exceeds 256 bits")
    return value.to_bytes(SEED_BYTES, "little")


def random_field(shape: tuple[int, ...]) -> U64Array:
    """Uniform field elements from the OS CSPRNG (64 random bits reduced mod p: bias < 2^-33)."""
    count = int(np.prod(shape))
    raw = np.frombuffer(os.urandom(8 * count), dtype="<u8").astype(np.uint64)
    return (raw % _PRIME).reshape(shape)


def split(secrets: Sequence[bytes], *, xs: Sequence[int], threshold: int) -> U64Array:
    """Share several 32-byte secrets among holders at x-coordinates ``xs``.

    Parameters
    ----------
    secrets
        The secrets, shared independently (a holder may later reveal one without the other).
    xs
        Distinct non-zero x-coordinates of the holders, each below the prime.
    threshold
        t: any t shares reconstruct a secret, any t - 1 reveal nothing about it.

    Returns
    -------
    numpy.ndarray
        uint64 array of shape (len(xs), len(secrets), 9): holder, secret, chunk.
    """
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < FIELD_PRIME for x in xs):
        raise ValueError("xs must be distinct and in [1, p)")
    constant = np.array([secret_to_field(s) for s in secrets], dtype=np.uint64)  # (S, 9)
    coeffs = random_field((threshold - 1, len(secrets), SECRET_CHUNKS))  # (t-1, S, 9)
    x = np.asarray(xs, dtype=np.uint64).reshape(-1, 1, 1)  # (H, 1, 1)
    acc = np.zeros((len(xs), len(secrets), SECRET_CHUNKS), dtype=np.uint64)  # (H, S, 9)
    # Horner from the highest coefficient down; every intermediate stays below p^2 < 2^62.
    for k in range(threshold - 2, -1, -1):
        acc = (acc * x + coeffs[k]) % _PRIME
    return (acc * x + constant) % _PRIME


@functools.lru_cache(maxsize=_LAGRANGE_CACHE_SIZE)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients λ_j with f(0) = Σ λ_j f(x_j), for distinct non-zero xs."""
    p = FIELD_PRIME
    product = 1
    for x in xs:
        product = product * x % p
    out = []
    for j, xj in enumerate(xs):
        denominator = xj
        for m, xm in enumerate(xs):
            if m != j:
                denominator = denominator * (xm - xj) % p
        out.append(product * pow(denominator, p - 2, p) % p)
    return tuple(out)


def reconstruct(shares: U64Array, *, xs: Sequence[int]) -> U64Array:
    """Interpolate at zero from exactly t shares.

    Parameters
    ----------
    shares
        uint64 array of shape (t, ...): the shares of holders ``xs`` (any trailing shape, e.g.
        several secrets × 9 chunks that were shared with the same holders).
    xs
        The t distinct x-coordinates, in the same order as ``shares``.

    Returns
    -------
    numpy.ndarray
        The field elements at zero, shape ``shares.shape[1:]``.
    """
    if shares.shape[0] != len(xs):
        raise ValueError(f"{shares.shape[0]} shares for {len(xs)} x-coordinates")
    if len(set(xs)) != len(xs):
        raise ValueError("xs must be distinct")
    lambdas = lagrange_at_zero(tuple(int(x) for x in xs))
    acc = np.zeros(shares.shape[1:], dtype=np.uint64)
    for lam, share in zip(lambdas, shares, strict=True):
        acc = (acc + np.uint64(lam) * share) % _PRIME
    return acc
