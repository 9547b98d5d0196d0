"""Worker groups end to end against a real redis-server, one group killed mid-job.

Two worker groups run as separate processes on one job stream. One is SIGKILLed while
it is executing a job; the other reclaims that job once the dead group's heartbeat is
older than ``reclaim_idle_s``. Every job ends with exactly one recorded outcome,
superseded evaluations are skipped, and an artifact built twice has one hash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
# tests/ itself is on pytest's pythonpath; the worker fixtures live beside their unit tests.
sys.path.insert(0, str(ROOT / "tests" / "unit" / "cloud_workers"))

from redis_server import RedisServer  # noqa: E402
from worker_fixtures import publish_version  # noqa: E402

from estuary.jobs import CONSUMER_GROUP, JOB_STREAM, JobOutcome, make_job, result_key, submit_job  # noqa: E402
from estuary.model.presets import build_preset  # noqa: E402
from estuary.state import open_store  # noqa: E402
from estuary.state.blobs import BlobStore  # noqa: E402
from estuary.state.keys import version_key, worker_key  # noqa: E402

# No skip without redis-server: the redis_binary fixture fails the run instead (or skips
# only with ESTUARY_ALLOW_NO_REDIS=1), like every Redis-backed test.
pytestmark = [pytest.mark.redis, pytest.mark.slow]

# One worker group process: the tiny preset, 4 held-out windows, an injected per-job
# delay so the test can kill it mid-job.
WORKER = """
import sys, threading
from cloud_workers.group import WorkerGroup
from cloud_workers.executor import ModelJobExecutor
from estuary.model.presets import build_preset
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from worker_fixtures import eval_windows

url, blob_dir, name, delay, idle_exit, lease = sys.argv[1:7]
store = open_store(url)
# No ONNX export: this test is about job delivery, and each export costs seconds.
executor = ModelJobExecutor(store, blobs=BlobStore(blob_dir), base=build_preset("tiny", seed=0),
                            eval_windows=eval_windows(), onnx=False)
# No artifact lane: this test counts what each group holds pending from the stream
# (the lane is tested in tests/unit/cloud_workers/test_jobs.py).
group = WorkerGroup(store, executor=executor, name=name, heartbeat_s=0.5,
                    reclaim_idle_s=float(lease), job_delay_s=float(delay), artifacts_ahead=False)
