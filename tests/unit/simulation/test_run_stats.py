"""The simulation's run totals: the staleness histogram counts accepted updates only.

The coordinator hands each member its staleness weight before the member uploads
(``weight_assigned``); a member may still drop out afterwards, and a cohort may abort.
Only survivors of an accepted cohort sum (``update_accepted``) are accepted updates, so
the histogram's total must equal ``updates_accepted``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from simulation.report import MetricsLog, read_events
from simulation.run import RunStats, _SimObserver


def _observer(tmp_path: Path) -> tuple[_SimObserver, RunStats, MetricsLog]:
    stats = RunStats()
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    return _SimObserver(metrics, stats), stats, metrics


def test_histogram_counts_survivors_of_accepted_cohorts_not_weights(tmp_path: Path) -> None:
    observer, stats, metrics = _observer(tmp_path)
    # Cohort a: three members get weights, member 1 drops before uploading.
    for member, staleness in ((0, 0), (1, 2), (2, 1)):
        observer.event("weight_assigned", cohort_id="a", member=member, staleness=staleness)
    # Cohort b: two members get weights, then the cohort aborts below its threshold.
    for member in (0, 1):
        observer.event("weight_assigned", cohort_id="b", member=member, staleness=3)
    observer.event("cohort_finished", cohort_id="b", status="aborted", size=2, survivors=0)
    observer.event(
        "update_accepted", cohort_id="a", updates=2, survivors=[0, 2], weight_total=1.7, dropouts=1
    )
    observer.event("cohort_finished", cohort_id="a", status="completed", size=3, survivors=2)
    metrics.close()

    assert stats.accepted == 2
    assert stats.staleness.as_dict() == {0: 1, 1: 1}
    assert stats.staleness.total == stats.accepted
    assert stats.dropouts == 1 + 2
    assert stats.cohorts == {"aborted": 1, "completed": 1}
    # Every event still reaches the log, weights handed out included.
    kinds = [e["kind"] for e in read_events(tmp_path / "metrics.jsonl")]
    assert kinds.count("weight_assigned") == 5


@st.composite
def _runs(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    """Interleaved events of several cohorts, each accepted or aborted."""
    per_cohort: list[list[tuple[str, dict[str, Any]]]] = []
    for c in range(draw(st.integers(0, 6))):
        cohort_id = f"c{c}"
        size = draw(st.integers(1, 6))
        weighted = draw(st.lists(st.integers(0, size - 1), unique=True, max_size=size))
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "weight_assigned",
                {"cohort_id": cohort_id, "member": m, "staleness": draw(st.integers(0, 5))},
            )
            for m in weighted
        ]
        # Survivors are members that uploaded, and only a weighted member may upload.
        survivors = sorted(draw(st.sets(st.sampled_from(weighted))) if weighted else set())
        accepted = draw(st.booleans())
        if survivors and accepted:
            events.append(
                (
                    "update_accepted",
                    {
                        "cohort_id": cohort_id,
                        "updates": len(survivors),
                        "survivors": survivors,
                        "weight_total": 1.0,
                        "dropouts": size - len(survivors),
                    },
                )
            )
            status = "completed"
        else:
            status = "aborted"
        events.append(("cohort_finished", {"cohort_id": cohort_id, "status": status, "size": size}))
        per_cohort.append(events)
    # Interleave the cohorts' event streams, keeping each cohort's own order.
    merged: list[tuple[str, dict[str, Any]]] = []
    while any(per_cohort):
        pick = draw(st.sampled_from([i for i, events in enumerate(per_cohort) if events]))
        merged.append(per_cohort[pick].pop(0))
    return merged


@settings(max_examples=80, deadline=None)
@given(_runs())
def test_histogram_total_is_always_the_accepted_count(
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    stats = RunStats()
    expected: dict[int, int] = {}
    weights: dict[tuple[str, int], int] = {}
    for kind, fields in events:
        stats.observe(kind, fields)
        if kind == "weight_assigned":
            weights[(fields["cohort_id"], fields["member"])] = fields["staleness"]
        elif kind == "update_accepted":
            for m in fields["survivors"]:
                s = weights[(fields["cohort_id"], m)]
                expected[s] = expected.get(s, 0) + 1

    assert stats.staleness.total == stats.accepted
    assert stats.staleness.as_dict() == dict(sorted(expected.items()))


def test_aborted_cohorts_are_counted_by_reason(tmp_path: Path) -> None:
    observer, stats, metrics = _observer(tmp_path)
    for cohort_id, answered in (("a", 1), ("b", 2)):
        observer.event(
            "cohort_finished",
            cohort_id=cohort_id,
            status="aborted",
            size=8,
            survivors=0,
            reason=f"{answered} clients answered ADVERTISE_KEYS, threshold 6",
        )
    observer.event("cohort_finished", cohort_id="c", status="aborted", size=4, survivors=0)
    observer.event(
        "cohort_finished", cohort_id="d", status="completed", size=4, survivors=4, reason=""
    )
    metrics.close()

    # Like reasons add up whatever their numbers; a reason missing is said to be missing.
    assert stats.abort_reasons == {
        "# clients answered ADVERTISE_KEYS, threshold #": 2,
        "no reason given": 1,
    }


def test_dropped_and_folded_updates_are_counted_apart(tmp_path: Path) -> None:
    observer, stats, metrics = _observer(tmp_path)
    observer.event("weight_assigned", cohort_id="a", member=0, staleness=0)
    observer.event("weight_assigned", cohort_id="a", member=1, staleness=1)
    observer.event(
        "update_accepted", cohort_id="a", updates=2, survivors=[0, 1], weight_total=1.7, dropouts=0
    )
    observer.event("update_dropped", cohort_id="a", updates=2, trained_on=0, reason="stale")
    observer.event(
        "version_committed", version=1, updates=4, cohorts=["b", "c"], adapter_sha256="x",
        folded_staleness=[[0, 1], [2, 3]],
    )  # fmt: skip
    metrics.close()
    assert stats.accepted == 2 and stats.dropped == 2
    # Folded in, per update at the staleness its version's commit priced it at.
    assert stats.folded.as_dict() == {0: 1, 2: 3}
    kinds = [e["kind"] for e in read_events(tmp_path / "metrics.jsonl")]
    assert "update_dropped" in kinds
