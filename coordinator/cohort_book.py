"""Where the cohorts of a federation live in the store, and this replica's cohort cache.

Key layout (the records are :mod:`coordinator.cohorts`' typed records):

- ``forming/<class>``: the :class:`~coordinator.cohorts.FormingCohort` of a device class.
  Admission adds to it with compare-and-set; sealing marks it sealed with compare-and-set
  (:meth:`CohortBook.mark_sealed`), the one point where membership becomes final, then
  writes the cohort record and the assignments, then deletes the marker
  (:meth:`CohortBook.seal_forming`).
- ``cohort/<id>``: the sealed :class:`~coordinator.cohorts.CohortRecord`, created with
  insert-if-absent and changed only by compare-and-set (:meth:`CohortBook.update`).
- ``assign/<device>``: the :class:`~coordinator.cohorts.Assignment` a device holds.
- ``cohorts-active``: sorted set of sealed, unfinished cohort ids (score: sealed at).
- ``training/<device>``: the :class:`~coordinator.cohorts.TrainingTask` a device holds
  before it joins a cohort (devices train first).
- ``devices-training``: sorted set of the devices holding a training task (score: when
  it expires: its deadline, or sooner once the device is silent for ``silence_s``).
  Added with the training task, removed when the device reports it finished, gives it
  up, or it expires (the tick). Its size is what the pacer caps
  (:meth:`CohortBook.training_devices`): one O(1) read, not a scan.
- ``seen/<cohort>/<member>``: when a member last showed it is alive (heartbeat, share
  relay), as Unix seconds from the injected clock; the tick's silence rule reads it.
- ``trained/<device>``: the version of the last task the device was given (decimal),
  written with its training task (with ``pacing.one_task_per_version``); admission
  reads it so that a device does not train twice on one version while the next is
  already under way.

:class:`CohortBook` is the only code that reads or writes these keys. It also keeps the
:class:`~coordinator.cohort_log.ReplicatedCohort` of every cohort this replica has
touched, synced with the store's log on each read and dropped once the cohort is folded in.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable

from coordinator.cohort_log import ReplicatedCohort
from coordinator.cohorts import (
    Assignment,
    CohortRecord,
    FormingCohort,
    MalformedRecord,
    TrainingTask,
)
from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.state.base import Record, Store
from estuary.state.errors import VersionConflict
from estuary.state.keys import FORMING_PREFIX, cohort_key
from secure_agg import Server

__all__ = [
    "ACTIVE_COHORTS",
    "ASSIGN_PREFIX",
    "FORMING_PREFIX",
    "SEEN_PREFIX",
    "TRAINED_PREFIX",
    "TRAINING_DEVICES",
    "TRAINING_PREFIX",
    "CohortBook",
]

ASSIGN_PREFIX = "assign/"
ACTIVE_COHORTS = "cohorts-active"
TRAINING_DEVICES = "devices-training"
TRAINING_PREFIX = "training/"
#: Parsed cohort records kept per replica (cleared when full: finished cohorts go).
_PARSED_MAX = 4096
SEEN_PREFIX = "seen/"
TRAINED_PREFIX = "trained/"


def _assign_key(device_id: str) -> str:
    return f"{ASSIGN_PREFIX}{device_id}"


def _forming_key(device_class: str) -> str:
    return f"{FORMING_PREFIX}{device_class}"


def _trained_key(device_id: str) -> str:
    return f"{TRAINED_PREFIX}{device_id}"


def _training_key(device_id: str) -> str:
    return f"{TRAINING_PREFIX}{device_id}"


def _seen_key(cohort_id: str, index: int) -> str:
    return f"{SEEN_PREFIX}{cohort_id}/{index}"


class CohortBook:
    """Every cohort record of one federation in the store, and this replica's cohort cache.

    Parameters
    ----------
    store
        The shared state store.
    clock
        Stamps ``seen`` records (Unix seconds from :meth:`~estuary.clock.Clock.time`).
    """

    def __init__(self, store: Store, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock
        self._cohorts: dict[str, ReplicatedCohort] = {}
        self._parsed: dict[str, tuple[bytes, CohortRecord]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sealed cohorts

    def record(self, cohort_id: str) -> CohortRecord | None:
        """Return the sealed cohort ``cohort_id``, or None if there is none.

        The record is read every time; it is parsed only when its bytes changed since
        this replica last parsed it (every poll, upload and heartbeat of a member reads
        it, and a record with its members' identity keys takes milliseconds to parse).
        """
        key = cohort_key(cohort_id)
        rec = self.store.get(key)
        if rec is None:
            return None
        cached = self._parsed.get(cohort_id)
        if cached is not None and cached[0] == rec.value:
            return cached[1]
        record = CohortRecord.from_json(rec.value, where=key)
        with self._lock:
            if len(self._parsed) >= _PARSED_MAX:  # cohorts another replica finished
                self._parsed.clear()
            self._parsed[cohort_id] = (rec.value, record)
        return record

    def create(self, record: CohortRecord) -> bool:
        """Store a newly sealed cohort; False if its id is taken (nothing written)."""
        return self.store.insert_if_absent(cohort_key(record.cohort_id), record.to_json())

    def update(
        self, cohort_id: str, change: Callable[[CohortRecord], CohortRecord | None]
    ) -> CohortRecord | None:
        """Apply ``change`` with compare-and-set; return the stored result.

        ``change`` returns None to leave the record as it is; the call then returns None,
        as it does when the cohort does not exist.
        """
        key = cohort_key(cohort_id)

        def apply(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            changed = change(CohortRecord.from_json(current, where=key))
            return None if changed is None else changed.to_json()

        stored = self.store.update(key, apply)
        return None if stored is None else CohortRecord.from_json(stored, where=key)

    def cohort(self, record: CohortRecord) -> ReplicatedCohort:
        """Return this replica's secure-aggregation state of ``record``, synced with its log."""
        with self._lock:
            cohort = self._cohorts.get(record.cohort_id)
            if cohort is None:
                config = record.session_config()
                members = range(record.size)
                identities = record.peer_identities()  # None unless active-adversary
                cohort = ReplicatedCohort(
                    self.store,
                    record.cohort_id,
                    make_server=lambda: Server(config, members=members, peer_identities=identities),
                )
                self._cohorts[record.cohort_id] = cohort
        cohort.sync()
        return cohort

    def forget(self, cohort_id: str) -> None:
        """Drop the cached state of a finished cohort."""
        with self._lock:
            self._cohorts.pop(cohort_id, None)
            self._parsed.pop(cohort_id, None)

    def membership(self, device: Device, cohort_id: str) -> tuple[CohortRecord, int]:
        """Return the cohort record and the device's member index, or refuse.

        Raises
        ------
        FailedPrecondition
            No such cohort, not a member, or the device abandoned its task.
        """
        record = self.record(cohort_id) if cohort_id else None
        if record is None:
            raise FailedPrecondition(f"cohort {cohort_id!r}: no such cohort")
        index = record.member_index(device.device_id)
        if index is None:
            raise FailedPrecondition(
                f"cohort {cohort_id}: device {device.device_id} is not a member"
            )
        if record.is_abandoned(index):
            raise FailedPrecondition(
                f"cohort {cohort_id}: this device abandoned its task (it asked for new work)"
            )
        return record, index

    # ------------------------------------------------------------------ the active set

    def activate(self, cohort_id: str, *, sealed_at: float) -> None:
        """Add a sealed cohort to the active set."""
        self.store.zadd(ACTIVE_COHORTS, {cohort_id: sealed_at})

    def deactivate(self, cohort_id: str) -> None:
        """Remove a cohort from the active set."""
        self.store.zrem(ACTIVE_COHORTS, cohort_id)

    def active_ids(self) -> list[str]:
        """Ids of sealed, unfinished cohorts, oldest first."""
        entries = self.store.zrange_by_score(
            ACTIVE_COHORTS, min_score=-math.inf, max_score=math.inf
        )
        return [cohort_id for cohort_id, _ in entries]

    # ------------------------------------------------------------------ forming cohorts

    def forming(self, device_class: str) -> tuple[FormingCohort, int] | None:
        """Return the forming cohort of ``device_class`` and its record version, or None."""
        key = _forming_key(device_class)
        rec = self.store.get(key)
        return None if rec is None else (FormingCohort.from_json(rec.value, where=key), rec.version)

    def forming_classes(self) -> list[str]:
        """Device classes that have a forming cohort."""
        return [key[len(FORMING_PREFIX) :] for key in self.store.scan(FORMING_PREFIX)]

    def all_forming(self) -> list[FormingCohort]:
        """Every forming cohort."""
        return [
            FormingCohort.from_json(rec.value, where=key)
            for key, rec in self.store.scan(FORMING_PREFIX).items()
        ]

    def update_forming(
        self, device_class: str, change: Callable[[FormingCohort | None], FormingCohort | None]
    ) -> FormingCohort | None:
        """Apply ``change`` to the forming cohort of ``device_class`` with compare-and-set.

        Return the stored result, or None when ``change`` left the record as it was.
        """
        key = _forming_key(device_class)

        def apply(current: bytes | None) -> bytes | None:
            forming = None if current is None else FormingCohort.from_json(current, where=key)
            changed = change(forming)
            return None if changed is None else changed.to_json()

        stored = self.store.update(key, apply)
        return None if stored is None else FormingCohort.from_json(stored, where=key)

    def mark_sealed(
        self, device_class: str, sealed: FormingCohort, *, expected_version: int
    ) -> int | None:
        """Store ``sealed`` (a marker) if the record is unchanged since read: the seal.

        Returns the marker's record version, or None if another change came first.
        """
        try:
            return self.store.compare_and_set(
                _forming_key(device_class), sealed.to_json(), expected_version=expected_version
            )
        except VersionConflict:
            return None

    def seal_forming(self, device_class: str, *, expected_version: int) -> bool:
        """Delete the forming record if unchanged since read; False if it changed or went."""
        try:
            return self.store.delete(_forming_key(device_class), expected_version=expected_version)
        except VersionConflict:
            return False

    # ------------------------------------------------------------------ one round trip

    @staticmethod
    def admission_keys(device_id: str, device_class: str) -> list[str]:
        """Keys of a device's tasks, its class's forming cohort and its last task's version.

        Its cohort task, the forming cohort, the version and its training task.
        In that order. GetTask's hot path reads them with others in one store round trip (with the
        request's nonce, :mod:`coordinator.admission`) and parses the records with
        :meth:`parse_admission`.
        """
        return [
            _assign_key(device_id),
            _forming_key(device_class),
            _trained_key(device_id),
            _training_key(device_id),
        ]

    @staticmethod
    def parse_admission(
        device_id: str,
        device_class: str,
        assign_rec: Record | None,
        forming_rec: Record | None,
        trained_rec: Record | None,
        training_rec: Record | None,
    ) -> tuple[
        Assignment | None,
        tuple[FormingCohort, int] | None,
        int | None,
        tuple[TrainingTask, int] | None,
    ]:
        """Parse reads of :meth:`admission_keys`.

        Returns (assignment, (forming, its record version), version last trained on,
        (training task, its record version)); each is None where its record is absent.
        """
        training = (
            None
            if training_rec is None
            else (
                TrainingTask.from_json(training_rec.value, where=_training_key(device_id)),
                training_rec.version,
            )
        )
        assign_key, forming_key = _assign_key(device_id), _forming_key(device_class)
        trained: int | None = None
        if trained_rec is not None:
            try:
                trained = int(trained_rec.value)
            except ValueError:
                raise MalformedRecord(
                    f"{_trained_key(device_id)}: expected a version number, "
                    f"got {trained_rec.value[:40]!r}"
                ) from None
        assignment = (
            None if assign_rec is None else Assignment.from_json(assign_rec.value, where=assign_key)
        )
        forming = (
            None
            if forming_rec is None
            else (
                FormingCohort.from_json(forming_rec.value, where=forming_key),
                forming_rec.version,
            )
        )
        return assignment, forming, trained, training

    # ------------------------------------------------------------------ assignments

    def assignment(self, device_id: str) -> Assignment | None:
        """Return the task ``device_id`` holds, or None."""
        key = _assign_key(device_id)
        rec = self.store.get(key)
        return None if rec is None else Assignment.from_json(rec.value, where=key)

    def assign(self, device_id: str, assignment: Assignment) -> None:
        """Record the task ``device_id`` holds."""
        self.store.put(_assign_key(device_id), assignment.to_json())

    def clear_assignment(self, device_id: str, cohort_id: str) -> None:
        """Forget the device's task if it still belongs to ``cohort_id``."""
        key = _assign_key(device_id)
        rec = self.store.get(key)
        if rec is not None and Assignment.from_json(rec.value, where=key).cohort_id == cohort_id:
            # A conflict means it was reassigned meanwhile: the new task stays.
            with contextlib.suppress(VersionConflict):
                self.store.delete(key, expected_version=rec.version)

    def record_trained(self, device_id: str, version: int) -> None:
        """Record that ``device_id`` was given a task on ``version``."""
        self.store.put(_trained_key(device_id), str(version).encode())

    # ------------------------------------------------------------------ liveness

    def mark_seen(self, cohort_id: str, index: int) -> None:
        """Record that member ``index`` of a cohort is alive now."""
        self.store.put(_seen_key(cohort_id, index), repr(self.clock.time()).encode())

    def last_seen(self, cohort_id: str, index: int) -> float | None:
        """Unix seconds when member ``index`` last showed it is alive, or None."""
        key = _seen_key(cohort_id, index)
        rec = self.store.get(key)
        if rec is None:
            return None
        try:
            return float(rec.value)
        except ValueError:
            raise MalformedRecord(f"{key}: expected a number, got {rec.value!r}") from None

    def clear_seen(self, cohort_id: str, index: int) -> None:
        """Drop the liveness record of a member (its cohort finished)."""
        self.store.delete(_seen_key(cohort_id, index))

    # ------------------------------------------------------------------ counting

    def training_task(self, device_id: str) -> tuple[TrainingTask, int] | None:
        """Return the training task ``device_id`` holds and its record version, or None."""
        key = _training_key(device_id)
        rec = self.store.get(key)
        return None if rec is None else (TrainingTask.from_json(rec.value, where=key), rec.version)

    def start_training(self, device_id: str, task: TrainingTask, *, expires_at: float) -> None:
        """Record the training task ``device_id`` now holds and count it as training."""
        self.store.put(_training_key(device_id), task.to_json())
        self.store.zadd(TRAINING_DEVICES, {device_id: expires_at})

    def keep_training(self, device_id: str, *, expires_at: float) -> None:
        """Move the expiry of ``device_id``'s training task (it showed it is alive)."""
        self.store.zadd(TRAINING_DEVICES, {device_id: expires_at})

    def stop_training(self, device_id: str, *, expected_version: int | None = None) -> bool:
        """Drop the device's training task; True if this call removed it.

        ``expected_version``: only the record read at that version (of two replicas that
        take the same report, exactly one gets True).
        """
        try:
            removed = self.store.delete(_training_key(device_id), expected_version=expected_version)
        except VersionConflict:
            return False
        self.store.zrem(TRAINING_DEVICES, device_id)
        return removed

    def expired_training(self, now: float) -> list[str]:
        """Devices whose training task expired by ``now`` (deadline, or silent too long)."""
        entries = self.store.zrange_by_score(TRAINING_DEVICES, min_score=-math.inf, max_score=now)
        return [device_id for device_id, _ in entries]

    def training_devices(self) -> int:
        """Devices holding a training task: what the pacer caps.

        A device that finished training and waits for, or is in, a cohort trains
        nothing and takes no slot. One store call (a sorted set's size).
        """
        return self.store.zcard(TRAINING_DEVICES)

    def in_flight_updates(self) -> int:
        """Count the updates still to come: from devices training, and sealed cohorts.

        Sealed, unfinished cohorts' members less the ones that abandoned their task (a
        dropout that is not yet known counts). Not the members of forming cohorts: a
        cohort below ``min_size`` may be waiting for the very devices this count would
        hold back (``pacing.one_task_per_version``), and a training device reports (or
        expires) by itself.
        """
        count = self.training_devices()
        for cohort_id in self.active_ids():
            record = self.record(cohort_id)
            if record is not None and record.active:
                count += record.size - len(record.abandoned)
        return count

    def active_devices(self) -> int:
        """Devices admitted and not finished: training, in forming and in active cohorts.

        A scan of every forming and active cohort, for metrics; the pacer reads
        :meth:`training_devices`.
        """
        forming = sum(len(forming.members) for forming in self.all_forming())
        return forming + self.in_flight_updates()
