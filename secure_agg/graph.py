"""Neighbour graphs and the choice of k (neighbours) and t (threshold).

Complete graph (Bonawitz et al. 2017): every client shares its secrets with, and masks against,
every other client of U1; t is global. SecAgg+ (Bell et al. 2020): a random k-regular Harary
graph; a client shares with and masks against its k neighbours only, and t applies to each
closed neighbourhood (the client and its k neighbours, k + 1 share holders).

The graph is a pure function of the session id, so every party computes the same graph and
the server cannot pick it after seeing the keys without also changing the session id.

How to choose t and k. Let n be the cohort size, δ the tolerated dropout fraction and γ the
tolerated fraction of clients that collude with the server.

- Complete graph: every holder set is the whole cohort. Correctness needs at least t
  survivors: t ≤ (1 - δ) n. Privacy needs the colluders to hold fewer than t shares:
  t > γ n. And a server can show different survivor sets to different clients (a peer alive
  to some, dropped to others); each honest client answers one request, so the answers to two
  conflicting requests must not both reach t: t > n / 2 always (:class:`SessionConfig`
  refuses less), and t > (n + γ n) / 2 with colluders, when the consistency check with
  signatures (active mode) keeps colluders from answering both.
  :func:`choose_threshold` returns the smallest admissible t, which tolerates the most dropouts.
- SecAgg+: a closed neighbourhood is the owner plus k clients drawn at random, so the number of
  surviving holders is (up to sampling without replacement, whose tails are no heavier)
  Binomial(k + 1, 1 - δ) and the number of colluding holders Binomial(k + 1, γ).
  :func:`choose_neighbours` returns the smallest even k with a t > (k + 1) / 2 (the same
  majority rule, per neighbourhood) such that, over all n neighbourhoods (union bound),
  P[survivors < t] ≤ 2^-η and P[colluders ≥ t] ≤ 2^-σ.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

from secure_agg.constants import LABEL_GRAPH, MIN_COHORT_SIZE


def harary_neighbours(
    clients: Sequence[int], *, k: int | None, session: bytes
) -> dict[int, frozenset[int]]:
    """Open neighbourhoods of a random k-regular Harary graph over ``clients``.

    Parameters
    ----------
    clients
        Distinct client ids (U1).
    k
        Even number of neighbours, or None for the complete graph. A k ≥ len(clients) - 1 is
        the complete graph too.
    session
        Session id; it seeds the permutation that places clients on the Harary cycle.

    Returns
    -------
    dict
        client → the ids it is adjacent to (never itself).
    """
    members = sorted(clients)
    everyone = frozenset(members)
    if k is None or k >= len(members) - 1:
        return {c: everyone - {c} for c in members}
    if k < 2 or k % 2:
        raise ValueError(f"k must be an even number >= 2, got {k}")
    # Random placement: order clients by a hash of (session, id). Public randomness, not secret.
    order = sorted(
        members,
        key=lambda c: hashlib.sha256(LABEL_GRAPH + session + struct.pack("<I", c)).digest(),
    )
    n = len(order)
    half = k // 2
    out: dict[int, frozenset[int]] = {}
    for position, client in enumerate(order):
        near = {order[(position + d) % n] for d in range(-half, half + 1) if d != 0}
        out[client] = frozenset(near)
    return out


def choose_threshold(n: int, *, dropout: float, corrupt: float, active: bool = False) -> int:
    """Smallest threshold t for the complete graph that keeps both guarantees.

    Raises
    ------
    ValueError
        If no t satisfies the privacy bound and (1 - dropout) · n survivors at once.
    """
    _check_fraction("dropout", dropout)
    _check_fraction("corrupt", corrupt)
    if n < MIN_COHORT_SIZE:
        raise ValueError(f"n must be >= {MIN_COHORT_SIZE}, got {n}")
    majority = n // 2 + 1  # two disjoint sets of t answers must be impossible
    lowest = (
        math.floor((n + corrupt * n) / 2) + 1
        if active
        else max(majority, math.floor(corrupt * n) + 1)
    )
    highest = math.floor((1 - dropout) * n)
    if lowest > highest:
        raise ValueError(
            f"no threshold for n={n}, dropout={dropout}, corrupt={corrupt}, active={active}: "
            f"privacy needs t >= {lowest} but only {highest} survivors are guaranteed"
        )
    return lowest


def _log2_binom_tail_ge(trials: int, p: float, at_least: int) -> float:
    """log2 P[Binomial(trials, p) ≥ at_least], exact by summation."""
    if at_least <= 0:
        return 0.0
    if at_least > trials:
        return -math.inf
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    total = 0.0
    for i in range(at_least, trials + 1):
        total += math.comb(trials, i) * p**i * (1 - p) ** (trials - i)
    return math.log2(total) if total > 0 else -math.inf


def choose_neighbours(
    n: int,
    *,
    dropout: float,
    corrupt: float,
    security_bits: int = 40,
    correctness_bits: int = 20,
) -> tuple[int, int]:
    """Smallest even k and a per-neighbourhood t for SecAgg+ (see the module docstring).

    Parameters
    ----------
    n
        Cohort size.
    dropout
        Tolerated dropout fraction δ in [0, 1).
    corrupt
        Tolerated colluding fraction γ in [0, 1).
    security_bits
        σ: failure probability of privacy at most 2^-σ over all neighbourhoods.
    correctness_bits
        η: probability that some neighbourhood cannot be unmasked at most 2^-η.

    Returns
    -------
    tuple of int
        (k, t). k = n - 1 (complete graph) when no smaller k meets the bounds.
    """
    _check_fraction("dropout", dropout)
    _check_fraction("corrupt", corrupt)
    union = math.log2(max(n, 1))
    for k in range(2, n, 2):
        holders = k + 1
        for t in range(holders // 2 + 1, holders + 1):
            fail = _log2_binom_tail_ge(holders, dropout, holders - t + 1) + union
            leak = _log2_binom_tail_ge(holders, corrupt, t) + union
            if fail <= -correctness_bits and leak <= -security_bits:
                return k, t
    return n - 1, choose_threshold(n, dropout=dropout, corrupt=corrupt)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
