"""The cloud-job contract: how jobs are named, queued, superseded and recorded.

The coordinator submits jobs and reads their outcomes; worker groups
(:mod:`cloud_workers`) execute them. Both speak through this module, so job ids, stream
names, the supersede rule and the outcome record are spelt in one place.

A job is a :class:`estuary.proto.v1.jobs_pb2.Job` serialised in field ``job`` of an
entry of the store stream :data:`JOB_STREAM`. Every worker group is one consumer of
the consumer group :data:`CONSUMER_GROUP`, so each job is delivered to one group; a
faster group simply pulls more.

Superseding: run the newest, never starve it
--------------------------------------------
Evaluations, merges and ONNX exports of version *v* are superseded by any newer version,
edge artifacts by a newer version *of the same device class* (the *kind key*,
:func:`supersede_key`); ``generate`` is a person's request and never superseded. A group
that is handed a job decides with :func:`job_to_run`:

- if some group has already **started** a newer version of the kind key, the job is
  skipped. That newer job is sure to get an outcome: its own stream entry is skipped
  only for a version newer still, so the entry of the newest started version runs when
  it is reached (or finds the outcome its starter recorded), whether or not the group
  that started it survived. A failure is an outcome too; the next version retries;
- otherwise the group runs the **newest submitted** job of the kind key in its place
  (the job itself when nothing newer was submitted), and records the delivered job as
  ``skipped`` once the newer one has its outcome. The newer job's own entry finds that
  outcome later and is acknowledged without running again.

Skipping only on a submitted-but-not-started newer version (the rule before) starved
every kind key but the first of each version whenever versions were committed faster
than jobs ran: each entry, when its turn came, already had a newer sibling queued
behind it, so laptops never got an artifact and no version after 0 was ever evaluated.
With the rule above, every pass through the queue runs each kind key once, on the
newest version. This bounds the **evaluation lag** (commit of version *v* → held-out
figure of *v* or a newer version). Once *v* is committed, each kind key ahead of *v*'s
evaluate entry runs at most once more (that run is on a version ≥ *v*, after which every
older entry of the key is skipped at once). So with one group and ``K`` kind keys the
evaluation of *v* or a newer one has finished within ``K + 1`` jobs of the commit: the
job in progress, one run of each other kind key, and the evaluation (``generate``
requests aside). The same bound holds for each device class's newest edge artifact,
which is what the coordinator seals cohorts on.

Training artifacts run ahead of the stream
------------------------------------------
Devices train on the newest edge artifact of their class, and every version they are
behind is staleness their update carries. So a ``build_artifacts`` job is cheap by
design (the compressed base is made once per scheme; a version adds only its adapter and
a manifest) and never waits behind slow jobs: besides taking jobs from the stream in
order, a group runs the newest submitted artifact job of each class as soon as it is
queued (:func:`artifact_jobs_ahead`), under the same supersede rule, so its stream entry
later finds the outcome recorded. The int8 ONNX export for serving, tens of seconds
per version, is a job of its own (``export_onnx``); an artifact names the newest export
completed when it was built, so serving lags a version or two and training never does.

Record layout (besides the ``version/`` and ``worker/`` records of
:mod:`estuary.state.keys`):

- ``joblatest/<kind key>`` → ``{"version": n, "job": <base64 Job>}``: the newest
  submitted job of that kind key (the one a group runs in place of an older one).
- ``jobstarted/<kind key>`` → ``{"version": n}``: the newest version any group started
  running; raised with compare-and-set, so of two groups promoting the same version one
  runs it and the other skips.
- ``jobdone/<kind key>`` → ``{"version": n, "job_id": id}``: the newest version whose job
  completed (status ``done``); the coordinator finds the newest built edge artifact of a
  class by it (:func:`newest_done`).
- ``jobresult/<job_id>`` → the job's outcome (JSON), created with ``insert_if_absent``:
  exactly one completion is ever recorded per job id, however many times it ran.

Each of the three per-kind records holds one small value per kind key, so they never
grow with the number of versions.

Outputs are content-addressed blobs, so running a job twice (a reclaimed job whose first
runner was only slow) writes the same bytes under the same hash.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, cast

from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Record, Store
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
    "RunDecision",
    "artifact_classes",
    "artifact_jobs_ahead",
    "decode_job",
    "done_key",
    "done_of",
    "find_local_worker",
    "job_id_for",
    "job_kind",
    "job_to_run",
    "kind_key",
    "latest_key",
    "make_job",
    "newest_done",
    "newest_submitted",
    "record_done",
    "result_key",
    "submit_job",
    "supersede_key",
    "trim_jobs",
]

logger = logging.getLogger(__name__)

#: Stream every cloud job is appended to.
JOB_STREAM = "jobs"
#: The one consumer group all worker groups read through (each group is a consumer).
CONSUMER_GROUP = "workers"
#: ``joblatest/<kind key>``: newest submitted job per kind key.
LATEST_PREFIX = "joblatest/"
#: ``jobstarted/<kind key>``: newest version a group started running per kind key.
STARTED_PREFIX = "jobstarted/"
#: ``jobdone/<kind key>``: newest version completed per kind key, with its job id.
DONE_PREFIX = "jobdone/"
#: ``jobresult/<job_id>``: the recorded outcome of a job, written once.
RESULT_PREFIX = "jobresult/"
#: Stream field holding the serialised Job.
JOB_FIELD = "job"

Kind = Literal["evaluate", "build_artifacts", "merge", "generate", "export_onnx"]
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


def kind_key(kind: Kind, *, device_class: str = "") -> str | None:
    """Return the key under which newer versions supersede jobs of ``kind``, or ``None``.

    Evaluations, merges and ONNX exports are superseded by any newer version; artifacts
    by a newer version for the same device class. ``generate`` is a person's request, never
    superseded.

    Raises
    ------
    ValueError
        If ``kind`` is ``build_artifacts`` and ``device_class`` is empty.
    """
    if kind == "generate":
        return None
    if kind == "build_artifacts":
        if not device_class:
            raise ValueError("device_class: build_artifacts needs a device class")
        return f"build_artifacts/{device_class}"
    return kind


def supersede_key(job: jobs_pb2.Job) -> str | None:
    """Return the kind key under which newer versions supersede ``job``, or ``None``."""
    kind = job_kind(job)
    if kind == "build_artifacts" and not job.build_artifacts.device_class:
        raise JobInputError(f"job {job.job_id!r}: build_artifacts names no device class")
    return kind_key(kind, device_class=job.build_artifacts.device_class)


def latest_key(job: jobs_pb2.Job) -> str | None:
    """Return the store key of the newest submitted job of ``job``'s kind key."""
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
    elif kind == "export_onnx":
        job.export_onnx.SetInParent()
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


