"""What ``estuary status`` knows about a run: the store's records, read and summarised.

:func:`collect_records` reads every record family ``estuary status`` shows (the layout is
in :mod:`estuary.state.keys`) as JSON objects; :func:`build_report` turns them into a
:class:`StatusReport` of typed rows: versions with their held-out score, device classes
with the devices waiting against ``min_size``, cohorts by stage, workers and how far
evaluation lags behind the head. Both are pure reads, and :func:`build_report` is a
function of the records and ``now`` only, so a test gives it records and a time.

Records are written by other roles (and possibly by other releases), so a field that is
missing or of the wrong type does not stop the report: the row shows it as unknown and
the report's ``problems`` names the key and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from estuary.federation import FEDERATION_KEY, FederationRecord, MalformedFederationRecord
from estuary.state.base import Store
from estuary.state.errors import StoreError, StoreUnavailable
from estuary.state.keys import (
    COHORT_PREFIX,
    DEVICE_PREFIX,
    FORMING_PREFIX,
    HEAD_KEY,
    NONCE_PREFIX,
    VERSION_PREFIX,
    WORKER_PREFIX,
)
from secure_agg import Stage

__all__ = [
    "SECTIONS",
    "ClassRow",
    "CohortRow",
    "DeviceRow",
    "StatusReport",
    "VersionRow",
    "WorkerRow",
    "build_report",
    "collect_records",
]

#: Record families listed in full under ``--format json``: section name → key prefix.
SECTIONS = {
    "versions": VERSION_PREFIX,
    "cohorts": COHORT_PREFIX,
    "workers": WORKER_PREFIX,
    "devices": DEVICE_PREFIX,
    "forming": FORMING_PREFIX,
}

#: A stage name in a cohort record, in protocol order (unknown names sort last).
_STAGE_ORDER = {stage.name: int(stage) for stage in Stage}


def _decode(key: str, prefix: str, value: bytes) -> dict[str, Any]:
    ident = key[len(prefix) :]
    try:
        obj = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"id": ident, "error": "record is not JSON"}
    if not isinstance(obj, dict):
        return {"id": ident, "error": "record is not a JSON object"}
    return {"id": ident, **obj}


def collect_records(store: Store) -> dict[str, Any]:
    """Return the store's records for ``estuary status``, each section sorted by id.

    Keys: ``state`` (the store's redacted URL), one list per :data:`SECTIONS` entry (each
    record a JSON object with its ``id`` added, or ``{"id", "error"}`` when it is not a
    JSON object), ``head`` and ``federation`` (the object, or None when absent), and
    ``store_size``: ``{"keys", "bytes"}`` of :meth:`~estuary.state.base.Store.footprint`
    (on Redis the whole database: ``DBSIZE`` and ``used_memory``).
    """
    size: dict[str, Any]
    try:
        footprint = store.footprint()
        size = {"keys": footprint.keys, "bytes": footprint.bytes}
    except StoreUnavailable:
        raise
    except StoreError as exc:  # e.g. a Redis user not allowed INFO or DBSIZE
        size = {"error": str(exc)}
    result: dict[str, Any] = {"state": store.url, "store_size": size}
    for section, prefix in SECTIONS.items():
        records = store.scan(prefix)
        result[section] = [_decode(key, prefix, rec.value) for key, rec in sorted(records.items())]
    # When each device last made a signed request: the newest nonce it used (one
    # pipelined read); a device record only says when the device enrolled.
    devices = result["devices"]
    newest = store.zmax_many([NONCE_PREFIX + d["id"] for d in devices])
    for device, ms in zip(devices, newest, strict=True):
        if ms is not None and "error" not in device:
            device["last_request_at"] = ms / 1000.0
    for name, key in (("head", HEAD_KEY), ("federation", FEDERATION_KEY)):
        rec = store.get(key)
        if rec is None:
            result[name] = None
        else:
            obj = _decode(key, key, rec.value)
            obj.pop("id")
            result[name] = obj
    return result


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class VersionRow:
    """A committed version (``version/<n>``); None where the record does not say."""

    version: int
    committed_at: float | None
    updates: int | None
    eval_bpb: float | None
    eval_at: float | None
    adapter_sha256: str | None


@dataclass(frozen=True, slots=True)
class ClassRow:
    """A device class: devices enrolled, waiting in its forming cohort, and needed.

    ``min_size`` is None when no coordinator has published its settings; ``rank`` too,
    or when the class is not among the published ones (devices enrolled under an older
    configuration). ``forming_since`` is when the first waiting device joined.
    """

    name: str
    rank: int | None
    enrolled: int
    revoked: int
    waiting: int
    min_size: int | None
    forming_since: float | None


@dataclass(frozen=True, slots=True)
class CohortRow:
    """A sealed cohort (``cohort/<id>``).

    ``stage`` is the stored stage name (e.g. ``MASKED_INPUT``); ``status`` is
    ``active``, ``completed`` or ``aborted``.
    """

    cohort_id: str
    device_class: str | None
    version: int | None
    stage: str | None
    status: str
    size: int | None
    survivors: int | None
    sealed_at: float | None
    abort_reason: str | None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker group's last heartbeat (``worker/<group>``).

    ``last_lag_s`` is the commit → result time of the group's last job;
    ``last_eval_version`` the version it last evaluated.
    """

    group: str
    last_seen: float | None
    jobs_done: int | None
    jobs_skipped: int | None
    jobs_failed: int | None
    throughput_per_min: float | None
    last_lag_s: float | None
    last_eval_version: int | None
    current_job: str | None
    stages: int | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """An enrolled device (``device/<id>``)."""

    device_id: str
    device_class: str | None
    enrolled_at: float | None
    last_seen: float | None
    revoked: bool | None


