"""Retention rules, one at a time (issue 11, item 9); the soak test shows them together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from service_fixtures import Fed
from test_service import run_cohort

from coordinator.retention import Retention
from estuary.clock import VirtualClock
from estuary.config.models import RetentionSettings
from estuary.state.errors import StoreUnavailable
from estuary.state.memory import MemoryStore


def _keys(fed: Fed, prefix: str) -> set[str]:
    return set(fed.store.scan(prefix))


def test_a_cohort_goes_only_once_folded_into_a_version_and_past_its_grace(
    tmp_path: Path, base: Any
) -> None:
    fed = Fed(
        tmp_path,
        base,
        aggregation={"buffer_size": 6, "max_staleness": 0},
        retention={"keep_versions": 1, "grace_s": 30.0, "interval_s": 0.0},
    )
    laptops = [fed.device("laptop") for _ in range(3)]
    rng = np.random.default_rng(0)
    run_cohort(fed, laptops, rng=rng)  # completed; its sum waits in the buffer (K = 6)
    [first] = [k[len("cohort/") :] for k in _keys(fed, "cohort/")]
    fed.clock.advance(100.0)
    fed.service.tick()
    assert _keys(fed, "cohort/") == {f"cohort/{first}"}  # past its grace, but not folded in
    assert _keys(fed, f"cohort-log/{first}/") and _keys(fed, f"buffer/{first}")
    run_cohort(fed, laptops, rng=rng)  # the second cohort commits version 1
    assert fed.service.ledger.head().version == 1  # type: ignore[union-attr]
    second = next(k for k in _keys(fed, "cohort/") if first not in k)[len("cohort/") :]
    fed.service.tick()
    # The first is folded in and long finished: record, log (masked uploads) and marker go.
    assert _keys(fed, "cohort/") == {f"cohort/{second}"}
    assert not _keys(fed, f"cohort-log/{first}/") and not _keys(fed, f"buffer-seen/{first}")
    assert _keys(fed, f"cohort-log/{second}/") and _keys(fed, f"buffer-seen/{second}")
    fed.clock.advance(31.0)
    fed.service.tick()
    assert not _keys(fed, "cohort/") and not _keys(fed, "cohort-log/")
    assert not _keys(fed, "buffer-seen/")
    # Version 0 is outside the window (keep 1, max_staleness 0) ...
    assert _keys(fed, "version/") == {"version/0000000001"}
    assert _keys(fed, "jobs-submitted/") == {"jobs-submitted/1"}
    # ... but its job results are the newest done of their kinds (version 1's have not
    # run): a device is still handed version 0's artifact's manifest, so they stay.
    assert {"jobresult/build_artifacts-laptop-v0", "jobresult/evaluate-v0"} <= _keys(
        fed, "jobresult/"
    )


def _retention(store: MemoryStore, clock: VirtualClock, **settings: Any) -> Retention:
    return Retention(
        RetentionSettings(**settings), store=store, blobs=None, max_staleness=4, clock=clock
    )


@given(
    head=st.integers(0, 10_000),
    keep=st.integers(1, 100),
    active=st.lists(st.integers(0, 10_000), max_size=5),
)
def test_the_version_floor_keeps_the_window_the_staleness_and_every_active_cohort(
    head: int, keep: int, active: list[int]
) -> None:
    clock = VirtualClock()
    retention = _retention(MemoryStore(clock=clock.time), clock, keep_versions=keep)
    active = [min(v, head) for v in active]
    floor = retention.version_floor(head, active)
    assert 0 <= floor <= head
    assert floor <= head - keep + 1 or floor == 0
    assert floor <= head - 4 or floor == 0
    assert all(floor <= v for v in active)
    # And no lower than it must be: the oldest of the three bounds.
    assert floor == max(0, min([head - keep + 1, head - 4, *active]))


def test_worker_records_go_after_worker_gone_s_and_others_stay() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    now = clock.time()
    store.put("head/version", json.dumps({"version": 0}).encode())
    store.put("worker/gone", json.dumps({"last_seen": now - 101}).encode())
    store.put("worker/alive", json.dumps({"last_seen": now - 99}).encode())
    store.put("worker/odd", b"[1, 2]")
    report = _retention(store, clock, worker_gone_s=100.0).sweep()
    assert report.workers == 1
    assert set(store.scan("worker/")) == {"worker/alive", "worker/odd"}


class _FailingStore(MemoryStore):
    def get(self, key: str) -> Any:
        raise StoreUnavailable("down")


def test_sweeps_are_spaced_by_interval_and_a_failing_store_only_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    store.put("head/version", json.dumps({"version": 0}).encode())
    retention = _retention(store, clock, interval_s=60.0)
    assert retention.maybe_sweep() is not None
    clock.advance(59.0)
    assert retention.maybe_sweep() is None
    clock.advance(1.0)
    assert retention.maybe_sweep() is not None
    failing = _retention(_FailingStore(clock=clock.time), clock, interval_s=60.0)
    assert failing.maybe_sweep() is None
    assert "retention sweep failed" in caplog.text


def test_a_replica_that_stalled_past_retention_does_not_count_a_cohort_twice(
    tmp_path: Path, base: Any
) -> None:
    # Replica A reads a finished cohort, then stalls. Replica B folds it in, later versions
    # commit and retention removes the cohort's record and its "seen" marker. When A wakes
    # it must not buffer the same sum again.
    fed = Fed(
        tmp_path,
        base,
        aggregation={"buffer_size": 3, "max_staleness": 4},
        retention={"keep_versions": 8, "grace_s": 30.0, "interval_s": 0.0},
    )
    ticker = fed.service.ticker
    real_finish = ticker._finish
    stalled: list[tuple[Any, Any]] = []

    def stall_once(record: Any, cohort: Any) -> None:
        if not stalled:
            stalled.append((record, cohort))  # replica A: read it, then nothing
            return
        real_finish(record, cohort)

    ticker._finish = stall_once  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    laptops = [fed.device("laptop") for _ in range(3)]
    run_cohort(fed, laptops, rng=rng)
    assert stalled and fed.service.ledger.head().version == 0  # type: ignore[union-attr]
    fed.service.tick()  # replica B folds it in: version 1
    assert fed.service.ledger.head().version == 1  # type: ignore[union-attr]
    fed.run_jobs()
    run_cohort(fed, laptops, rng=rng)  # version 2: the first cohort is no longer the head's
    assert fed.service.ledger.head().version == 2  # type: ignore[union-attr]
    fed.clock.advance(100.0)
    fed.service.tick()  # past its grace: record and marker removed
    first = stalled[0][0].cohort_id
    assert not _keys(fed, f"cohort/{first}") and not _keys(fed, f"buffer-seen/{first}")
    real_finish(*stalled[0])  # replica A wakes up
    assert fed.service.ledger.buffered_updates() == 0
    assert not _keys(fed, f"buffer/{first}")
