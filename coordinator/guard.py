"""The regression guard: a committed version that scores worse than the best so far is undone.

Every committed version is evaluated by a cloud worker on held-out data; the worker
writes the score (bits per byte, lower is better) into the version record as
``eval_bpb``. The guard compares each scored version, in version order, with the best
score seen so far on the current lineage. A score more than ``tolerance`` bits/byte
above the best is a regression: the ledger then commits a **rollback**, a new version
number whose adapter is the best version's (the same blob), and marks every version
after the best as *abandoned*. Buffered sums trained on an abandoned version are never
folded into a later version, and devices are handed the rollback version from then on.

The guard keeps no state of its own. Its state (:class:`GuardState`) travels in the
head record, written with every commit under the aggregator lease, so any replica that
reads the same head and the same version records reaches the same verdict, and a
replica whose lease was superseded cannot roll back (its fenced write is refused).

:func:`review` is a pure function of that state and the scores read since; the ledger
(:mod:`coordinator.versions`) calls it at the start of each commit attempt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["GuardState", "Verdict", "review"]


@dataclass(frozen=True)
class GuardState:
    """What the guard knows, as of the head it was written with.

    Attributes
    ----------
    best_version
        Version with the lowest score on the current lineage; -1 before any score.
    best_bpb
        Its score, bits/byte (``inf`` before any score).
    best_sha256
        Its adapter blob digest ("" before any score).
    reviewed
        Newest version whose score (or lack of one) no longer matters: versions up to it
        are never read again. -1 at the start.
    abandoned
        Closed ranges ``(first, last)`` of versions rolled back; work trained on them is
        dropped.
    """

    best_version: int = -1
    best_bpb: float = float("inf")
    best_sha256: str = ""
    reviewed: int = -1
    abandoned: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def is_abandoned(self, version: int) -> bool:
        """Whether ``version`` lies in a rolled-back range."""
        return any(first <= version <= last for first, last in self.abandoned)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form stored in the head record."""
        return {
            "best_version": self.best_version,
            "best_bpb": None if self.best_version < 0 else self.best_bpb,
            "best_sha256": self.best_sha256,
            "reviewed": self.reviewed,
            "abandoned": [list(r) for r in self.abandoned],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> GuardState:
        """Parse :meth:`to_json`'s output; ``None`` (a head written before the guard): start."""
        if obj is None:
            return cls()
        best = int(obj["best_version"])
        return cls(
            best_version=best,
            best_bpb=float("inf") if best < 0 else float(obj["best_bpb"]),
            best_sha256=str(obj["best_sha256"]),
            reviewed=int(obj["reviewed"]),
            abandoned=tuple((int(a), int(b)) for a, b in obj["abandoned"]),
        )


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`review`.

    Attributes
    ----------
    state
        The guard state to write with the next commit.
    regressed
        The version that regressed beyond the tolerance, or ``None``: no rollback.
    regressed_bpb
        Its score (``nan`` without a regression).
    """

    state: GuardState
    regressed: int | None = None
    regressed_bpb: float = float("nan")

    def reason(self, tolerance: float) -> str:
        """Say why a rollback is made (for the log and the rollback's version record)."""
        s = self.state
        return (
            f"version {self.regressed} scored {self.regressed_bpb:.4f} bits/byte, more than "
            f"{tolerance} above the best so far (version {s.best_version}: {s.best_bpb:.4f})"
        )


def review(
    state: GuardState,
    scored: Mapping[int, tuple[float, str]],
    *,
    head: int,
    tolerance: float,
) -> Verdict:
    """Review the versions after ``state.reviewed`` up to ``head`` in version order.

    Parameters
    ----------
    state
        The guard state from the head record.
    scored
        ``version → (eval_bpb, adapter_sha256)`` for the versions in
        ``(state.reviewed, head]`` evaluated so far; versions not yet evaluated are absent.
    head
        The head version.
    tolerance
        A score more than this many bits/byte above the best is a regression; ≥ 0.

    Returns
    -------
    Verdict
        With ``regressed`` set, the state already records the rollback: the versions
        after the best up to ``head`` are abandoned and everything up to ``head`` is
        reviewed. The caller commits version ``head + 1`` with ``state.best_sha256``.

    Raises
    ------
    ValueError
        If ``tolerance`` is negative or not finite, or a score is not finite.
    """
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance: must be a finite number >= 0, got {tolerance}")
    best = state
    for version in range(state.reviewed + 1, head + 1):
        if version not in scored or state.is_abandoned(version):
            continue  # not evaluated yet: its score counts when it comes, unless a newer one did
        score, sha = scored[version]
        if not math.isfinite(score):
            raise ValueError(f"scored: version {version} has a non-finite score {score}")
        if best.best_version >= 0 and score > best.best_bpb + tolerance:
            settled = replace(
                best,
                reviewed=head,
                abandoned=(*state.abandoned, (best.best_version + 1, head)),
            )
            return Verdict(settled, regressed=version, regressed_bpb=score)
        if score < best.best_bpb:
            best = replace(best, best_version=version, best_bpb=score, best_sha256=sha)
        # Everything up to a scored version is settled: an older version's evaluation is
        # skipped once a newer one has started (estuary.jobs), and had it come late it
        # would judge a model this newer score has already judged.
        best = replace(best, reviewed=version)
    return Verdict(best)
