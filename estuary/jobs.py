"""The cloud-job contract: how jobs are named, queued, superseded and recorded.

The coordinator submits jobs and reads their outcomes; worker groups
(:mod:`cloud_workers`) execute them. Both speak through this module, so job ids, stream
names and the outcome record are spelt in one place.

A job is a :class:`estuary.proto.v1.jobs_pb2.Job` serialised in field ``job`` of an
entry of the store stream :data:`JOB_STREAM`. Every worker group is one consumer of
the consumer group :data:`CONSUMER_GROUP`, so each job is delivered to one group; a
faster group simply pulls more.

Record layout (besides the ``version/`` and ``worker/`` records of
:mod:`estuary.state.keys`):

- ``joblatest/<kind key>`` → ``{"version": n}``: the newest version for which a job of
  that kind was submitted. A job whose version is lower is *superseded* and skipped.
- ``jobresult/<job_id>`` → the job's outcome (JSON), created with ``insert_if_absent``:
  exactly one completion is ever recorded per job id, however many times it ran.

Outputs are content-addressed blobs, so running a job twice (a reclaimed job whose first
runner was only slow) writes the same bytes under the same hash.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, cast

from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Store
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key

__all__ = [
    "CONSUMER_GROUP",
    "JOB_STREAM",
    "JobExecutor",
    "JobInputError",
    "JobOutcome",
    "JobRunner",
    "LocalWorkerFactory",
    "LocalWorkerUnavailable",
    "decode_job",
    "find_local_worker",
    "job_id_for",
    "job_kind",
    "latest_key",
    "make_job",
    "result_key",
    "submit_job",
    "supersede_key",
]

logger = logging.getLogger(__name__)

#: Stream every cloud job is appended to.
JOB_STREAM = "jobs"
#: The one consumer group all worker groups read through (each group is a consumer).
CONSUMER_GROUP = "workers"
#: ``joblatest/<kind key>``: newest submitted version per kind.
LATEST_PREFIX = "joblatest/"
#: ``jobresult/<job_id>``: the recorded outcome of a job, written once.
RESULT_PREFIX = "jobresult/"
#: Stream field holding the serialised Job.
JOB_FIELD = "job"

Kind = Literal["evaluate", "build_artifacts", "merge", "generate"]
Status = Literal["done", "skipped", "failed"]


class JobInputError(ValueError):
    """A job names something that does not exist or cannot be used.

    Unknown version, missing or corrupt adapter/checkpoint, unknown device class: the
    job fails with this message recorded, and the group goes on serving.
    """


def job_kind(job: jobs_pb2.Job) -> Kind:
    """Return the job's kind (the ``kind`` oneof).

    Raises
    ------
    JobInputError
        If the job sets no kind.
    """
    kind = job.WhichOneof("kind")
    if kind is None:
        raise JobInputError(f"job {job.job_id!r}: no kind set")
    return cast(Kind, kind)


def supersede_key(job: jobs_pb2.Job) -> str | None:
    """Return the key under which newer versions supersede ``job``, or ``None``.

    Evaluations and merges are superseded by any newer version; artifacts by a newer
    version for the same device class. ``generate`` is a person's request, never
    superseded.
    """
    kind = job_kind(job)
    if kind == "generate":
        return None
    if kind == "build_artifacts":
        return f"build_artifacts/{job.build_artifacts.device_class}"
    return kind


def latest_key(job: jobs_pb2.Job) -> str | None:
    """Return the store key of the newest submitted version of ``job``'s kind."""
    key = supersede_key(job)
    return None if key is None else f"{LATEST_PREFIX}{key}"


def result_key(job_id: str) -> str:
    """Return the store key of the recorded outcome of job ``job_id``."""
    if not job_id:
        raise ValueError("job_id: must be non-empty")
    return f"{RESULT_PREFIX}{job_id}"


def job_id_for(kind: Kind, *, version: int, device_class: str = "") -> str:
    """Return the deterministic id of ``kind``'s job for ``version``.

    ``<kind>[-<class>]-v<version>``: the class is part of the id of ``build_artifacts``
    jobs only. The coordinator both names jobs and finds their outcomes by it.
    """
    suffix = f"-{device_class}" if kind == "build_artifacts" else ""
    return f"{kind}{suffix}-v{version}"


