"""A worker group's job loop: pull, skip superseded, execute, record once, acknowledge.

Stage 0 of a group runs :class:`WorkerGroup`. The loop guarantees:

- **Load balancing by pulling.** A group asks for one job at a time when it is free, so a
  group twice as fast takes twice as many.
- **The newest version runs; older ones are skipped.** The supersede rule is
  :func:`estuary.jobs.job_to_run`: a job is skipped (recorded ``skipped``) only if a newer
  version of its kind key was already started; otherwise the group runs the newest
  submitted job of that kind key in its place, records that job's outcome, then records
  the delivered one as ``skipped``. So evaluations and each class's edge artifact keep up
  with a stream of versions however fast they come.
- **Training artifacts never wait.** Devices train on their class's newest artifact, so
  an artifact job stuck behind an evaluation or an ONNX export (tens of seconds each)
  hands devices versions that are already several behind. A second thread, the
  *artifact lane*, looks every :data:`ARTIFACT_POLL_S` for artifact jobs submitted but
  not started (:func:`estuary.jobs.artifact_jobs_ahead`) and runs them at once under the
  same supersede rule; their stream entries later find the outcome recorded.
- **Heartbeats are job leases.** A background thread writes ``worker/<group>`` every
  ``heartbeat_s``, also while a job runs, and the record carries ``lease_s``
  (``reclaim_idle_s``): the promise "if I am silent this long, I am dead".
- **Reclaim.** Jobs pending on a group whose heartbeat is older than the lease that group
  advertises, and idle that long, are taken over (checked every ``heartbeat_s`` between
  jobs). A short lease (the coordinator's local worker) gets a dead replica's job
  running again within seconds; a group that advertises none is judged by the reader's
  own ``reclaim_idle_s``.
- **Exactly-once completion.** The outcome is created with ``insert_if_absent`` at
  ``jobresult/<job_id>`` before the acknowledgement: a job that ran twice (its first
  group was slow, not dead) still has one recorded completion, and its outputs are
  content-addressed, so both runs wrote the same blobs.
- **Bad input does not stop the group.** A :class:`~estuary.jobs.JobInputError`
  (unknown version, missing checkpoint) is recorded as ``failed`` with its message.
  Store outages propagate: the job stays pending and is reclaimed later.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from estuary.clock import SYSTEM_CLOCK, Clock, VirtualClock
from estuary.jobs import (
    CONSUMER_GROUP,
    JOB_STREAM,
    JobExecutor,
    JobInputError,
    JobOutcome,
    Status,
    artifact_classes,
    artifact_jobs_ahead,
    decode_job,
    job_kind,
    job_to_run,
    record_done,
    result_key,
)
from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Job as StreamJob
from estuary.state.base import Store
from estuary.state.errors import StoreError
from estuary.state.keys import worker_key

__all__ = ["GroupStats", "WorkerGroup"]

logger = logging.getLogger(__name__)

#: How long one read waits for a new job. Short enough that the loop notices a stop
#: request and runs its reclaim check promptly; long enough not to poll the store hot.
READ_BLOCK_S = 0.5
#: Seconds between the artifact lane's looks for new artifact jobs: versions come every
#: several seconds at the fastest, so half a second adds little to what devices wait
#: for, at one batched read of three small records per class.
ARTIFACT_POLL_S = 0.5
#: Seconds between the artifact lane's scans for device classes (a key scan; classes
#: are configuration, so a new one is found within this long).
CLASS_SCAN_S = 10.0


@dataclass
class GroupStats:
    """Counters a group reports in its heartbeat."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    promoted: int = 0
    started_at: float = 0.0
    current_job: str | None = None
    last_eval_version: int | None = None
    last_eval_lag_s: float | None = None
    last_lag_s: float | None = None

    @property
    def processed(self) -> int:
        """Jobs this group recorded an outcome for (done, skipped or failed)."""
        return self.done + self.skipped + self.failed


