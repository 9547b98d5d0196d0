"""What ``estuary status`` reads from the store: typed rows, the summary, JSON, bad records."""

from __future__ import annotations

import json
import re

import pytest
from status_fixtures import HEAD, NOW, cells, fill_run, overlong, sample_report
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode
from estuary.cli.status_report import build_report, collect_records
from estuary.federation import FederationRecord, MalformedFederationRecord, PublishedClass
from estuary.state import shared_memory_store
from estuary.state.keys import FEDERATION_KEY, cohort_key, forming_key, version_key, worker_key
from estuary.state.memory import MemoryStore

runner = CliRunner()


def test_classes_count_enrolled_and_waiting_devices_against_min_size() -> None:
    report = sample_report()

    rows = [(c.name, c.rank, c.enrolled, c.revoked, c.waiting, c.min_size) for c in report.classes]
    assert rows == [("phone", 4, 2, 0, 2, 4), ("laptop", 16, 2, 1, 0, 4)]
    assert report.classes[0].forming_since == NOW - 12


def test_classes_not_published_follow_the_published_ones_by_name() -> None:
    store = MemoryStore()
    fill_run(store)
    store.put(forming_key("watch"), json.dumps({"members": ["a"], "opened_at": NOW}).encode())
    store.put("device/zz", json.dumps({"device_class": "tablet", "revoked": False}).encode())

    report = build_report(collect_records(store), now=NOW)

    assert [(c.name, c.rank, c.enrolled, c.waiting) for c in report.classes] == [
        ("phone", 4, 2, 2),
        ("laptop", 16, 2, 0),
        ("tablet", None, 1, 0),
        ("watch", None, 0, 1),
    ]


def test_cohorts_by_stage_versions_and_lag() -> None:
    report = sample_report()

    assert report.active_by_stage() == {"ADVERTISE_KEYS": 1, "MASKED_INPUT": 2, "UNMASKING": 1}
    assert (report.finished("completed"), report.finished("aborted")) == (14, 1)
    assert [v.version for v in report.versions] == list(range(HEAD + 1))
    assert report.head_version == HEAD
    scored = report.newest_scored()
    assert scored is not None and scored.version == HEAD - 1
    assert report.evaluation_lag() == 1
    assert report.problems == ()


def test_bad_records_are_named_and_the_rest_still_shown() -> None:
    store = MemoryStore()
    fill_run(store)
    store.put(version_key(3), json.dumps({"version": 3, "eval_bpb": "low"}).encode())
    store.put(worker_key("w"), b"\xff not json")
    store.put(cohort_key("c"), json.dumps({"stage": "unmasking", "members": 5}).encode())

    report = build_report(collect_records(store), now=NOW)

    assert report.problems == (
        "version/0000000003: field 'eval_bpb': expected a number, got 'low'",
        "worker/w: record is not JSON",
    )
    v3 = next(v for v in report.versions if v.version == 3)
    assert v3.eval_bpb is None and v3.committed_at is None
    # A record of an older writer: members as a count, stage in lower case, no status.
    c = next(c for c in report.cohorts if c.cohort_id == "c")
    assert (c.stage, c.status, c.size) == ("UNMASKING", "active", 5)
    assert report.active_by_stage()["UNMASKING"] == 2


def test_malformed_federation_record_is_a_problem_not_a_crash() -> None:
    store = MemoryStore()
    fill_run(store)
    store.put(FEDERATION_KEY, json.dumps({"min_size": "four"}).encode())

    report = build_report(collect_records(store), now=NOW)

    assert report.federation is None
    assert report.problems == ("federation/settings: field 'device_classes' is missing",)
    assert [c.min_size for c in report.classes] == [None, None]


def test_federation_record_round_trips_and_names_bad_fields() -> None:
    record = FederationRecord(
        device_classes=(PublishedClass("phone", 4),),
        min_size=4,
        max_size=8,
        formation_s=1,
        buffer_size=3,
        published_by="c0",
        published_at=NOW,
    )
    assert FederationRecord.from_json(record.to_json()) == record
    bad = {**record.to_dict(), "min_size": True}
    with pytest.raises(MalformedFederationRecord, match="field 'min_size': expected int, got True"):
        FederationRecord.from_dict(bad)
    with pytest.raises(MalformedFederationRecord, match="not JSON"):
        FederationRecord.from_json(b"{")


def test_json_keeps_every_record_and_adds_the_summary() -> None:
    store = shared_memory_store("status-json")
    fill_run(store)

    result = runner.invoke(app, ["status", "--state", "memory://status-json", "--format", "json"])

    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    assert len(data["versions"]) == HEAD + 1 and data["versions"][0]["id"] == "0000000000"
    assert len(data["cohorts"]) == 19 and len(data["devices"]) == 5
    assert [w["id"] for w in data["workers"]] == ["cpu-b", "gpu-a"]
    assert data["forming"][0]["id"] == "phone" and len(data["forming"][0]["members"]) == 2
    assert data["head"]["version"] == HEAD
    assert data["federation"]["min_size"] == 4
    summary = data["summary"]
    assert [(c["name"], c["waiting"], c["min_size"]) for c in summary["classes"]] == [
        ("phone", 2, 4),
        ("laptop", 0, 4),
    ]
    assert summary["cohorts"] == {
        "active_by_stage": {"ADVERTISE_KEYS": 1, "MASKED_INPUT": 2, "UNMASKING": 1},
        "completed": 14,
        "aborted": 1,
    }
    assert summary["lag"]["evaluation_versions_behind"] == 1
    assert summary["lag"]["worker_job_lag_s"] == {"cpu-b": 125.0, "gpu-a": 7.5}
    assert summary["devices"] == {"enrolled": 4, "revoked": 1}


def test_text_command_fits_80_columns_with_every_detail() -> None:
    store = shared_memory_store("status-text")
    fill_run(store)

    result = runner.invoke(
        app, ["status", "--state", "memory://status-text", "--all"], env={"COLUMNS": "80"}
    )

    assert result.exit_code == ExitCode.OK, result.output
    assert overlong(result.stdout) == [] and "…" not in result.stdout
    assert not re.search(r"\b1\d{9}\b", result.stdout)  # no raw Unix seconds
    assert cells(result.stdout, "phone") == ["phone", "4", "2", "2", "4"]
    assert "all cohorts (19)" in result.stdout and "all devices (5)" in result.stdout
