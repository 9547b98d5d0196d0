"""A retention sweep over a real redis-server removes what the rules say, and only that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis_server import RedisServer

from coordinator.retention import Retention
from estuary.clock import VirtualClock
from estuary.config.models import RetentionSettings
from estuary.jobs import CONSUMER_GROUP, JOB_STREAM, job_id_for, result_key
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from estuary.state.keys import HEAD_KEY, version_key

pytestmark = pytest.mark.redis


def test_sweep_on_redis_keeps_the_window_and_trims_acknowledged_jobs(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = VirtualClock()
    store = open_store(own_redis_server.url)
    blobs = BlobStore(tmp_path, fsync=False)
    adapters = {v: blobs.put_bytes(f"adapter {v}".encode()) for v in range(20)}
    for v in range(20):
        store.put(
            version_key(v), json.dumps({"version": v, "adapter_sha256": adapters[v]}).encode()
        )
        job_id = job_id_for("evaluate", version=v)
        store.put(result_key(job_id), json.dumps({"job_id": job_id, "version": v}).encode())
        store.put(f"jobs-submitted/{v}", b"1")
    store.put(HEAD_KEY, json.dumps({"version": 19, "adapter_sha256": adapters[19]}).encode())
    store.put("jobdone/evaluate", json.dumps({"version": 3, "job_id": "evaluate-v3"}).encode())
    store.ensure_group(JOB_STREAM, CONSUMER_GROUP)
    ids = [store.stream_add(JOB_STREAM, {"job": b"x"}) for _ in range(5)]
    store.read_group(JOB_STREAM, CONSUMER_GROUP, "w", count=3)
    store.ack(JOB_STREAM, CONSUMER_GROUP, *ids[:2])
    retention = Retention(
        RetentionSettings(keep_versions=5, blob_grace_s=1e-6),
        store=store,
        blobs=blobs,
        max_staleness=2,
        clock=clock,
    )

    report = retention.sweep()

    assert sorted(store.scan("version/")) == [version_key(v) for v in range(15, 20)]
    assert sorted(store.scan("jobs-submitted/")) == [f"jobs-submitted/{v}" for v in range(15, 20)]
    # evaluate-v3 is the newest done evaluation: kept although below the window.
    assert sorted(store.scan("jobresult/")) == sorted(
        [result_key("evaluate-v3")] + [result_key(f"evaluate-v{v}") for v in range(15, 20)]
    )
    assert store.stream_length(JOB_STREAM) == 3  # the pending one and the two undelivered
    assert set(blobs.digests()) == {adapters[v] for v in range(15, 20)}
    assert (report.versions, report.markers, report.job_results) == (15, 15, 14)
    assert (report.stream_entries, report.blobs) == (2, 15)
    assert retention.sweep().removed == 0  # a second sweep finds nothing more
