"""Job loop on the in-memory store: superseded skip, exactly-once, bad input, reclaim."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from worker_fixtures import eval_windows, publish_version

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import WorkerGroup
from estuary.clock import VirtualClock
from estuary.jobs import (
    CONSUMER_GROUP,
    JOB_STREAM,
    JobInputError,
    JobOutcome,
    decode_job,
    make_job,
    newest_done,
    result_key,
    submit_job,
)
from estuary.model.presets import build_preset
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key, worker_key
from estuary.state.memory import MemoryStore


@pytest.fixture(scope="module")
def base() -> Any:
    return build_preset("tiny", seed=0)


@pytest.fixture
def env(tmp_path: Path, base: Any) -> tuple[Any, BlobStore, ModelJobExecutor]:
    store = open_store("memory://")
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    executor = ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=eval_windows())
    return store, blobs, executor


class Recording:
    """Executor stand-in that records what ran and can block on one job."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def execute(self, job: Any) -> dict[str, Any]:
        self.ran.append(job.job_id)
        return {"n": len(self.ran)}


def outcomes(store: Any) -> dict[str, JobOutcome]:
    return {k: JobOutcome.from_json(r.value) for k, r in store.scan("jobresult/").items()}


def test_superseded_evaluations_are_skipped_but_artifacts_per_class_are_not() -> None:
    store = open_store("memory://")
    executor = Recording()
    group = WorkerGroup(store, executor=executor, name="g1", heartbeat_s=0.2, reclaim_idle_s=1.0)
    for version in (1, 2, 3):
        submit_job(store, make_job("evaluate", version=version))
    submit_job(store, make_job("build_artifacts", version=3, device_class="phone"))
    submit_job(store, make_job("build_artifacts", version=2, device_class="laptop"))
    submit_job(store, make_job("generate", version=1, prompt="x", job_id="gen-1"))
    while group.step(block_s=0):
        pass
    got = {k.removeprefix("jobresult/"): o.status for k, o in outcomes(store).items()}
    assert got == {
        "evaluate-v1": "skipped",
        "evaluate-v2": "skipped",
        "evaluate-v3": "done",
        "build_artifacts-phone-v3": "done",
        "build_artifacts-laptop-v2": "done",
        "gen-1": "done",  # a person's request is never superseded
    }
    assert executor.ran == [
        "evaluate-v3",
        "build_artifacts-phone-v3",
        "build_artifacts-laptop-v2",
        "gen-1",
    ]
    assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []
    assert (group.stats.done, group.stats.skipped) == (4, 2)


def test_evaluate_writes_bits_per_byte_to_the_version_record(env: Any, base: Any) -> None:
    from estuary.model.evaluate import bits_per_byte

    store, blobs, executor = env
    publish_version(store, blobs, base, 1)
    group = WorkerGroup(store, executor=executor, name="g1", heartbeat_s=0.2, reclaim_idle_s=1.0)
    submit_job(store, make_job("evaluate", version=1))
    assert group.step(block_s=0) == 1
    record = json.loads(store.get(version_key(1)).value)
    # Independent check: merge by hand and evaluate with the model-core function.
    expected = bits_per_byte(executor.merged_model(make_job("evaluate", version=1)), eval_windows())
    assert record["eval_bpb"] == pytest.approx(expected, abs=1e-6)
    assert 5.0 < record["eval_bpb"] < 10.0
    assert outcomes(store)[result_key("evaluate-v1")].output["eval_bpb"] == record["eval_bpb"]


