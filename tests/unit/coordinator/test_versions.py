from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.staleness import StalenessPolicy
from coordinator.versions import VersionLedger, _decode_entry, _encode_entry, _entry_meta
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.clock import VirtualClock
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key
from estuary.state.memory import MemoryStore

SHAPES = {"layers.0.q_proj.lora_B": (8, 4), "layers.0.v_proj.lora_B": (8, 4)}


def _adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _global(rng: np.random.Generator) -> GlobalAdapter:
    # B is (out=8, r_max=4) per module; A would be (4, in=16).
    shapes = {name: (8, 16) for name in SHAPES}
    return GlobalAdapter(config=AdapterConfig(r_max=4), shapes=shapes, b=_adapter(rng))


def _ledger(
    store: MemoryStore,
    tmp_path: Path,
    holder: str = "r1",
    k: int = 4,
    lr: float = 1.0,
    clock: VirtualClock | None = None,
    step_divisor: Literal["buffer", "updates"] = "buffer",
) -> VersionLedger:
    return VersionLedger(
        store,
        blobs=BlobStore(tmp_path / "blobs"),
        holder=holder,
        buffer_size=k,
        step_divisor=step_divisor,
        server_lr=lr,
        lease_ttl_s=10.0,
        clock=clock or VirtualClock(),
    )


def test_commit_applies_fedbuff_rule_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=4, lr=0.5)
    initial = _global(rng)
    base = initial.b
    ledger.initialise(initial)
    s1, s2 = _adapter(rng), _adapter(rng)
    assert ledger.add_cohort_sum("c1", weighted_sum=s1, weight_total=1.5, updates=2)
    assert ledger.try_commit() is None  # 2 < K
    assert ledger.add_cohort_sum("c2", weighted_sum=s2, weight_total=2.0, updates=2)
    info = ledger.try_commit()
    assert info is not None
    assert (info.version, info.updates, sorted(info.cohorts)) == (1, 4, ["c1", "c2"])
    got = ledger.adapter(info).b
    for name in SHAPES:
        # Fresh work (staleness 0) keeps the weights it was given; the step is divided
        # by the update count N = 4, not by Σw (coordinator.versions docstring).
        expected = base[name] + 0.5 * (s1[name] + s2[name]) / 4
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)
    assert ledger.buffered_updates() == 0
    assert ledger.head() == info


def test_duplicate_cohort_is_not_counted_twice_even_after_commit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ledger = _ledger(MemoryStore(), tmp_path, k=1)
    ledger.initialise(_global(rng))
    s = _adapter(rng)
    assert ledger.add_cohort_sum("c1", weighted_sum=s, weight_total=1.0, updates=1)
    assert not ledger.add_cohort_sum("c1", weighted_sum=s, weight_total=1.0, updates=1)
    assert ledger.try_commit() is not None
    # Re-delivered after its version was committed: still refused.
    assert not ledger.add_cohort_sum("c1", weighted_sum=s, weight_total=1.0, updates=1)
    assert ledger.buffered_updates() == 0
    assert ledger.try_commit() is None