group.run(threading.Event(), idle_exit_s=float(idle_exit))
"""

#: Worst case for one process to import torch + transformers, build the model and
#: drain its jobs on a loaded 2-core runner; a hang fails the test instead of CI.
PROCESS_TIMEOUT_S = 120.0


def start_group(
    url: str, blob_dir: Path, name: str, *, delay: float, idle_exit: float, lease: float = 2.0
) -> subprocess.Popen[bytes]:
    # One intra-op thread per process: the tiny model gains nothing from more, and two
    # worker processes on a 2-core runner would otherwise oversubscribe it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "unit" / "cloud_workers"), env.get("PYTHONPATH", "")]
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER,
            url,
            str(blob_dir),
            name,
            str(delay),
            str(idle_exit),
            str(lease),
        ],
        env=env,
    )


def test_two_groups_one_killed_every_job_completes_exactly_once(
    tmp_path: Path, redis_binary: str
) -> None:
    torch.set_num_threads(1)  # this process builds models too; see start_group
    with RedisServer(tmp_path / "redis", binary=redis_binary) as redis:
        store = open_store(redis.url)
        blobs = BlobStore(tmp_path / "blobs")
        base = build_preset("tiny", seed=0)
        for version in (1, 2, 3, 4):
            publish_version(store, blobs, base, version)
        jobs = [make_job("evaluate", version=v) for v in (1, 2, 3, 4)]
        jobs += [
            make_job("build_artifacts", version=4, device_class="phone", job_id="art-a"),
            make_job("build_artifacts", version=4, device_class="phone", job_id="art-b"),
        ]
        jobs += [
            make_job("generate", version=4, prompt="def ", max_new_tokens=4, job_id=f"gen-{i}")
            for i in range(6)
        ]
        # A job for a version that does not exist: a clear failure, the groups go on.
        jobs.append(make_job("merge", version=9, job_id="merge-unknown"))
        for job in jobs:
            submit_job(store, job)

        # The victim never finishes a job (each takes 10 minutes) and advertises a 5 s
        # lease (ten heartbeats), so a victim starved of CPU by a busy machine still keeps
        # its job until it is killed; it is killed inside its first job once the survivor
        # serves. The survivor stays 12 s idle before it exits: past that lease, so it
        # reclaims the job.
        victim = start_group(
            redis.url, tmp_path / "blobs", "victim", delay=600, idle_exit=600, lease=5.0
        )
        survivor = None
        try:
            deadline = time.monotonic() + PROCESS_TIMEOUT_S

            def victim_holds_a_job() -> bool:
                pending = store.pending(JOB_STREAM, CONSUMER_GROUP)
                return any(p.consumer == "victim" for p in pending)

            while time.monotonic() < deadline and not victim_holds_a_job():
                time.sleep(0.05)
            assert victim_holds_a_job(), "the victim group never took a job"
            survivor = start_group(
                redis.url, tmp_path / "blobs", "survivor", delay=0.0, idle_exit=12
            )
            while time.monotonic() < deadline and store.get(worker_key("survivor")) is None:
                time.sleep(0.05)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            # What the victim held when it died: one job (it pulls one at a time).
            orphaned = [
                p for p in store.pending(JOB_STREAM, CONSUMER_GROUP) if p.consumer == "victim"
            ]
            assert len(orphaned) == 1
            assert survivor.wait(timeout=PROCESS_TIMEOUT_S) == 0
        finally:
            for proc in (victim, survivor):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()

        results = {k: JobOutcome.from_json(r.value) for k, r in store.scan("jobresult/").items()}
        # Every job has exactly one outcome; nothing is left pending.
        assert sorted(results) == sorted(result_key(j.job_id) for j in jobs)
        assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []
        status = {k.removeprefix("jobresult/"): o.status for k, o in results.items()}
        assert [status[f"evaluate-v{v}"] for v in (1, 2, 3, 4)] == ["skipped"] * 3 + ["done"]
        assert status["merge-unknown"] == "failed"
        assert "version 9: unknown" in (results[result_key("merge-unknown")].error or "")
        assert all(status[f"gen-{i}"] == "done" for i in range(6))
        # The job the victim died in was reclaimed and completed once, by the survivor,
        # which recorded every outcome (the victim finished none).
        redelivered = [o for o in results.values() if o.deliveries > 1]
        assert len(redelivered) == 1
        assert (redelivered[0].group, redelivered[0].deliveries) == ("survivor", 2)
        assert {o.group for o in results.values()} == {"survivor"}
        # Artifacts built twice, by separate runs, have one content hash.
        art = [results[result_key(n)].output["artifact_sha256"] for n in ("art-a", "art-b")]
        assert art[0] == art[1] and blobs.exists(art[0])
        # The evaluation is in the version record that `estuary status` shows.
        v4 = json.loads(store.get(version_key(4)).value)
        assert v4["eval_bpb"] == results[result_key("evaluate-v4")].output["eval_bpb"]
        assert "eval_bpb" not in json.loads(store.get(version_key(3)).value)
        beat = json.loads(store.get(worker_key("survivor")).value)
        assert beat["jobs_reclaimed"] >= 1 and beat["current_job"] is None
        store.close()


def _config(path: Path, *, url: str, blob_dir: Path, stages: int) -> Path:
    path.write_text(
        f"""
group = "pipe"
stages = {stages}
backend = "gloo"
micro_batches = 2
heartbeat_s = 0.5
reclaim_idle_s = 5.0
process_group_timeout_s = 60.0

[state]
url = "{url}"
blob_dir = "{blob_dir}"

[model]
preset = "tiny"
"""
    )
    return path


def test_two_stage_group_under_torchrun_evaluates_like_one_process(
    tmp_path: Path, redis_binary: str
) -> None:
    torch.set_num_threads(1)
    from cloud_workers.executor import ModelJobExecutor
    from cloud_workers.worker import cloud_eval_windows
    from estuary.model.evaluate import bits_per_byte

    with RedisServer(tmp_path / "redis", binary=redis_binary) as redis:
        store = open_store(redis.url)
        blobs = BlobStore(tmp_path / "blobs")
        base = build_preset("tiny", seed=0)
        publish_version(store, blobs, base, 1)
        submit_job(store, make_job("evaluate", version=1))
        config = _config(tmp_path / "w.toml", url=redis.url, blob_dir=tmp_path / "blobs", stages=2)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        # `run` sees stages = 2 outside torchrun, so it launches torchrun with 2 ranks.
        proc = subprocess.run(
            [sys.executable, "-m", "cloud_workers.cli", "run", "--config", str(config),
             "--idle-exit-s", "2"],
            env=env, timeout=PROCESS_TIMEOUT_S, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(store.get(version_key(1)).value)["eval_bpb"]
        executor = ModelJobExecutor(
            store, blobs=blobs, base=base, eval_windows=cloud_eval_windows()
        )
        expected = bits_per_byte(
            executor.merged_model(make_job("evaluate", version=1)), cloud_eval_windows()
        )
        assert abs(got - expected) < 1e-5
        beat = json.loads(store.get(worker_key("pipe")).value)
        assert (beat["stages"], beat["jobs_done"]) == (2, 1)
        store.close()
