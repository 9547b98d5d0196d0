"""Liveness of the job loop under real commit rates and crashes, on a virtual clock.

- Versions committed faster than jobs run must not starve any kind key: each device
  class's newest artifact and the newest evaluation keep up, with a lag bounded by a few
  job durations (the supersede rule of :func:`estuary.jobs.job_to_run`).
- Whatever the interleaving of submissions, groups and crashes, every job ends with one
  outcome, nothing runs twice, and the newest version of each kind key is done.
- A job held by a dead group is taken over once the lease that group advertises has
  passed: within seconds for the coordinator's local worker, never while it heartbeats.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from worker_fixtures import eval_windows, publish_version

from cloud_workers.group import WorkerGroup
from cloud_workers.local import (
    LOCAL_WORKER_HEARTBEAT_S,
    LOCAL_WORKER_RECLAIM_IDLE_S,
    local_worker,
)
from estuary.clock import VirtualClock
from estuary.jobs import (
    CONSUMER_GROUP,
    JOB_STREAM,
    JobOutcome,
    Kind,
    decode_job,
    job_id_for,
    make_job,
    newest_done,
    result_key,
    submit_job,
)
from estuary.model.presets import build_preset
from estuary.proto.v1 import jobs_pb2
from estuary.state.blobs import BlobStore
from estuary.state.keys import worker_key
from estuary.state.memory import MemoryStore

CLASSES = ("phone", "laptop")


def outcomes(store: MemoryStore) -> dict[str, JobOutcome]:
    return {
        k.removeprefix("jobresult/"): JobOutcome.from_json(r.value)
        for k, r in store.scan("jobresult/").items()
    }


def submit_version(store: MemoryStore, clock: VirtualClock, version: int) -> None:
    """Queue a version's jobs as the coordinator does: artifacts per class, then evaluate."""
    for device_class in CLASSES:
        job = make_job("build_artifacts", version=version, device_class=device_class, clock=clock)
        submit_job(store, job)
    submit_job(store, make_job("evaluate", version=version, clock=clock))


class Crash(BaseException):
    """A group's process dies inside a job: not an Exception, so nothing records it."""