def test_artifacts_and_merge_are_content_addressed_and_reproducible(
    env: Any, base: Any, tmp_path: Path
) -> None:
    store, blobs, executor = env
    digest = publish_version(store, blobs, base, 4)
    job = make_job("build_artifacts", version=4, device_class="phone")
    first = executor.execute(job)
    fresh = ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=eval_windows())
    second = fresh.execute(job)
    assert first["artifact_sha256"] == second["artifact_sha256"]
    manifest = json.loads(blobs.read(first["artifact_sha256"]))
    assert manifest["files"]["adapter.safetensors"] == digest
    assert set(manifest["files"]) >= {"config.json", "adapter.safetensors"}
    # No export has completed yet: the training artifact does not wait for one.
    assert "onnx" not in manifest
    # The int8 ONNX export is a job of its own; once done, artifacts built after it
    # name it for serving, and it is reproducible too.
    group = WorkerGroup(store, executor=executor, name="g1", heartbeat_s=0.2, reclaim_idle_s=1.0)
    submit_job(store, make_job("export_onnx", version=4))
    assert group.step(block_s=0) == 1
    exported = outcomes(store)[result_key("export_onnx-v4")].output["onnx"]
    assert set(exported) == {"model.int8.onnx", "estuary_onnx.json", "config.json"}
    assert fresh.execute(make_job("export_onnx", version=4)) == {"onnx": exported}
    manifest = json.loads(blobs.read(fresh.execute(job)["artifact_sha256"]))
    assert manifest["onnx"] == exported
    served = tmp_path / "served"
    served.mkdir()
    for name, blob in manifest["onnx"].items():
        (served / name).write_bytes(blobs.read(blob))
    from edge_client.serving import OrtLM

    logits = OrtLM(served).logits(np.array([[1, 2, 3, 4]], dtype=np.int64))
    assert logits.shape == (1, 4, 256) and np.isfinite(logits).all()
    merged = executor.execute(make_job("merge", version=4))
    assert merged == fresh.execute(make_job("merge", version=4))
    assert "model.safetensors" in json.loads(blobs.read(merged["checkpoint_sha256"]))["files"]


def test_bad_inputs_fail_clearly_and_the_group_keeps_serving(env: Any, base: Any) -> None:
    store, blobs, executor = env
    publish_version(store, blobs, base, 1)
    # Version 2 is announced but its adapter blob never reached the blob store.
    store.put(version_key(2), json.dumps({"version": 2, "adapter_sha256": "ab" * 32}).encode())
    group = WorkerGroup(store, executor=executor, name="g1", heartbeat_s=0.2, reclaim_idle_s=1.0)
    submit_job(store, make_job("merge", version=9, job_id="unknown-version"))
    submit_job(store, make_job("generate", version=2, prompt="def ", job_id="missing-ckpt"))
    store.stream_add(JOB_STREAM, {"job": b"\xff\xfenot a protobuf"})
    submit_job(store, make_job("generate", version=1, prompt="def ", max_new_tokens=5, job_id="ok"))
    while group.step(block_s=0):
        pass
    got = outcomes(store)
    assert got[result_key("unknown-version")].status == "failed"
    assert "version 9: unknown" in got[result_key("unknown-version")].error
    assert "missing from the blob store" in got[result_key("missing-ckpt")].error
    assert next(o for k, o in got.items() if k.startswith("jobresult/entry-")).status == "failed"
    assert got[result_key("ok")].status == "done"
    assert len(got[result_key("ok")].output["text"].encode("utf-8", "replace")) >= 1
    assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []


def test_decode_job_refuses_entries_without_a_job() -> None:
    with pytest.raises(JobInputError, match="no 'job' field"):
        decode_job({"other": b"x"})


def test_jobs_of_a_silent_group_are_reclaimed_and_completed_once() -> None:
    # Virtual time: the store's pending-idle times and the groups' heartbeats read one
    # clock that moves only when the test says, so no machine is too slow for this.
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    for version in (1, 2):
        submit_job(store, make_job("generate", version=version, job_id=f"g{version}"))
    dead = WorkerGroup(
        store, executor=Recording(), name="dead", heartbeat_s=0.1, reclaim_idle_s=0.5, clock=clock
    )
    dead.heartbeat()
    # "dead" takes a job and dies before recording it: the job stays pending on it.
    taken = store.read_group(JOB_STREAM, CONSUMER_GROUP, "dead", count=1)
    assert [decode_job(j.fields).job_id for j in taken] == ["g1"]
    alive_exec = Recording()
    alive = WorkerGroup(
        store, executor=alive_exec, name="alive", heartbeat_s=0.1, reclaim_idle_s=0.5, clock=clock
    )
    assert alive.reclaim() == []  # dead's heartbeat is fresh: not yet silent
    alive.step(block_s=0)  # takes g2 itself
    clock.advance(0.49)
    assert alive.silent_groups() == set()  # not silent for reclaim_idle_s yet
    clock.advance(0.02)
    assert alive.silent_groups() == {"dead"}
    alive.step(block_s=0)
    assert alive_exec.ran == ["g2", "g1"]
    assert alive.stats.reclaimed == 1
    assert outcomes(store)[result_key("g1")].deliveries == 2
    # The dead group comes back and finishes the same job late: no second completion.
    assert dead.process(taken[0]) is None
    assert len(outcomes(store)) == 2 and store.pending(JOB_STREAM, CONSUMER_GROUP) == []


