"""The regression guard (issue 15 item 1): a version scoring worse than the best is undone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from coordinator.guard import GuardState, review
from coordinator.job_submission import JOBS_SUBMITTED_PREFIX
from coordinator.metrics import CoordinatorMetrics
from coordinator.versions import REVIEW_WINDOW, VersionInfo, VersionLedger
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.clock import VirtualClock
from estuary.jobs import update_version_record
from estuary.state.base import Record
from estuary.state.blobs import BlobStore
from estuary.state.keys import HEAD_KEY, version_key
from estuary.state.memory import MemoryStore

SHAPES = {"layers.0.q_proj.lora_B": (8, 4), "layers.0.v_proj.lora_B": (8, 4)}
TOL = 0.1


def _initial() -> GlobalAdapter:
    shapes = {name: (8, 16) for name in SHAPES}
    b = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    return GlobalAdapter(config=AdapterConfig(r_max=4), shapes=shapes, b=b)


def _ledger(
    store: MemoryStore,
    blobs: BlobStore,
    *,
    holder: str = "r1",
    clock: VirtualClock | None = None,
    tolerance: float | None = TOL,
) -> VersionLedger:
    return VersionLedger(
        store,
        blobs=blobs,
        holder=holder,
        buffer_size=1,
        lease_ttl_s=10.0,
        clock=clock or VirtualClock(),
        guard_tolerance_bpb=tolerance,
    )


def _commit(ledger: VersionLedger, tag: str, value: float, trained_on: int | None = None) -> int:
    update = {n: np.full(s, value, np.float32) for n, s in SHAPES.items()}
    assert ledger.add_cohort_sum(
        tag, weighted_sum=update, weight_total=1.0, updates=1, trained_on=trained_on
    )
    info = ledger.try_commit()
    assert info is not None and info.rolled_back_to is None
    return info.version


def _score(store: MemoryStore, version: int, bpb: float) -> None:
    """What the worker's evaluate job does (cloud_workers.executor)."""
    update_version_record(store, version, {"eval_bpb": bpb}, stamp="eval_at")


def _record(store: MemoryStore, version: int) -> dict[str, object]:
    rec = store.get(version_key(version))
    assert rec is not None
    out: dict[str, object] = json.loads(rec.value)
    return out


def _regressed_federation(
    tmp_path: Path, clock: VirtualClock | None = None
) -> tuple[MemoryStore, BlobStore, VersionLedger]:
    """Versions 0-4 scored 3.24, 3.22 (best), 3.25, 3.30 (noise within 0.1), 3.40."""
    store = MemoryStore(clock=clock.time) if clock else MemoryStore()
    blobs = BlobStore(tmp_path / "blobs")
    ledger = _ledger(store, blobs, clock=clock)
    ledger.initialise(_initial())
    for i, bpb in enumerate([3.24, 3.22, 3.25, 3.30]):
        if i:
            _commit(ledger, f"c{i}", 0.1 * i)
        _score(store, i, bpb)
        assert ledger.try_commit() is None  # nothing buffered, nothing regressed
    _commit(ledger, "c4", 0.4)
    _score(store, 4, 3.40)
    return store, blobs, ledger


def test_a_regression_rolls_back_exactly_once_to_the_best_adapter(tmp_path: Path) -> None:
    store, blobs, ledger = _regressed_federation(tmp_path)

    rollback = ledger.try_commit()  # nothing buffered: the guard alone makes this version

    assert rollback is not None
    assert (rollback.version, rollback.rolled_back_to, rollback.updates) == (5, 1, 0)
    best = _record(store, 1)
    assert rollback.adapter_sha256 == best["adapter_sha256"]
    assert blobs.read(rollback.adapter_sha256) == blobs.read(str(best["adapter_sha256"]))
    best_b = ledger.adapter(VersionInfo(1, str(best["adapter_sha256"]), (), 0)).b
    regressed_b = ledger.adapter(VersionInfo(4, str(_record(store, 4)["adapter_sha256"]), (), 0)).b
    for name in SHAPES:
        assert ledger.adapter(rollback).b[name].tobytes() == best_b[name].tobytes()
        assert not np.array_equal(ledger.adapter(rollback).b[name], regressed_b[name])
    assert ledger.head() == rollback
    record = _record(store, 5)
    assert record["rollback_to"] == 1
    assert "version 4 scored 3.4000" in str(record["rollback_reason"])
    # Exactly once: no further rollback, before or after the rollback version is scored
    # (the same adapter scores the same).
    assert ledger.try_commit() is None
    _score(store, 5, 3.22)
    assert ledger.try_commit() is None
    assert ledger.head() == rollback


