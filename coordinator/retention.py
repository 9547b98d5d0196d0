"""Retention: what a federation keeps in its stores, so months of running stay bounded.

Every key family the coordinator and the worker groups write has a rule here, or a
reason why it is bounded by itself:

========================  ==============================================================
``cohort/<id>``           Removed ``retention.grace_s`` after the cohort finished, once
``cohort-log/<id>/…``     its sum is folded into a committed version (no ``buffer/<id>``
``buffer-seen/<id>``      left) or it aborted. The log holds the masked uploads. The
                          grace outlasts any tick still folding the cohort in, so the
                          accepted-sum marker cannot vanish under a late re-delivery.
``version/<n>``           Kept for the newest ``keep_versions`` versions, every version
``jobs-submitted/<n>``    within ``aggregation.max_staleness`` of the head (a device may
``jobresult/<job id>``    still be training on it) and every version an unfinished cohort
                          was sealed on; older ones are removed. A job result named by a
                          ``jobdone/`` record (the newest artifact of a class) is kept.
job stream ``jobs``       Entries acknowledged by the worker groups are trimmed
                          (:func:`estuary.jobs.trim_jobs`).
blobs                     Collected when no kept record names them, directly or through a
                          manifest, and they are older than ``blob_grace_s``.
``worker/<group>``        Removed ``worker_gone_s`` after the group's last heartbeat.
``enrol-token/…``         Expired tokens are swept by :mod:`coordinator.enrolment`.
``nonces/<device>``       Pruned to the replay window on every request of the device
                          (bounded per enrolled device).
``assign/``, ``seen/``    Dropped when a cohort is folded in (:mod:`coordinator.tick`).
``buffer/<id>``           Dropped by the commit that folds it in.
``training/<device>``,    A training task and its pacer entry go when the device reports
``devices-training``      it finished, gives it up, or it expires (the tick drops every
                          entry past its expiry, record or not), so the pacer's count
                          cannot creep up over months.
per-class and singleton   ``forming/<class>``, ``joblatest/``, ``jobstarted/``,
records                   ``jobdone/`` (one per kind key), ``head/version``,
                          ``federation/settings``: one each, never growing.
``device/<id>``           Kept: one per enrolled device (the fleet, not time).
``trained/<device>``      Kept: one per device that trained (the fleet, not time), written
                          only with ``pacing.one_task_per_version``.
========================  ==============================================================

A sweep runs every ``retention.interval_s`` from the tick of every replica. Every delete
is either of a record no writer touches any more or conditional on the version read, so
replicas sweeping at once only repeat each other's work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields

from coordinator.cohort_log import LOG_PREFIX
from coordinator.cohorts import CohortRecord
from coordinator.job_submission import JOBS_SUBMITTED_PREFIX
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.config.models import RetentionSettings
from estuary.jobs import DONE_PREFIX, RESULT_PREFIX, trim_jobs
from estuary.state.base import Record, Store
from estuary.state.blobs import BlobStore
from estuary.state.errors import StoreError
from estuary.state.keys import (
    COHORT_PREFIX,
    HEAD_KEY,
    VERSION_PREFIX,
    WORKER_PREFIX,
    buffer_key,
    buffer_seen_key,
)

__all__ = ["BLOB_ROOT_PREFIXES", "Retention", "SweepReport"]

log = logging.getLogger(__name__)

#: Records whose text names the blobs to keep (adapters, artifact and checkpoint
#: manifests). Everything else in the store names no blob.
BLOB_ROOT_PREFIXES = (HEAD_KEY, VERSION_PREFIX, RESULT_PREFIX, DONE_PREFIX)


@dataclass
class SweepReport:
    """What one sweep removed."""

    cohorts: int = 0
    """Finished cohorts removed (record, log with masked uploads, accepted-sum marker)."""
    log_entries: int = 0
    """Cohort-log entries among them."""
    versions: int = 0
    """Version records removed."""
    job_results: int = 0
    """Job outcome records removed."""
    markers: int = 0
    """``jobs-submitted/`` markers removed."""
    workers: int = 0
    """Worker-group records removed."""
    stream_entries: int = 0
    """Job-stream entries trimmed."""
    blobs: int = 0
    """Blobs deleted."""
    blob_bytes: int = 0
    """Bytes those blobs held."""

    @property
    def removed(self) -> int:
        """Everything removed, in items."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "blob_bytes")


