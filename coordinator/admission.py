"""Admission: a device is paced or trains, then joins a cohort of devices that trained.

Devices train first. GetTask from an idle device is answered with Pace, or a *training
task* (version, artifact, rank, steps; no cohort) recorded at ``training/<device>``
(:class:`~coordinator.cohorts.TrainingTask`). The pacer (:mod:`coordinator.pacing`)
decides whether there is room: it counts the devices holding a training task
(:meth:`~coordinator.cohort_book.CohortBook.training_devices`); a device that finished
takes no slot. A training task expires at its deadline, or once the device has been
silent (no GetTask, no heartbeat) for ``cohort.silence_s``; the tick drops it.

When the device has trained it asks again with ``trained_task_id``: it leaves the
training count and joins the forming cohort of its class with the version its update
trained on, answered with Pace until the cohort is sealed, then with the *cohort task*
(cohort, member index, secure-aggregation session). Members of one cohort may have
trained on different versions: the cohort record keeps each member's, and the share
relay weighs each member by its own staleness. A cohort is sealed once it has
``max_size`` devices, or ``min_size`` devices for ``formation_s`` seconds, or ``min_size``
devices while no device trains (no one else can join), or ``min_size`` devices one of
which trained on a version older than the head (waiting for more would only make the
updates it holds staler; with versions committed every few seconds cohorts seal at
``min_size``, with versions hours apart they fill for ``formation_s``). Sealing marks the
forming record sealed with compare-and-set, so of two replicas sealing the same cohort
exactly one seals it; the sealed :class:`~coordinator.cohorts.CohortRecord`, the members'
assignments and the entry in the active set are written after, and the marker is deleted
last. Whoever reads a marker (a tick, a member's GetTask) finishes those idempotent writes,
so a coordinator that dies halfway through a seal loses no member's update.

Work is only handed out if it can count. Training tasks use the newest edge artifact
built for the class, and an update more than ``aggregation.max_staleness`` versions
behind the head is refused (when it is reported finished, and again at the share relay);
so while a class's newest artifact is already that far behind, its devices are paced
until a current one is built. Worker groups run each class's newest build ahead of older
ones (:func:`estuary.jobs.job_to_run`), so the wait is about one build, not a backlog.
Nor is work handed out on a version the regression guard abandoned
(:mod:`coordinator.guard`), however new its artifact: the newest artifact of the kept
lineage is used instead.

An idle device's GetTask is one store round trip: its cohort task, its class's forming
cohort, its last version, its training task, the head and the class's newest artifact
build are read together (:meth:`Admission.task_keys`), with the request's nonce when the
service authenticates it.

A device that asks for work without ``trained_task_id`` has no trained update: one that
holds a training task gets it again (if it still counts); a member of a sealed cohort
has lost its task state, e.g. by a restart, and its task is abandoned (the member
becomes a dropout of its cohort) before it is admitted afresh. ``trained_task_id`` naming
no training task the device holds is refused (FailedPrecondition): the update is not
wanted (the task expired, was given up, or its version became too stale).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NoReturn

import numpy as np

from coordinator.cohort_book import CohortBook
from coordinator.cohorts import (
    ArtifactRef,
    Assignment,
    CohortRecord,
    FormingCohort,
    TrainingTask,
    neighbours_for,
)
from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition
from coordinator.outcomes import (
    PaceMechanism,
    PaceOffer,
    ServiceCounters,
    ServiceObserver,
    TaskOffer,
)
from coordinator.pacing import Admit, PacerConfig, decide
from coordinator.tick import TICK_INTERVAL_S
from coordinator.versions import VersionInfo, VersionLedger
from estuary.adapters import rank_learning_rate, trained_columns
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.config.models import CoordinatorSettings
from estuary.jobs import JobOutcome, done_key, done_of, job_id_for, result_key
from estuary.state.base import Record, Store
from estuary.state.blobs import BlobStore
from estuary.state.keys import HEAD_KEY, PACE_WAITING
from secure_agg import FixedPoint, Stage

__all__ = ["SEAL_POLL_S", "Admission", "PaceQueue", "pacer_config"]

log = logging.getLogger(__name__)

#: The soonest a member of a forming cohort that is due to be sealed is told to come
#: back: the tick interval, at which cohorts are sealed.
SEAL_POLL_S = TICK_INTERVAL_S


def pacer_config(settings: CoordinatorSettings) -> PacerConfig:
    """Return the pacer parameters ``settings`` give (cap, deadline, retry-after bounds)."""
    return PacerConfig(
        buffer_size=settings.aggregation.buffer_size,
        target_staleness=settings.pacing.target_staleness,
        deadline_s=settings.cohort.deadline_s,
        retry_after_min_s=settings.pacing.retry_after_min_s,
        retry_after_max_s=settings.pacing.retry_after_max_s,
    )


class PaceQueue:
    """The devices deferred for a pacer slot, each with the time it was told to come back.

    Kept in the store (:data:`~estuary.state.keys.PACE_WAITING`), so every replica puts a
    deferred device behind the same queue. :meth:`waiting` is what
    :func:`coordinator.pacing.decide` is told; :meth:`add` puts a deferred device in line.
    """

    def __init__(self, store: Store, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._clock = clock

    def waiting(self) -> int:
        """Count the deferred devices whose time to come back is still ahead. One call."""
        now = self._clock.time()
        return self._store.zcount(
            PACE_WAITING, min_score=math.nextafter(now, math.inf), max_score=math.inf
        )

    def add(self, device_id: str, retry_after_s: float) -> None:
        """Note that ``device_id`` comes back ``retry_after_s`` from now. One call.

        Drops the devices whose time has passed (they came back, or went away) first, so
        the set stays the size of the queue; a device already in line is moved, never
        counted twice.
        """
        now = self._clock.time()
        self._store.zadd_pruned(PACE_WAITING, {device_id: now + retry_after_s}, prune_max_score=now)


class Admission:
    """Pacing, cohort formation and sealing, and the tasks handed to members.

    Parameters
    ----------
    settings
        The coordinator's settings (device classes, pacing, cohorts, training).
    book
        The cohort records.
    ledger
        The version history (the head decides which artifacts are current).
    blobs
        Blob store holding the edge artifacts (their sizes go into tasks).
    tensors
        ``(name, length)`` of every adapter tensor, sorted: the secure-aggregation input.
    observer
        Told ``paced``, ``training_started``, ``update_rejected``, ``member_abandoned``
        and ``cohort_sealed``.
    counters
        Counts updates refused as too stale when they are reported finished.
    clock
        Formation and deadline times (Unix seconds).
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        book: CohortBook,
        ledger: VersionLedger,
        blobs: BlobStore,
        tensors: list[tuple[str, int]],
        observer: ServiceObserver,
        clock: Clock = SYSTEM_CLOCK,
        new_cohort_id: Callable[[], str] | None = None,
        counters: ServiceCounters | None = None,
    ) -> None:
        self.settings = settings
        self._counters = counters or ServiceCounters()
        self._new_cohort_id = new_cohort_id or (lambda: uuid.uuid4().hex)
        self._book = book
        self._ledger = ledger
        self._blobs = blobs
        self._tensors = tuple(tensors)
        self._observer = observer
        self._clock = clock
        self._classes = {c.name: c for c in settings.device_classes}
        self._fastest = min(c.expected_task_s for c in settings.device_classes)
        self.pacer = pacer_config(settings)
        self.queue = PaceQueue(book.store, clock=clock)
        self._artifacts: dict[str, tuple[int, str, int]] = {}
        # Per class, (head version, floor) of the last search of build outcomes.
        self._searched: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ GetTask

    def get_task(
        self,
        device: Device,
        device_class: str,
        *,
        trained_task_id: str = "",
        records: Sequence[Record | None] | None = None,
    ) -> TaskOffer | PaceOffer:
        """Give ``device`` (of the configured ``device_class``) a task, or pace it.

        ``trained_task_id``: the training task whose update the device holds, finished
        (it joins a cohort); empty: it holds none. The device's records, the forming
        cohort, the head and the class's newest artifact build are read in one store
        round trip; an idle device that is paced costs no more. ``records``: those
        reads, of :meth:`task_keys` in order, made by the caller (the service reads them
        with the request's nonce); ``None``: read them here.

        Raises
        ------
        FailedPrecondition
            ``trained_task_id`` names no training task the device holds, or one whose
            version is too stale (or abandoned) to count: drop the update.
        """
        keys = self.task_keys(device.device_id, device_class)
        if records is None:
            records = self._book.store.get_many(keys)
        elif len(records) != len(keys):
            raise ValueError(
                f"records: expected {len(keys)} reads of task_keys, got {len(records)}"
            )
        assign_rec, forming_rec, trained_rec, training_rec, head_rec, done_rec = records
        assignment, forming, trained, training = self._book.parse_admission(
            device.device_id, device_class, assign_rec, forming_rec, trained_rec, training_rec
        )
        head = VersionLedger.head_of(head_rec)
        if assignment is not None:
            offer = self._resume(device, assignment, head, trained_task_id)
            if offer is not None:
                return offer
        if forming is not None and device.device_id in forming[0].members:
            index = forming[0].members.index(device.device_id)
            if not forming[0].trained or forming[0].tasks[index] == trained_task_id:
                return self._wait_for_seal(device, device_class, head, forming)
            self._leave_forming(device, device_class)  # it lost its update: a restart
        if training is not None:
            task, record_version = training
            if trained_task_id == task.task_id:
                return self._finished(device, device_class, task, record_version, head)
            if not trained_task_id:
                if self._counts(task.version, head) and self._clock.time() < task.deadline_at:
                    # Asked again before reporting it: the reply was lost, or the device
                    # restarted; the same task, still alive.
                    self.keep_training(device.device_id, task)
                    return self._training_offer(task)
                self._book.stop_training(device.device_id, expected_version=record_version)
        if trained_task_id:
            raise FailedPrecondition(
                f"trained_task_id: {trained_task_id!r} is not a training task this device "
                "holds (it expired, was given up, was already reported, or its update became "
                "too stale to count): drop the update"
            )
        build_key = done_key("build_artifacts", device_class=device_class)
        artifact = self._artifact_at(device_class, head, done_of(done_rec, key=build_key))
        if artifact is None:
            return self._pace(self.pacer.retry_after_min_s * 2, self._no_artifact(device_class))
        if (
            trained is not None
            and head is not None
            and trained >= artifact[0]
            and self._next_version_under_way(head, artifact[0])
        ):
            return self._pace(
                self.pacer.retry_after_min_s,
                f"already trained on version {artifact[0]}; waiting for the next, under way",
                "next_version",
            )
        active = self._book.training_devices()
        # Only a device that meets the cap asks how many wait before it: one more call.
        at_cap = active >= self.pacer.max_concurrency
        decision = decide(
            self.pacer,
            active=active,
            waiting=self.queue.waiting() if at_cap else 0,
            expected_task_s=self._classes[device_class].expected_task_s,
            fastest_task_s=self._fastest,
        )
        if not isinstance(decision, Admit):
            if decision.queued:
                self.queue.add(device.device_id, decision.retry_after_s)
            return self._pace(decision.retry_after_s, decision.reason)
        return self._start_training(device, device_class, artifact)

    @staticmethod
    def task_keys(device_id: str, device_class: str) -> list[str]:
        """Return the keys :meth:`get_task` reads first, in one round trip.

        In order: the device's cohort task, the forming cohort of its class, the version
        the device last trained on, its training task, the head and the class's newest
        completed artifact build (its ``jobdone/`` record).
        """
        return [
            *CohortBook.admission_keys(device_id, device_class),
            HEAD_KEY,
            done_key("build_artifacts", device_class=device_class),
        ]

    def _next_version_under_way(self, head: VersionInfo, artifact_version: int) -> bool:
        """Whether a version newer than ``artifact_version`` is committed or under way.

        ``pacing.one_task_per_version``: a device whose last task trained on the
        newest artifact's version would train on it again: from the same weights on the
        same data, arriving stale and over-weighting the fastest devices. It waits
        instead while the next version is certain to come: committed and its artifact
        being built (for at most ``cohort.deadline_s`` after the commit, in case the
        build never lands), or made by the buffered updates plus those still to come
        (from devices training and sealed cohorts). When neither holds (too few devices,
        dropouts) it trains again, or a small federation could stall. A few reads, made
        only for such a device.
        """
        if not self.settings.pacing.one_task_per_version:
            return False
        if head.version > artifact_version:
            committed = self._ledger.committed_at(head.version)
            return (
                committed is not None
                and self._clock.time() - committed < self.settings.cohort.deadline_s
            )
        coming = self._ledger.buffered_updates() + self._book.in_flight_updates()
        return coming >= self.pacer.buffer_size

    def _pace(
        self,
        seconds: float,
        reason: str,
        mechanism: PaceMechanism = "pacing",
        *,
        forming_cohort_id: str = "",
    ) -> PaceOffer:
        self._observer.event("paced", retry_after_s=seconds, reason=reason)
        return PaceOffer(seconds, reason, mechanism, forming_cohort_id=forming_cohort_id)

    def _resume(
        self,
        device: Device,
        assignment: Assignment,
        head: VersionInfo | None,
        trained_task_id: str,
    ) -> TaskOffer | None:
        """Offer the device's cohort task again, or abandon it; None: it was abandoned.

        Offered again while the member has not started (advertised keys), the cohort
        waits for keys, its update still counts, and the device still holds that update
        (asks with its training task's id). Its update no longer counting is refused
        (FailedPrecondition) after the task is abandoned.
        """
        cohort_id = assignment.cohort_id
        record = self._book.record(cohort_id)
        index = assignment.member_index
        stale = ""
        if record is not None and record.active:
            cohort = self._book.cohort(record)
            # A member of a cohort that already finished (the next tick folds it in) is
            # simply done; only a task still under way is abandoned.
            finished = cohort.stage in (Stage.COMPLETED, Stage.ABORTED)
            if not finished and not record.is_abandoned(index):
                unstarted = not cohort.server.advertised(index)
                if (
                    unstarted
                    and cohort.stage is Stage.ADVERTISE_KEYS
                    and trained_task_id == assignment.trained_task_id
                ):
                    stale = self._why_stale(record.member_version(index), head)
                    if not stale:
                        return self.offer(record, index, trained_task_id=trained_task_id)
                self._abandon(cohort_id, index)
        self._book.clear_assignment(device.device_id, cohort_id)
        if stale:
            self._refuse(trained_task_id, stale, cohort_id=cohort_id)
        return None

    def _abandon(self, cohort_id: str, index: int) -> None:
        def add(record: CohortRecord) -> CohortRecord | None:
            return None if record.is_abandoned(index) else record.with_abandoned(index)

        if self._book.update(cohort_id, add) is not None:
            log.info("cohort %s: member %d abandoned its task", cohort_id, index)
            self._observer.event("member_abandoned", cohort_id=cohort_id, member=index)

    # ------------------------------------------------------------------ training

    def _expiry(self, task: TrainingTask) -> float:
        """When ``task`` expires if the device stays silent from now."""
        return min(task.deadline_at, self._clock.time() + self.settings.cohort.silence_s)

    def keep_training(self, device_id: str, task: TrainingTask) -> None:
        """Note that ``device_id``, training ``task``, is alive now."""
        self._book.keep_training(device_id, expires_at=self._expiry(task))

    def training_heartbeat(
        self, device_id: str, task: TrainingTask, head: VersionInfo | None
    ) -> bool:
        """Take a heartbeat of ``device_id`` training ``task``; return whether to go on.

        Its work must still count at ``head``; while it does, the heartbeat keeps the task
        from expiring as silent.
        """
        if not self._counts(task.version, head):
            return False
        self.keep_training(device_id, task)
        return True

    def _start_training(
        self, device: Device, device_class: str, artifact: tuple[int, str, int]
    ) -> TaskOffer:
        """Give ``device`` a training task on the class's newest artifact."""
        now = self._clock.time()
        version, digest, size_bytes = artifact
        task_id = self._new_cohort_id()
        task = TrainingTask(
            task_id=task_id,
            device_class=device_class,
            version=version,
            artifact=ArtifactRef(sha256=digest, size=size_bytes),
            column_seed=int(task_id[:8], 16),
            started_at=now,
            deadline_at=now + self.settings.cohort.deadline_s,
        )
        self._book.start_training(device.device_id, task, expires_at=self._expiry(task))
        if self.settings.pacing.one_task_per_version:
            self._book.record_trained(device.device_id, version)
        self._observer.event(
            "training_started",
            device_class=device_class,
            version=version,
            task_id=task_id,
        )
        return self._training_offer(task)

    def _finished(
        self,
        device: Device,
        device_class: str,
        task: TrainingTask,
        record_version: int,
        head: VersionInfo | None,
    ) -> TaskOffer | PaceOffer:
        """Put a device that reports ``task`` trained into the forming cohort of its class.

        It joins before its training task is dropped, so a crash between the two leaves
        it a member (its training task expires), never neither.
        """
        stale = self._why_stale(task.version, head)
        if stale:
            self._book.stop_training(device.device_id, expected_version=record_version)
            self._refuse(task.task_id, stale)
        joined = self._join(device, device_class, task)
        for _ in range(2):  # a full forming cohort is sealed, then joined afresh
            if joined:
                break
            self.maybe_seal(device_class, head=head)
            joined = self._join(device, device_class, task)
        if not joined:
            return self._pace(
                self.pacer.retry_after_min_s,
                "every forming cohort was full; report the update again",
                "cohort_formation",
            )
        self._book.stop_training(device.device_id, expected_version=record_version)
        return self._wait_for_seal(device, device_class, head)

    def _leave_forming(self, device: Device, device_class: str) -> None:
        """Take ``device`` out of its class's forming cohort (it holds no update now)."""
        min_size = self.settings.cohort.min_size

        def leave(forming: FormingCohort | None) -> FormingCohort | None:
            if forming is None or forming.sealed_at is not None:
                return None
            if device.device_id not in forming.members:
                return None
            return forming.without({forming.members.index(device.device_id)}, min_size=min_size)

        if self._book.update_forming(device_class, leave) is not None:
            log.info("device %s left its forming cohort: it lost its update", device.device_id)

    def _join(self, device: Device, device_class: str, task: TrainingTask) -> bool:
        """Add the device with its trained ``task`` to the class's forming cohort."""
        now = self._clock.time()
        cohort = self.settings.cohort

        def join(forming: FormingCohort | None) -> FormingCohort | None:
            if forming is None:
                forming = FormingCohort(cohort_id=self._new_cohort_id(), members=(), opened_at=now)
            if (
                forming.sealed_at is not None
                or device.device_id in forming.members
                or len(forming.members) >= cohort.max_size
            ):
                return None
            return forming.joined(
                device.device_id,
                identity_key=device.public_key,
                version=task.version,
                task_id=task.task_id,
                min_size=cohort.min_size,
                now=now,
            )

        member = False

        def join_or_note(forming: FormingCohort | None) -> FormingCohort | None:
            nonlocal member
            member = forming is not None and device.device_id in forming.members
            return join(forming)

        joined = self._book.update_forming(device_class, join_or_note)
        return member or (joined is not None and device.device_id in joined.members)

    def _wait_for_seal(
        self,
        device: Device,
        device_class: str,
        head: VersionInfo | None,
        found: tuple[FormingCohort, int] | None = None,
    ) -> TaskOffer | PaceOffer:
        """Seal the device's forming cohort if it is ready; its cohort task, or Pace.

        ``found``: the forming cohort and its record version, as the caller read them
        (``None``: read here); the Pace's count and retry-after come from it.
        """
        if found is None:
            found = self._book.forming(device_class)
        self.maybe_seal(device_class, head=head, found=found)
        assignment = self._book.assignment(device.device_id)
        if assignment is not None:
            record = self._book.record(assignment.cohort_id)
            if record is not None:
                return self.offer(
                    record,
                    assignment.member_index,
                    trained_task_id=assignment.trained_task_id,
                )
        forming = found[0] if found else None
        members = len(forming.members) if forming else 0
        retry = self.pacer.retry_after_min_s
        if forming is not None and forming.full_at is not None:
            # Big enough: sealed once formation_s has passed (at a tick), so come back
            # then rather than a whole retry-after later.
            due = forming.full_at + self.settings.cohort.formation_s - self._clock.time()
            retry = min(retry, max(due, SEAL_POLL_S))
        # A member of the forming cohort: it comes back soon, with its update.
        member = forming is not None and device.device_id in forming.members
        return self._pace(
            retry,
            f"waiting for the cohort to fill ({members}/{self.settings.cohort.min_size})",
            "cohort_formation",
            forming_cohort_id=forming.cohort_id if forming is not None and member else "",
        )

    def expire_training(self) -> None:
        """Drop the training tasks that expired (deadline, or a silent device); the tick.

        A device that reports such a task later is refused (its update is not wanted).
        """
        for device_id in self._book.expired_training(self._clock.time()):
            found = self._book.training_task(device_id)
            if found is None:
                self._book.stop_training(device_id)  # a leftover count entry
                continue
            task, record_version = found
            if self._book.stop_training(device_id, expected_version=record_version):
                self._observer.event(
                    "training_expired",
                    task_id=task.task_id,
                    device_class=task.device_class,
                    version=task.version,
                )

    # ------------------------------------------------------------------ sealing

    def seal_ready(self) -> None:
        """Seal every forming cohort that is ready (the tick's first step).

        Reads the forming cohort of each configured class (one read each), not a scan of
        the store's keys: a scan costs as much as the whole keyspace, devices included.
        """
        head = self._ledger.head()
        for device_class in self._classes:
            self.maybe_seal(device_class, head=head)

    def maybe_seal(
        self,
        device_class: str,
        *,
        head: VersionInfo | None = None,
        found: tuple[FormingCohort, int] | None = None,
    ) -> str | None:
        """Seal the forming cohort of ``device_class`` if it is full enough; return its id.

        Members whose update no longer counts at ``head`` (read here when None: more than
        ``max_staleness`` behind, or abandoned by a rollback) are taken out first and
        refused; the cohort is sealed from the rest, at a later call. ``found``: the
        forming cohort and its record version as the caller just read them (``None``:
        read here; a stale read only makes the seal's compare-and-set fail). A cohort
        found sealed but not yet written out (its sealer died) is finished here.
        """
        if found is None:
            found = self._book.forming(device_class)
        if found is None:
            return None
        forming, record_version = found
        if forming.sealed_at is not None:
            # Sealed, by this replica or another that may have died before writing the
            # cohort and its assignments: finish that (each step is idempotent).
            return self._complete_seal(device_class, forming, record_version)
        if head is None:
            head = self._ledger.head()
        if forming.trained and any(not self._counts(v, head) for v in forming.versions):
            self._prune_stale(device_class, head)
            return None
        n = len(forming.members)
        cohort = self.settings.cohort
        now = self._clock.time()
        full_at = now if forming.full_at is None else forming.full_at
        if not forming.trained:
            # Written by a release whose members had not trained: nothing to aggregate.
            if self._book.seal_forming(device_class, expected_version=record_version):
                log.warning(
                    "forming cohort %s of %s predates training first; discarded (%d members)",
                    forming.cohort_id,
                    device_class,
                    n,
                )
            return None
        # Waiting for more members only makes these updates staler once a version newer
        # than one of them has been committed, and no one can come while none trains.
        behind = head is not None and head.version > min(forming.versions, default=head.version)
        ready = n >= cohort.max_size or (
            n >= cohort.min_size
            and (now - full_at >= cohort.formation_s or behind or self._none_training())
        )
        if not ready:
            return None
        # Marking the record sealed (compare-and-set) is the seal: of two replicas
        # sealing, exactly one wins. The marker stays until the cohort record and every
        # assignment are written, so a replica that dies in between loses no update.
        sealing = replace(forming, sealed_at=now)
        marker_version = self._book.mark_sealed(
            device_class, sealing, expected_version=record_version
        )
        if marker_version is None:
            return None
        return self._complete_seal(device_class, sealing, marker_version)

    def _complete_seal(self, device_class: str, forming: FormingCohort, marker_version: int) -> str:
        """Write the cohort record and the assignments of sealed ``forming``; return its id.

        Idempotent, so that any replica reading the marker may finish a seal another began:
        the record is inserted if absent; if it was there, only the members still without
        an assignment get theirs, and none once the cohort finished or left the key
        exchange (an assignment cleared since was cleared on purpose: a member that
        finished or gave up). The marker is then deleted, and the replica that deletes it
        logs the seal and tells the observer, once.
        """
        now = forming.sealed_at
        if now is None:
            raise ValueError(f"forming cohort {forming.cohort_id}: not sealed")
        cohort = self.settings.cohort
        n = len(forming.members)
        # The clip travels as a float32 and is bound into the session id: use the value
        # the devices will see, or coordinator and devices would be in different sessions.
        clip = float(np.float32(cohort.clip_norm))
        fp = FixedPoint.for_cohort(n, bits=cohort.bits, clip=clip)
        neighbours = neighbours_for(n, cohort.neighbours)
        # t is a fraction of a secret's share holders: the cohort, or a SecAgg+ neighbourhood.
        holders = n if neighbours is None else neighbours + 1
        active = cohort.active_adversary and forming.has_identity_keys
        record = CohortRecord(
            cohort_id=forming.cohort_id,
            device_class=device_class,
            rank=self._classes[device_class].rank,
            members=forming.members,
            version=min(forming.versions),
            # The members trained already: they need no artifact.
            artifact=ArtifactRef(sha256="", size=0),
            sealed_at=now,
            deadline_at=now + cohort.deadline_s,
            threshold=max(1, min(holders, math.ceil(cohort.threshold_fraction * holders))),
            bits=fp.bits,
            frac_bits=fp.frac_bits,
            clip=fp.clip,
            neighbours=neighbours,
            tensors=self._tensors,
            stage=Stage.ADVERTISE_KEYS,
            stage_started=now,
            active_adversary=active,
            identity_keys=forming.identity_keys if active else (),
            member_versions=forming.versions,
        )
        cohort_id = record.cohort_id
        pending = list(range(n)) if self._book.create(record) else self._unassigned(cohort_id)
        for index in pending or ():
            device_id = record.members[index]
            self._book.assign(
                device_id,
                Assignment(
                    cohort_id=cohort_id,
                    member_index=index,
                    task_id=record.task_id(index),
                    trained_task_id=forming.tasks[index],
                ),
            )
        if pending is not None:
            self._book.activate(cohort_id, sealed_at=now)
        if not self._book.seal_forming(device_class, expected_version=marker_version):
            return cohort_id  # another replica finished the same seal
        if cohort.active_adversary and not active:
            log.warning(
                "cohort %s: its forming record predates identity keys; sealed in passive mode",
                cohort_id,
            )
        log.info(
            "sealed cohort %s: %d %s devices trained on versions %d..%d",
            cohort_id,
            n,
            device_class,
            record.version,
            max(forming.versions),
        )
        self._observer.event(
            "cohort_sealed",
            cohort_id=cohort_id,
            device_class=device_class,
            size=n,
            version=record.version,
        )
        return cohort_id

    def _unassigned(self, cohort_id: str) -> list[int] | None:
        """Members an interrupted seal of the written ``cohort_id`` left without a task.

        None (write nothing, not even the active-set entry) once the cohort is gone or
        finished; none past its key exchange (a member without a task by then lost it).
        """
        record = self._book.record(cohort_id)
        if record is None or not record.active:
            return None
        if self._book.cohort(record).stage is not Stage.ADVERTISE_KEYS:
            return []
        return [
            index
            for index, device_id in enumerate(record.members)
            if not record.is_abandoned(index) and self._book.assignment(device_id) is None
        ]

    def _prune_stale(self, device_class: str, head: VersionInfo | None) -> None:
        """Take the members whose update no longer counts out of the forming cohort."""
        removed: list[tuple[str, int]] = []

        def prune(forming: FormingCohort | None) -> FormingCohort | None:
            removed.clear()
            if forming is None or not forming.trained or forming.sealed_at is not None:
                return None
            stale = {i for i, v in enumerate(forming.versions) if not self._counts(v, head)}
            removed.extend((forming.tasks[i], forming.versions[i]) for i in sorted(stale))
            return forming.without(stale, min_size=self.settings.cohort.min_size) if stale else None

        if self._book.update_forming(device_class, prune) is None:
            return
        for task_id, version in removed:
            reason = f"{self._why_stale(version, head)}, while its cohort formed"
            log.info("training task %s: %s", task_id, reason)
            self._reject(reason)

    def _none_training(self) -> bool:
        """Whether no device trains now: a forming cohort can gain no member soon.

        ``formation_s`` keeps a cohort that has ``min_size`` devices open for more; with
        no device training none will come, so the wait would only hold its members idle:
        it is sealed at once instead.
        """
        return self._book.training_devices() == 0

    # ------------------------------------------------------------------ tasks

    def _training_offer(self, task: TrainingTask) -> TaskOffer:
        """Return the training task ``task`` as handed to the device."""
        rank = self._classes[task.device_class].rank
        return TaskOffer(
            task_id=task.task_id,
            cohort_id="",
            version=task.version,
            artifact_sha256=task.artifact.sha256,
            artifact_size=task.artifact.size,
            deadline_ms=int(task.deadline_at * 1000),
            member_index=0,
            session=None,
            columns=trained_columns(
                self.settings.training.column_rule,
                rank,
                self.settings.model.r_max,
                version=task.version,
                member=task.column_seed,
            )
            or (),
            **self._training_fields(rank),
        )

    def offer(self, record: CohortRecord, index: int, *, trained_task_id: str) -> TaskOffer:
        """Return the cohort task of member ``index`` of a sealed cohort.

        ``trained_task_id``: the member's training task, whose update it aggregates. The
        training fields repeat the class's; the member trained already.
        """
        return TaskOffer(
            task_id=record.task_id(index),
            cohort_id=record.cohort_id,
            version=record.member_version(index),
            artifact_sha256=record.artifact.sha256,
            artifact_size=record.artifact.size,
            deadline_ms=int(record.deadline_at * 1000),
            member_index=index,
            session=record.session_config(),
            identity_keys=record.identity_keys,
            trained_task_id=trained_task_id,
            **self._training_fields(record.rank),
        )

    def _training_fields(self, rank: int) -> dict[str, Any]:
        """Return the task fields that say how a rank-``rank`` device trains (``training.*``)."""
        training = self.settings.training
        return {
            "rank": rank,
            "local_steps": training.local_steps,
            "learning_rate": rank_learning_rate(
                training.learning_rate,
                rank=rank,
                r_max=self.settings.model.r_max,
                power=training.rank_lr_power,
            ),
            "grad_clip_norm": training.grad_clip_norm,
            "batch_size": training.batch_size,
            "seq_len": training.seq_len,
            "warmup_steps": training.warmup_steps,
        }

    def _why_stale(self, version: int, head: VersionInfo | None) -> str:
        """Why work on ``version`` no longer counts at ``head``; empty if it does."""
        if self._counts(version, head):
            return ""
        if head is not None and head.is_abandoned(version):
            return f"trained on version {version}, abandoned by a rollback"
        return (
            f"trained on version {version}, more than "
            f"{self.settings.aggregation.max_staleness} versions behind the current "
            f"{head.version if head else 0}"
        )

    def _reject(self, reason: str, *, cohort_id: str = "") -> None:
        """Count an update refused as too stale (``updates_rejected``, ``update_rejected``)."""
        self._counters.updates_rejected += 1
        self._observer.event("update_rejected", cohort_id=cohort_id, reason=reason)

    def _refuse(self, trained_task_id: str, reason: str, *, cohort_id: str = "") -> NoReturn:
        """Count a reported update that no longer counts, and refuse it by name."""
        self._reject(reason, cohort_id=cohort_id)
        raise FailedPrecondition(
            f"trained_task_id: {trained_task_id!r} {reason}: too stale to count; drop the update"
        )

    def _counts(self, version: int, head: VersionInfo | None) -> bool:
        """Whether work on ``version`` would still be accepted at ``head``.

        Not when it is more than ``max_staleness`` behind, nor when the regression guard
        abandoned it (its sum would be dropped at commit).
        """
        if head is None or head.is_abandoned(version):
            return False
        return version >= head.version - self.settings.aggregation.max_staleness

    def _no_artifact(self, device_class: str) -> str:
        limit = self.settings.aggregation.max_staleness
        return (
            f"waiting for a {device_class} edge artifact at most {limit} versions behind "
            "the current version (work on an older one would be refused as too stale)"
        )

    def artifact_for(self, device_class: str) -> tuple[int, str, int] | None:
        """Newest (version, artifact sha256, size) built for ``device_class``, or None.

        None also when the newest usable artifact is more than ``max_staleness`` versions
        behind the head: work trained on it could not count. An artifact of a version
        the regression guard abandoned is never used, however new.
        """
        build_key = done_key("build_artifacts", device_class=device_class)
        head_rec, done_rec = self._book.store.get_many([HEAD_KEY, build_key])
        return self._artifact_at(
            device_class, VersionLedger.head_of(head_rec), done_of(done_rec, key=build_key)
        )

    def _artifact_at(
        self, device_class: str, head: VersionInfo | None, done: tuple[int, str] | None
    ) -> tuple[int, str, int] | None:
        """:meth:`artifact_for` given reads of the head and of the class's ``jobdone/`` record."""
        if head is None:
            return None
        oldest = head.version - self.settings.aggregation.max_staleness
        found = self._newest_artifact(device_class, head=head, done=done)
        return found if found is not None and found[0] >= oldest else None

    def _newest_artifact(
        self, device_class: str, *, head: VersionInfo, done: tuple[int, str] | None
    ) -> tuple[int, str, int] | None:
        """Return the newest built artifact of the class not abandoned (cached), or None.

        ``done`` is the class's ``jobdone/`` record: the outcome is read only when a newer
        build completed. When that record is absent (a store from before it existed) or
        names an abandoned version, the build outcomes from the head down to
        ``head − max_staleness`` are read in one round trip, once per head: a build
        that completes later raises the ``jobdone/`` record, which every call reads.
        """
        known = self._artifacts.get(device_class)
        if known is not None and head.is_abandoned(known[0]):
            known = None
            self._artifacts.pop(device_class, None)  # handler threads may race here
        if done is not None:
            version, job_id = done
            if known is not None and known[0] >= version:
                return known
            if not head.is_abandoned(version):
                found = self._built(job_id, version)
                if found is not None:
                    self._artifacts[device_class] = found
                    return found
        oldest = head.version - self.settings.aggregation.max_staleness
        floor = max(known[0] if known else -1, oldest - 1)
        if self._searched.get(device_class) == (head.version, floor):
            return known  # searched at this head already: only a jobdone/ raise is news
        versions = [v for v in range(head.version, floor, -1) if not head.is_abandoned(v)]
        job_ids = [
            job_id_for("build_artifacts", version=v, device_class=device_class) for v in versions
        ]
        records = self._book.store.get_many([result_key(job_id) for job_id in job_ids])
        for version, rec in zip(versions, records, strict=True):
            found = self._outcome(rec, version)
            if found is not None:
                self._artifacts[device_class] = known = found
                break
        self._searched[device_class] = (head.version, max(known[0] if known else -1, floor))
        return known

    def _built(self, job_id: str, version: int) -> tuple[int, str, int] | None:
        """(version, sha256, size) of a completed build job, or None."""
        return self._outcome(self._book.store.get(result_key(job_id)), version)

    def _outcome(self, rec: Record | None, version: int) -> tuple[int, str, int] | None:
        """(version, sha256, size) of a read build outcome if it completed, or None."""
        if rec is None:
            return None
        outcome = JobOutcome.from_json(rec.value)
        if outcome.status != "done":
            return None
        digest = str(outcome.output["artifact_sha256"])
        return version, digest, self._blobs.size(digest)