class WorkerGroup:
    """The job loop of one worker group (run on its stage 0).

    Parameters
    ----------
    store
        State store holding the job stream, outcomes and heartbeats.
    executor
        Runs a job (see :class:`~cloud_workers.executor.ModelJobExecutor`).
    name
        Group name: the consumer name in the stream's consumer group.
    heartbeat_s
        Seconds between heartbeats.
    reclaim_idle_s
        This group's job lease, advertised in its heartbeat: once it has been silent
        this long, other groups take over its pending jobs (and it takes back, after a
        restart under the same name, jobs pending on its name this long). Also the lease
        assumed for a group whose heartbeat advertises none. Must exceed
        ``2 × heartbeat_s`` so one late heartbeat never costs a live group its job.
    stages
        Pipeline stages of this group (reported in the heartbeat).
    stream, consumer_group
        Where jobs come from.
    job_delay_s
        Extra seconds spent per executed job: an injected slowdown for benchmarks and
        tests, 0 in production.
    on_outcome
        Called with each recorded outcome (for metrics and tests).
    on_idle
        Called after every read that found no job (a multi-stage group keeps its
        followers' collectives alive with it).
    artifacts_ahead
        Run the artifact lane in :meth:`run` (see the module docstring); False takes
        artifact jobs from the stream only, in order.
    clock
        Time of heartbeats, reclaim decisions, outcome stamps and idle exits. A
        :class:`~estuary.clock.VirtualClock` group is driven with :meth:`step` (and
        :meth:`heartbeat`); :meth:`run` needs a real clock for its heartbeat thread.
    """

    def __init__(
        self,
        store: Store,
        *,
        executor: JobExecutor,
        name: str,
        heartbeat_s: float,
        reclaim_idle_s: float,
        stages: int = 1,
        stream: str = JOB_STREAM,
        consumer_group: str = CONSUMER_GROUP,
        job_delay_s: float = 0.0,
        on_outcome: Callable[[JobOutcome], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        artifacts_ahead: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not name:
            raise ValueError("name: must be a non-empty group name")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s: must be > 0, got {heartbeat_s}")
        if not reclaim_idle_s > 2 * heartbeat_s:
            raise ValueError(
                f"reclaim_idle_s: {reclaim_idle_s} must exceed 2 × heartbeat_s={heartbeat_s}"
            )
        if job_delay_s < 0:
            raise ValueError(f"job_delay_s: must be >= 0, got {job_delay_s}")
        self.store = store
        self.executor = executor
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.reclaim_idle_s = reclaim_idle_s
        self.stages = stages
        self.stream = stream
        self.consumer_group = consumer_group
        self.job_delay_s = job_delay_s
        self.on_outcome = on_outcome
        self.on_idle = on_idle
        self.artifacts_ahead = artifacts_ahead
        self.clock = clock
        self.stats = GroupStats(started_at=clock.time())
        self._last_reclaim = 0.0
        self._classes: list[str] = []
        self._last_class_scan: float | None = None
        self._lock = threading.Lock()
        store.ensure_group(stream, consumer_group)

    # ---------------------------------------------------------------- heartbeat

    def heartbeat(self) -> None:
        """Write this group's ``worker/<name>`` record."""
        with self._lock:
            stats = self.stats
            now = self.clock.time()
            elapsed = max(now - stats.started_at, 1e-9)
            value = {
                "group": self.name,
                "last_seen": round(now, 3),
                "jobs_done": stats.done,
                "jobs_skipped": stats.skipped,
                "jobs_failed": stats.failed,
                "jobs_reclaimed": stats.reclaimed,
                # Newer jobs run in place of an older delivered one (supersede rule).
                "jobs_promoted": stats.promoted,
                # The job lease: silent this long, this group's pending jobs are taken.
                "lease_s": self.reclaim_idle_s,
                # Jobs whose outcome another group had already recorded (run twice).
                "jobs_duplicate": stats.duplicates,
                "throughput_per_min": round(60.0 * stats.processed / elapsed, 3),
                "current_job": stats.current_job,
                "last_lag_s": stats.last_lag_s,
                "last_eval_version": stats.last_eval_version,
                "last_eval_lag_s": stats.last_eval_lag_s,
                "stages": self.stages,
                "started_at": round(stats.started_at, 3),
            }
        self.store.put(worker_key(self.name), json.dumps(value, sort_keys=True).encode())

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not self.clock.wait(stop, self.heartbeat_s):
            try:
                self.heartbeat()
            except StoreError as exc:  # an outage: keep trying; reclaim covers a long one
                logger.warning("group %s: heartbeat failed: %s", self.name, exc)

    # ---------------------------------------------------------------- reclaim

    def _lease_if_silent(self, consumer: str, now: float) -> float | None:
        """Return ``consumer``'s lease if it has been silent that long, else ``None``."""
        if consumer == self.name:
            # The loop is single-threaded and between jobs here, so a job pending on
            # this name is an orphan of an earlier run of this group (it crashed and
            # was restarted under the same name): take it back.
            return self.reclaim_idle_s
        record = self.store.get(worker_key(consumer))
        beat: dict[str, Any] = json.loads(record.value) if record is not None else {}
        advertised = beat.get("lease_s")
        lease = self.reclaim_idle_s  # for a group from before leases were advertised
        if isinstance(advertised, int | float) and not isinstance(advertised, bool):
            lease = float(advertised) if 0 < advertised < float("inf") else lease
        last_seen = float(beat.get("last_seen", 0.0))
        return lease if now - last_seen >= lease else None

    def _reclaimable(self) -> dict[str, float]:
        """Silent consumers with a pending job idle for their lease → that lease."""
        now = self.clock.time()
        verdict: dict[str, float | None] = {}
        silent: dict[str, float] = {}
        for entry in self.store.pending(self.stream, self.consumer_group):
            if entry.consumer not in verdict:  # one heartbeat read per consumer
                verdict[entry.consumer] = self._lease_if_silent(entry.consumer, now)
            lease = verdict[entry.consumer]
            if lease is not None and entry.idle_s >= lease:
                silent[entry.consumer] = lease
        return silent

    def silent_groups(self) -> set[str]:
        """Return consumers holding a pending job idle for longer than their silence.

        A consumer is silent when its heartbeat is older than the lease it advertises
        (``lease_s``; this group's ``reclaim_idle_s`` if it advertises none).
        """
        return set(self._reclaimable())

    def reclaim(self, *, count: int = 16) -> list[StreamJob]:
        """Take over up to ``count`` jobs of silent groups; return them."""
        silent = self._reclaimable()
        jobs: list[StreamJob] = []
        for consumer, lease in sorted(silent.items()):
            jobs += self.store.reclaim(
                self.stream,
                self.consumer_group,
                self.name,
                min_idle_s=lease,
                count=count - len(jobs),
                from_consumers={consumer},
            )
            if len(jobs) >= count:
                break
        if jobs:
            logger.info(
                "group %s reclaimed %d job(s) of silent group(s) %s",
                self.name,
                len(jobs),
                sorted(silent),
            )
        return jobs

    # ---------------------------------------------------------------- jobs

    def _record(self, outcome: JobOutcome) -> bool:
        created = self.store.insert_if_absent(result_key(outcome.job_id), outcome.to_json())
        with self._lock:
            if not created:
                self.stats.duplicates += 1
            elif outcome.status == "done":
                self.stats.done += 1
                # Commit → result: how far behind the newest versions this group runs.
                lag = round((outcome.finished_ms - outcome.committed_ms) / 1000, 3)
                self.stats.last_lag_s = lag if outcome.committed_ms else None
                if outcome.kind == "evaluate":
                    self.stats.last_eval_version = outcome.version
                    self.stats.last_eval_lag_s = self.stats.last_lag_s
            elif outcome.status == "skipped":
                self.stats.skipped += 1
            else:
                self.stats.failed += 1
        if created and self.on_outcome is not None:
            self.on_outcome(outcome)
        return created

    def process(self, entry: StreamJob) -> JobOutcome | None:
        """Handle one delivered stream entry; return the outcome recorded (``None``: none new).

        Raises
        ------
        StoreError
            The store failed; the job stays pending and will be reclaimed.
        """
        now_ms = self.clock.time_ms()
        try:
            job = decode_job(entry.fields)
        except JobInputError as exc:
            # No job id to record under: name the outcome after the stream entry.
            outcome = JobOutcome(
                job_id=f"entry-{entry.id}", kind="unknown", version=-1, status="failed",
                group=self.name, error=str(exc), finished_ms=now_ms,
                deliveries=entry.deliveries,
            )  # fmt: skip
            logger.warning("group %s: undecodable job %s: %s", self.name, entry.id, exc)
            created = self._record(outcome)
            self.store.ack(self.stream, self.consumer_group, entry.id)
            return outcome if created else None

        def outcome_of(of: jobs_pb2.Job, status: Status, **extra: Any) -> JobOutcome:
            return JobOutcome(
                job_id=of.job_id, kind=job_kind(of), version=of.version, status=status,
                group=self.name, committed_ms=of.created_ms, deliveries=entry.deliveries,
                finished_ms=self.clock.time_ms(), **extra,
            )  # fmt: skip

        found = self.store.get(result_key(job.job_id))
        if found is not None:
            recorded = JobOutcome.from_json(found.value)
            if recorded.status == "done":
                record_done(self.store, job)  # redo a raise lost with its runner
            self.store.ack(self.stream, self.consumer_group, entry.id)
            if recorded.promoted_from is None and recorded.deliveries > 0:
                # Completed before from this entry (its runner died between recording
                # and acknowledging); a promoted run, or one ahead of the stream
                # (0 deliveries), is the normal way, not a duplicate.
                with self._lock:
                    self.stats.duplicates += 1
            return None
        try:
            decision = job_to_run(self.store, job)
        except JobInputError as exc:
            logger.warning("group %s: job %s refused: %s", self.name, job.job_id, exc)
            refused = outcome_of(job, "failed", error=str(exc))
            created = self._record(refused)
            self.store.ack(self.stream, self.consumer_group, entry.id)
            return refused if created else None
        run = decision.run
        if run is None:
            outcome = outcome_of(job, "skipped", output={"superseded_by": decision.superseded_by})
        elif run is job:
            outcome = self._execute(run, outcome_of)
        else:
            # A newer job of this kind key runs in this one's place (the supersede rule);
            # its outcome is recorded first, so if this group dies now the delivered job
            # is reclaimed and then skipped, never run again.
            if self.store.get(result_key(run.job_id)) is None:
                ran = self._execute(run, outcome_of, promoted_from=job.job_id)
                if self._record(ran):
                    with self._lock:
                        self.stats.promoted += 1
                if ran.status == "done":
                    record_done(self.store, run)
                logger.info(
                    "group %s: %s %s (v%d) in place of %s",
                    self.name, ran.status, run.job_id, run.version, job.job_id,
                )  # fmt: skip
            outcome = outcome_of(job, "skipped", output={"superseded_by": run.version})
        created = self._record(outcome)
        if outcome.status == "done":
            record_done(self.store, job)
        self.store.ack(self.stream, self.consumer_group, entry.id)
        logger.info(
            "group %s: %s %s (v%d)%s",
            self.name,
            outcome.status,
            job.job_id,
            job.version,
            "" if created else " (already recorded by another group)",
        )
        return outcome if created else None

    def _execute(
        self,
        job: jobs_pb2.Job,
        outcome_of: Callable[..., JobOutcome],
        *,
        promoted_from: str | None = None,
        current: bool = True,
    ) -> JobOutcome:
        """Run ``job``; return its outcome (``done`` or ``failed``), not yet recorded.

        ``current``: report it as the group's current job (the stream loop's, not the
        artifact lane's, which runs beside it).
        """
        if current:
            with self._lock:
                self.stats.current_job = job.job_id
        try:
            output = self.executor.execute(job)
            if self.job_delay_s:
                self.clock.sleep(self.job_delay_s)
            return outcome_of(job, "done", output=output, promoted_from=promoted_from)
        except StoreError:
            raise
        except JobInputError as exc:
            logger.warning("group %s: job %s failed: %s", self.name, job.job_id, exc)
            return outcome_of(job, "failed", error=str(exc), promoted_from=promoted_from)
        except Exception as exc:  # a bug in one job kind must not stop the group
            logger.exception("group %s: job %s crashed", self.name, job.job_id)
            error = f"{type(exc).__name__}: {exc}"
            return outcome_of(job, "failed", error=error, promoted_from=promoted_from)
        finally:
            if current:
                with self._lock:
                    self.stats.current_job = None

    def step_artifacts(self) -> list[JobOutcome]:
        """Run the artifact jobs submitted but not started, ahead of the stream.

        The artifact lane's one look (:meth:`run` calls it every :data:`ARTIFACT_POLL_S`
        on a thread of its own). Each job goes through
        :func:`~estuary.jobs.job_to_run` first, so a version another group (or this
        group's stream loop) started meanwhile is left to it. Returns the outcomes
        recorded; each has ``deliveries`` 0: it ran before its stream entry was read.

        Raises
        ------
        StoreError
            The store failed; the jobs are still in the stream and run from there.
        """
        now = self.clock.monotonic()
        if self._last_class_scan is None or now - self._last_class_scan >= CLASS_SCAN_S:
            self._classes = artifact_classes(self.store)
            self._last_class_scan = now
        recorded: list[JobOutcome] = []
        for ahead in artifact_jobs_ahead(self.store, self._classes):
            job = job_to_run(self.store, ahead).run  # a newer one if submitted meanwhile
            if job is None or self.store.get(result_key(job.job_id)) is not None:
                continue  # a newer version was started elsewhere, or this one is done

            def outcome_of(of: jobs_pb2.Job, status: Status, **extra: Any) -> JobOutcome:
                return JobOutcome(
                    job_id=of.job_id, kind=job_kind(of), version=of.version, status=status,
                    group=self.name, committed_ms=of.created_ms, deliveries=0,
                    finished_ms=self.clock.time_ms(), **extra,
                )  # fmt: skip

            outcome = self._execute(job, outcome_of, current=False)
            created = self._record(outcome)
            if outcome.status == "done":
                record_done(self.store, job)
            logger.info(
                "group %s: %s %s (v%d) ahead of the stream",
                self.name, outcome.status, job.job_id, job.version,
            )  # fmt: skip
            if created:
                recorded.append(outcome)
        return recorded

    def _artifact_loop(self, stop: threading.Event) -> None:
        while not self.clock.wait(stop, ARTIFACT_POLL_S):
            try:
                self.step_artifacts()
            except StoreError as exc:  # an outage: the stream loop runs them later
                logger.warning("group %s: artifact lane: %s", self.name, exc)
            except Exception:  # a bug here must not stop the lane (or pass silently)
                logger.exception("group %s: artifact lane failed", self.name)

    def step(self, *, block_s: float = READ_BLOCK_S) -> int:
        """Reclaim if due, then take one job and handle it; return entries handled."""
        handled = 0
        now = self.clock.monotonic()
        if now - self._last_reclaim >= self.heartbeat_s:
            self._last_reclaim = now
            reclaimed = self.reclaim()
            with self._lock:
                self.stats.reclaimed += len(reclaimed)
            for entry in reclaimed:
                self.process(entry)
                handled += 1
        if handled:
            return handled
        for entry in self.store.read_group(
            self.stream, self.consumer_group, self.name, count=1, block_s=block_s
        ):
            self.process(entry)
            handled += 1
        return handled

    def run(self, stop: threading.Event, *, idle_exit_s: float | None = None) -> GroupStats:
        """Serve jobs until ``stop`` is set (or, with ``idle_exit_s``, after that long idle).

        Heartbeats run on a background thread for the whole call.

        Raises
        ------
        RuntimeError
            If the group runs on a :class:`~estuary.clock.VirtualClock`: its heartbeat
            thread would spin time forward; drive such a group with :meth:`step`.
        """
        if isinstance(self.clock, VirtualClock):
            raise RuntimeError("run: needs a real clock; drive a virtual-clock group with step()")
        self.heartbeat()
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat_loop, args=(beat_stop,), name=f"heartbeat-{self.name}",
            daemon=True,
        )  # fmt: skip
        beat.start()
        lane: threading.Thread | None = None
        if self.artifacts_ahead:
            lane = threading.Thread(
                target=self._artifact_loop, args=(beat_stop,), name=f"artifacts-{self.name}",
                daemon=True,
            )  # fmt: skip
            lane.start()
        idle_since = self.clock.monotonic()
        try:
            while not stop.is_set():
                if self.step():
                    idle_since = self.clock.monotonic()
                    continue
                if self.on_idle is not None:
                    self.on_idle()
                if idle_exit_s is not None and self.clock.monotonic() - idle_since >= idle_exit_s:
                    break
        finally:
            beat_stop.set()
            beat.join(timeout=self.heartbeat_s + 1.0)
            if lane is not None:
                # An artifact build is a manifest once the base is compressed; the first
                # one compresses it (seconds). Not joined longer: it is a daemon thread,
                # and its job is still in the stream if it did not finish.
                lane.join(timeout=self.heartbeat_s + 1.0)
            self.heartbeat()
        return self.stats