def test_initialise_is_idempotent_across_replicas(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = MemoryStore()
    a, b = _ledger(store, tmp_path, "a"), _ledger(store, tmp_path, "b")
    first = a.initialise(_global(rng))
    second = b.initialise(_global(rng))  # different tensors: ignored, version 0 exists
    assert first == second
    assert first.version == 0


def test_committed_at_is_read_from_the_injected_clock(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    clock = VirtualClock(start=1_234_567_890.0)
    store = MemoryStore(clock=clock.time)
    ledger = _ledger(store, tmp_path, k=1, clock=clock)
    ledger.initialise(_global(rng))
    clock.advance(42.5)
    ledger.add_cohort_sum("c1", weighted_sum=_adapter(rng), weight_total=1.0, updates=1)
    assert ledger.try_commit() is not None
    stamps = [
        json.loads(record.value)["committed_at"]
        for record in (store.get(version_key(0)), store.get(version_key(1)))
        if record is not None
    ]
    assert stamps == [1_234_567_890.0, 1_234_567_932.5]


def test_folded_staleness_is_what_each_cohort_landed_with(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=2)
    ledger.initialise(_global(rng))
    assert ledger.folded_staleness(0) == {}  # version 0 folds nothing in
    for version in (1, 2):  # two fresh versions, one cohort of 2 each
        ledger.add_cohort_sum(
            f"fresh{version}", weighted_sum=_adapter(rng), weight_total=2.0, updates=2,
            trained_on=version - 1,
        )  # fmt: skip
        assert ledger.try_commit() is not None
    # Version 3 folds in a cohort trained on v0 (its weights fixed back then) and one on v2.
    ledger.add_cohort_sum("old", weighted_sum=_adapter(rng), weight_total=3.0, updates=3,
                          trained_on=0)  # fmt: skip
    ledger.add_cohort_sum("new", weighted_sum=_adapter(rng), weight_total=1.0, updates=1,
                          trained_on=2)  # fmt: skip
    info = ledger.try_commit()
    assert info is not None and info.version == 3
    assert ledger.folded_staleness(3) == {"old": 2, "new": 0}
    # The commit says it per update too (for /metrics): 1 update fresh, 3 two versions stale.
    assert info.folded_staleness == ((0, 1), (2, 3))
    assert ledger.folded_staleness(1) == {"fresh1": 0}
    assert ledger.folded_staleness(9) is None  # no such version
    record = json.loads(store.get(version_key(3)).value)  # type: ignore[union-attr]
    store.put(version_key(3), json.dumps({**record, "staleness": {"old": -1}}).encode())
    with pytest.raises(ValueError, match=r"version/0000000003: staleness must map"):
        ledger.folded_staleness(3)
    store.put(version_key(3), b"not json")
    with pytest.raises(ValueError, match=r"version/0000000003: not a readable version record"):
        ledger.folded_staleness(3)


def test_members_trained_on_different_versions_are_each_priced_at_their_own_staleness(
    tmp_path: Path,
) -> None:
    # Prepare: K 3, step ÷ updates; version 2 is the head. One cohort of three whose members
    # trained on versions 0, 1 and 1 (they train first, then form a cohort), weighted
    # w_i at the relay; a reference cohort of one fresh update for the head's direction.
    rng = np.random.default_rng(11)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=3, step_divisor="updates")
    ledger.initialise(_global(rng))
    for version in (1, 2):
        ledger.add_cohort_sum(f"v{version}", weighted_sum=_adapter(rng), weight_total=3.0,
                              updates=3)  # fmt: skip
        assert ledger.try_commit() is not None
    before = ledger.adapter(ledger.head())  # type: ignore[arg-type]
    weighted, weights = _adapter(rng), (0.6, 0.8, 0.8)

    # Execute: buffer it with each member's version, and commit.
    assert ledger.add_cohort_sum(
        "mixed", weighted_sum=weighted, weight_total=sum(weights), updates=3,
        trained_versions=[0, 1, 1],
    )  # fmt: skip
    info = ledger.try_commit()

    # Assert: d = Σ_i f*(2 − t_i) / Σ w_i, capped at 1; the step is d · Σ w ΔB / N.
    policy = StalenessPolicy()
    priced = policy.commit_weight(2) + 2 * policy.commit_weight(1)
    discount = min(1.0, priced / sum(weights))
    after = ledger.adapter(ledger.head())  # type: ignore[arg-type]
    for name in SHAPES:
        np.testing.assert_allclose(
            after.b[name], before.b[name] + discount * weighted[name] / 3, rtol=1e-5, atol=1e-6
        )
    # Each update counted at its own staleness; the cohort by its oldest member.
    assert info is not None and info.folded_staleness == ((1, 2), (2, 1))
    assert ledger.folded_staleness(info.version) == {"mixed": 2}


def test_trained_versions_that_do_not_fit_the_sum_are_refused_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=3)
    ledger.initialise(_global(rng))
    bad: list[tuple[dict[str, object], str]] = [
        ({"trained_versions": [0, 0]}, "expected one per update"),
        ({"trained_versions": [0, 0, 1]}, r"must be committed versions \(0..0\), got \[1\]"),
        ({"trained_versions": [0, 0, 0], "trained_on": 1}, "trained_on: 1 is not the oldest"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            ledger.add_cohort_sum("c", weighted_sum=_adapter(rng), weight_total=1.0, updates=3,
                                  **kwargs)  # type: ignore[arg-type]  # fmt: skip
    assert ledger.buffered_updates() == 0  # nothing was stored


def test_a_sum_too_stale_by_the_commit_is_dropped_and_reported_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    store = MemoryStore()
    ledger = VersionLedger(
        store, blobs=BlobStore(tmp_path / "blobs"), holder="r1", buffer_size=2,
        staleness=StalenessPolicy(max_staleness=1), clock=VirtualClock(),
    )  # fmt: skip
    ledger.initialise(_global(rng))
    for version in (1, 2, 3):
        ledger.add_cohort_sum(
            f"fresh{version}", weighted_sum=_adapter(rng), weight_total=2.0, updates=2,
            trained_on=version - 1,
        )  # fmt: skip
        if version == 2:  # one version behind when folded in: allowed, not dropped
            ledger.add_cohort_sum("behind", weighted_sum=_adapter(rng), weight_total=1.0,
                                  updates=1, trained_on=0)  # fmt: skip
            assert ledger.take_dropped() == []
        info = ledger.try_commit()
        assert info is not None and info.version == version
    assert ledger.folded_staleness(2) == {"behind": 1, "fresh2": 0}
    assert ledger.take_dropped() == []
    # Two versions behind the head of 3: retired unused, its 3 updates reported once.
    assert ledger.add_cohort_sum("stale", weighted_sum=_adapter(rng), weight_total=3.0,
                                 updates=3, trained_on=1)  # fmt: skip
    ledger.add_cohort_sum("fresh4", weighted_sum=_adapter(rng), weight_total=2.0, updates=2,
                          trained_on=3)  # fmt: skip
    info = ledger.try_commit()
    assert info is not None and info.cohorts == ("fresh4",) and info.updates == 2
    dropped = ledger.take_dropped()
    assert [(d.cohort_id, d.updates, d.trained_on) for d in dropped] == [("stale", 3, 1)]
    assert "2 versions behind (limit 1)" in dropped[0].reason
    assert ledger.take_dropped() == []  # reported once
    # A re-delivery of the dropped sum is a duplicate, never a new sum.
    assert not ledger.add_cohort_sum("stale", weighted_sum=_adapter(rng), weight_total=3.0,
                                     updates=3, trained_on=3)  # fmt: skip
    assert ledger.buffered_updates() == 0


def test_only_lease_holder_commits_and_stale_holder_is_fenced(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    a = _ledger(store, tmp_path, "a", k=1, clock=clock)
    b = _ledger(store, tmp_path, "b", k=1, clock=clock)
    a.initialise(_global(rng))
    a.add_cohort_sum("c1", weighted_sum=_adapter(rng), weight_total=1.0, updates=1)
    assert a.try_commit() is not None  # a now holds the lease
    b.add_cohort_sum("c2", weighted_sum=_adapter(rng), weight_total=1.0, updates=1)
    assert b.try_commit() is None  # lease held by a
    clock.advance(60)  # a's lease expires; b takes over
    info_b = b.try_commit()
    assert info_b is not None and info_b.version == 2
    # a still believes it holds its old lease object; its fenced writes must be refused.
    a.add_cohort_sum("c3", weighted_sum=_adapter(rng), weight_total=1.0, updates=1)
    stale = a._lease
    assert stale is not None
    a._ensure_lease = lambda: stale  # type: ignore[method-assign]
    assert a.try_commit() is None
    assert a.head() == info_b


def test_crash_after_head_moved_does_not_double_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=1)
    ledger.initialise(_global(rng))
    ledger.add_cohort_sum("c1", weighted_sum=_adapter(rng), weight_total=1.0, updates=1)

    def crash(ids: list[str]) -> None:
        if ids:  # the post-commit clean-up, not the (empty) leftover sweep before it
            raise RuntimeError("replica died before cleaning the buffer")

    real_retire = ledger._retire
    ledger._retire = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        ledger.try_commit()
    ledger._retire = real_retire  # type: ignore[method-assign]
    head = ledger.head()
    assert head is not None and head.version == 1
    assert ledger.buffered_updates() == 0  # the leftover is recognised as counted
    assert ledger.try_commit() is None
    head_after = ledger.head()
    assert head_after is not None and head_after.version == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_total": 0.0}, "weight_total"),
        ({"weight_total": 3.0, "updates": 2}, "exceeds updates"),
        ({"updates": 0}, "updates"),
        ({"bad_shape": True}, "shape"),
        ({"nan": True}, "non-finite"),
        ({"missing": True}, "names differ"),
    ],
)
def test_bad_sums_are_refused_and_nothing_is_stored(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    rng = np.random.default_rng(5)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path)
    ledger.initialise(_global(rng))
    s = _adapter(rng)
    if kwargs.pop("bad_shape", False):
        s["layers.0.q_proj.lora_B"] = np.zeros((4, 8), np.float32)
    if kwargs.pop("nan", False):
        s["layers.0.v_proj.lora_B"][0, 0] = np.nan
    if kwargs.pop("missing", False):
        del s["layers.0.v_proj.lora_B"]
    args: dict[str, object] = {"weight_total": 1.0, "updates": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ledger.add_cohort_sum("c1", weighted_sum=s, **args)  # type: ignore[arg-type]
    assert ledger.buffered_updates() == 0
    assert store.scan("buffer") == {}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=8),
    k=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
    divisor=st.sampled_from(["buffer", "updates"]),
)
def test_versions_strictly_increase_and_match_reference(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    k: int,
    seed: int,
    divisor: Literal["buffer", "updates"],
) -> None:
    # Fresh sums (staleness 0, discount 1): each version is its predecessor plus the
    # buffered sum over K (every update counts the same however cohorts group), or over
    # the N ≥ K updates it holds (one mean step, a synchronous round's rule).
    rng = np.random.default_rng(seed)
    ledger = _ledger(MemoryStore(), tmp_path_factory.mktemp("v"), k=k, lr=1.0, step_divisor=divisor)
    initial = _global(rng)
    reference = initial.b
    ledger.initialise(initial)
    pending_sum = {n: np.zeros(s) for n, s in SHAPES.items()}
    pending_w, pending_n, last = 0.0, 0, 0
    for i, n in enumerate(sizes):
        s = _adapter(rng)
        w = float(rng.uniform(0.1, 1.0)) * n
        assert ledger.add_cohort_sum(f"c{i}", weighted_sum=s, weight_total=w, updates=n)
        for name in SHAPES:
            pending_sum[name] += s[name].astype(np.float64)
        pending_w, pending_n = pending_w + w, pending_n + n
        info = ledger.try_commit()
        if pending_n >= k:
            assert info is not None and info.version == last + 1
            reference = {
                name: (
                    reference[name] + pending_sum[name] / (k if divisor == "buffer" else pending_n)
                ).astype(np.float32)
                for name in SHAPES
            }
            got = ledger.adapter(info).b
            for name in SHAPES:
                np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-5)
            pending_sum = {name: np.zeros(s) for name, s in SHAPES.items()}
            pending_w, pending_n, last = 0.0, 0, info.version
        else:
            assert info is None


