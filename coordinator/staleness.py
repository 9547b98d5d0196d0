"""Staleness weighting: how much an update trained on an old version still counts.

An update computed from version ``v`` arriving when the current version is ``c`` has
staleness ``s = c - v``. The coordinator tells the device its weight ``w = f(s)``
before the masked upload; the device scales its clipped update by ``w`` and the
secure sum yields ``Σ w_i ΔB_i``. Since the coordinator chose every ``w_i`` it also
knows ``Σ w_i`` over the survivors, so the new version is ``B + η · Σ w ΔB / Σ w``.

Functions (Xie et al., "Asynchronous Federated Optimization", 2019):

- ``constant``: ``f(s) = 1``.
- ``polynomial``: ``f(s) = (1 + s)^-a``.
- ``hinge``: ``f(s) = 1`` for ``s ≤ b``, else ``1 / (a·(s − b) + 1)``.

Every ``f`` maps ``s = 0`` to 1, never increases with ``s`` and stays in ``(0, 1]``,
which is what the secure-aggregation bit budget assumes (``w ≤ 1``).

When a version is committed, each cohort counts with :meth:`StalenessPolicy.commit_weight`
of the staleness it lands with: ``f(s)`` capped at :func:`stable_gain` ``(s)``, the
largest weight at which updates that are all ``s`` versions late cannot make the
iteration grow (see :func:`stable_gain`). With the default polynomial ``a = 0.5`` the
cap changes nothing up to ``s = 2`` (the pacer's default target) and cuts the weight
from 0.33 to 0.18 at ``s = 8``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

StalenessKind = Literal["constant", "polynomial", "hinge"]


def stable_gain(staleness: int) -> float:
    """Return the largest weight, ≤ 1, at which updates ``staleness`` versions late stay stable.

    The worst case for a delayed update is every update of every version landing ``s``
    versions late and moving ``B`` all the way to its target: then, with ``x`` the
    distance to the target, ``x_{v+1} = x_v − g · x_{v−s}``, which is stable exactly for
    ``0 < g < 2 sin(π / (2(2s+1)))`` (the roots of ``z^{s+1} − z^s + g`` stay inside the
    unit circle). That bound is 2 at ``s = 0``, 1 at ``s = 1``, 0.62 at 2, 0.35 at 4 and
    0.18 at 8. Real local training moves only part of the way, so the bound itself,
    capped at 1, is the ceiling (issue 15 measured growth without bound at ``s ≈ 8`` with
    the weight cancelled to 1).

    Raises
    ------
    ValueError
        If ``staleness`` is negative.
    """
    if staleness < 0:
        raise ValueError(f"staleness: must be >= 0, got {staleness}")
    return min(1.0, 2.0 * math.sin(math.pi / (2 * (2 * staleness + 1))))


class StaleUpdate(ValueError):
    """An update is more versions behind than the configured maximum, or from the future."""


@dataclass(frozen=True)
class StalenessPolicy:
    """A weighting function and the staleness beyond which work is refused.

    Parameters
    ----------
    kind
        ``"constant"``, ``"polynomial"`` or ``"hinge"``.
    a
        Exponent (polynomial) or slope (hinge); ≥ 0.
    b
        Hinge knee in versions; ≥ 0. Ignored by the other kinds.
    max_staleness
        Largest accepted staleness, in versions; 0 accepts only up-to-date work.
    """

    kind: StalenessKind = "polynomial"
    a: float = 0.5
    b: int = 4
    max_staleness: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "polynomial", "hinge"):
            raise ValueError(f"kind: {self.kind!r} is not constant, polynomial or hinge")
        if not self.a >= 0:  # also catches NaN
            raise ValueError(f"a: must be >= 0, got {self.a}")
        if self.b < 0:
            raise ValueError(f"b: must be >= 0, got {self.b}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {self.max_staleness}")

    def staleness(self, *, trained_on: int, current: int) -> int:
        """Return ``current - trained_on`` after checking it is acceptable.

        Raises
        ------
        StaleUpdate
            If the update is from a version newer than ``current`` (a client bug or a
            forged task) or more than ``max_staleness`` versions old.
        """
        s = current - trained_on
        if s < 0:
            raise StaleUpdate(
                f"update trained on version {trained_on} is newer than the current {current}"
            )
        if s > self.max_staleness:
            raise StaleUpdate(
                f"update is {s} versions stale (trained on {trained_on}, current {current}); "
                f"the limit is {self.max_staleness}"
            )
        return s

    def weight(self, staleness: int) -> float:
        """Return ``f(staleness)`` in ``(0, 1]``.

        Raises
        ------
        ValueError
            If ``staleness`` is negative.
        """
        if staleness < 0:
            raise ValueError(f"staleness: must be >= 0, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + staleness) ** -self.a)
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)

    def commit_weight(self, staleness: int) -> float:
        """Return ``min(f(staleness), stable_gain(staleness))``: a cohort's weight at commit.

        Raises
        ------
        ValueError
            If ``staleness`` is negative.
        """
        return min(self.weight(staleness), stable_gain(staleness))