class Cloud:
    """Executor stand-in: each job takes ``job_s`` of virtual time; counts completions."""

    def __init__(
        self,
        clock: VirtualClock,
        *,
        job_s: float,
        during: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.job_s = job_s
        self.during = during
        self.completed: Counter[str] = Counter()
        self.crash_next = False

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        if self.crash_next:
            raise Crash
        # Time passes in small steps so that whatever happens meanwhile (commits) does.
        for _ in range(10):
            self.clock.advance(self.job_s / 10)
            if self.during is not None:
                self.during()
        self.completed[job.job_id] += 1
        if job.WhichOneof("kind") == "build_artifacts":
            return {"artifact_sha256": f"{job.build_artifacts.device_class}-{job.version}"}
        return {"eval_bpb": 1.0}


def test_commits_faster_than_jobs_keep_every_class_artifact_and_the_evaluation_current() -> None:
    # One version per second, each job takes 3 s: nine jobs arrive for every one that runs.
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    commit_s, job_s, versions = 1.0, 3.0, 90
    committed: dict[int, float] = {}

    def commit_due() -> None:
        while len(committed) < versions and clock.time() >= start + len(committed) * commit_s:
            committed[len(committed)] = clock.time()
            submit_version(store, clock, len(committed) - 1)

    start = clock.time()
    cloud = Cloud(clock, job_s=job_s, during=commit_due)
    group = WorkerGroup(
        store, executor=cloud, name="g", heartbeat_s=1.0, reclaim_idle_s=5.0, clock=clock
    )
    commit_due()
    # When each version was first covered: an outcome of that kind key on it or newer.
    covered: dict[str, dict[int, float]] = {key: {} for key in (*CLASSES, "evaluate")}
    for _ in range(10_000):
        if not group.step(block_s=0):
            break
        for key in covered:
            kind: Kind = "evaluate" if key == "evaluate" else "build_artifacts"
            done = newest_done(store, kind, device_class="" if key == "evaluate" else key)
            for version in range(done[0] + 1 if done else 0):
                covered[key].setdefault(version, clock.time())
    assert len(committed) == versions and store.pending(JOB_STREAM, CONSUMER_GROUP) == []
    # Every version of every kind key was covered, within one job of each of the three
    # kind keys plus the one in progress at its commit (module docstring of estuary.jobs).
    bound = (len(covered) + 1) * job_s
    for key, at in covered.items():
        lags = [at[v] - committed[v] for v in committed]
        assert len(at) == versions, key
        assert max(lags) <= bound + 1e-6, (key, max(lags))
    # Each newest job completed once; older ones were skipped, never run late.
    got = outcomes(store)
    for device_class in CLASSES:
        newest = job_id_for("build_artifacts", version=versions - 1, device_class=device_class)
        assert got[newest].status == "done"
    assert got[job_id_for("evaluate", version=versions - 1)].status == "done"
    assert set(cloud.completed.values()) == {1}
    assert len(got) == 3 * versions  # one outcome per job
    ran = sum(o.status == "done" for o in got.values())
    assert ran == len(cloud.completed) and ran < versions  # most were skipped
    skipped = [o for o in got.values() if o.status == "skipped"]
    assert all(o.output["superseded_by"] > o.version for o in skipped)


# ------------------------------------------------------------------ any interleaving

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.integers(1, 3)),
        st.tuples(st.just("step"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("crash"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("wait"), st.floats(0.1, 4.0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_any_interleaving_records_every_job_once_and_finishes_the_newest(
    ops: list[tuple[str, Any]],
) -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    clouds = {n: Cloud(clock, job_s=0.5) for n in ("a", "b")}
    groups = {
        n: WorkerGroup(
            store, executor=clouds[n], name=n, heartbeat_s=0.5, reclaim_idle_s=2.0, clock=clock
        )
        for n in clouds
    }
    alive = {"a": True, "b": True}
    version = 0

    def heartbeat() -> None:
        for name, group in groups.items():
            if alive[name]:
                group.heartbeat()

    def step(name: str) -> None:
        try:
            groups[name].step(block_s=0)
        except Crash:
            alive[name] = False  # dead from now on: no steps, no heartbeats

    for op, arg in ops:
        if op == "commit":
            for _ in range(arg):
                submit_version(store, clock, version)
                version += 1
        elif op == "step" and alive[arg]:
            step(arg)
        elif (
            op == "crash" and all(alive.values()) and not any(c.crash_next for c in clouds.values())
        ):
            clouds[arg].crash_next = True  # dies in the next job it runs; one survivor left
        elif op == "wait":
            clock.advance(arg)
        heartbeat()
    survivor = next(name for name in groups if alive[name])
    clouds[survivor].crash_next = False
    for _ in range(2000):  # drain: the survivor serves and reclaims what the dead held
        step(survivor)
        clock.advance(0.5)
        heartbeat()
        if not store.pending(JOB_STREAM, CONSUMER_GROUP) and not groups[survivor].step(block_s=0):
            break
    got = outcomes(store)
    event(f"crashed: {not all(alive.values())}")
    event(f"run in an older job's place: {any(o.promoted_from for o in got.values())}")
    keys: list[tuple[Kind, str]] = [
        ("build_artifacts", "phone"),
        ("build_artifacts", "laptop"),
        ("evaluate", ""),
    ]
    submitted = {
        job_id_for(kind, version=v, device_class=c) for v in range(version) for kind, c in keys
    }
    assert set(got) == submitted  # every job has exactly one outcome (keys are unique)
    assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []
    completed = clouds["a"].completed + clouds["b"].completed
    assert all(n == 1 for n in completed.values()), completed  # nothing ran twice
    assert {k for k, o in got.items() if o.status == "done"} == set(completed)
    for o in got.values():
        assert o.status in ("done", "skipped")
        # Skipped only for a newer version, and that chain ends in one that ran.
        while o.status == "skipped":
            newer = o.output["superseded_by"]
            assert newer > o.version
            device_class = o.job_id.split("-")[1] if o.kind == "build_artifacts" else ""
            o = got[job_id_for(o.kind, version=newer, device_class=device_class)]  # type: ignore[arg-type]
    if version:
        newest = version - 1
        assert got[job_id_for("evaluate", version=newest)].status == "done"
        for device_class in CLASSES:
            job_id = job_id_for("build_artifacts", version=newest, device_class=device_class)
            assert got[job_id].status == "done"
            assert newest_done(store, "build_artifacts", device_class=device_class) == (
                newest,
                job_id,
            )


# ------------------------------------------------------------------ leases


def test_a_group_is_judged_by_the_lease_it_advertises() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    for v in (1, 2):
        submit_job(store, make_job("generate", version=v, job_id=f"gen-{v}", clock=clock))
    patient = WorkerGroup(
        store, executor=Cloud(clock, job_s=1), name="patient", heartbeat_s=5, reclaim_idle_s=120,
        clock=clock,
    )  # fmt: skip
    brisk = WorkerGroup(
        store, executor=Cloud(clock, job_s=1), name="brisk", heartbeat_s=1, reclaim_idle_s=5,
        clock=clock,
    )  # fmt: skip
    for group in (patient, brisk):
        group.heartbeat()
        store.read_group(JOB_STREAM, CONSUMER_GROUP, group.name, count=1)  # takes one, dies
    assert json.loads(store.get(worker_key("brisk")).value)["lease_s"] == 5  # type: ignore[union-attr]
    judge = WorkerGroup(
        store, executor=Cloud(clock, job_s=1), name="judge", heartbeat_s=1, reclaim_idle_s=30,
        clock=clock,
    )  # fmt: skip
    clock.advance(4.9)
    assert judge.silent_groups() == set()
    clock.advance(0.2)
    # brisk promised to beat within 5 s; patient within 120 s: only brisk is silent.
    assert judge.silent_groups() == {"brisk"}
    taken = judge.reclaim()
    assert [decode_job(j.fields).job_id for j in taken] == ["gen-2"]
    judge.process(taken[0])
    clock.advance(115)
    assert judge.silent_groups() == {"patient"}


@pytest.fixture(scope="module")
def base() -> Any:
    return build_preset("tiny", seed=0)


def test_a_dead_replicas_build_is_taken_over_by_a_live_local_worker_within_seconds(
    tmp_path: Path, base: Any
) -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    publish_version(store, blobs, base, 1)

    def replica(name: str) -> WorkerGroup:
        return local_worker(
            store, blobs=blobs, base=base, name=name, eval_windows=eval_windows(), onnx=False,
            clock=clock,
        )  # fmt: skip

    dying, live = replica("local-a"), replica("local-b")
    submit_job(store, make_job("build_artifacts", version=1, device_class="phone", clock=clock))
    dying.heartbeat()
    live.heartbeat()
    # Replica a takes the build and is SIGKILLed: its heartbeat stops, the job stays pending.
    assert len(store.read_group(JOB_STREAM, CONSUMER_GROUP, "local-a", count=1)) == 1
    died_at = clock.time()
    key = result_key(job_id_for("build_artifacts", version=1, device_class="phone"))
    while store.get(key) is None and clock.time() - died_at < 300:
        clock.advance(LOCAL_WORKER_HEARTBEAT_S)  # the live replica's heartbeat thread
        live.heartbeat()
        live.step(block_s=0)
    taken_over_after = clock.time() - died_at
    outcome = JobOutcome.from_json(store.get(key).value)  # type: ignore[union-attr]
    assert (outcome.status, outcome.group, outcome.deliveries) == ("done", "local-b", 2)
    # Within the lease plus one reclaim check: seconds, not the 120 s of before.
    assert taken_over_after <= LOCAL_WORKER_RECLAIM_IDLE_S + 2 * LOCAL_WORKER_HEARTBEAT_S
    assert taken_over_after <= 10.0


def test_a_live_local_worker_keeps_a_job_longer_than_its_lease(tmp_path: Path) -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    other: list[WorkerGroup] = []
    busy: list[WorkerGroup] = []

    def meanwhile() -> None:
        # What the busy group's heartbeat thread and the other replica do while it works.
        busy[0].heartbeat()
        other[0].heartbeat()
        other[0].step(block_s=0)

    # A job four leases long; meanwhile the heartbeat thread beats every two seconds.
    job_s = 4 * LOCAL_WORKER_RECLAIM_IDLE_S
    cloud = Cloud(clock, job_s=job_s, during=meanwhile)
    for name, executor in (("local-a", cloud), ("local-b", Cloud(clock, job_s=1))):
        group = WorkerGroup(
            store, executor=executor, name=name, heartbeat_s=LOCAL_WORKER_HEARTBEAT_S,
            reclaim_idle_s=LOCAL_WORKER_RECLAIM_IDLE_S, clock=clock,
        )  # fmt: skip
        (busy if name == "local-a" else other).append(group)
    submit_job(store, make_job("generate", version=0, job_id="long", clock=clock))
    busy[0].heartbeat()
    assert busy[0].step(block_s=0) == 1
    got = outcomes(store)
    assert (got["long"].group, got["long"].deliveries) == ("local-a", 1)
    assert other[0].stats.reclaimed == 0 and cloud.completed == Counter({"long": 1})


def test_a_restarted_replica_takes_back_its_own_orphan_after_its_lease() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    submit_job(store, make_job("generate", version=0, job_id="orphan", clock=clock))
    store.read_group(JOB_STREAM, CONSUMER_GROUP, "local-a", count=1)  # then the process died
    restarted = WorkerGroup(
        store, executor=Cloud(clock, job_s=1), name="local-a",
        heartbeat_s=LOCAL_WORKER_HEARTBEAT_S, reclaim_idle_s=LOCAL_WORKER_RECLAIM_IDLE_S,
        clock=clock,
    )  # fmt: skip
    restarted.heartbeat()  # the new process beats at once: its own name is never "silent"
    elapsed = 0.0
    while "orphan" not in outcomes(store) and elapsed < 300:
        clock.advance(LOCAL_WORKER_HEARTBEAT_S)
        elapsed += LOCAL_WORKER_HEARTBEAT_S
        restarted.heartbeat()
        restarted.step(block_s=0)
    assert outcomes(store)["orphan"].deliveries == 2
    assert elapsed <= LOCAL_WORKER_RECLAIM_IDLE_S + 2 * LOCAL_WORKER_HEARTBEAT_S