@given(
    weight=st.floats(min_value=1e-6, max_value=64.0, allow_nan=False),
    updates=st.integers(min_value=1, max_value=10_000),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
)
def test_entry_metadata_read_from_the_header_matches_a_full_decode(
    weight: float, updates: int, shapes: list[tuple[int, int]]
) -> None:
    tensors = {f"m{i}": np.full(shape, 0.5, dtype=np.float32) for i, shape in enumerate(shapes)}
    data = _encode_entry(tensors, weight_total=weight, updates=updates)
    decoded, full_weight, full_updates = _decode_entry(data)
    assert _entry_meta(data) == (full_weight, full_updates) == (weight, updates)
    assert set(decoded) == set(tensors)


def _scanned_count(store: MemoryStore, ledger: VersionLedger) -> int:
    """The buffered updates as the entries themselves say (a scan: what the hint stands for)."""
    from estuary.state.keys import BUFFER_PREFIX

    head = ledger.head()
    done = set(head.cohorts) if head else set()
    return sum(
        _entry_meta(rec.value)[1]
        for key, rec in store.scan(BUFFER_PREFIX).items()
        if key[len(BUFFER_PREFIX) :] not in done
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 5), st.integers(1, 3)),
            st.tuples(st.just("commit"), st.just(0), st.just(0)),
        ),
        max_size=20,
    )
)
def test_buffered_updates_reads_the_counts_not_the_keyspace(
    tmp_path: Path, ops: list[tuple[str, int, int]]
) -> None:
    # Admission asks on every request of a device that trained on the newest version: the
    # answer must equal the entries' own count after any mix of sums (re-deliveries too)
    # and commits, without a scan of the store (which on Redis walks every key).
    rng = np.random.default_rng(7)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path / str(len(ops)), k=4)
    ledger.initialise(_global(rng))
    for op, cohort, updates in ops:
        if op == "add":
            ledger.add_cohort_sum(
                f"c{cohort}", weighted_sum=_adapter(rng), weight_total=1.0, updates=updates
            )
        else:
            ledger.try_commit()
            # Committed as soon as K were buffered, even when it skipped reading them.
            assert _scanned_count(store, ledger) < 4
        expected = _scanned_count(store, ledger)
        real_scan = store.scan
        store.scan = lambda prefix: pytest.fail(f"buffered_updates scanned {prefix!r}")  # type: ignore[method-assign]
        try:
            assert ledger.buffered_updates() == expected
        finally:
            store.scan = real_scan  # type: ignore[method-assign]


