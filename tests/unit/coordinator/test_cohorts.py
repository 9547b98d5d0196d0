"""Cohort records: the stored JSON format is unchanged, and bad stored data names its field."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.cohort_book import CohortBook
from coordinator.cohorts import (
    ArtifactRef,
    Assignment,
    CohortRecord,
    FormingCohort,
    MalformedRecord,
    TrainingTask,
    neighbours_for,
)
from estuary.clock import VirtualClock
from estuary.state.keys import cohort_key
from estuary.state.memory import MemoryStore
from secure_agg import FixedPoint, SessionConfig, Stage


def legacy_sealed() -> dict[str, Any]:
    """A sealed cohort exactly as the dict-based service wrote it before CohortRecord."""
    return {
        "cohort_id": "3f2a" * 8,
        "device_class": "laptop",
        "rank": 4,
        "members": ["dev-a", "dev-b", "dev-c"],
        "version": 7,
        "artifact": {"sha256": "ab" * 32, "size": 123456},
        "sealed_at": 1700000000.25,
        "deadline_at": 1700000060.25,
        "threshold": 2,
        "bits": 32,
        "frac_bits": 20,
        "clip": 1.0,
        "neighbours": None,
        "tensors": [["layers.0.q_proj.lora_B", 32], ["layers.0.v_proj.lora_B", 32]],
        "stage": "ADVERTISE_KEYS",
        "stage_started": 1700000000.25,
        "status": "active",
        "abandoned": [],
    }


def _bytes(value: dict[str, Any]) -> bytes:
    # How the service serialised records (sorted keys), then and now.
    return json.dumps(value, sort_keys=True).encode()


def test_a_sealed_record_reads_and_writes_back_byte_identical() -> None:
    stored = _bytes(legacy_sealed())
    record = CohortRecord.from_json(stored)
    assert record.stage is Stage.ADVERTISE_KEYS and record.active
    assert record.members == ("dev-a", "dev-b", "dev-c")
    assert record.artifact == ArtifactRef("ab" * 32, 123456)
    assert record.member_index("dev-c") == 2 and record.member_index("stranger") is None
    assert record.task_id(1) == f"{'3f2a' * 8}-1"
    assert record.to_json() == stored


@pytest.mark.parametrize("status", ["completed", "aborted"])
def test_finished_records_keep_the_legacy_outcome_fields(status: str) -> None:
    legacy = legacy_sealed()
    legacy.update(status=status, stage="COMPLETED" if status == "completed" else "ABORTED")
    legacy["finished_at"] = 1700000050.5
    legacy["abandoned"] = [1]
    if status == "completed":
        legacy.update(survivors=[0, 2], weight_total=1.5)
    else:
        legacy["abort_reason"] = None  # the protocol may give no reason; stored as null
    record = CohortRecord.from_json(_bytes(legacy))
    assert record.to_json() == _bytes(legacy)
    # The same outcome, made by the methods the tick uses, serialises identically.
    active = CohortRecord.from_json(_bytes(legacy_sealed())).with_abandoned(1)
    if status == "completed":
        made = active.completed(
            stage=Stage.COMPLETED, now=1700000050.5, survivors=(0, 2), weight_total=1.5
        )
    else:
        made = active.aborted(stage=Stage.ABORTED, now=1700000050.5, reason=None)
    assert made == record


def test_stage_and_abandoned_changes() -> None:
    record = CohortRecord.from_json(_bytes(legacy_sealed()))
    moved = record.with_stage(Stage.SHARE_KEYS, now=1700000003.0)
    assert (moved.stage, moved.stage_started) == (Stage.SHARE_KEYS, 1700000003.0)
    assert json.loads(moved.to_json())["stage"] == "SHARE_KEYS"
    twice = record.with_abandoned(2).with_abandoned(0).with_abandoned(2)
    assert twice.abandoned == (0, 2) and twice.is_abandoned(0) and not twice.is_abandoned(1)
    assert record.abandoned == ()  # frozen: the original is untouched


def test_session_config_is_the_one_the_legacy_record_described() -> None:
    config = CohortRecord.from_json(_bytes(legacy_sealed())).session_config()
    assert config == SessionConfig(
        cohort=("3f2a" * 8).encode(),
        cohort_size=3,
        threshold=2,
        tensors=(("layers.0.q_proj.lora_B", 32), ("layers.0.v_proj.lora_B", 32)),
        fixed_point=FixedPoint(bits=32, frac_bits=20, clip=1.0),
        neighbours=None,
    )


def test_a_record_without_abandoned_reads_as_none_abandoned() -> None:
    legacy = legacy_sealed()
    del legacy["abandoned"]  # the dict-based reader defaulted it to []
    assert CohortRecord.from_json(_bytes(legacy)).abandoned == ()


def test_unknown_fields_are_ignored() -> None:
    legacy = legacy_sealed()
    legacy["added_by_a_newer_release"] = {"x": 1}
    assert CohortRecord.from_json(_bytes(legacy)) == CohortRecord.from_json(_bytes(legacy_sealed()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("threshold"), "field 'threshold' is missing"),
        (lambda r: r.update(threshold="2"), "field 'threshold': expected an integer"),
        (lambda r: r.update(rank=True), "field 'rank': expected an integer"),
        (lambda r: r.update(sealed_at="now"), "field 'sealed_at': expected a number"),
        (lambda r: r.update(members=["a", 2]), "field 'members': expected a list of str"),
        (lambda r: r.update(stage="TRAINING"), "field 'stage': no stage named 'TRAINING'"),
        (lambda r: r.update(status="paused"), "field 'status': expected one of"),
        (lambda r: r.update(tensors=[["a"]]), "field 'tensors': expected \\[name, length\\]"),
        (lambda r: r["artifact"].pop("size"), "field 'artifact': field 'size' is missing"),
        (lambda r: r.update(abandoned=[0.5]), "field 'abandoned': expected a list of int"),
        (lambda r: r.update(survivors="all"), "field 'survivors': expected a list of int"),
        (lambda r: r.update(abort_reason=3), "field 'abort_reason': expected a string"),
    ],
)
def test_malformed_stored_data_names_the_key_and_field(change: Any, message: str) -> None:
    legacy = legacy_sealed()
    change(legacy)
    with pytest.raises(MalformedRecord, match=message) as caught:
        CohortRecord.from_json(_bytes(legacy), where="cohort/xyz")
    assert str(caught.value).startswith("cohort/xyz: ")


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff"])
def test_stored_bytes_that_are_no_json_object_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedRecord, match="cohort/xyz"):
        CohortRecord.from_json(raw, where="cohort/xyz")


def test_forming_cohort_format_and_joining() -> None:
    legacy = {"cohort_id": "c1", "members": ["a"], "opened_at": 10.0}
    forming = FormingCohort.from_json(_bytes(legacy))
    assert forming.to_json() == _bytes(legacy)  # no full_at until min_size
    key = bytes(range(32))
    joined = forming.joined("b", identity_key=key, version=4, task_id="tb", min_size=3, now=11.0)
    joined = joined.joined("c", identity_key=key, version=5, task_id="tc", min_size=3, now=12.0)
    assert joined.members == ("a", "b", "c") and joined.full_at == 12.0
    # A record from before identity keys has none for "a": it keeps none (sealed passive).
    assert not joined.has_identity_keys and joined.identity_keys == ()
    # Nor from before devices trained first: "a" never trained, so it is not sealed.
    assert not joined.trained
    assert json.loads(joined.to_json()) == {
        **legacy,
        "members": ["a", "b", "c"],
        "full_at": 12.0,
        "versions": [4, 5],
        "tasks": ["tb", "tc"],
    }
    fresh = FormingCohort(cohort_id="c2", members=(), opened_at=10.0)
    fresh = fresh.joined("a", identity_key=key, version=3, task_id="ta", min_size=2, now=11.0)
    fresh = fresh.joined("b", identity_key=key, version=5, task_id="tb", min_size=2, now=12.0)
    assert fresh.trained and fresh.versions == (3, 5) and fresh.tasks == ("ta", "tb")
    assert FormingCohort.from_json(fresh.to_json()) == fresh
    with pytest.raises(MalformedRecord, match="forming/phone: field 'opened_at'"):
        FormingCohort.from_json(_bytes({"cohort_id": "c1", "members": []}), where="forming/phone")


def test_assignment_format() -> None:
    legacy = {"cohort_id": "c1", "member_index": 2, "task_id": "c1-2"}
    assignment = Assignment.from_json(_bytes(legacy))
    assert assignment == Assignment("c1", 2, "c1-2")
    assert assignment.to_json() == _bytes(legacy)
    with pytest.raises(MalformedRecord, match="assign/d: field 'member_index'"):
        Assignment.from_json(_bytes({**legacy, "member_index": "2"}), where="assign/d")
    trained = Assignment("c1", 2, "c1-2", trained_task_id="t9")
    assert Assignment.from_json(trained.to_json()) == trained
    assert json.loads(trained.to_json())["trained_task_id"] == "t9"


def test_training_task_format_and_bad_fields() -> None:
    task = TrainingTask(
        task_id="t1",
        device_class="phone",
        version=3,
        artifact=ArtifactRef(sha256="ab" * 32, size=10),
        column_seed=7,
        started_at=1.5,
        deadline_at=61.5,
    )
    assert TrainingTask.from_json(task.to_json()) == task
    with pytest.raises(MalformedRecord, match="training/d: field 'version'"):
        TrainingTask.from_json(
            _bytes({**json.loads(task.to_json()), "version": "3"}), where="training/d"
        )


def test_member_versions_round_trip_and_must_match_the_members() -> None:
    record = CohortRecord.from_json(_bytes(legacy_sealed()))
    assert record.member_versions == () and record.member_version(1) == record.version
    mixed = dataclasses.replace(
        record, member_versions=tuple(record.version + i for i in range(record.size))
    )
    again = CohortRecord.from_json(mixed.to_json())
    assert again == mixed and again.member_version(1) == record.version + 1
    bad = {**json.loads(mixed.to_json()), "member_versions": [record.version]}
    with pytest.raises(MalformedRecord, match="'member_versions': expected one per member"):
        CohortRecord.from_json(_bytes(bad), where="cohort/x")


@pytest.mark.parametrize(
    ("n", "wanted", "expected"), [(10, None, None), (10, 5, 4), (10, 4, 4), (5, 4, None)]
)
def test_neighbours_for(n: int, wanted: int | None, expected: int | None) -> None:
    assert neighbours_for(n, wanted) == expected


def test_the_book_reports_a_malformed_stored_cohort_by_its_key() -> None:
    store = MemoryStore()
    legacy = legacy_sealed()
    del legacy["deadline_at"]
    store.put(cohort_key("c1"), _bytes(legacy))
    with pytest.raises(MalformedRecord, match=f"^{cohort_key('c1')}: field 'deadline_at'"):
        CohortBook(store).record("c1")


def test_the_book_reads_what_the_dict_based_service_stored() -> None:
    store = MemoryStore()
    legacy = legacy_sealed()
    store.put(cohort_key(legacy["cohort_id"]), _bytes(legacy))
    book = CohortBook(store, clock=VirtualClock(start=5.0))
    record = book.record(legacy["cohort_id"])
    assert record is not None and record.to_dict() == legacy
    updated = book.update(legacy["cohort_id"], lambda r: r.with_abandoned(1))
    assert updated is not None and updated.abandoned == (1,)
    stored = store.get(cohort_key(legacy["cohort_id"]))
    assert stored is not None and json.loads(stored.value) == {**legacy, "abandoned": [1]}
    book.mark_seen(legacy["cohort_id"], 2)
    assert book.last_seen(legacy["cohort_id"], 2) == 5.0


def test_forming_cohort_keeps_each_members_identity_key_in_order() -> None:
    keys = [bytes([i]) * 32 for i in range(3)]
    forming = FormingCohort(cohort_id="c1", members=(), opened_at=10.0)
    for i, name in enumerate("abc"):
        forming = forming.joined(
            name, identity_key=keys[i], version=0, task_id=f"t{i}", min_size=3, now=11.0 + i
        )
    assert forming.has_identity_keys and forming.identity_keys == tuple(keys)
    stored = json.loads(forming.to_json())
    assert stored["identity_keys"] == [k.hex() for k in keys]
    assert FormingCohort.from_json(forming.to_json()) == forming


def test_an_active_record_round_trips_its_identity_keys() -> None:
    identities = [Ed25519PrivateKey.generate() for _ in range(3)]
    keys = tuple(k.public_key().public_bytes_raw() for k in identities)
    active = CohortRecord.from_json(_bytes(legacy_sealed()))
    active = dataclasses.replace(active, active_adversary=True, identity_keys=keys)
    stored = json.loads(active.to_json())
    assert stored["active_adversary"] is True
    assert stored["identity_keys"] == [k.hex() for k in keys]
    again = CohortRecord.from_json(active.to_json())
    assert again == active and again.session_config().active
    peers = again.peer_identities()
    assert peers is not None
    assert {i: p.public_bytes_raw() for i, p in peers.items()} == dict(enumerate(keys))
    # A legacy record describes a passive session, with no identities.
    legacy = CohortRecord.from_json(_bytes(legacy_sealed()))
    assert not legacy.session_config().active and legacy.peer_identities() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"identity_keys": ["zz"]}, "field 'identity_keys': expected a list of hex strings"),
        ({"active_adversary": "yes"}, "field 'active_adversary': expected true or false"),
    ],
)
def test_malformed_active_fields_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedRecord, match=message):
        CohortRecord.from_json(_bytes({**legacy_sealed(), **change}))


def test_an_active_record_without_a_key_per_member_is_refused() -> None:
    record = dataclasses.replace(
        CohortRecord.from_json(_bytes(legacy_sealed())),
        active_adversary=True,
        identity_keys=(bytes(32),),
    )
    with pytest.raises(MalformedRecord, match="expected one key per member \\(3\\), got 1"):
        record.peer_identities()
