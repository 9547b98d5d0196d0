"""A version's cloud jobs are queued once, artifacts first, stamped by the injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.job_submission import JobSubmitter
from coordinator.versions import VersionInfo
from estuary.clock import VirtualClock
from estuary.jobs import CONSUMER_GROUP, JOB_STREAM, decode_job, job_kind
from estuary.state.blobs import BlobStore
from estuary.state.memory import MemoryStore


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def event(self, kind: str, **fields: Any) -> None:
        self.seen.append((kind, fields))


def test_jobs_are_queued_once_per_version_artifacts_first(tmp_path: Path) -> None:
    clock = VirtualClock(start=1_800_000_000.0)
    store = MemoryStore(clock=clock.time)
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    digest = blobs.put_bytes(b"adapter bytes")
    events = Events()
    submitter = JobSubmitter(
        store, blobs=blobs, device_classes=["phone", "laptop"], observer=events, clock=clock
    )
    info = VersionInfo(version=3, adapter_sha256=digest, cohorts=(), updates=0)

    clock.advance(1.5)
    assert submitter.submit(info)
    clock.advance(10)
    assert not submitter.submit(info)  # a second replica, or a repeated tick: nothing more

    jobs = [
        decode_job(entry.fields)
        for entry in store.read_group(JOB_STREAM, CONSUMER_GROUP, "reader", count=10)
    ]
    assert [(job_kind(j), j.job_id) for j in jobs] == [
        ("build_artifacts", "build_artifacts-phone-v3"),
        ("build_artifacts", "build_artifacts-laptop-v3"),
        ("evaluate", "evaluate-v3"),
        ("export_onnx", "export_onnx-v3"),
    ]
    assert {j.created_ms for j in jobs} == {1_800_000_001_500}
    assert jobs[0].adapter.size_bytes == len(b"adapter bytes")
    assert [kind for kind, _ in events.seen] == ["job_submitted"] * 4


def test_no_device_class_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device_classes"):
        JobSubmitter(
            MemoryStore(),
            blobs=BlobStore(tmp_path / "blobs", fsync=False),
            device_classes=[],
            observer=Events(),
        )