def test_the_abandoned_lineage_is_no_longer_built_on(tmp_path: Path) -> None:
    _, _, ledger = _regressed_federation(tmp_path)
    rollback = ledger.try_commit()
    assert rollback is not None and rollback.version == 5
    best_b = ledger.adapter(rollback).b

    assert [ledger.is_abandoned(v) for v in range(7)] == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    # A cohort that trained on version 3 (abandoned) arrives: dropped, never folded in.
    bad = {n: np.full(s, 9.0, np.float32) for n, s in SHAPES.items()}
    ledger.add_cohort_sum("late-bad", weighted_sum=bad, weight_total=1.0, updates=1, trained_on=3)
    assert ledger.try_commit() is None
    assert ledger.buffered_updates() == 0
    # A cohort that trained on the rollback version is folded in as usual.
    version = _commit(ledger, "good", 0.01, trained_on=5)
    assert version == 6
    head = ledger.head()
    assert head is not None
    got = ledger.adapter(head).b
    for name in SHAPES:
        np.testing.assert_allclose(got[name], best_b[name] + 0.01, rtol=1e-6)


def test_noise_within_tolerance_never_rolls_back(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger = _ledger(store, BlobStore(tmp_path / "blobs"))
    ledger.initialise(_initial())
    _score(store, 0, 3.20)
    for i, bpb in enumerate([3.29, 3.25, 3.30, 3.15, 3.24], start=1):
        _commit(ledger, f"c{i}", 0.01)
        _score(store, i, bpb)  # 3.30 is within 0.1 of 3.20; 3.24 within 0.1 of 3.15
    assert ledger.try_commit() is None
    head = ledger.head()
    assert head is not None and head.version == 5 and head.rolled_back_to is None


def test_the_guard_can_be_switched_off(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger = _ledger(store, BlobStore(tmp_path / "blobs"), tolerance=None)
    ledger.initialise(_initial())
    _score(store, 0, 3.0)
    _commit(ledger, "c1", 0.5)
    _score(store, 1, 9.0)
    assert ledger.try_commit() is None


def test_a_stale_lease_cannot_roll_back(tmp_path: Path) -> None:
    clock = VirtualClock()
    store, blobs, a = _regressed_federation(tmp_path, clock)
    stale = a._lease
    assert stale is not None
    clock.advance(60)  # a's lease expires; b takes over and commits
    b = _ledger(store, blobs, holder="r2", clock=clock)
    taken = store.acquire_lease("aggregator", holder="r2", ttl_s=10.0)
    assert taken is not None
    b._lease = taken
    head_before = store.get(HEAD_KEY)

    a._ensure_lease = lambda: stale  # type: ignore[method-assign]
    assert a.try_commit() is None

    head_after = store.get(HEAD_KEY)
    assert head_before is not None and head_after is not None
    assert head_after.value == head_before.value
    assert store.get(version_key(5)) is None
    # The replica holding the current lease makes the rollback.
    rollback = b.try_commit()
    assert rollback is not None and rollback.rolled_back_to == 1


def test_replay_on_another_replica_gives_the_same_result(tmp_path: Path) -> None:
    store_a, _, a = _regressed_federation(tmp_path / "a")
    store_b, _, b = _regressed_federation(tmp_path / "b")

    ra, rb = a.try_commit(), b.try_commit()

    assert ra is not None and rb is not None
    assert (ra.version, ra.adapter_sha256, ra.rolled_back_to) == (
        rb.version,
        rb.adapter_sha256,
        rb.rolled_back_to,
    )
    head_a, head_b = store_a.get(HEAD_KEY), store_b.get(HEAD_KEY)
    assert head_a is not None and head_b is not None and head_a.value == head_b.value


def test_a_second_replica_sharing_the_store_does_not_roll_back_again(tmp_path: Path) -> None:
    clock = VirtualClock()
    store, blobs, a = _regressed_federation(tmp_path, clock)
    assert a.try_commit() is not None
    a.release()
    b = _ledger(store, blobs, holder="r2", clock=clock)

    assert b.try_commit() is None

    head = b.head()
    assert head is not None and head.version == 5


def test_a_rollback_is_counted_in_metrics() -> None:
    metrics = CoordinatorMetrics()
    metrics.event(
        "version_committed",
        version=4,
        updates=4,
        cohorts=["c"],
        adapter_sha256="x",
        rolled_back_to=None,
    )
    metrics.event(
        "version_committed", version=5, updates=0, cohorts=[], adapter_sha256="x", rolled_back_to=1
    )
    text = generate_latest(metrics.registry).decode()
    assert "estuary_rollbacks_total 1.0" in text
    assert "estuary_versions_committed_total 2.0" in text


# --------------------------------------------------------------------------- the pure rule


@settings(max_examples=200, deadline=None)
@given(
    best=st.floats(min_value=0.5, max_value=8.0),
    offsets=st.lists(st.floats(min_value=-0.5, max_value=TOL), min_size=1, max_size=12),
)
def test_review_never_rolls_back_within_tolerance_of_the_running_best(
    best: float, offsets: list[float]
) -> None:
    scored = {0: (best, "s0")}
    running = best
    for version, offset in enumerate(offsets, start=1):
        scored[version] = (running + offset, f"s{version}")
        running = min(running, running + offset)
    verdict = review(GuardState(), scored, head=len(offsets), tolerance=TOL)
    assert verdict.regressed is None
    assert verdict.state.best_bpb == pytest.approx(min(s for s, _ in scored.values()))
    assert verdict.state.reviewed == len(offsets)


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(st.floats(min_value=2.0, max_value=4.0), min_size=1, max_size=8),
    excess=st.floats(min_value=1e-3, max_value=5.0),
    unscored_after=st.integers(min_value=0, max_value=3),
)
def test_review_rolls_back_to_the_best_on_a_regression(
    before: list[float], excess: float, unscored_after: int
) -> None:
    scored = {v: (bpb, f"s{v}") for v, bpb in enumerate(before)}
    best = min(range(len(before)), key=lambda v: (before[v], v))
    # No earlier regression: every score before is within tolerance of the best so far.
    running = before[0]
    for bpb in before:
        if bpb > running + TOL:
            return
        running = min(running, bpb)
    bad = len(before)
    scored[bad] = (before[best] + TOL + excess, "bad")
    head = bad + unscored_after

    verdict = review(GuardState(), scored, head=head, tolerance=TOL)

    assert verdict.regressed == bad
    assert verdict.state.best_version == best and verdict.state.best_sha256 == f"s{best}"
    assert verdict.state.abandoned == ((best + 1, head),)
    assert verdict.state.reviewed == head
    again = review(verdict.state, {}, head=head + 1, tolerance=TOL)
    assert again.regressed is None  # a rollback is made once


def test_guard_state_round_trips_through_json() -> None:
    state = GuardState(
        best_version=3, best_bpb=3.2, best_sha256="ab", reviewed=7, abandoned=((4, 7),)
    )
    assert GuardState.from_json(json.loads(json.dumps(state.to_json()))) == state
    assert GuardState.from_json(None) == GuardState()
    with pytest.raises(ValueError, match="tolerance"):
        review(state, {}, head=7, tolerance=-1.0)


def test_version_info_of_a_rollback_reads_back_from_the_head(tmp_path: Path) -> None:
    store, _, ledger = _regressed_federation(tmp_path)
    rollback = ledger.try_commit()
    assert isinstance(rollback, VersionInfo)
    assert VersionLedger.head_of(store.get(HEAD_KEY)) == rollback


def test_the_service_tick_rolls_back_counts_it_and_queues_the_new_versions_jobs(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: a coordinator whose observer is its /metrics; versions 1 and 2 committed
    # by the tick, scored 3.0 (v0), 2.9 (v1), 3.2 (v2: 0.3 above the best).
    from service_fixtures import make_settings

    from coordinator.service import FederationService

    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    metrics = CoordinatorMetrics()
    settings = make_settings(aggregation={"buffer_size": 1})
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4))
    service = FederationService(
        settings,
        store=store,
        blobs=BlobStore(tmp_path / "blobs"),
        initial_adapter=adapter,
        clock=clock,
        observer=metrics,
    )
    service.start()
    _score(store, 0, 3.0)
    for version, bpb in ((1, 2.9), (2, 3.2)):
        update = {n: np.full_like(b, 0.01 * version) for n, b in adapter.b.items()}
        service.ledger.add_cohort_sum(
            f"c{version}", weighted_sum=update, weight_total=1.0, updates=1
        )
        info = service.tick()
        assert info is not None and info.version == version
        _score(store, version, bpb)

    rollback = service.tick()

    assert rollback is not None and (rollback.version, rollback.rolled_back_to) == (3, 1)
    assert rollback.adapter_sha256 == _record(store, 1)["adapter_sha256"]
    assert "estuary_rollbacks_total 1.0" in generate_latest(metrics.registry).decode()
    assert store.get(f"{JOBS_SUBMITTED_PREFIX}3") is not None  # artifacts, evaluation queued
    assert service.tick() is None


