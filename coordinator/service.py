"""The federation service: what the coordinator does, with no gRPC in sight.

The servicer (:mod:`coordinator.grpc_service`) authenticates nothing and decides nothing:
it turns protobuf messages into calls of :class:`FederationService` and its exceptions
(:mod:`coordinator.errors`) into status codes. Everything here is synchronous and keeps
its durable state in the :class:`~estuary.state.base.Store`, so any number of replicas
can serve the same devices; :meth:`FederationService.tick` is the periodic work (sealing
cohorts, stage deadlines, folding finished cohorts into versions) and is safe to run on
every replica at once.

Record layout, besides the ledger's (:mod:`coordinator.versions`), the cohort logs
(:mod:`coordinator.cohort_log`) and the devices (:mod:`coordinator.enrolment`):

- ``forming/<class>``: the cohort of a device class that is gathering devices:
  ``{"cohort_id", "members": [device ids], "opened_at", "full_at"}``. Admission adds to it
  with compare-and-set; **sealing deletes it with a versioned delete**, which is the one
  point where a cohort's membership becomes final (of two replicas sealing, one wins).
- ``cohort/<id>``: a sealed cohort: members, version and artifact it trains from, the
  secure-aggregation parameters, ``stage`` and ``stage_started`` (for deadlines),
  ``status`` (active / completed / aborted) and ``abandoned`` members.
- ``assign/<device>``: the task a device holds: ``{"cohort_id", "member_index", "task_id"}``.
- ``cohorts-active``: sorted set of sealed, unfinished cohort ids (score: sealed at).
- ``jobs-submitted/<version>``: marker that the cloud jobs of a version were queued.
- ``seen/<cohort>/<member>``: when a member last showed it is alive (heartbeat, share
  relay). Once every member the upload stage awaits has been silent for ``silence_s``,
  the stage closes early instead of holding the survivors until ``deadline_s``.

A task's life: GetTask admits the device into ``forming/<class>`` (answering Pace until the
cohort is sealed), then returns the Task. Keys are exchanged, the member trains, asks for
the share relay (the moment its staleness weight is fixed), uploads its masked input, and
answers the unmask request. The cohort's unmasked sum ``(Σ w ΔB, Σ w)`` goes to the
FedBuff buffer; the ledger commits a version every K updates and the service queues the
version's cloud jobs (evaluation, edge artifacts per device class).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.cohort_log import ReplicatedCohort
from coordinator.enrolment import Device, DeviceRegistry
from coordinator.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from coordinator.pacing import Admit, PacerConfig, decide
from coordinator.ratelimit import RateLimiter
from coordinator.staleness import StalenessPolicy, StaleUpdate
from coordinator.versions import VersionInfo, VersionLedger
from estuary.adapters.lora import GlobalAdapter
from estuary.auth import SignedAuth
from estuary.config.models import CoordinatorSettings
from estuary.jobs import JobOutcome, make_job, result_key, submit_job
from estuary.state.base import Store
from estuary.state.blobs import BlobNotFound, BlobStore
from estuary.state.errors import VersionConflict
from estuary.state.keys import cohort_key
from secure_agg import FixedPoint, Server, SessionConfig, Stage
from secure_agg import decode as decode_secagg
from secure_agg.messages import MaskedInput

log = logging.getLogger(__name__)

FORMING_PREFIX = "forming/"
ASSIGN_PREFIX = "assign/"
ACTIVE_COHORTS = "cohorts-active"
JOBS_SUBMITTED_PREFIX = "jobs-submitted/"
SEEN_PREFIX = "seen/"

#: Stages a device may send with SendSecAgg (the masked input has its own upload RPC).
_SENDABLE = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.CONSISTENCY_CHECK, Stage.UNMASKING)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TaskOffer:
    """A task for one cohort member (the fields of ``edge_pb2.Task``)."""

    task_id: str
    cohort_id: str
    version: int
    artifact_sha256: str
    artifact_size: int
    rank: int
    local_steps: int
    learning_rate: float
    grad_clip_norm: float
    batch_size: int
    seq_len: int
    deadline_ms: int
    member_index: int
    session: SessionConfig


@dataclass(frozen=True)
class PaceOffer:
    """Come back after ``retry_after_s`` seconds."""

    retry_after_s: float
    reason: str


@dataclass(frozen=True)
class SecAggReply:
    """The next secure-aggregation message for a member.

    ``stage`` is the secure_agg stage the message belongs to (COMPLETED: done, ABORTED:
    drop the task, with ``abort_reason``). ``weight`` is set with the share relay.
    """

    stage: Stage
    payload: bytes = b""
    weight: float = 0.0
    abort_reason: str = ""


@dataclass(frozen=True)
class UploadResult:
    """Outcome of a masked upload; ``duplicate``: already stored, not counted again."""

    accepted: bool
    duplicate: bool
    durable_bytes: int


@dataclass(frozen=True)
class HeartbeatReply:
    """Go on (``abandon`` False) or drop the task; the current version either way."""

    abandon: bool
    current_version: int


class ServiceObserver(Protocol):
    """Receives what the service did, for metrics and the simulator's log."""

    def event(self, kind: str, **fields: Any) -> None:
        """Record one event.

        ``kind``: version_committed, cohort_sealed, cohort_finished, update_accepted,
        update_rejected, weight_assigned, member_abandoned, paced, upload, job_submitted.
        """


