"""The supersede rule of the job contract: run the newest, skip only for a started newer one."""

from __future__ import annotations

import json

import pytest

from estuary.jobs import (
    job_to_run,
    kind_key,
    make_job,
    newest_done,
    newest_submitted,
    record_done,
    submit_job,
)
from estuary.state.memory import MemoryStore


def started(store: MemoryStore, key: str) -> int | None:
    record = store.get(f"jobstarted/{key}")
    return None if record is None else int(json.loads(record.value)["version"])


def test_an_older_job_runs_the_newest_submitted_one_in_its_place() -> None:
    store = MemoryStore()
    for version in (1, 2, 3):
        submit_job(store, make_job("evaluate", version=version, adapter_sha256=f"{version:064x}"))
    decision = job_to_run(store, make_job("evaluate", version=1))
    assert decision.run is not None and decision.superseded_by == 3
    # The whole newest job, as submitted: its adapter and id travel with it.
    assert (decision.run.job_id, decision.run.adapter.sha256) == ("evaluate-v3", f"{3:064x}")
    assert started(store, "evaluate") == 3


def test_a_job_is_skipped_only_once_a_newer_version_has_started() -> None:
    store = MemoryStore()
    for version in (1, 2, 3):
        submit_job(store, make_job("build_artifacts", version=version, device_class="phone"))
    first = job_to_run(store, make_job("build_artifacts", version=1, device_class="phone"))
    assert first.run is not None and first.run.version == 3
    # A second group handed version 2 meanwhile: version 3 is started, so it skips.
    second = job_to_run(store, make_job("build_artifacts", version=2, device_class="phone"))
    assert (second.run, second.superseded_by) == (None, 3)
    # The started version's own entry still runs (its first runner may have died).
    own = job_to_run(store, make_job("build_artifacts", version=3, device_class="phone"))
    assert own.run is not None and (own.run.version, own.superseded_by) == (3, None)
    # Another class is a separate kind key: nothing newer started there.
    laptop = job_to_run(store, make_job("build_artifacts", version=1, device_class="laptop"))
    assert laptop.run is not None and laptop.run.version == 1
    assert started(store, "build_artifacts/laptop") == 1


def test_a_newer_submission_after_the_start_is_run_by_the_next_entry() -> None:
    store = MemoryStore()
    submit_job(store, make_job("evaluate", version=1))
    assert job_to_run(store, make_job("evaluate", version=1)).run is not None
    submit_job(store, make_job("evaluate", version=2))
    # Version 1 is started, not version 2: the entry of version 2 runs it.
    decision = job_to_run(store, make_job("evaluate", version=2))
    assert decision.run is not None and decision.run.version == 2


def test_generate_is_never_superseded() -> None:
    store = MemoryStore()
    submit_job(store, make_job("generate", version=5, prompt="a", job_id="later"))
    asked = make_job("generate", version=1, prompt="b", job_id="asked")
    decision = job_to_run(store, asked)
    assert decision.run is asked and decision.superseded_by is None
    assert newest_submitted(store, asked) is None
    assert store.scan("jobstarted/") == {}


def test_a_latest_record_from_before_it_carried_the_job_runs_the_delivered_one() -> None:
    store = MemoryStore()
    store.put("joblatest/evaluate", json.dumps({"version": 7}).encode())
    job = make_job("evaluate", version=4)
    decision = job_to_run(store, job)
    assert decision.run is job and started(store, "evaluate") == 4


def test_done_record_only_rises_and_names_the_job() -> None:
    store = MemoryStore()
    assert newest_done(store, "build_artifacts", device_class="phone") is None
    record_done(store, make_job("build_artifacts", version=4, device_class="phone"))
    record_done(store, make_job("build_artifacts", version=2, device_class="phone"))
    record_done(store, make_job("build_artifacts", version=9, device_class="laptop"))
    record_done(store, make_job("generate", version=9, prompt="x", job_id="g"))  # no record
    assert newest_done(store, "build_artifacts", device_class="phone") == (
        4,
        "build_artifacts-phone-v4",
    )
    assert newest_done(store, "build_artifacts", device_class="laptop") == (
        9,
        "build_artifacts-laptop-v9",
    )
    assert sorted(store.scan("jobdone/")) == [
        "jobdone/build_artifacts/laptop",
        "jobdone/build_artifacts/phone",
    ]


def test_bad_arguments_and_records_are_named() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="never superseded"):
        newest_done(store, "generate")
    with pytest.raises(ValueError, match="device_class"):
        kind_key("build_artifacts")
    store.put("jobstarted/evaluate", b"not json")
    with pytest.raises(ValueError, match="jobstarted/evaluate"):
        job_to_run(store, make_job("evaluate", version=1))