def test_a_commit_attempt_repairs_the_counts_a_crash_left(tmp_path: Path) -> None:
    from estuary.state.keys import BUFFER_COUNTS, buffer_key

    rng = np.random.default_rng(8)
    store = MemoryStore()
    ledger = _ledger(store, tmp_path, k=10)
    ledger.initialise(_global(rng))
    assert ledger.add_cohort_sum("c1", weighted_sum=_adapter(rng), weight_total=1.0, updates=3)
    # A replica crashed after writing an entry and before noting its count; another noted
    # a count whose entry is gone.
    entry = _encode_entry(_adapter(rng), weight_total=2.0, updates=2, trained_on=0)
    assert store.insert_if_absent(buffer_key("c2"), entry)
    store.zadd(BUFFER_COUNTS, {"ghost": 5.0})
    assert ledger.buffered_updates() == 3 + 5  # the hint is off until the next attempt
    assert ledger.try_commit() is None  # 5 < K: no commit, but the counts are noted
    assert ledger.buffered_updates() == 3 + 2 == _scanned_count(store, ledger)


def test_below_k_a_commit_attempt_reads_the_buffer_only_every_reread_period(
    tmp_path: Path,
) -> None:
    # The entries are read by a scan of the keyspace; while their count is below K the
    # lease holder reads them at most every BUFFER_REREAD_S, so a sum whose count a crash
    # lost is folded in that much later at worst.
    from coordinator.versions import BUFFER_REREAD_S
    from estuary.state.keys import buffer_key

    rng = np.random.default_rng(9)
    store = MemoryStore()
    clock = VirtualClock()
    ledger = _ledger(store, tmp_path, k=4, clock=clock)
    ledger.initialise(_global(rng))
    scans: list[str] = []
    real_scan = store.scan

    def counting_scan(prefix: str) -> dict:  # type: ignore[type-arg]
        scans.append(prefix)
        return real_scan(prefix)

    store.scan = counting_scan  # type: ignore[method-assign]
    assert ledger.add_cohort_sum("c1", weighted_sum=_adapter(rng), weight_total=1.0, updates=2)
    assert ledger.try_commit() is None and len(scans) == 1  # first attempt: a full read
    for _ in range(10):
        clock.advance(0.25)
        assert ledger.try_commit() is None
    assert len(scans) == 1  # 2 < K by the count: nothing read
    # A replica crashed after buffering c2 (2 updates) and before noting its count.
    entry = _encode_entry(_adapter(rng), weight_total=2.0, updates=2, trained_on=0)
    assert store.insert_if_absent(buffer_key("c2"), entry)
    assert ledger.try_commit() is None  # the count still says 2
    clock.advance(BUFFER_REREAD_S)
    info = ledger.try_commit()
    assert info is not None and sorted(info.cohorts) == ["c1", "c2"] and len(scans) == 2
    # At K by the count, the entries are read at once.
    assert ledger.add_cohort_sum("c3", weighted_sum=_adapter(rng), weight_total=1.0, updates=4)
    info = ledger.try_commit()
    assert info is not None and info.cohorts == ("c3",) and len(scans) == 3