def test_without_evaluations_each_review_reads_a_bounded_window(tmp_path: Path) -> None:
    store = MemoryStore()
    ledger = _ledger(store, BlobStore(tmp_path / "blobs"))
    ledger.initialise(_initial())
    for i in range(REVIEW_WINDOW + 6):
        _commit(ledger, f"c{i}", 0.0)  # never scored: no worker runs
    reads: list[int] = []
    real = store.get_many

    def counting(keys: Sequence[str]) -> list[Record | None]:
        reads.append(len(keys))
        return real(keys)

    store.get_many = counting  # type: ignore[method-assign]
    assert ledger.try_commit() is None
    assert reads == [REVIEW_WINDOW]


def test_a_rollback_never_lets_the_head_s_cohorts_count_again(tmp_path: Path) -> None:
    # A crash mid-retire left version 4's cohort in the buffer. The rollback's head names no
    # cohorts, so if it moved without retiring it, a later read would fold c4 in again.
    from coordinator.versions import BUFFER_REREAD_S, _encode_entry
    from estuary.state.keys import buffer_key

    clock = VirtualClock()
    store, _, ledger = _regressed_federation(tmp_path, clock)
    head = ledger.head()
    assert head is not None and head.cohorts == ("c4",)
    update = {n: np.full(s, 0.4, np.float32) for n, s in SHAPES.items()}
    entry = _encode_entry(update, weight_total=1.0, updates=1, trained_on=1)
    assert store.insert_if_absent(buffer_key("c4"), entry)

    rollback = ledger.try_commit()  # right after a commit: the buffer is not read again

    assert rollback is not None and rollback.rolled_back_to == 1
    assert store.get(buffer_key("c4")) is None
    clock.advance(BUFFER_REREAD_S)
    assert ledger.try_commit() is None  # K = 1, yet nothing is left to fold in
    assert ledger.head() == rollback