@dataclass(frozen=True)
class StatusReport:
    """Everything ``estuary status`` shows, typed; built by :func:`build_report`.

    Attributes
    ----------
    state
        The store's URL, password redacted.
    now
        Unix seconds the report was made at: ages are measured from it.
    head_version
        The announced version, or None before the coordinator first started.
    federation
        The coordinator's published settings, or None when absent or malformed.
    versions, classes, cohorts, workers, devices
        One row per record; versions oldest first, classes in configuration order
        (unpublished ones after, by name), the others by id.
    problems
        One line per record or field that could not be read.
    store_keys, store_bytes
        Keys the state store holds and about how many bytes they take (None: not read).
    """

    state: str
    now: float
    head_version: int | None
    federation: FederationRecord | None
    versions: tuple[VersionRow, ...]
    classes: tuple[ClassRow, ...]
    cohorts: tuple[CohortRow, ...]
    workers: tuple[WorkerRow, ...]
    devices: tuple[DeviceRow, ...]
    problems: tuple[str, ...]
    store_keys: int | None = None
    store_bytes: int | None = None

    def active_by_stage(self) -> dict[str, int]:
        """Return active cohorts per stage name, in protocol order (empty stages left out)."""
        counts: dict[str, int] = {}
        for row in self.cohorts:
            if row.status == "active":
                stage = row.stage or "unknown"
                counts[stage] = counts.get(stage, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (_STAGE_ORDER.get(kv[0], 99), kv[0])))

    def finished(self, status: str) -> int:
        """Return how many cohorts' records say ``status`` (``completed`` or ``aborted``)."""
        return sum(1 for row in self.cohorts if row.status == status)

    def newest_scored(self) -> VersionRow | None:
        """Return the newest version with a held-out score, or None."""
        scored = [v for v in self.versions if v.eval_bpb is not None]
        return scored[-1] if scored else None

    def evaluation_lag(self) -> int | None:
        """Return versions between the head and the newest scored one (None: either unknown)."""
        scored = self.newest_scored()
        if self.head_version is None or scored is None:
            return None
        return self.head_version - scored.version

    def summary(self) -> dict[str, Any]:
        """Return the summary as JSON: what the text view shows, with Unix-second times."""
        scored = self.newest_scored()
        return {
            "now": self.now,
            "head_version": self.head_version,
            "classes": [asdict(row) for row in self.classes],
            "cohorts": {
                "active_by_stage": self.active_by_stage(),
                "completed": self.finished("completed"),
                "aborted": self.finished("aborted"),
            },
            "devices": {
                "enrolled": sum(1 for d in self.devices if not d.revoked),
                "revoked": sum(1 for d in self.devices if d.revoked),
            },
            "lag": {
                "newest_scored_version": None if scored is None else scored.version,
                "evaluation_versions_behind": self.evaluation_lag(),
                "worker_job_lag_s": {w.group: w.last_lag_s for w in self.workers},
            },
            "store": {"keys": self.store_keys, "bytes": self.store_bytes},
            "problems": list(self.problems),
        }