class Retention:
    """Removes what a federation no longer needs from its store and blob store.

    Parameters
    ----------
    settings
        The retention rules (``coordinator.retention``).
    store
        The federation's state store.
    blobs
        The blob store to collect; ``None`` leaves blobs alone.
    max_staleness
        ``aggregation.max_staleness``: versions this close to the head may still be
        trained on, so their records and artifacts are kept.
    clock
        Ages of cohorts and worker heartbeats are measured on it (Unix seconds).
    """

    def __init__(
        self,
        settings: RetentionSettings,
        *,
        store: Store,
        blobs: BlobStore | None,
        max_staleness: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {max_staleness}")
        self.settings = settings
        self._store = store
        self._blobs = blobs
        self._max_staleness = max_staleness
        self._clock = clock
        self._last_sweep: float | None = None

    def maybe_sweep(self) -> SweepReport | None:
        """Sweep if ``interval_s`` has passed since this replica's last sweep.

        A failing store is logged and the sweep retried at the next interval: retention
        is housekeeping, never a reason to stop the tick.
        """
        now = self._clock.time()
        if self._last_sweep is not None and now - self._last_sweep < self.settings.interval_s:
            return None
        self._last_sweep = now
        try:
            return self.sweep()
        except StoreError as exc:
            log.warning(
                "retention sweep failed (retried in %.0f s): %s", self.settings.interval_s, exc
            )
            return None

    def sweep(self) -> SweepReport:
        """Apply every rule once; return what was removed."""
        report = SweepReport()
        head = self._head_version()
        if head is None:
            return report  # not initialised yet: nothing is old
        cohorts = self._cohorts()
        floor = self.version_floor(head, [r.version for r in cohorts.values() if r.active])
        self._sweep_cohorts(cohorts, report)
        self._sweep_versions(floor, report)
        self._sweep_workers(report)
        report.stream_entries = trim_jobs(self._store)
        if self._blobs is not None:
            roots = [
                r.value.decode("utf-8", errors="replace")
                for prefix in BLOB_ROOT_PREFIXES
                for r in self._store.scan(prefix).values()
            ]
            report.blobs, report.blob_bytes = self._blobs.collect(
                self._blobs.reachable(roots), older_than_s=self.settings.blob_grace_s
            )
        if report.removed:
            log.info("retention: below version %d removed %s", floor, report)
        return report

    def version_floor(self, head: int, active_versions: list[int]) -> int:
        """Return the oldest version kept.

        The newest ``keep_versions`` versions, those within ``max_staleness`` of the head
        (a device may be training on them) and every version an unfinished cohort was
        sealed on are kept.
        """
        floor = min(head - self.settings.keep_versions + 1, head - self._max_staleness)
        if active_versions:
            floor = min(floor, min(active_versions))
        return max(0, floor)

    # ------------------------------------------------------------------ rules

    def _head_version(self) -> int | None:
        record = self._store.get(HEAD_KEY)
        if record is None:
            return None
        return int(json.loads(record.value)["version"])

    def _cohorts(self) -> dict[str, CohortRecord]:
        out: dict[str, CohortRecord] = {}
        for key, record in self._store.scan(COHORT_PREFIX).items():
            out[key] = CohortRecord.from_json(record.value, where=key)
        return out

    def _sweep_cohorts(self, cohorts: dict[str, CohortRecord], report: SweepReport) -> None:
        now = self._clock.time()
        for key, cohort in cohorts.items():
            if cohort.active or cohort.finished_at is None:
                continue
            if now - cohort.finished_at < self.settings.grace_s:
                continue
            if self._store.get(buffer_key(cohort.cohort_id)) is not None:
                continue  # its sum waits for the next version: not folded in yet
            # Log first and the record last: a sweep cut short leaves the record, and
            # the next sweep finishes the job.
            entries = self._store.scan(f"{LOG_PREFIX}{cohort.cohort_id}/")
            for entry in entries:
                self._store.delete(entry)
            self._store.delete(buffer_seen_key(cohort.cohort_id))
            current = self._store.get(key)
            if current is not None and self._store.delete(key, expected_version=current.version):
                report.cohorts += 1
                report.log_entries += len(entries)

    def _sweep_versions(self, floor: int, report: SweepReport) -> None:
        for key in self._store.scan(VERSION_PREFIX):
            if _number(key[len(VERSION_PREFIX) :]) < floor and self._store.delete(key):
                report.versions += 1
        for key in self._store.scan(JOBS_SUBMITTED_PREFIX):
            if _number(key[len(JOBS_SUBMITTED_PREFIX) :]) < floor and self._store.delete(key):
                report.markers += 1
        newest_done = {
            str(json.loads(r.value).get("job_id", ""))
            for r in self._store.scan(DONE_PREFIX).values()
        }
        for key, record in self._store.scan(RESULT_PREFIX).items():
            if key[len(RESULT_PREFIX) :] in newest_done:
                continue
            if _result_version(record) < floor and self._store.delete(key):
                report.job_results += 1

    def _sweep_workers(self, report: SweepReport) -> None:
        cutoff = self._clock.time() - self.settings.worker_gone_s
        for key, record in self._store.scan(WORKER_PREFIX).items():
            try:
                last_seen = float(json.loads(record.value).get("last_seen", 0.0))
            except (ValueError, TypeError, AttributeError):
                continue  # not ours to judge: left for an operator
            if last_seen < cutoff and self._store.delete(key, expected_version=record.version):
                report.workers += 1


def _number(text: str) -> int:
    """Return the version in a key's tail; one that is no number is never removed."""
    try:
        return int(text)
    except ValueError:
        return 1 << 62


def _result_version(record: Record) -> int:
    """Return the version of a job outcome; one that does not say is never removed."""
    try:
        return int(json.loads(record.value)["version"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62