def _record_version(raw: bytes | None, *, key: str) -> int:
    """Return the ``version`` of a per-kind record, -1 if there is none."""
    if raw is None:
        return -1
    try:
        return int(json.loads(raw)["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{key}: not a job record with a version ({exc}): {raw[:80]!r}") from None


def _raise_record(store: Store, key: str, version: int, **fields: Any) -> bool:
    """Raise the per-kind record ``key`` to ``version`` (with ``fields``); True if written.

    A record already at ``version`` or above is left as it is, so the first writer of a
    version wins and the record never goes back.
    """

    def raise_to(current: bytes | None) -> bytes | None:
        if _record_version(current, key=key) >= version:
            return None
        return json.dumps({"version": version, **fields}, sort_keys=True).encode()

    return store.update(key, raise_to) is not None


def submit_job(store: Store, job: jobs_pb2.Job, *, stream: str = JOB_STREAM) -> str:
    """Queue ``job`` and record it as the newest of its kind key; return the entry id.

    The newest-job record is raised *before* the job is appended, so by the time any
    group can see this job, a group handed an older job of the same kind key runs this
    one in its place (:func:`job_to_run`).
    """
    key = latest_key(job)
    if key is not None:
        encoded = base64.b64encode(job.SerializeToString()).decode("ascii")
        _raise_record(store, key, job.version, job=encoded)
    # Creating the consumer group here (idempotent) lets `status` list pending jobs
    # before any worker group has started.
    store.ensure_group(stream, CONSUMER_GROUP)
    return store.stream_add(stream, {JOB_FIELD: job.SerializeToString()})


def trim_jobs(store: Store, *, stream: str = JOB_STREAM) -> int:
    """Drop the job stream's entries every worker group is done with; return how many.

    An entry leaves the stream once it was delivered to a group and acknowledged (its
    outcome is in ``jobresult/``); pending and undelivered jobs stay, so the stream holds
    only the backlog, however many versions have been committed.
    """
    return store.trim_stream(stream, CONSUMER_GROUP)


def newest_submitted(store: Store, job: jobs_pb2.Job) -> jobs_pb2.Job | None:
    """Return the newest submitted job of ``job``'s kind key, or ``None``.

    ``None`` also for ``generate`` (never superseded) and for a record written before
    records carried the job.
    """
    key = latest_key(job)
    if key is None:
        return None
    record = store.get(key)
    if record is None:
        return None
    encoded = json.loads(record.value).get("job")
    if not encoded:
        return None
    newest = jobs_pb2.Job()
    newest.ParseFromString(base64.b64decode(encoded))
    return newest


@dataclass(frozen=True)
class RunDecision:
    """What a group does with a delivered job; see :func:`job_to_run`.

    Attributes
    ----------
    run
        The job to execute: the delivered job itself, or the newest submitted job of its
        kind key in its place. ``None``: skip the delivered job.
    superseded_by
        The newer version that was already started (when skipping) or that runs in the
        delivered job's place; ``None`` when the delivered job runs itself.
    """

    run: jobs_pb2.Job | None
    superseded_by: int | None


def job_to_run(store: Store, job: jobs_pb2.Job) -> RunDecision:
    """Apply the supersede rule (module docstring) to a delivered ``job``.

    Skip it if a newer version of its kind key has been started; otherwise run the
    newest submitted job of its kind key (``job`` itself if none is newer) and record
    that version as started, with compare-and-set, so of two groups deciding at once
    for the same kind key only one starts the newer version.

    Raises
    ------
    JobInputError
        If the job is a ``build_artifacts`` job without a device class.
    """
    key = supersede_key(job)
    if key is None:
        return RunDecision(run=job, superseded_by=None)
    newest = newest_submitted(store, job)
    candidate = newest if newest is not None and newest.version > job.version else job
    started_key = f"{STARTED_PREFIX}{key}"
    decision = RunDecision(run=job, superseded_by=None)

    def start(current: bytes | None) -> bytes | None:
        nonlocal decision
        started = _record_version(current, key=started_key)
        if started > job.version:
            decision = RunDecision(run=None, superseded_by=started)
            return None
        promoted = candidate is not job
        decision = RunDecision(run=candidate, superseded_by=candidate.version if promoted else None)
        if started >= candidate.version:
            return None  # this very version is started already: its own entry runs it
        return json.dumps({"version": candidate.version}).encode()

    store.update(started_key, start)
    return decision


def record_done(store: Store, job: jobs_pb2.Job) -> None:
    """Record that ``job`` completed, raising its kind key's ``jobdone/`` record.

    Call it after the job's outcome is recorded (and again for an outcome found
    recorded): a raise that was lost with its runner is redone, never undone.
    """
    key = supersede_key(job)
    if key is not None:
        _raise_record(store, f"{DONE_PREFIX}{key}", job.version, job_id=job.job_id)


def newest_done(store: Store, kind: Kind, *, device_class: str = "") -> tuple[int, str] | None:
    """Return ``(version, job id)`` of the newest completed job of a kind key, or ``None``.

    The coordinator reads the newest built edge artifact of ``device_class`` with it; the
    outcome (:class:`JobOutcome`) is at :func:`result_key` of the job id.

    Raises
    ------
    ValueError
        If ``kind`` is never superseded (``generate``) or ``build_artifacts`` is given
        no device class.
    """
    key = done_key(kind, device_class=device_class)
    return done_of(store.get(key), key=key)


def done_key(kind: Kind, *, device_class: str = "") -> str:
    """Return the ``jobdone/`` key :func:`newest_done` reads (to batch it with other reads).

    Raises
    ------
    ValueError
        As :func:`newest_done`.
    """
    key = kind_key(kind, device_class=device_class)
    if key is None:
        raise ValueError(f"kind: {kind!r} jobs are never superseded and have no newest")
    return f"{DONE_PREFIX}{key}"


def done_of(record: Record | None, *, key: str) -> tuple[int, str] | None:
    """Return ``(version, job id)`` of a read of :func:`done_key` ``key``; None: no record."""
    if record is None:
        return None
    version = _record_version(record.value, key=key)
    try:
        job_id = str(json.loads(record.value)["job_id"])
    except KeyError:
        raise ValueError(f"{key}: no job_id in {record.value[:80]!r}") from None
    return version, job_id


def artifact_jobs_ahead(store: Store, device_classes: Sequence[str]) -> list[jobs_pb2.Job]:
    """Return the artifact jobs a group may run ahead of the stream, one per class at most.

    For each class of ``device_classes``, the newest submitted ``build_artifacts`` job,
    unless a job of that version or a newer one has been started (some group runs it, or
    ran it) or completed. Reads three records per class in one round trip; the caller
    runs each through :func:`job_to_run`, which settles a race with another group.
    """
    keys: list[str] = []
    for name in device_classes:
        kind = kind_key("build_artifacts", device_class=name)
        keys += [f"{LATEST_PREFIX}{kind}", f"{STARTED_PREFIX}{kind}", f"{DONE_PREFIX}{kind}"]
    records = store.get_many(keys)
    ahead: list[jobs_pb2.Job] = []
    for i in range(0, len(keys), 3):
        latest, started, done = records[i : i + 3]
        if latest is None:
            continue
        encoded = json.loads(latest.value).get("job")
        if not encoded:
            continue  # a record from before records carried the job
        newest = _record_version(latest.value, key=keys[i])
        floor = max(
            _record_version(None if started is None else started.value, key=keys[i + 1]),
            _record_version(None if done is None else done.value, key=keys[i + 2]),
        )
        if newest > floor:
            job = jobs_pb2.Job()
            job.ParseFromString(base64.b64decode(encoded))
            ahead.append(job)
    return ahead


def artifact_classes(store: Store) -> list[str]:
    """Return the device classes that have had an artifact job submitted (a key scan)."""
    prefix = f"{LATEST_PREFIX}build_artifacts/"
    return sorted(key[len(prefix) :] for key in store.scan(prefix))


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


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job; stored as JSON at :func:`result_key`.

    Attributes
    ----------
    job_id, kind, version
        The job.
    status
        ``done``, ``skipped`` (superseded; ``output["superseded_by"]`` is the newer
        version started in its place) or ``failed`` (bad input; see ``error``).
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
        How many times the job had been delivered when this outcome was recorded (for a
        job run in an older job's place: that older job's deliveries).
        0: it ran ahead of the stream (a group's artifact lane), before any delivery.
    promoted_from
        The id of the older job of the same kind key whose delivery ran this job ahead
        of its own stream entry; ``None`` when the job ran from its own entry.
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
    promoted_from: str | None = None

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