class _NoObserver:
    def event(self, kind: str, **fields: Any) -> None:
        pass


@dataclass
class ServiceCounters:
    """Running totals of this replica (exported as metrics)."""

    uploads: int = 0
    updates_accepted: int = 0
    updates_rejected: int = 0
    cohorts_completed: int = 0
    cohorts_aborted: int = 0
    staleness: dict[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _assign_key(device_id: str) -> str:
    return f"{ASSIGN_PREFIX}{device_id}"


def _forming_key(device_class: str) -> str:
    return f"{FORMING_PREFIX}{device_class}"


def session_config(record: dict[str, Any]) -> SessionConfig:
    """Return the secure-aggregation parameters stored in a cohort record."""
    return SessionConfig(
        cohort=record["cohort_id"].encode(),
        cohort_size=len(record["members"]),
        threshold=int(record["threshold"]),
        tensors=tuple((str(n), int(m)) for n, m in record["tensors"]),
        fixed_point=FixedPoint(
            bits=int(record["bits"]), frac_bits=int(record["frac_bits"]), clip=record["clip"]
        ),
        neighbours=record["neighbours"],
    )


def _neighbours(n: int, wanted: int | None) -> int | None:
    """SecAgg+ k for a cohort of ``n``: None (complete graph) when k would reach n − 1."""
    if wanted is None:
        return None
    k = wanted - (wanted % 2)
    return None if k >= n - 1 else k


class FederationService:
    """One replica's federation logic over the shared store.

    Parameters
    ----------
    settings
        The coordinator's settings (classes, aggregation, pacing, cohorts, training).
    store, blobs
        Shared state and blob stores.
    initial_adapter
        Version 0's adapter (zero B), recorded unless a version exists already.
    clock
        Wall clock in seconds (injected by tests).
    observer
        Told about commits, cohorts and uploads.
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        store: Store,
        blobs: BlobStore,
        initial_adapter: GlobalAdapter,
        clock: Callable[[], float] = time.time,
        observer: ServiceObserver | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self._clock = clock
        self.observer: ServiceObserver = observer or _NoObserver()
        self.counters = ServiceCounters()
        self._classes = {c.name: c for c in settings.device_classes}
        self._fastest = min(c.expected_task_s for c in settings.device_classes)
        self.registry = DeviceRegistry(store, device_classes=list(self._classes), clock=clock)
        self.limiter = RateLimiter(
            settings.server.device_requests_per_s, burst=settings.server.device_burst
        )
        agg = settings.aggregation
        self.policy = StalenessPolicy(
            kind=agg.staleness,
            a=agg.staleness_a,
            b=agg.staleness_b,
            max_staleness=agg.max_staleness,
        )
        self.pacer = PacerConfig(
            buffer_size=agg.buffer_size,
            target_staleness=settings.pacing.target_staleness,
            deadline_s=settings.cohort.deadline_s,
            retry_after_min_s=settings.pacing.retry_after_min_s,
            retry_after_max_s=settings.pacing.retry_after_max_s,
        )
        self.ledger = VersionLedger(
            store,
            blobs=blobs,
            holder=settings.node_id,
            buffer_size=agg.buffer_size,
            server_lr=agg.server_lr,
            lease_ttl_s=agg.lease_ttl_s,
        )
        self._initial = initial_adapter
        self._tensors = sorted(
            (name, int(np.prod(b.shape))) for name, b in initial_adapter.b.items()
        )
        self._shapes = {name: b.shape for name, b in initial_adapter.b.items()}
        self._cohorts: dict[str, ReplicatedCohort] = {}
        self._artifacts: dict[str, tuple[int, str, int]] = {}
        self._rejected: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start-up

    def start(self) -> VersionInfo:
        """Record version 0 if the federation is new and queue its cloud jobs."""
        head = self.ledger.initialise(self._initial)
        self._submit_jobs(head)
        return head

    def _submit_jobs(self, info: VersionInfo) -> None:
        # One replica queues a version's jobs; the marker makes it once per version.
        if not self.store.insert_if_absent(f"{JOBS_SUBMITTED_PREFIX}{info.version}", b"1"):
            return
        size = self.blobs.size(info.adapter_sha256)
        # Artifacts first: devices wait for them, and a worker takes jobs in order.
        jobs = [
            make_job(
                "build_artifacts",
                version=info.version,
                adapter_sha256=info.adapter_sha256,
                adapter_size=size,
                device_class=name,
            )
            for name in self._classes
        ]
        jobs.append(make_job("evaluate", version=info.version, adapter_sha256=info.adapter_sha256))
        for job in jobs:
            submit_job(self.store, job)
            self.observer.event("job_submitted", job_id=job.job_id, version=info.version)

    # ------------------------------------------------------------------ devices

    def enroll(self, token: str, *, public_key: bytes, device_class: str) -> Device:
        """Enrol a device with a one-time token (see :class:`DeviceRegistry`)."""
        if device_class not in self._classes:
            raise InvalidArgument(
                f"device_class: unknown class {device_class!r}; configured: {sorted(self._classes)}"
            )
        if len(public_key) != 32:
            raise InvalidArgument(
                "identity_public_key: must be a raw 32-byte Ed25519 key, "
                f"got {len(public_key)} bytes"
            )
        return self.registry.enroll(token, public_key=public_key, device_class=device_class)

    def authenticate(self, auth: SignedAuth, *, method: str, body_sha256: bytes) -> Device:
        """Return the enrolled device that signed this request.

        Raises
        ------
        Unauthenticated
            Unknown, revoked, badly signed, stale or replayed.
        ResourceExhausted
            The device exceeded its request rate.
        """
        device = self.registry.authenticate(auth, method=method, body_sha256=body_sha256)
        if not self.limiter.allow(device.device_id):
            raise ResourceExhausted(
                f"device {device.device_id}: more than "
                f"{self.settings.server.device_requests_per_s:g} requests/s "
                f"(burst {self.settings.server.device_burst}); slow down"
            )
        return device

    def device_class(self, device: Device) -> tuple[str, int]:
        """Return the (name, rank) of the device's class."""
        cls = self._classes.get(device.device_class)
        if cls is None:
            raise FailedPrecondition(
                f"device class {device.device_class!r} is no longer configured"
            )
        return cls.name, cls.rank

    # ------------------------------------------------------------------ cohorts

    def _record(self, cohort_id: str) -> dict[str, Any] | None:
        rec = self.store.get(cohort_key(cohort_id))
        return None if rec is None else dict(json.loads(rec.value))

    def _cohort(self, record: dict[str, Any]) -> ReplicatedCohort:
        cohort_id = record["cohort_id"]
        with self._lock:
            cohort = self._cohorts.get(cohort_id)
            if cohort is None:
                config = session_config(record)
                members = range(len(record["members"]))
                cohort = ReplicatedCohort(
                    self.store, cohort_id, make_server=lambda: Server(config, members=members)
                )
                self._cohorts[cohort_id] = cohort
        cohort.sync()
        return cohort

    def _membership(self, device: Device, cohort_id: str) -> tuple[dict[str, Any], int]:
        """Return the cohort record and the device's member index, or refuse."""
        record = self._record(cohort_id) if cohort_id else None
        if record is None:
            raise FailedPrecondition(f"cohort {cohort_id!r}: no such cohort")
        try:
            index = record["members"].index(device.device_id)
        except ValueError:
            raise FailedPrecondition(
                f"cohort {cohort_id}: device {device.device_id} is not a member"
            ) from None
        if index in record.get("abandoned", []):
            raise FailedPrecondition(
                f"cohort {cohort_id}: this device abandoned its task (it asked for new work)"
            )
        return record, index

    def _artifact_for(self, device_class: str) -> tuple[int, str, int] | None:
        """Newest (version, artifact sha256, size) built for ``device_class``, or None."""
        head = self.ledger.head()
        if head is None:
            return None
        known = self._artifacts.get(device_class)
        floor = known[0] if known else -1
        for version in range(head.version, floor, -1):
            rec = self.store.get(result_key(f"build_artifacts-{device_class}-v{version}"))
            if rec is None:
                continue
            outcome = JobOutcome.from_json(rec.value)
            if outcome.status != "done":
                continue
            digest = str(outcome.output["artifact_sha256"])
            found = (version, digest, self.blobs.size(digest))
            self._artifacts[device_class] = found
            return found
        return known

    def _active_ids(self) -> list[tuple[str, float]]:
        return self.store.zrange_by_score(ACTIVE_COHORTS, min_score=-math.inf, max_score=math.inf)

    def _active_devices(self) -> int:
        """Devices admitted and not finished: in forming cohorts and active cohorts."""
        count = 0
        for rec in self.store.scan(FORMING_PREFIX).values():
            count += len(json.loads(rec.value)["members"])
        for cohort_id, _ in self._active_ids():
            record = self._record(cohort_id)
            if record is not None:
                count += len(record["members"]) - len(record.get("abandoned", []))
        return count

    def get_task(self, device: Device) -> TaskOffer | PaceOffer:
        """Admit ``device`` into a cohort of its class, return its task, or pace it.

        A device that asks for work while its task is under way (it has advertised keys)
        has lost its task state, e.g. by a restart: the task is abandoned (the member
        becomes a dropout of its cohort) and the device is admitted afresh.
        """
        name, _rank = self.device_class(device)
        assignment = self.store.get(_assign_key(device.device_id))
        if assignment is not None:
            offer = self._resume(device, json.loads(assignment.value))
            if offer is not None:
                return offer
        forming = self.store.get(_forming_key(name))
        if forming is not None and device.device_id in json.loads(forming.value)["members"]:
            return self._wait_for_seal(device, name)
        if self._artifact_for(name) is None:
            return self._pace(
                self.pacer.retry_after_min_s * 2, "the first edge artifacts are being built"
            )
        decision = decide(
            self.pacer,
            active=self._active_devices(),
            expected_task_s=self._classes[name].expected_task_s,
            fastest_task_s=self._fastest,
        )
        if not isinstance(decision, Admit):
            return self._pace(decision.retry_after_s, decision.reason)
        self._admit(device, name)
        return self._wait_for_seal(device, name)

    def _pace(self, seconds: float, reason: str) -> PaceOffer:
        self.observer.event("paced", retry_after_s=seconds, reason=reason)
        return PaceOffer(seconds, reason)

    def _resume(self, device: Device, assignment: dict[str, Any]) -> TaskOffer | None:
        cohort_id = assignment["cohort_id"]
        record = self._record(cohort_id)
        index = int(assignment["member_index"])
        if record is not None and record["status"] == "active":
            cohort = self._cohort(record)
            # A member of a cohort that already finished (the next tick folds it in) is
            # simply done; only a task still under way is abandoned.
            finished = cohort.stage in (Stage.COMPLETED, Stage.ABORTED)
            if not finished and index not in record.get("abandoned", []):
                if not cohort.server.advertised(index) and cohort.stage is Stage.ADVERTISE_KEYS:
                    return self._offer(record, index)
                self._abandon(cohort_id, index)
        self._clear_assignment(device.device_id, cohort_id)
        return None

    def _abandon(self, cohort_id: str, index: int) -> None:
        def add(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            record = json.loads(current)
            if index in record.get("abandoned", []):
                return None
            record["abandoned"] = sorted({*record.get("abandoned", []), index})
            return _json(record)

        if self.store.update(cohort_key(cohort_id), add) is not None:
            log.info("cohort %s: member %d abandoned its task", cohort_id, index)
            self.observer.event("member_abandoned", cohort_id=cohort_id, member=index)

    def _clear_assignment(self, device_id: str, cohort_id: str) -> None:
        key = _assign_key(device_id)
        rec = self.store.get(key)
        if rec is not None and json.loads(rec.value)["cohort_id"] == cohort_id:
            # A conflict means it was reassigned meanwhile: the new task stays.
            with contextlib.suppress(VersionConflict):
                self.store.delete(key, expected_version=rec.version)

    def _admit(self, device: Device, name: str) -> None:
        now = self._clock()
        max_size = self.settings.cohort.max_size

        def join(current: bytes | None) -> bytes | None:
            record: dict[str, Any] = (
                json.loads(current)
                if current is not None
                else {"cohort_id": uuid.uuid4().hex, "members": [], "opened_at": now}
            )
            members: list[str] = record["members"]
            if device.device_id in members or len(members) >= max_size:
                return None
            members.append(device.device_id)
            if len(members) == self.settings.cohort.min_size:
                record["full_at"] = now
            return _json(record)

        self.store.update(_forming_key(name), join)

    def _wait_for_seal(self, device: Device, name: str) -> TaskOffer | PaceOffer:
        self._maybe_seal(name)
        assignment = self.store.get(_assign_key(device.device_id))
        if assignment is not None:
            value = json.loads(assignment.value)
            record = self._record(value["cohort_id"])
            if record is not None:
                return self._offer(record, int(value["member_index"]))
        forming = self.store.get(_forming_key(name))
        members = len(json.loads(forming.value)["members"]) if forming else 0
        return self._pace(
            self.pacer.retry_after_min_s,
            f"waiting for the cohort to fill ({members}/{self.settings.cohort.min_size})",
        )

    def _maybe_seal(self, name: str) -> str | None:
        """Seal the forming cohort of ``name`` if it is full enough; return its id."""
        key = _forming_key(name)
        rec = self.store.get(key)
        if rec is None:
            return None
        forming = json.loads(rec.value)
        size = len(forming["members"])
        cohort = self.settings.cohort
        now = self._clock()
        ready = size >= cohort.max_size or (
            size >= cohort.min_size and now - forming.get("full_at", now) >= cohort.formation_s
        )
        if not ready:
            return None
        artifact = self._artifact_for(name)
        if artifact is None:
            return None
        # The versioned delete is the seal: of two replicas sealing, exactly one wins.
        try:
            self.store.delete(key, expected_version=rec.version)
        except VersionConflict:
            return None
        version, digest, size_bytes = artifact
        n = size
        # The clip travels as a float32 and is bound into the session id: use the value
        # the devices will see, or coordinator and devices would be in different sessions.
        clip = float(np.float32(cohort.clip_norm))
        fp = FixedPoint.for_cohort(n, bits=cohort.bits, clip=clip)
        record = {
            "cohort_id": forming["cohort_id"],
            "device_class": name,
            "rank": self._classes[name].rank,
            "members": forming["members"],
            "version": version,
            "artifact": {"sha256": digest, "size": size_bytes},
            "sealed_at": now,
            "deadline_at": now + cohort.deadline_s,
            "threshold": max(1, min(n, math.ceil(cohort.threshold_fraction * n))),
            "bits": fp.bits,
            "frac_bits": fp.frac_bits,
            "clip": fp.clip,
            "neighbours": _neighbours(n, cohort.neighbours),
            "tensors": self._tensors,
            "stage": Stage.ADVERTISE_KEYS.name,
            "stage_started": now,
            "status": "active",
            "abandoned": [],
        }
        cohort_id = str(forming["cohort_id"])
        self.store.insert_if_absent(cohort_key(cohort_id), _json(record))
        for index, device_id in enumerate(record["members"]):
            self.store.put(
                _assign_key(device_id),
                _json(
                    {
                        "cohort_id": cohort_id,
                        "member_index": index,
                        "task_id": f"{cohort_id}-{index}",
                    }
                ),
            )
        self.store.zadd(ACTIVE_COHORTS, {cohort_id: now})
        log.info("sealed cohort %s: %d %s devices on version %d", cohort_id, n, name, version)
        self.observer.event(
            "cohort_sealed", cohort_id=cohort_id, device_class=name, size=n, version=version
        )
        return cohort_id

    def _offer(self, record: dict[str, Any], index: int) -> TaskOffer:
        training = self.settings.training
        return TaskOffer(
            task_id=f"{record['cohort_id']}-{index}",
            cohort_id=record["cohort_id"],
            version=int(record["version"]),
            artifact_sha256=record["artifact"]["sha256"],
            artifact_size=int(record["artifact"]["size"]),
            rank=int(record["rank"]),
            local_steps=training.local_steps,
            learning_rate=training.learning_rate,
            grad_clip_norm=training.grad_clip_norm,
            batch_size=training.batch_size,
            seq_len=training.seq_len,
            deadline_ms=int(record["deadline_at"] * 1000),
            member_index=index,
            session=session_config(record),
        )

    # ------------------------------------------------------------------ artifacts

    def blob_size(self, sha256: str) -> int:
        """Return the size of a blob a device may download."""
        try:
            return self.blobs.size(sha256)
        except ValueError as exc:
            raise InvalidArgument(f"sha256: {exc}") from exc
        except BlobNotFound:
            raise NotFound(f"blob {sha256} does not exist") from None

    def read_blob(self, sha256: str, *, offset: int, chunk_bytes: int) -> Iterator[bytes]:
        """Yield the blob's bytes from ``offset`` in chunks of ``chunk_bytes``."""
        total = self.blob_size(sha256)
        if offset > total:
            raise InvalidArgument(f"offset: {offset} is past the end of the {total}-byte blob")
        while offset < total:
            length = min(chunk_bytes, total - offset)
            yield self.blobs.read_range(sha256, offset=offset, length=length)
            offset += length

    # ------------------------------------------------------------------ secure aggregation

    def send_secagg(self, device: Device, cohort_id: str, stage: Stage, payload: bytes) -> Stage:
        """Take a member's message for ``stage``; return the cohort's stage after it."""
        if stage not in _SENDABLE:
            raise InvalidArgument(
                f"stage: {stage.name} messages are not sent with SendSecAgg"
                + (" (use UploadMasked)" if stage is Stage.MASKED_INPUT else "")
            )
        record, index = self._membership(device, cohort_id)
        cohort = self._cohort(record)
        if cohort.stage is not stage:
            raise FailedPrecondition(
                f"cohort {cohort_id} is in stage {cohort.stage.name}, not {stage.name}"
            )
        self._check_payload(payload, index)
        outcome = cohort.submit_message(index, payload)
        if outcome.error is not None:
            raise FailedPrecondition(f"cohort {cohort_id}: message refused: {outcome.error}")
        return cohort.stage

    @staticmethod
    def _check_payload(payload: bytes, index: int) -> Any:
        try:
            message = decode_secagg(payload)
        except Exception as exc:  # the decoder raises several types for garbage
            raise InvalidArgument(f"payload: not a secure-aggregation message: {exc}") from exc
        sender = getattr(message, "sender", index)
        if sender != index:
            raise InvalidArgument(f"payload: sender {sender} is not this device's index {index}")
        return message

    def poll_secagg(self, device: Device, cohort_id: str, after: Stage) -> SecAggReply | None:
        """Return the member's first message of a stage later than ``after``, or None.

        When that message is the share relay, the member's staleness weight is fixed now
        (the member is about to upload); work too stale is refused and the member drops.
        """
        record, index = self._membership(device, cohort_id)
        cohort = self._cohort(record)
        if cohort.stage is Stage.ABORTED:
            return SecAggReply(Stage.ABORTED, abort_reason=cohort.abort_reason or "aborted")
        for stage, payload in cohort.messages_for(index, after=after):
            if stage is Stage.MASKED_INPUT:
                weight = self._weight_for(cohort, record, index)
                if weight is None:
                    return SecAggReply(
                        Stage.ABORTED,
                        abort_reason=(
                            f"update trained on version {record['version']} is too stale "
                            f"(limit {self.policy.max_staleness})"
                        ),
                    )
                return SecAggReply(stage, payload, weight=weight)
            return SecAggReply(stage, payload)
        if cohort.stage is Stage.COMPLETED and after >= Stage.UNMASKING:
            result = cohort.server.result
            if result is not None and index in result.survivors:
                return SecAggReply(Stage.COMPLETED)
            return SecAggReply(Stage.ABORTED, abort_reason="not among the cohort's survivors")
        return None

    def _weight_for(
        self, cohort: ReplicatedCohort, record: dict[str, Any], index: int
    ) -> float | None:
        weight = cohort.server.weight_of(index)
        if weight is not None:
            return weight
        head = self.ledger.head()
        current = head.version if head else 0
        try:
            staleness = self.policy.staleness(trained_on=int(record["version"]), current=current)
        except StaleUpdate as exc:
            key = (str(record["cohort_id"]), index)
            if key not in self._rejected:  # a refused member may poll again: count it once
                self._rejected.add(key)
                self.counters.updates_rejected += 1
                self.observer.event(
                    "update_rejected", cohort_id=record["cohort_id"], reason=str(exc)
                )
            return None
        self._seen(str(record["cohort_id"]), index)
        cohort.assign_weight(index, self.policy.weight(staleness))
        assigned = cohort.server.weight_of(index)
        if assigned is not None:
            self.counters.staleness[staleness] = self.counters.staleness.get(staleness, 0) + 1
            self.observer.event(
                "weight_assigned",
                cohort_id=record["cohort_id"],
                member=index,
                staleness=staleness,
                weight=assigned,
            )
        return assigned

    def expected_upload_bytes(self, device: Device, cohort_id: str) -> int:
        """Exact size of this member's encoded masked input (checked before reading it)."""
        record, index = self._membership(device, cohort_id)
        config = session_config(record)
        # The encoding of empty tensors gives the framing; the packed elements add the rest
        # (no need to build a payload-sized probe for every upload).
        frame = MaskedInput(
            session=b"\0" * 32,
            sender=index,
            tensors=tuple((name, b"") for name, _ in config.tensors),
        )
        per_element = (config.fixed_point.bits + 7) // 8
        return len(frame.encode()) + per_element * sum(n for _, n in config.tensors)

    def upload_masked(
        self, device: Device, *, task_id: str, cohort_id: str, payload: bytes, sha256: str
    ) -> UploadResult:
        """Store a member's masked input durably; a repeat is acknowledged as duplicate."""
        record, index = self._membership(device, cohort_id)
        if task_id != f"{cohort_id}-{index}":
            raise FailedPrecondition(f"task_id: {task_id!r} is not this device's task")
        if hashlib.sha256(payload).hexdigest() != sha256.lower():
            raise InvalidArgument("sha256: the uploaded bytes do not match the header's digest")
        cohort = self._cohort(record)
        if cohort.server.has_masked_input(index):
            return UploadResult(accepted=True, duplicate=True, durable_bytes=len(payload))
        if cohort.stage is not Stage.MASKED_INPUT:
            raise FailedPrecondition(
                f"cohort {cohort_id} is in stage {cohort.stage.name}, not MASKED_INPUT"
            )
        if cohort.server.weight_of(index) is None:
            raise FailedPrecondition(
                "no staleness weight assigned yet: await the share relay (AwaitSecAgg after "
                "SHARE_KEYS) before uploading"
            )
        message = self._check_payload(payload, index)
        if not isinstance(message, MaskedInput):
            raise InvalidArgument(f"payload: a {type(message).__name__}, not a masked input")
        outcome = cohort.submit_message(index, payload)
        if outcome.error is not None:
            raise FailedPrecondition(f"cohort {cohort_id}: masked input refused: {outcome.error}")
        if not outcome.duplicate:  # another replica may have stored the same bytes first
            self.counters.uploads += 1
            self.observer.event(
                "upload", cohort_id=cohort_id, member=index, bytes=len(payload), duplicate=False
            )
        return UploadResult(accepted=True, duplicate=outcome.duplicate, durable_bytes=len(payload))

    def heartbeat(self, device: Device, task_id: str) -> HeartbeatReply:
        """Tell a training member whether to go on."""
        head = self.ledger.head()
        current = head.version if head else 0
        rec = self.store.get(_assign_key(device.device_id))
        assignment = None if rec is None else json.loads(rec.value)
        if assignment is None or assignment["task_id"] != task_id:
            return HeartbeatReply(abandon=True, current_version=current)
        record = self._record(assignment["cohort_id"])
        index = int(assignment["member_index"])
        self._seen(assignment["cohort_id"], index)
        abandon = (
            record is None
            or record["status"] != "active"
            or index in record.get("abandoned", [])
            or self._cohort(record).stage is Stage.ABORTED
        )
        return HeartbeatReply(abandon=abandon, current_version=current)

    # ------------------------------------------------------------------ periodic work

    def _seen(self, cohort_id: str, index: int) -> None:
        """Record that a member of a cohort is alive now (heartbeat, share relay)."""
        self.store.put(f"{SEEN_PREFIX}{cohort_id}/{index}", repr(self._clock()).encode())

    def _all_awaited_gone(
        self, record: dict[str, Any], cohort: ReplicatedCohort, now: float
    ) -> bool:
        """Whether every member the upload stage still awaits is silent or abandoned."""
        waiting = cohort.server.waiting_for()
        if not waiting:
            return False
        abandoned = set(record.get("abandoned", []))
        silence = self.settings.cohort.silence_s
        for index in waiting - abandoned:
            seen = self.store.get(f"{SEEN_PREFIX}{record['cohort_id']}/{index}")
            last = float(seen.value) if seen is not None else float(record["stage_started"])
            if now - max(last, float(record["stage_started"])) < silence:
                return False
        return True

    def _deadline(self, record: dict[str, Any], stage: Stage) -> float:
        if stage is Stage.MASKED_INPUT:
            return float(record["deadline_at"])
        return float(record["stage_started"]) + self.settings.cohort.key_timeout_s

    def tick(self) -> VersionInfo | None:
        """Do the periodic work; return the version committed by this call, if any.

        Seals ready cohorts, closes stages past their deadline, folds finished cohorts
        into the buffer and commits a version when it is due.
        """
        for key in self.store.scan(FORMING_PREFIX):
            self._maybe_seal(key[len(FORMING_PREFIX) :])
        now = self._clock()
        for cohort_id, _ in self._active_ids():
            record = self._record(cohort_id)
            if record is None or record["status"] != "active":
                self.store.zrem(ACTIVE_COHORTS, cohort_id)
                continue
            cohort = self._cohort(record)
            stage = cohort.stage
            if stage.name != record["stage"]:
                self._note_stage(cohort_id, stage, now)
                record = self._record(cohort_id) or record
            if stage not in (Stage.COMPLETED, Stage.ABORTED) and now >= self._deadline(
                record, stage
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
            if stage in (Stage.COMPLETED, Stage.ABORTED):
                self._finish(record, cohort)
        info = self.ledger.try_commit()
        if info is not None:
            self.observer.event(
                "version_committed",
                version=info.version,
                updates=info.updates,
                cohorts=list(info.cohorts),
                adapter_sha256=info.adapter_sha256,
            )
            self._submit_jobs(info)
        return info

    def _note_stage(self, cohort_id: str, stage: Stage, now: float) -> None:
        def advance(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            record = json.loads(current)
            if record["stage"] == stage.name:
                return None
            record["stage"] = stage.name
            record["stage_started"] = now
            return _json(record)

        self.store.update(cohort_key(cohort_id), advance)

    def _finish(self, record: dict[str, Any], cohort: ReplicatedCohort) -> None:
        cohort_id = record["cohort_id"]
        result = cohort.server.result
        status = "completed" if result is not None else "aborted"
        if result is not None and result.survivors:
            weighted = {
                name: result.float_sum[name].reshape(self._shapes[name]).astype(np.float32)
                for name in self._shapes
            }
            weight_total = result.weight_sum
            if weight_total > 0:
                added = self.ledger.add_cohort_sum(
                    cohort_id,
                    weighted_sum=weighted,
                    weight_total=weight_total,
                    updates=len(result.survivors),
                )
                if added:
                    self.counters.updates_accepted += len(result.survivors)
                    self.observer.event(
                        "update_accepted",
                        cohort_id=cohort_id,
                        updates=len(result.survivors),
                        weight_total=weight_total,
                        dropouts=len(record["members"]) - len(result.survivors),
                    )

        def close(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            value = json.loads(current)
            if value["status"] != "active":
                return None
            value["status"] = status
            value["stage"] = cohort.stage.name
            value["finished_at"] = self._clock()
            if result is not None:
                value["survivors"] = list(result.survivors)
                value["weight_total"] = result.weight_sum
            else:
                value["abort_reason"] = cohort.abort_reason
            return _json(value)

        if self.store.update(cohort_key(cohort_id), close) is not None:
            if status == "completed":
                self.counters.cohorts_completed += 1
            else:
                self.counters.cohorts_aborted += 1
            log.info("cohort %s %s", cohort_id, status)
            self.observer.event(
                "cohort_finished",
                cohort_id=cohort_id,
                status=status,
                size=len(record["members"]),
                survivors=len(result.survivors) if result is not None else 0,
                reason=cohort.abort_reason or "",
            )
        for index, device_id in enumerate(record["members"]):
            self._clear_assignment(device_id, cohort_id)
            self.store.delete(f"{SEEN_PREFIX}{cohort_id}/{index}")
        self.store.zrem(ACTIVE_COHORTS, cohort_id)
        with self._lock:
            self._cohorts.pop(cohort_id, None)

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> dict[str, Any]:
        """Gauges for metrics: head version, cohorts by stage, devices active."""
        head = self.ledger.head()
        stages: dict[str, int] = {}
        for cohort_id, _ in self._active_ids():
            record = self._record(cohort_id)
            if record is not None:
                stages[record["stage"]] = stages.get(record["stage"], 0) + 1
        forming = len(self.store.scan(FORMING_PREFIX))
        if forming:
            stages["FORMING"] = forming
        return {
            "version": head.version if head else -1,
            "cohorts": stages,
            "devices_active": self._active_devices(),
            "buffered_updates": self.ledger.buffered_updates(),
        }


__all__ = [
    "ACTIVE_COHORTS",
    "FederationService",
    "HeartbeatReply",
    "PaceOffer",
    "SecAggReply",
    "ServiceCounters",
    "ServiceObserver",
    "TaskOffer",
    "UploadResult",
    "session_config",
]
