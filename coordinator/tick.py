"""The periodic work of a replica: seal cohorts, close stages, fold cohorts in, commit.

:meth:`Ticker.tick` runs every ``TICK_INTERVAL_S`` on every replica at once; each step is
safe to repeat and to race, because every write it makes is conditional:

1. **Expire** training tasks past their deadline or of devices silent for
   ``cohort.silence_s`` (:meth:`Admission.expire_training`): their pacer slots free up.
   **Seal** forming cohorts that are ready (:meth:`Admission.seal_ready`), then log each
   class whose count of waiting devices changed (:mod:`coordinator.formation`).
2. **Note stages.** A cohort's stage lives in its replicated log; the tick copies a new
   stage into the cohort record with the time it noticed it (``stage_started``), which
   starts that stage's deadline.
3. **Deadlines.** The masked-upload stage ends at the cohort's ``deadline_at``
   (``cohort.deadline_s`` after sealing); every other stage ``cohort.key_timeout_s``
   after it started. A stage past its deadline is closed with a deadline event in the
   log: members that have not answered are dropped, and below the threshold the cohort
   aborts.
4. **Silence.** The upload stage also closes early once every member it still awaits
   (abandoned members aside) has been silent for ``cohort.silence_s``: no heartbeat and
   no share relay since ``max(last seen, stage_started)``. Survivors then need not wait
   for the full deadline because of members that are gone.
5. **Fold in** finished cohorts: a completed cohort's unmasked sum goes to the FedBuff
   buffer (:mod:`coordinator.versions`), the record is closed with its outcome, and its
   assignments, liveness records and cache entry are dropped.
6. **Commit** a version when the buffer holds ``K`` updates, and queue its cloud jobs.
7. **Retention** (every ``retention.interval_s``): remove what no one needs any more
   (:mod:`coordinator.retention`).

Every time here is read from the injected clock, so a test drives deadlines and silence
by advancing a :class:`~estuary.clock.VirtualClock`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from coordinator.cohort_book import CohortBook
from coordinator.cohort_log import ReplicatedCohort
from coordinator.cohorts import CohortRecord
from coordinator.formation import FormationLog, waiting_by_class
from coordinator.job_submission import JobSubmitter
from coordinator.outcomes import ServiceCounters, ServiceObserver
from coordinator.retention import Retention
from coordinator.versions import VersionInfo, VersionLedger
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.config.models import CohortSettings
from secure_agg import Stage

if TYPE_CHECKING:  # admission reads TICK_INTERVAL_S from here
    from coordinator.admission import Admission

__all__ = ["TICK_INTERVAL_S", "Ticker", "stage_deadline"]

#: Seconds between calls of the service's periodic work (the server's tick loop): 0.25 s.
#: Sealing a cohort or closing a stage late by this much is invisible next to stage
#: deadlines of seconds to minutes, and a tick is a handful of store reads when nothing
#: is due.
TICK_INTERVAL_S = 0.25

log = logging.getLogger(__name__)

_FINISHED = (Stage.COMPLETED, Stage.ABORTED)


def stage_deadline(record: CohortRecord, stage: Stage, *, key_timeout_s: float) -> float:
    """Unix time at which ``stage`` of the cohort ends without waiting for more members.

    The masked-upload stage ends at the cohort's ``deadline_at``; every other stage
    ``key_timeout_s`` after the tick noted its start.
    """
    if stage is Stage.MASKED_INPUT:
        return record.deadline_at
    return record.stage_started + key_timeout_s


class Ticker:
    """One replica's periodic work over the shared store.

    Parameters
    ----------
    cohort
        Cohort settings: ``key_timeout_s`` and ``silence_s``.
    book
        The cohort records and this replica's cohort states.
    admission
        Seals forming cohorts.
    ledger
        The FedBuff buffer and version history.
    jobs
        Queues the cloud jobs of a committed version.
    shapes
        Shape of every adapter tensor (B), to reshape an unmasked flat sum.
    counters, observer
        Told about finished cohorts, accepted updates and commits.
    clock
        Deadlines and silence are measured on it (Unix seconds).
    retention
        Sweeps old records and blobs after each tick's commit; ``None``: never.
    """

    def __init__(
        self,
        cohort: CohortSettings,
        *,
        book: CohortBook,
        admission: Admission,
        ledger: VersionLedger,
        jobs: JobSubmitter,
        shapes: dict[str, tuple[int, ...]],
        counters: ServiceCounters,
        observer: ServiceObserver,
        clock: Clock = SYSTEM_CLOCK,
        retention: Retention | None = None,
    ) -> None:
        self._settings = cohort
        self._book = book
        self._admission = admission
        self._ledger = ledger
        self._jobs = jobs
        self._shapes = dict(shapes)
        self._counters = counters
        self._observer = observer
        self._clock = clock
        self._classes = [c.name for c in admission.settings.device_classes]
        self._formation = FormationLog(min_size=cohort.min_size)
        self._retention = retention

    def tick(self) -> VersionInfo | None:
        """Do the periodic work; return the version committed by this call, if any."""
        self._admission.expire_training()
        self._admission.seal_ready()
        self._formation.observe(waiting_by_class(self._book, self._classes))
        now = self._clock.time()
        for cohort_id in self._book.active_ids():
            record = self._book.record(cohort_id)
            if record is None or not record.active:
                self._book.deactivate(cohort_id)
                continue
            cohort = self._book.cohort(record)
            stage = cohort.stage
            if stage is not record.stage:
                record = self._note_stage(cohort_id, stage, now) or record
            if stage not in _FINISHED and now >= stage_deadline(
                record, stage, key_timeout_s=self._settings.key_timeout_s
            ):
                log.info("cohort %s: stage %s deadline passed", cohort_id, stage.name)
                cohort.close_stage_if(stage)
                stage = cohort.stage
            elif stage is Stage.MASKED_INPUT and self._all_awaited_gone(record, cohort, now):
                log.info(
                    "cohort %s: every member still awaited is silent; closing %s early",
                    cohort_id,
                    stage.name,
                )
                cohort.close_stage_if(stage)
                stage = cohort.stage
            if stage in _FINISHED:
                self._finish(record, cohort)
        info = self._ledger.try_commit()
        for dropped in self._ledger.take_dropped():
            self._counters.updates_dropped += dropped.updates
            self._observer.event(
                "update_dropped",
                cohort_id=dropped.cohort_id,
                updates=dropped.updates,
                trained_on=dropped.trained_on,
                reason=dropped.reason,
            )
        if info is not None:
            self._observer.event(
                "version_committed",
                version=info.version,
                updates=info.updates,
                cohorts=list(info.cohorts),
                adapter_sha256=info.adapter_sha256,
                rolled_back_to=info.rolled_back_to,
                folded_staleness=[list(pair) for pair in info.folded_staleness],
            )
            self._jobs.submit(info)
        if self._retention is not None:
            self._retention.maybe_sweep()
        return info

    def _note_stage(self, cohort_id: str, stage: Stage, now: float) -> CohortRecord | None:
        """Record that the cohort entered ``stage`` at ``now``; return the stored record.

        When another replica noted the stage first, its record is read back (its
        ``stage_started`` counts); None only if the record is gone.
        """

        def advance(record: CohortRecord) -> CohortRecord | None:
            return None if record.stage is stage else record.with_stage(stage, now=now)

        noted = self._book.update(cohort_id, advance)
        return noted if noted is not None else self._book.record(cohort_id)

    def _all_awaited_gone(self, record: CohortRecord, cohort: ReplicatedCohort, now: float) -> bool:
        """Whether every member the upload stage still awaits is silent or abandoned."""
        waiting = cohort.server.waiting_for()
        if not waiting:
            return False
        silence = self._settings.silence_s
        for index in waiting - set(record.abandoned):
            seen = self._book.last_seen(record.cohort_id, index)
            last = record.stage_started if seen is None else seen
            if now - max(last, record.stage_started) < silence:
                return False
        return True

    def _finish(self, record: CohortRecord, cohort: ReplicatedCohort) -> None:
        """Fold a finished cohort in: buffer its sum, close its record, drop its leftovers."""
        cohort_id = record.cohort_id
        result = cohort.server.result
        if result is not None and result.survivors:
            weighted = {
                name: result.float_sum[name].reshape(shape).astype(np.float32)
                for name, shape in self._shapes.items()
            }
            weight_total = result.weight_sum
            # Re-read the record right before buffering: if it is gone or no longer active,
            # another replica folded the sum in (it closes the record only after buffering)
            # and retention may since have removed the marker that catches a repeat.
            current = self._book.record(cohort_id)
            if current is None or not current.active:
                log.info("cohort %s already folded in by another replica", cohort_id)
                weight_total = 0.0
            if weight_total > 0:
                added = self._ledger.add_cohort_sum(
                    cohort_id,
                    weighted_sum=weighted,
                    weight_total=weight_total,
                    updates=len(result.survivors),
                    trained_versions=[record.member_version(i) for i in result.survivors],
                )
                if added:
                    self._counters.updates_accepted += len(result.survivors)
                    self._observer.event(
                        "update_accepted",
                        cohort_id=cohort_id,
                        updates=len(result.survivors),
                        survivors=list(result.survivors),
                        weight_total=weight_total,
                        dropouts=record.size - len(result.survivors),
                    )
        now = self._clock.time()

        def close(current: CohortRecord) -> CohortRecord | None:
            if not current.active:
                return None
            if result is not None:
                return current.completed(
                    stage=cohort.stage,
                    now=now,
                    survivors=tuple(result.survivors),
                    weight_total=result.weight_sum,
                )
            return current.aborted(stage=cohort.stage, now=now, reason=cohort.abort_reason)

        status = "completed" if result is not None else "aborted"
        if self._book.update(cohort_id, close) is not None:
            if result is not None:
                self._counters.cohorts_completed += 1
            else:
                self._counters.cohorts_aborted += 1
            log.info("cohort %s %s", cohort_id, status)
            self._observer.event(
                "cohort_finished",
                cohort_id=cohort_id,
                status=status,
                size=record.size,
                survivors=len(result.survivors) if result is not None else 0,
                reason=cohort.abort_reason or "",
            )
        for index, device_id in enumerate(record.members):
            self._book.clear_assignment(device_id, cohort_id)
            self._book.clear_seen(cohort_id, index)
        self._book.deactivate(cohort_id)
        self._book.forget(cohort_id)
