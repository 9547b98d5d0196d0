"""Worker-group benchmark: pull-based load balancing, superseded skips, reclaim.

Usage::

    python bench/workers.py --json
    python bench/workers.py --json --jobs 400 --overload 2.0

Two CPU worker groups share one job stream; the slow group gets an injected per-job
delay that makes each of its jobs take 3× as long as the same job's work plus the fast
group's delay, whatever its kind. (The delay follows the job's measured work: an artifact
build, which includes the ONNX export, costs ~200× an evaluation, so one fixed delay
would make the slow group 30× slower at evaluations and 2× at builds, and the capacity
below would depend on which group happens to pull which kind.) A producer commits
a new model version at a fixed rate and submits an ``evaluate`` and a
``build_artifacts`` job for it (``--jobs`` in all); jobs arrive at ``--overload`` times
the two groups' combined capacity (default 1.0: exactly what both together can absorb,
so any idling or misassignment shows up as backlog, superseded skips and lag). Jobs are
real (tiny preset: merge the version's adapter, held-out bits/byte on standard-library
text; compressed base + adapter artifact with the version's int8 ONNX export, which runs
in an exporter process: the two groups share this process, and in-process exports broke
each other).

Reported per scenario:

- ``throughput_fraction``: executed jobs per second, from the first arrival to the last
  outcome, as a fraction of the two groups' combined capacity (per-job work of each kind
  measured alone first, plus each group's delay). Pulling should reach ≥ 0.9.
  ``throughput_fraction_of_live_capacity`` is the same with the capacity recomputed
  from the work the executed jobs took during the scenario: on a machine shared with
  other work, CPU-bound jobs (the ~5 s export of each artifact build) run slower or
  faster than when calibrated, and only this figure is free of that drift (it still
  counts every second a group sat idle). ``round_robin``
  (each group owns every other job, on its own stream) is the baseline: the slow group
  gets half the jobs for a quarter of the capacity, so its backlog is superseded and
  skipped and its evaluations lag.
- ``skipped_superseded``: jobs acknowledged without running because a newer version of
  their kind had been submitted.
- ``p95_commit_to_eval_s``: 95th percentile of (evaluation recorded − version committed)
  over the versions that were evaluated.
- ``killed``: the same pull run with the fast group killed half-way (its job left
  pending, its heartbeat stopped): every job still has exactly one outcome, none ran to
  completion twice.

Prints one JSON object with ``--json``, else a short table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import WorkerGroup
from estuary.adapters import AdapterConfig, GlobalAdapter, put_adapter
from estuary.data import eval_windows, stdlib_clients
from estuary.jobs import JOB_STREAM, JobOutcome, job_kind, make_job, submit_job
from estuary.model.presets import build_preset
from estuary.state import open_store
from estuary.state.base import Store
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key

#: Baseline delay added to every job of the fast group. It was chosen when jobs were
#: cheap, to make per-job time a sleep rather than CPU work two threads share; since
#: artifact builds include the ONNX export (~5 s on 2 cores) their CPU work dominates.
FAST_DELAY_S = 0.15
#: Every job of the slow group takes this many times as long as on the fast group.
SLOW_FACTOR = 3.0
FACTORS = {"fast": 1.0, "slow": SLOW_FACTOR}
#: The drain after the last arrival gives up after this many of the slow group's slowest
#: jobs' time passes without a new outcome (a job reclaimed from the killed group included).
DRAIN_IDLE_JOBS = 3.0
KINDS = ("evaluate", "build_artifacts")
#: Heartbeat and reclaim timing of the benchmark groups: short so a killed group's
#: job is reclaimed within the run; reclaim > 2 × heartbeat as the settings require.
HEARTBEAT_S = 0.2
RECLAIM_IDLE_S = 1.0


class _Killed(BaseException):
    """Raised inside a job to simulate the group's process dying mid-job.

    A BaseException, so the loop's per-job error handling does not record it: the job
    stays pending and unacknowledged, exactly as after a crash.
    """


class CountingExecutor:
    """Wraps an executor: counts completed executions per job, can die on request.

    ``factor``: after each job it sleeps so that the job takes ``factor`` × (its work +
    :data:`FAST_DELAY_S`) in all: the group's injected slowness. The work of every job
    is recorded by kind in ``work``, shared by the executors of a scenario.
    """

    def __init__(
        self,
        inner: ModelJobExecutor,
        completions: Counter[str],
        lock: threading.Lock,
        *,
        factor: float,
        work: dict[str, list[float]],
    ) -> None:
        self.inner = inner
        self.completions = completions
        self.lock = lock
        self.factor = factor
        self.work = work
        self.kill = threading.Event()

    def execute(self, job: Any) -> dict[str, Any]:
        if self.kill.is_set():
            raise _Killed
        start = time.perf_counter()
        out = self.inner.execute(job)
        elapsed = time.perf_counter() - start
        with self.lock:
            self.work[job_kind(job)].append(elapsed)
        time.sleep((self.factor - 1.0) * elapsed + self.factor * FAST_DELAY_S)
        if self.kill.is_set():  # died after the work, before recording it
            raise _Killed
        with self.lock:
            self.completions[job.job_id] += 1
        return out


def publish(store: Store, blobs: BlobStore, base: torch.nn.Module, version: int) -> str:
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4))
    rng = np.random.default_rng(version)
    digest = put_adapter(
        blobs,
        adapter.with_b(
            {n: rng.normal(0, 0.02, v.shape).astype(np.float32) for n, v in adapter.b.items()}
        ),
    )
    record = {"version": version, "adapter_sha256": digest, "committed_at": time.time()}
    store.put(version_key(version), json.dumps(record).encode())
    return digest


def version_jobs(version: int, digest: str, *, created_ms: int = 0) -> tuple[Any, Any]:
    """The two jobs a committed version emits: its evaluation and one artifact build."""
    return (
        make_job("evaluate", version=version, adapter_sha256=digest, created_ms=created_ms),
        make_job("build_artifacts", version=version, device_class="phone",
                 adapter_sha256=digest, created_ms=created_ms),
    )  # fmt: skip


def calibrate(
    executor: ModelJobExecutor, store: Store, blobs: BlobStore, base: Any
) -> dict[str, float]:
    """Mean seconds of real work per job of each kind.

    Every round is a new version, as in the scenarios: an artifact build then includes
    the version's ONNX export, which an executor does once per adapter (the same
    version again would reuse it and understate the work several times over).
    """
    warm_up(executor, store, blobs, base, version=0)
    rounds = 5
    jobs = [
        j for v in range(1, rounds + 1) for j in version_jobs(v, publish(store, blobs, base, v))
    ]
    spent = dict.fromkeys(KINDS, 0.0)
    for job in jobs:
        start = time.perf_counter()
        executor.execute(job)
        spent[job_kind(job)] += time.perf_counter() - start
    return {kind: seconds / rounds for kind, seconds in spent.items()}


def warm_up(
    executor: ModelJobExecutor, store: Store, blobs: BlobStore, base: Any, *, version: int
) -> None:
    """Run a version's jobs once: compress the base, start an exporter, first-call costs.

    A long-running group did all this long ago; the benchmark does it before its clock.
    """
    for job in version_jobs(version, publish(store, blobs, base, version)):
        executor.execute(job)


def scenario(
    *,
    mode: str,
    base: Any,
    windows: torch.Tensor,
    work_s: dict[str, float],
    jobs: int,
    overload: float,
    kill_half_way: bool,
) -> dict[str, Any]:
    store = open_store("memory://")
    with tempfile.TemporaryDirectory() as tmp:
        blobs = BlobStore(Path(tmp) / "blobs", fsync=False)
        completions: Counter[str] = Counter()
        lock = threading.Lock()
        capacity = capacity_of(mean_work(work_s))
        live_work: dict[str, list[float]] = {k: [] for k in KINDS}
        executors: dict[str, CountingExecutor] = {}
        groups: dict[str, WorkerGroup] = {}
        for i, (name, factor) in enumerate(FACTORS.items()):
            inner = ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=windows)
            executors[name] = CountingExecutor(
                inner, completions, lock, factor=factor, work=live_work
            )
            groups[name] = WorkerGroup(
                store, executor=executors[name], name=name, heartbeat_s=HEARTBEAT_S,
                reclaim_idle_s=RECLAIM_IDLE_S,
                stream=JOB_STREAM if mode == "pull" else f"{JOB_STREAM}-rr{i}",
            )  # fmt: skip
        # Warm each executor up before the clock starts, both at once, so that each group
        # has an exporter process of its own running (they are started on demand).
        warmers = [
            threading.Thread(
                target=warm_up, args=(ex.inner, store, blobs, base), kwargs={"version": 0}
            )
            for ex in executors.values()
        ]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        versions = jobs // 2
        interval = 2.0 / (overload * capacity)  # 2 jobs per version
        # Adapters are published before the clock starts; each version is "committed"
        # (its record written with the commit time) when the producer submits its jobs.
        digests = {v: publish(store, blobs, base, v) for v in range(1, versions + 1)}
        stop = threading.Event()
        threads = {n: threading.Thread(target=_serve, args=(g, stop), daemon=True)
                   for n, g in groups.items()}  # fmt: skip
        for t in threads.values():
            t.start()
        submitted: list[str] = []
        killed_at: float | None = None
        start = time.time()
        for v in range(1, versions + 1):
            target = start + (v - 1) * interval
            time.sleep(max(0.0, target - time.time()))
            if kill_half_way and v == versions // 2 + 1:
                executors["fast"].kill.set()
                killed_at = time.time()
            now_ms = int(time.time() * 1000)
            for k, job in enumerate(version_jobs(v, digests[v], created_ms=now_ms)):
                # Round-robin alternates which group gets the evaluation, version by version.
                stream = JOB_STREAM if mode == "pull" else f"{JOB_STREAM}-rr{(v + k) % 2}"
                submit_job(store, job, stream=stream)
                submitted.append(job.job_id)
        arrivals_end = time.time()
        # Drain: wait while outcomes keep coming. A fixed 120 s ran out on a loaded machine
        # (slow-group builds of 30+ s behind a backlog) and counted queued jobs as lost; a
        # job with no outcome after DRAIN_IDLE_JOBS slow jobs' time without any progress is.
        done, last_progress = 0, time.time()
        while done < len(submitted):
            time.sleep(0.05)
            now_done = len(store.scan("jobresult/"))
            if now_done > done:
                done, last_progress = now_done, time.time()
            with lock:
                slowest = max((max(v) for v in live_work.values() if v), default=0.0)
            idle_limit = max(60.0, DRAIN_IDLE_JOBS * FACTORS["slow"] * (slowest + FAST_DELAY_S))
            if time.time() - last_progress > idle_limit:
                break
        stop.set()
        for t in threads.values():
            t.join(timeout=10)
        results = [JobOutcome.from_json(r.value) for r in store.scan("jobresult/").values()]
    executed = [r for r in results if r.status == "done"]
    # From the first arrival to the last recorded outcome: the time the groups had.
    window_s = max([r.finished_ms / 1000 for r in results] + [arrivals_end]) - start
    lags = sorted((r.finished_ms - r.committed_ms) / 1000 for r in executed if r.kind == "evaluate")
    per_group = Counter(r.group for r in executed)
    # Capacity actually alive during the window: after the kill only the slow group serves.
    alive_s = window_s if killed_at is None else killed_at - start

    def available(work: float) -> float:
        after_kill_s = (window_s - alive_s) / (FACTORS["slow"] * (work + FAST_DELAY_S))
        return capacity_of(work) * alive_s + after_kill_s

    live = mean_work({k: statistics.fmean(v) for k, v in live_work.items() if v})
    out: dict[str, Any] = {
        "jobs": len(submitted),
        "outcomes": len(results),
        "executed": len(executed),
        "skipped_superseded": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "executed_by_group": dict(sorted(per_group.items())),
        "executed_by_group_kind": {
            g: dict(sorted(Counter(r.kind for r in executed if r.group == g).items()))
            for g in sorted(per_group)
        },
        "throughput_fraction": round(len(executed) / window_s / capacity, 3),
        "throughput_fraction_of_alive_capacity": round(
            len(executed) / available(mean_work(work_s)), 3
        ),
        "live_work_s_per_job": round(live, 4),
        "throughput_fraction_of_live_capacity": round(len(executed) / available(live), 3),
        "p95_commit_to_eval_s": round(float(np.percentile(lags, 95)), 3) if lags else None,
        "median_commit_to_eval_s": round(statistics.median(lags), 3) if lags else None,
        "lost_jobs": len(set(submitted) - {r.job_id for r in results}),
        "completed_twice": sum(1 for c in completions.values() if c > 1),
        "reclaimed": sum(r.deliveries > 1 for r in results),
    }
    return out


def mean_work(work_s: dict[str, float]) -> float:
    """Mean seconds of work per job: the kinds arrive one each per version."""
    return sum(work_s.values()) / len(work_s)


def capacity_of(work: float) -> float:
    """Jobs per second both groups absorb at ``work`` seconds of work per job."""
    return sum(1.0 / (factor * (work + FAST_DELAY_S)) for factor in FACTORS.values())


def _serve(group: WorkerGroup, stop: threading.Event) -> None:
    # _Killed is the simulated death: the job it held stays pending, heartbeats stop.
    with contextlib.suppress(_Killed):
        group.run(stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--jobs", type=int, default=200, help="jobs submitted per scenario")
    parser.add_argument(
        "--overload", type=float, default=1.0,
        help="job arrival rate as a multiple of the groups' combined capacity",
    )  # fmt: skip
    args = parser.parse_args()
    if args.jobs < 4 or args.overload <= 0:
        parser.error("--jobs must be >= 4 and --overload > 0")
    torch.set_num_threads(1)  # two groups share the cores: one thread each, no oversubscription
    base = build_preset("tiny", seed=0)
    windows = torch.cat([
        eval_windows(c.heldout, seq_len=64, max_windows=2)
        for c in stdlib_clients(("email", "json", "asyncio", "xml"))
    ])  # fmt: skip
    store = open_store("memory://")
    with tempfile.TemporaryDirectory() as tmp:
        blobs = BlobStore(Path(tmp), fsync=False)
        executor = ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=windows)
        work_s = calibrate(executor, store, blobs, base)
    common = {"base": base, "windows": windows, "work_s": work_s, "jobs": args.jobs,
              "overload": args.overload}  # fmt: skip
    report = {
        "groups": {
            "fast_s_per_job": round(mean_work(work_s) + FAST_DELAY_S, 4),
            "slow_s_per_job": round(SLOW_FACTOR * (mean_work(work_s) + FAST_DELAY_S), 4),
            "work_s_per_job": round(mean_work(work_s), 4),
            "work_s_by_kind": {k: round(v, 4) for k, v in work_s.items()},
        },
        "overload": args.overload,
        "pull": scenario(mode="pull", kill_half_way=False, **common),
        "round_robin": scenario(mode="round_robin", kill_half_way=False, **common),
        "killed": scenario(mode="pull", kill_half_way=True, **common),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in ("pull", "round_robin", "killed"):
        r = report[name]
        print(
            f"{name:12s} throughput {r['throughput_fraction']:.2f} of capacity, "
            f"executed {r['executed']}, skipped {r['skipped_superseded']}, "
            f"p95 lag {r['p95_commit_to_eval_s']} s, lost {r['lost_jobs']}, "
            f"twice {r['completed_twice']}"
        )


if __name__ == "__main__":
    main()
