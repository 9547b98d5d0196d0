"""The federation service: what the coordinator does, with no gRPC in sight.

The servicer (:mod:`coordinator.grpc_service`) authenticates nothing and decides nothing:
it turns protobuf messages into calls of :class:`FederationService` and its exceptions
(:mod:`coordinator.errors`) into status codes. Everything here is synchronous and keeps
its durable state in the :class:`~estuary.state.base.Store`, so any number of replicas
can serve the same devices; :meth:`FederationService.tick` is the periodic work (sealing
cohorts, stage deadlines, folding finished cohorts into versions) and is safe to run on
every replica at once.

:class:`FederationService` is a facade over one part per concern, each in its module:

- :mod:`coordinator.cohorts`: the cohort records (forming, sealed, assignments) as typed
  records; :mod:`coordinator.cohort_book`: the one class that reads and writes them (and
  the active set and liveness) in the store;
- :mod:`coordinator.admission`: pacing, cohort formation and sealing, tasks;
- :mod:`coordinator.relay`: the secure-aggregation relay and the staleness weight;
- :mod:`coordinator.uploads`: masked uploads;
- :mod:`coordinator.tick`: deadlines, silence, folding cohorts in, the commit;
- :mod:`coordinator.job_submission`: each version's cloud jobs;

besides the ledger (:mod:`coordinator.versions`), the cohort logs
(:mod:`coordinator.cohort_log`) and the devices (:mod:`coordinator.enrolment`).

A task's life: GetTask gives the device a training task (or Pace); it trains and reports
it finished with GetTask(trained_task_id), which puts it into ``forming/<class>`` of devices
that trained (answering Pace until the cohort is sealed), then returns the cohort task.
Keys are exchanged, the member asks for the share relay (the moment its staleness weight
is fixed), uploads its masked input, and answers the unmask request. The cohort's
unmasked sum ``(Σ w ΔB, Σ w)`` goes to the FedBuff buffer; the ledger commits a version
every K updates and the service queues the version's cloud jobs (evaluation, edge
artifacts per device class).

Every time the service reads (formation, deadlines, silence, enrolment tokens, request
timestamps, rate limits, ``committed_at``, job stamps) comes from the one injected
:class:`~estuary.clock.Clock`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from coordinator.admission import Admission
from coordinator.cohort_book import ACTIVE_COHORTS, ASSIGN_PREFIX, TRAINING_PREFIX, CohortBook
from coordinator.cohorts import Assignment, TrainingTask
from coordinator.enrolment import Device, DeviceRegistry
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from coordinator.job_submission import JobSubmitter
from coordinator.outcomes import (
    HeartbeatReply,
    NoObserver,
    PaceOffer,
    SecAggReply,
    ServiceCounters,
    ServiceObserver,
    TaskOffer,
    UploadResult,
)
from coordinator.ratelimit import RateLimiter
from coordinator.relay import SecAggRelay
from coordinator.retention import Retention
from coordinator.staleness import StalenessPolicy
from coordinator.tick import Ticker
from coordinator.uploads import Uploads
from coordinator.versions import VersionInfo, VersionLedger
from estuary.adapters.lora import GlobalAdapter
from estuary.auth import SignedAuth
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.config.models import CoordinatorSettings
from estuary.federation import FEDERATION_KEY, FederationRecord
from estuary.pki import DeviceCA
from estuary.state.base import Record, Store
from estuary.state.blobs import BlobNotFound, BlobStore
from estuary.state.keys import HEAD_KEY
from secure_agg import Stage

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
]


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
        The one clock every part of the service reads (tests pass a
        :class:`~estuary.clock.VirtualClock`).
    observer
        Told about commits, cohorts and uploads.
    new_cohort_id
        Names each new cohort; random (``uuid4().hex``) by default. A simulation passes a
        seeded source so that a run is a function of its seed (some work is ordered by
        cohort id).
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        store: Store,
        blobs: BlobStore,
        initial_adapter: GlobalAdapter,
        clock: Clock = SYSTEM_CLOCK,
        observer: ServiceObserver | None = None,
        new_cohort_id: Callable[[], str] | None = None,
    ) -> None:
        if not isinstance(clock, Clock):
            raise ValueError(f"clock: must be an estuary.clock.Clock, got {type(clock).__name__}")
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.clock = clock
        self.observer: ServiceObserver = observer or NoObserver()
        self.counters = ServiceCounters()
        self._classes = {c.name: c for c in settings.device_classes}
        tls = settings.tls
        device_ca = (
            DeviceCA.from_files(
                tls.device_ca_cert_file,
                tls.device_ca_key_file,
                lifetime_s=tls.device_cert_lifetime_s,
            )
            if tls.device_ca_cert_file is not None and tls.device_ca_key_file is not None
            else None
        )
        self.registry = DeviceRegistry(
            store, device_classes=list(self._classes), clock=clock, device_ca=device_ca
        )
        self.limiter = RateLimiter(
            settings.server.device_requests_per_s,
            burst=settings.server.device_burst,
            clock=clock,
        )
        agg = settings.aggregation
        self.policy = StalenessPolicy(
            kind=agg.staleness,
            a=agg.staleness_a,
            b=agg.staleness_b,
            max_staleness=agg.max_staleness,
        )
        self.ledger = VersionLedger(
            store,
            blobs=blobs,
            holder=settings.node_id,
            buffer_size=agg.buffer_size,
            server_lr=agg.server_lr,
            lease_ttl_s=agg.lease_ttl_s,
            clock=clock,
            staleness=self.policy,
            max_step_norm=agg.max_step_norm or None,
            guard_tolerance_bpb=agg.guard_tolerance_bpb if agg.guard else None,
            step_divisor=agg.step_divisor,
        )
        self._initial = initial_adapter
        self.cohorts = CohortBook(store, clock=clock)
        self.jobs = JobSubmitter(
            store,
            blobs=blobs,
            device_classes=list(self._classes),
            observer=self.observer,
            clock=clock,
        )
        self.admission = Admission(
            settings,
            book=self.cohorts,
            ledger=self.ledger,
            blobs=blobs,
            tensors=sorted((name, int(np.prod(b.shape))) for name, b in initial_adapter.b.items()),
            observer=self.observer,
            clock=clock,
            new_cohort_id=new_cohort_id,
            counters=self.counters,
        )
        self.pacer = self.admission.pacer
        self.relay = SecAggRelay(
            self.cohorts,
            ledger=self.ledger,
            policy=self.policy,
            counters=self.counters,
            observer=self.observer,
        )
        self.uploads = Uploads(self.cohorts, counters=self.counters, observer=self.observer)
        self.ticker = Ticker(
            settings.cohort,
            book=self.cohorts,
            admission=self.admission,
            ledger=self.ledger,
            jobs=self.jobs,
            shapes={name: b.shape for name, b in initial_adapter.b.items()},
            counters=self.counters,
            observer=self.observer,
            clock=clock,
            retention=Retention(
                settings.retention,
                store=store,
                blobs=blobs,
                max_staleness=settings.aggregation.max_staleness,
                clock=clock,
            ),
        )

    # ------------------------------------------------------------------ start-up

    def start(self) -> VersionInfo:
        """Publish how cohorts form, record version 0 if new and queue its cloud jobs."""
        published = FederationRecord.from_settings(self.settings, now=self.clock.time())
        self.store.put(FEDERATION_KEY, published.to_json())
        head = self.ledger.initialise(self._initial)
        self.jobs.submit(head)
        return head

    # ------------------------------------------------------------------ devices

    @property
    def requires_device_certificates(self) -> bool:
        """Whether every signed request must come over mTLS with its signer's certificate."""
        return self.registry.device_ca is not None

    def enroll(self, token: str, *, public_key: bytes, device_class: str) -> Device:
        """Enrol a device with a one-time token (see :class:`DeviceRegistry`)."""
        return self.enroll_with_csr(
            token, public_key=public_key, device_class=device_class, csr=b"", csr_proof=b""
        )[0]

    def enroll_with_csr(
        self,
        token: str,
        *,
        public_key: bytes,
        device_class: str,
        csr: bytes,
        csr_proof: bytes,
    ) -> tuple[Device, bytes]:
        """Enrol a device with a one-time token; return it and its client certificate.

        The certificate (PEM) is empty unless the coordinator has a device CA, which then
        requires ``csr`` and ``csr_proof`` (see :meth:`DeviceRegistry.enroll_with_csr`).
        """
        if device_class not in self._classes:
            raise InvalidArgument(
                f"device_class: unknown class {device_class!r}; configured: {sorted(self._classes)}"
            )
        if len(public_key) != 32:
            raise InvalidArgument(
                "identity_public_key: must be a raw 32-byte Ed25519 key, "
                f"got {len(public_key)} bytes"
            )
        return self.registry.enroll_with_csr(
            token, public_key=public_key, device_class=device_class, csr=csr, csr_proof=csr_proof
        )

    def renew_certificate(self, device: Device, csr: bytes) -> bytes:
        """Return a new client certificate (PEM) for authenticated ``device``'s CSR."""
        return self.registry.renew_certificate(device, csr)

    def authenticate(self, auth: SignedAuth, *, method: str, body_sha256: bytes) -> Device:
        """Return the enrolled device that signed this request.

        Raises
        ------
        Unauthenticated
            Unknown, revoked, badly signed, stale or replayed.
        ResourceExhausted
            The device exceeded its request rate.
        """
        return self._authenticate_reading(auth, method=method, body_sha256=body_sha256)[0]

    def _authenticate_reading(
        self,
        auth: SignedAuth,
        *,
        method: str,
        body_sha256: bytes,
        read: Callable[[Device], Sequence[str]] | None = None,
    ) -> tuple[Device, list[Record | None]]:
        """:meth:`authenticate`, reading ``read(device)`` with the nonce (one round trip)."""
        device, records = self.registry.authenticate_reading(
            auth, method=method, body_sha256=body_sha256, read=read
        )
        if not self.limiter.allow(device.device_id):
            raise ResourceExhausted(
                f"device {device.device_id}: more than "
                f"{self.settings.server.device_requests_per_s:g} requests/s "
                f"(burst {self.settings.server.device_burst}); slow down"
            )
        return device, records

    def get_task_signed(
        self, auth: SignedAuth, *, body_sha256: bytes, trained_task_id: str = ""
    ) -> tuple[Device, TaskOffer | PaceOffer]:
        """:meth:`authenticate` a GetTask request, then :meth:`get_task`; the device too.

        For a device whose record this replica has cached, the first reads of the task
        (:meth:`~coordinator.admission.Admission.task_keys`) travel with the request's
        nonce: a paced GetTask is one store round trip in all.
        """

        def keys(device: Device) -> list[str]:
            cls = self._classes.get(device.device_class)
            return [] if cls is None else self.admission.task_keys(device.device_id, cls.name)

        device, records = self._authenticate_reading(
            auth, method="GetTask", body_sha256=body_sha256, read=keys
        )
        name, _rank = self.device_class(device)
        return device, self.admission.get_task(
            device, name, trained_task_id=trained_task_id, records=records
        )

    def sealed_for(self, device: Device, trained_task_id: str) -> bool:
        """Whether the cohort of ``device``'s update ``trained_task_id`` has been sealed.

        One store read (its assignment): what a GetTask held open while the device waits
        in a forming cohort polls, before it asks :meth:`get_task` for the cohort task.
        """
        assignment = self.cohorts.assignment(device.device_id)
        return assignment is not None and assignment.trained_task_id == trained_task_id

    def heartbeat_signed(
        self, auth: SignedAuth, *, task_id: str, body_sha256: bytes
    ) -> HeartbeatReply:
        """:meth:`authenticate` a Heartbeat request, then :meth:`heartbeat`.

        The head and the device's task travel with the request's nonce: a heartbeat of a
        device that holds no task (or another one) is one store round trip in all.
        """
        device, records = self._authenticate_reading(
            auth,
            method="Heartbeat",
            body_sha256=body_sha256,
            read=lambda device: [
                HEAD_KEY,
                ASSIGN_PREFIX + device.device_id,
                TRAINING_PREFIX + device.device_id,
            ],
        )
        return self._heartbeat(device, task_id, *records)

    def device_class(self, device: Device) -> tuple[str, int]:
        """Return the (name, rank) of the device's class."""
        cls = self._classes.get(device.device_class)
        if cls is None:
            raise FailedPrecondition(
                f"device class {device.device_class!r} is no longer configured"
            )
        return cls.name, cls.rank

    # ------------------------------------------------------------------ tasks

    def get_task(self, device: Device, *, trained_task_id: str = "") -> TaskOffer | PaceOffer:
        """Give ``device`` a training task, or the cohort task of its trained update, or pace it.

        ``trained_task_id``: the training task the device finished (it joins a cohort
        with its update); empty: it holds no trained update. A device that asks without
        one while its cohort task is under way (it has advertised keys) has lost its task
        state, e.g. by a restart: the task is abandoned (the member becomes a dropout of
        its cohort) and the device is given work afresh. See
        :meth:`coordinator.admission.Admission.get_task` (and its FailedPrecondition).
        """
        name, _rank = self.device_class(device)
        return self.admission.get_task(device, name, trained_task_id=trained_task_id)

    def heartbeat(self, device: Device, task_id: str) -> HeartbeatReply:
        """Tell a training device whether to go on.

        The head and the device's tasks are read in one round trip: a device that holds
        no task (or another one) is answered with that alone.
        """
        head_record, assign_record, training_record = self.store.get_many(
            [HEAD_KEY, ASSIGN_PREFIX + device.device_id, TRAINING_PREFIX + device.device_id]
        )
        return self._heartbeat(device, task_id, head_record, assign_record, training_record)

    def _heartbeat(
        self,
        device: Device,
        task_id: str,
        head_record: Record | None,
        assign_record: Record | None,
        training_record: Record | None,
    ) -> HeartbeatReply:
        """:meth:`heartbeat` given reads of the head and of the device's tasks.

        A training task goes on while it is the device's and its version still counts
        (the heartbeat also keeps it from expiring as silent); a cohort task while its
        cohort runs and the member has not abandoned it.
        """
        assign_key = ASSIGN_PREFIX + device.device_id
        head = self.ledger.head_of(head_record)
        current = head.version if head else 0
        if training_record is not None:
            training_key = TRAINING_PREFIX + device.device_id
            task = TrainingTask.from_json(training_record.value, where=training_key)
            if task.task_id == task_id:
                go_on = self.admission.training_heartbeat(device.device_id, task, head)
                return HeartbeatReply(abandon=not go_on, current_version=current)
        assignment = (
            None
            if assign_record is None
            else Assignment.from_json(assign_record.value, where=assign_key)
        )
        if assignment is None or assignment.task_id != task_id:
            return HeartbeatReply(abandon=True, current_version=current)
        record = self.cohorts.record(assignment.cohort_id)
        index = assignment.member_index
        self.cohorts.mark_seen(assignment.cohort_id, index)
        abandon = (
            record is None
            or not record.active
            or record.is_abandoned(index)
            or self.cohorts.cohort(record).stage is Stage.ABORTED
        )
        return HeartbeatReply(abandon=abandon, current_version=current)

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
        return self.relay.send(device, cohort_id, stage, payload)

    def poll_secagg(self, device: Device, cohort_id: str, after: Stage) -> SecAggReply | None:
        """Return the member's first message of a stage later than ``after``, or None.

        When that message is the share relay, the member's staleness weight is fixed now
        (the member is about to upload); work too stale is refused and the member drops.
        """
        return self.relay.poll(device, cohort_id, after)

    def expected_upload_bytes(self, device: Device, cohort_id: str) -> int:
        """Exact size of this member's encoded masked input (checked before reading it)."""
        return self.uploads.expected_size(device, cohort_id)

    def upload_masked(
        self, device: Device, *, task_id: str, cohort_id: str, payload: bytes, sha256: str
    ) -> UploadResult:
        """Store a member's masked input durably; a repeat is acknowledged as duplicate."""
        return self.uploads.store(
            device, task_id=task_id, cohort_id=cohort_id, payload=payload, sha256=sha256
        )

    # ------------------------------------------------------------------ periodic work

    def tick(self) -> VersionInfo | None:
        """Do the periodic work; return the version committed by this call, if any.

        Seals ready cohorts, closes stages past their deadline, folds finished cohorts
        into the buffer and commits a version when it is due (see :mod:`coordinator.tick`).
        """
        return self.ticker.tick()

    # ------------------------------------------------------------------ reading

    def cohort_stage(self, cohort_id: str) -> Stage | None:
        """Return the secure-aggregation stage of a sealed cohort, or None if unknown."""
        record = self.cohorts.record(cohort_id)
        return None if record is None else self.cohorts.cohort(record).stage

    def snapshot(self) -> dict[str, Any]:
        """Gauges for metrics: head version, cohorts by stage, devices active."""
        head = self.ledger.head()
        stages: dict[str, int] = {}
        for cohort_id in self.cohorts.active_ids():
            record = self.cohorts.record(cohort_id)
            if record is not None:
                stages[record.stage.name] = stages.get(record.stage.name, 0) + 1
        forming = len(self.cohorts.forming_classes())
        if forming:
            stages["FORMING"] = forming
        return {
            "version": head.version if head else -1,
            "cohorts": stages,
            "devices_active": self.cohorts.active_devices(),
            "buffered_updates": self.ledger.buffered_updates(),
        }