def test_run_heartbeats_and_stops() -> None:
    store = open_store("memory://")
    group = WorkerGroup(
        store, executor=Recording(), name="hb", heartbeat_s=0.05, reclaim_idle_s=0.5, stages=2
    )
    submit_job(store, make_job("evaluate", version=1))
    stats = group.run(threading.Event(), idle_exit_s=0.3)
    beat = json.loads(store.get(worker_key("hb")).value)
    assert (stats.done, beat["jobs_done"], beat["stages"]) == (1, 1, 2)
    assert beat["last_eval_version"] == 1 and 0 <= beat["last_eval_lag_s"] < 5.0
    assert time.time() - beat["last_seen"] < 2.0


def test_run_refuses_a_virtual_clock() -> None:
    clock = VirtualClock()
    group = WorkerGroup(
        MemoryStore(clock=clock.time), executor=Recording(), name="v", heartbeat_s=1,
        reclaim_idle_s=3, clock=clock,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="real clock"):
        group.run(threading.Event())


def test_constructor_validates_timing() -> None:
    with pytest.raises(ValueError, match="reclaim_idle_s"):
        WorkerGroup(
            open_store("memory://"), executor=Recording(), name="x", heartbeat_s=1, reclaim_idle_s=2
        )


class Blocking(Recording):
    """Records what ran; ``evaluate`` jobs wait until ``release`` is set (a slow job)."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluating = threading.Event()
        self.release = threading.Event()

    def execute(self, job: Any) -> dict[str, Any]:
        out = super().execute(job)
        if job.WhichOneof("kind") == "evaluate":
            self.evaluating.set()
            assert self.release.wait(60), "the test never released the evaluation"
        return out


def test_artifact_jobs_run_ahead_of_a_slow_job_and_their_entries_do_not_rerun() -> None:
    # Prepare: version 1's jobs; the stream loop is busy evaluating it (slow) when
    # versions 2 and 3 are committed.
    store = open_store("memory://")
    executor = Blocking()
    group = WorkerGroup(
        store, executor=executor, name="g1", heartbeat_s=0.2, reclaim_idle_s=1.0,
        clock=VirtualClock(start=1_800_000_000.0),
    )  # fmt: skip
    submit_job(store, make_job("evaluate", version=1))
    submit_job(store, make_job("build_artifacts", version=1, device_class="phone"))
    loop = threading.Thread(target=lambda: [group.step(block_s=0) for _ in range(8)])
    loop.start()
    assert executor.evaluating.wait(60)
    for version in (2, 3):
        submit_job(store, make_job("build_artifacts", version=version, device_class="phone"))
        submit_job(store, make_job("evaluate", version=version))

    # Execute: the artifact lane's look, while the evaluation of version 1 still runs.
    ahead = group.step_artifacts()

    # Assert: the newest artifact job ran ahead, once, and is the class's newest done.
    assert [(o.job_id, o.status, o.deliveries) for o in ahead] == [
        ("build_artifacts-phone-v3", "done", 0)
    ]
    assert executor.ran == ["evaluate-v1", "build_artifacts-phone-v3"]
    assert newest_done(store, "build_artifacts", device_class="phone") == (
        3,
        "build_artifacts-phone-v3",
    )
    assert group.step_artifacts() == []  # nothing new: a second look runs nothing
    executor.release.set()
    loop.join(60)
    assert not loop.is_alive()
    # The stream loop skipped the older artifact entries and ran no artifact job again.
    assert executor.ran == ["evaluate-v1", "build_artifacts-phone-v3", "evaluate-v3"]
    got = {k.removeprefix("jobresult/"): o.status for k, o in outcomes(store).items()}
    assert got == {
        "evaluate-v1": "done",
        "evaluate-v2": "skipped",
        "evaluate-v3": "done",
        "build_artifacts-phone-v1": "skipped",
        "build_artifacts-phone-v2": "skipped",
        "build_artifacts-phone-v3": "done",
    }
    assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []
    assert group.stats.duplicates == 0
