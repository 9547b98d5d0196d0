"""A federation driven through 300 versions keeps a flat store (issue 11, item 9).

Every version is one real secure-aggregation cohort of three laptops through the
:class:`FederationService` (keys, shares, masked uploads, consistency check, unmasking,
fold-in, commit) on a :class:`VirtualClock` over a :class:`MemoryStore`. The cloud jobs
run through a real :class:`WorkerGroup` whose executor records what the model executor
records (an edge-artifact manifest naming the version's adapter and a compressed base,
an evaluation figure), without the model's seconds of compute per job. After warm-up the
store's key count and bytes and the blob store's size must stay flat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from service_fixtures import Fed
from test_service import run_cohort

from cloud_workers.group import WorkerGroup
from estuary.artifacts import ADAPTER_FILE, EdgeArtifactManifest
from estuary.jobs import job_kind, update_version_record
from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Footprint
from estuary.state.keys import version_key

VERSIONS = 300
COHORT_S = 5.0  # virtual seconds between versions


class RecordingCloud:
    """Records each cloud job's outcome as :class:`ModelJobExecutor` does, model aside."""

    def __init__(self, fed: Fed) -> None:
        self.fed = fed

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        store, blobs = self.fed.store, self.fed.blobs
        if job_kind(job) == "evaluate":
            update_version_record(
                store, job.version, {"eval_bpb": 1.0}, stamp="eval_at", clock=self.fed.clock
            )
            return {"eval_bpb": 1.0}
        record = store.get(version_key(job.version))
        assert record is not None, f"version {job.version} was removed while still needed"
        adapter = json.loads(record.value)["adapter_sha256"]
        assert blobs.exists(adapter), f"version {job.version}'s adapter blob was collected"
        device_class = job.build_artifacts.device_class
        manifest = EdgeArtifactManifest(
            version=job.version,
            device_class=device_class,
            scheme="int8",
            files={"base.bin": blobs.put_bytes(f"base of {device_class}".encode()),
                   ADAPTER_FILE: adapter},
        )  # fmt: skip
        return {"artifact_sha256": blobs.put_bytes(manifest.to_json()), "scheme": "int8"}


def blob_size(fed: Fed) -> tuple[int, int]:
    files = [p for p in fed.blobs.root.glob("??/*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def test_three_hundred_versions_leave_a_flat_store(tmp_path: Path, base: Any) -> None:
    fed = Fed(
        tmp_path,
        base,
        aggregation={"buffer_size": 3, "max_staleness": 4},
        retention={"keep_versions": 8, "grace_s": 30.0, "interval_s": 0.0, "blob_grace_s": 1e-6},
    )
    cloud = WorkerGroup(
        fed.store, executor=RecordingCloud(fed), name="recording", heartbeat_s=1.0,
        reclaim_idle_s=3.0, clock=fed.clock,
    )  # fmt: skip
    laptops = [fed.device("laptop") for _ in range(3)]
    rng = np.random.default_rng(0)
    sizes: list[Footprint] = []
    blob_sizes: list[tuple[int, int]] = []
    for version in range(1, VERSIONS + 1):
        run_cohort(fed, laptops, rng=rng)
        head = fed.service.ledger.head()
        assert head is not None and head.version == version
        while cloud.step(block_s=0.0):
            pass
        fed.clock.advance(COHORT_S)
        sizes.append(fed.store.footprint())
        blob_sizes.append(blob_size(fed))

    def peak(values: list[int], start: int, stop: int) -> int:
        return max(values[start - 1 : stop])  # versions start..stop

    keys = [s.keys for s in sizes]
    size = [s.bytes for s in sizes]
    blob_count = [b[0] for b in blob_sizes]
    blob_bytes = [b[1] for b in blob_sizes]
    for series in (keys, size, blob_count, blob_bytes):
        assert peak(series, 201, 300) <= 1.1 * peak(series, 100, 200), series[::25]
    print(
        f"versions 201-300: at most {peak(keys, 201, 300)} keys, {peak(size, 201, 300)} bytes, "
        f"{peak(blob_count, 201, 300)} blobs, {peak(blob_bytes, 201, 300)} blob bytes"
    )
    # Not flat by accident of scale: everything older than the kept window is gone,
    # and what is kept is the window (the newest keep_versions) and no more.
    versions = sorted(fed.store.scan("version/"))
    assert versions == [version_key(v) for v in range(VERSIONS - 7, VERSIONS + 1)]
    assert fed.store.scan("cohort-log/").keys() <= {
        k for c in fed.store.scan("cohort/") for k in fed.store.scan(f"cohort-log/{c[7:]}/")
    }
    finished_long_ago = [
        k for k, r in fed.store.scan("cohort/").items()
        if fed.clock.time() - json.loads(r.value).get("finished_at", fed.clock.time()) > 40.0
    ]  # fmt: skip
    assert finished_long_ago == []
    # Every acknowledged job was trimmed but the last version's (run after the last sweep):
    # an artifact per class, the evaluation and the ONNX export.
    assert fed.store.stream_length("jobs") <= 2 + len(fed.settings.device_classes)
    # The newest artifact a device is handed still has every blob it names.
    offer_artifact = fed.service.admission.artifact_for("laptop")
    assert offer_artifact is not None and offer_artifact[0] == VERSIONS
    manifest = EdgeArtifactManifest.from_json(fed.blobs.read(offer_artifact[1]))
    assert all(fed.blobs.exists(d) for d in manifest.files.values())