# --------------------------------------------------------------------------- reading


class _Reader:
    """Typed, tolerant reads of one record: a bad field is None plus a problem line."""

    def __init__(self, record: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self._record = record
        self._where = where
        self._problems = problems

    def _bad(self, name: str, expected: str) -> None:
        value = self._record[name]
        self._problems.append(f"{self._where}: field {name!r}: expected {expected}, got {value!r}")

    def int_(self, name: str) -> int | None:
        value = self._record.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self._bad(name, "an integer")
            return None
        return value

    def float_(self, name: str) -> float | None:
        value = self._record.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._bad(name, "a number")
            return None
        return float(value)

    def str_(self, name: str) -> str | None:
        value = self._record.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self._bad(name, "a string")
            return None
        return value

    def bool_(self, name: str) -> bool | None:
        value = self._record.get(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            self._bad(name, "true or false")
            return None
        return value

    def count(self, name: str) -> int | None:
        """Return a list's length, or an integer count."""
        value = self._record.get(name)
        if isinstance(value, list):
            return len(value)
        return self.int_(name)


def _unreadable(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is :func:`_decode`'s stand-in for a record that is not JSON."""
    return set(record) <= {"id", "error"} and "error" in record


def _readable(
    records: list[dict[str, Any]], prefix: str, problems: list[str]
) -> list[tuple[str, _Reader]]:
    """Return ``(id, reader)`` per record, noting records that are not JSON objects."""
    out = []
    for record in records:
        ident = str(record.get("id"))
        if _unreadable(record):
            problems.append(f"{prefix}{ident}: {record['error']}")
            continue
        out.append((ident, _Reader(record, f"{prefix}{ident}", problems)))
    return out


def _last_seen(recorded: float | None, last_request: float | None, *, now: float) -> float | None:
    """Return the newer of a device record's ``last_seen`` and its newest request's timestamp.

    The timestamp is the device's clock (within the coordinator's allowed skew): one
    ahead of ``now`` reads as ``now``.
    """
    if last_request is None:
        return recorded
    seen = min(last_request, now)
    return seen if recorded is None else max(recorded, seen)


def build_report(records: Mapping[str, Any], *, now: float) -> StatusReport:
    """Summarise what :func:`collect_records` returned, with ages measured from ``now``."""
    problems: list[str] = []
    federation = None
    published = records.get("federation")
    if published is not None and _unreadable(published):
        problems.append(f"{FEDERATION_KEY}: {published['error']}")
    elif published is not None:
        try:
            federation = FederationRecord.from_dict(published)
        except MalformedFederationRecord as exc:
            problems.append(str(exc))
    head_version = None
    head = records.get("head")
    if head is not None and _unreadable(head):
        problems.append(f"{HEAD_KEY}: {head['error']}")
    elif head is not None:
        head_version = _Reader(head, HEAD_KEY, problems).int_("version")

    versions = []
    for ident, r in _readable(records.get("versions", []), VERSION_PREFIX, problems):
        number = r.int_("version")
        if number is None and ident.isdigit():
            number = int(ident)
        if number is None:
            problems.append(f"{VERSION_PREFIX}{ident}: no version number")
            continue
        versions.append(
            VersionRow(
                version=number,
                committed_at=r.float_("committed_at"),
                updates=r.int_("updates"),
                eval_bpb=r.float_("eval_bpb"),
                eval_at=r.float_("eval_at"),
                adapter_sha256=r.str_("adapter_sha256"),
            )
        )
    versions.sort(key=lambda v: v.version)

    devices = [
        DeviceRow(
            device_id=ident,
            device_class=r.str_("device_class"),
            enrolled_at=r.float_("enrolled_at"),
            last_seen=_last_seen(r.float_("last_seen"), r.float_("last_request_at"), now=now),
            revoked=r.bool_("revoked"),
        )
        for ident, r in _readable(records.get("devices", []), DEVICE_PREFIX, problems)
    ]

    waiting: dict[str, tuple[int, float | None]] = {}
    for ident, r in _readable(records.get("forming", []), FORMING_PREFIX, problems):
        waiting[ident] = (r.count("members") or 0, r.float_("opened_at"))

    cohorts = []
    for ident, r in _readable(records.get("cohorts", []), COHORT_PREFIX, problems):
        stage = r.str_("stage")
        status = r.str_("status")
        if status is None:
            # Records without a status (older writers): a finished stage says it.
            finished = {"COMPLETED": "completed", "ABORTED": "aborted"}
            status = finished.get((stage or "").upper(), "active")
        survivors = r.count("survivors")
        cohorts.append(
            CohortRow(
                cohort_id=ident,
                device_class=r.str_("device_class"),
                version=r.int_("version"),
                stage=None if stage is None else stage.upper(),
                status=status,
                size=r.count("members"),
                survivors=survivors,
                sealed_at=r.float_("sealed_at"),
                abort_reason=r.str_("abort_reason"),
            )
        )

    workers = [
        WorkerRow(
            group=ident,
            last_seen=r.float_("last_seen"),
            jobs_done=r.int_("jobs_done"),
            jobs_skipped=r.int_("jobs_skipped"),
            jobs_failed=r.int_("jobs_failed"),
            throughput_per_min=r.float_("throughput_per_min"),
            last_lag_s=r.float_("last_lag_s"),
            last_eval_version=r.int_("last_eval_version"),
            current_job=r.str_("current_job"),
            stages=r.int_("stages"),
        )
        for ident, r in _readable(records.get("workers", []), WORKER_PREFIX, problems)
    ]

    size = records.get("store_size")
    if not isinstance(size, Mapping):
        size = {}
    if "error" in size:
        problems.append(f"store size: {size['error']}")
    sized = _Reader(size, "store size", problems)
    return StatusReport(
        store_keys=sized.int_("keys"),
        store_bytes=sized.int_("bytes"),
        state=str(records.get("state", "")),
        now=now,
        head_version=head_version,
        federation=federation,
        versions=tuple(versions),
        classes=_classes(federation, devices, waiting),
        cohorts=tuple(cohorts),
        workers=tuple(workers),
        devices=tuple(devices),
        problems=tuple(problems),
    )


def _classes(
    federation: FederationRecord | None,
    devices: list[DeviceRow],
    waiting: Mapping[str, tuple[int, float | None]],
) -> tuple[ClassRow, ...]:
    """One row per published class, then per class only devices or forming cohorts name."""
    ranks: dict[str, int | None] = {}
    if federation is not None:
        ranks.update((c.name, c.rank) for c in federation.device_classes)
    seen = {d.device_class for d in devices if d.device_class is not None} | set(waiting)
    for name in sorted(seen - set(ranks)):
        ranks[name] = None
    rows = []
    for name, rank in ranks.items():
        members = [d for d in devices if d.device_class == name]
        count, since = waiting.get(name, (0, None))
        rows.append(
            ClassRow(
                name=name,
                rank=rank,
                enrolled=sum(1 for d in members if not d.revoked),
                revoked=sum(1 for d in members if d.revoked),
                waiting=count,
                min_size=None if federation is None else federation.min_size,
                forming_since=since,
            )
        )
    return tuple(rows)