def make_job(
    kind: Kind,
    *,
    version: int,
    adapter_sha256: str = "",
    adapter_size: int = 0,
    created_ms: int | None = None,
    device_class: str = "",
    prompt: str = "",
    max_new_tokens: int = 32,
    job_id: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> jobs_pb2.Job:
    """Return a :class:`Job` of ``kind`` for ``version``.

    The default job id is deterministic (``<kind>[-<class>]-v<version>``), so the
    coordinator submitting the same job twice names it once. ``created_ms`` defaults to
    ``clock``'s current Unix time in milliseconds.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``version`` is negative, or ``build_artifacts`` has no
        device class.
    """
    if version < 0:
        raise ValueError(f"version: must be >= 0, got {version}")
    job = jobs_pb2.Job(
        version=version,
        created_ms=clock.time_ms() if created_ms is None else created_ms,
    )
    if adapter_sha256:
        job.adapter.sha256 = adapter_sha256
        job.adapter.size_bytes = adapter_size
    if kind == "evaluate":
        job.evaluate.SetInParent()
    elif kind == "merge":
        job.merge.SetInParent()
    elif kind == "build_artifacts":
        if not device_class:
            raise ValueError("device_class: build_artifacts needs a device class")
        job.build_artifacts.device_class = device_class
    elif kind == "generate":
        job.generate.prompt = prompt
        job.generate.max_new_tokens = max_new_tokens
    else:
        raise ValueError(f"kind: unknown job kind {kind!r}")
    job.job_id = job_id or job_id_for(kind, version=version, device_class=device_class)
    return job


def _raise_latest(store: Store, key: str, version: int) -> None:
    def raise_to(current: bytes | None) -> bytes | None:
        if current is not None and json.loads(current)["version"] >= version:
            return None
        return json.dumps({"version": version}).encode()

    store.update(key, raise_to)


def submit_job(store: Store, job: jobs_pb2.Job, *, stream: str = JOB_STREAM) -> str:
    """Queue ``job`` and mark its version as the newest of its kind; return the entry id.

    The newest-version record is raised *before* the job is appended, so by the time any
    group can see this job, every older job of the same kind already reads as superseded.
    """
    key = latest_key(job)
    if key is not None:
        _raise_latest(store, key, job.version)
    # Creating the consumer group here (idempotent) lets `status` list pending jobs
    # before any worker group has started.
    store.ensure_group(stream, CONSUMER_GROUP)
    return store.stream_add(stream, {JOB_FIELD: job.SerializeToString()})


def decode_job(fields: Mapping[str, bytes]) -> jobs_pb2.Job:
    """Parse a stream entry's fields into a :class:`Job`.

    Raises
    ------
    JobInputError
        If the entry has no ``job`` field, it does not parse, or the job has no id or
        no kind.
    """
    from google.protobuf.message import DecodeError

    raw = fields.get(JOB_FIELD)
    if raw is None:
        raise JobInputError(f"stream entry has no {JOB_FIELD!r} field (fields: {sorted(fields)})")
    job = jobs_pb2.Job()
    try:
        job.ParseFromString(raw)
    except DecodeError as exc:
        raise JobInputError(f"stream entry is not a Job: {exc}") from exc
    if not job.job_id:
        raise JobInputError("job has no job_id")
    job_kind(job)
    return job


def is_superseded(store: Store, job: jobs_pb2.Job) -> bool:
    """Return whether a newer version of ``job``'s kind has been submitted."""
    key = latest_key(job)
    if key is None:
        return False
    record = store.get(key)
    return record is not None and int(json.loads(record.value)["version"]) > job.version


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job; stored as JSON at :func:`result_key`.

    Attributes
    ----------
    job_id, kind, version
        The job.
    status
        ``done``, ``skipped`` (superseded) or ``failed`` (bad input; see ``error``).
    group
        The worker group that recorded it.
    output
        Kind-specific results (``eval_bpb``, ``artifact_sha256``, ``text``, ...).
    error
        Why it failed; ``None`` unless ``failed``.
    committed_ms
        When the version was committed (the job's ``created_ms``).
    finished_ms
        When the outcome was recorded (Unix ms).
    deliveries
        How many times the job had been delivered when this outcome was recorded.
    """

    job_id: str
    kind: str
    version: int
    status: Status
    group: str
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    committed_ms: int = 0
    finished_ms: int = 0
    deliveries: int = 1

    def to_json(self) -> bytes:
        """Return the outcome as compact UTF-8 JSON."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobOutcome:
        """Parse an outcome written by :meth:`to_json`."""
        return cls(**json.loads(raw))


class JobExecutor(Protocol):
    """Runs one job and returns its kind-specific output."""

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Run ``job``; raise :class:`JobInputError` for bad inputs."""
        ...


def update_version_record(
    store: Store,
    version: int,
    updates: Mapping[str, Any],
    *,
    stamp: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Merge ``updates`` into the JSON record of ``version`` (compare-and-set loop).

    With ``stamp``, that field is set to ``clock``'s current Unix time when (and only
    when) the record changes, so a re-run of the same job leaves the record as it was.

    Raises
    ------
    JobInputError
        If the version has no record.
    """
    key = version_key(version)

    def merge(current: bytes | None) -> bytes | None:
        if current is None:
            raise JobInputError(f"version {version}: unknown (no {key} record)")
        value = json.loads(current)
        if all(value.get(k) == v for k, v in updates.items()):
            return None  # already written, by an earlier run of the same job
        value.update(updates)
        if stamp is not None:
            value[stamp] = round(clock.time(), 3)
        return json.dumps(value, sort_keys=True).encode()

    store.update(key, merge)


class JobRunner(Protocol):
    """A loop that executes cloud jobs until told to stop (a worker group)."""

    @property
    def name(self) -> str:
        """The consumer name the runner records outcomes under."""
        ...

    def run(self, stop: threading.Event) -> object:
        """Execute jobs until ``stop`` is set; may raise on a store outage."""
        ...


class LocalWorkerFactory(Protocol):
    """Builds the job runner a coordinator runs in-process when ``workers = "local"``.

    The coordinator never imports a worker implementation: whoever assembles the process
    passes one in (the simulation does), or the coordinator's command finds the one
    installed under the :data:`LOCAL_WORKER_ENTRY_POINTS` group (:func:`find_local_worker`).
    """

    def __call__(self, store: Store, *, blobs: BlobStore, base: Any, name: str) -> JobRunner:
        """Return a runner over ``store``/``blobs`` holding the full-precision ``base``."""
        ...


#: Entry-point group under which an installed worker package offers its local worker;
#: the ``worker`` extra's ``cloud_workers`` registers ``default`` there.
LOCAL_WORKER_ENTRY_POINTS = "estuary.local_worker"


class LocalWorkerUnavailable(LookupError):
    """No local worker is installed (the ``worker`` extra is missing)."""


def find_local_worker(name: str = "default") -> LocalWorkerFactory:
    """Return the installed local worker factory registered as ``name``.

    Raises
    ------
    LocalWorkerUnavailable
        If none is registered, or loading it fails for a missing dependency; the message
        says which extra to install.
    """
    from importlib.metadata import entry_points

    from estuary.extras import install_hint, missing_for

    found = [ep for ep in entry_points(group=LOCAL_WORKER_ENTRY_POINTS) if ep.name == name]
    hint = (
        "workers = 'local' runs cloud jobs in the coordinator process and needs the worker "
        f"extra ({install_hint(['worker'])}); or set workers = 'groups' and run "
        "`estuary worker run` groups"
    )
    if not found:
        raise LocalWorkerUnavailable(f"no local worker {name!r} is installed: {hint}")
    # Checked before loading: the module may import without what its jobs need later (onnx).
    missing = missing_for(found[0].extras)
    if missing:
        raise LocalWorkerUnavailable(
            f"local worker {name!r} is not usable here (missing: {', '.join(missing)}): {hint}"
        )
    try:
        factory: LocalWorkerFactory = found[0].load()
    except ImportError as exc:
        raise LocalWorkerUnavailable(f"local worker {name!r} cannot load ({exc}): {hint}") from None
    return factory
