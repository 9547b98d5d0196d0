"""Cohorts as typed records, with the JSON form they have in the store.

A cohort passes through three records, each a frozen dataclass with an explicit JSON
form (the one already in the store: the field names and value types are the stored
format, so records written before these classes existed read back unchanged):

- :class:`FormingCohort` at ``forming/<class>``: the cohort of a device class that is
  gathering devices. Admission adds to it with compare-and-set; **sealing marks it sealed
  with compare-and-set** (``sealed_at``), which is the one point where a cohort's
  membership becomes final (of two replicas sealing, one wins); the marker is deleted once
  the cohort record and the assignments are written.
- :class:`CohortRecord` at ``cohort/<id>``: a sealed cohort: members, the version and
  artifact it trains from, the secure-aggregation parameters, ``stage`` and
  ``stage_started`` (for deadlines), ``status`` (active / completed / aborted), the
  members that ``abandoned`` their task and, once finished, its outcome.
- :class:`Assignment` at ``assign/<device>``: the cohort task a device holds.
- :class:`TrainingTask` at ``training/<device>``: the training task a device holds before
  it joins a cohort (devices train first, then aggregate with devices that finished).

:class:`~coordinator.cohort_book.CohortBook` is the only code that reads or writes them.
Stored data that does not parse raises :class:`MalformedRecord` naming the key and the
field: a record edited by hand or written by an incompatible release is reported, never
half-read. Unknown fields are ignored, so a newer release may add one without breaking
this one (it is dropped when this release rewrites the record).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from secure_agg import FixedPoint, SessionConfig, Stage

__all__ = [
    "ArtifactRef",
    "Assignment",
    "CohortRecord",
    "CohortStatus",
    "FormingCohort",
    "MalformedRecord",
    "TrainingTask",
    "neighbours_for",
]

CohortStatus = Literal["active", "completed", "aborted"]
_STATUSES: tuple[CohortStatus, ...] = ("active", "completed", "aborted")

_T = TypeVar("_T")


class MalformedRecord(ValueError):
    """A stored cohort, forming or assignment record does not have the expected shape."""


# --------------------------------------------------------------------------- parsing


class _Fields:
    """Typed reads of one stored JSON object; every failure names the key and field."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise MalformedRecord(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self._obj: dict[str, Any] = obj
        self._where = where

    def _bad(self, name: str, expected: str, value: object) -> MalformedRecord:
        return MalformedRecord(f"{self._where}: field {name!r}: expected {expected}, got {value!r}")

    def _raw(self, name: str) -> Any:
        if name not in self._obj:
            raise MalformedRecord(f"{self._where}: field {name!r} is missing")
        return self._obj[name]

    def str_(self, name: str) -> str:
        value = self._raw(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string", value)
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._obj.get(name)
        if value is not None and not isinstance(value, str):
            raise self._bad(name, "a string or null", value)
        return value

    def int_(self, name: str) -> int:
        return self._as_int(name, self._raw(name))

    def opt_int(self, name: str) -> int | None:
        value = self._obj.get(name)
        return None if value is None else self._as_int(name, value)

    def _as_int(self, name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, "an integer", value)
        return value

    def float_(self, name: str) -> float:
        return self._as_float(name, self._raw(name))

    def opt_float(self, name: str) -> float | None:
        value = self._obj.get(name)
        return None if value is None else self._as_float(name, value)

    def _as_float(self, name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(name, "a number", value)
        return float(value)

    def list_of(self, name: str, kind: type[_T], *, default: list[_T] | None = None) -> list[_T]:
        value = self._obj.get(name, default) if default is not None else self._raw(name)
        if not isinstance(value, list) or not all(_is(item, kind) for item in value):
            raise self._bad(name, f"a list of {kind.__name__}", value)
        return value

    def opt_list_of(self, name: str, kind: type[_T]) -> list[_T] | None:
        return self.list_of(name, kind) if self._obj.get(name) is not None else None

    def bool_(self, name: str, *, default: bool) -> bool:
        value = self._obj.get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false", value)
        return value

    def hex_list(self, name: str) -> list[bytes]:
        """Read a list of hex strings (absent: empty) as bytes."""
        value = self._obj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._bad(name, "a list of hex strings", value)
        try:
            return [bytes.fromhex(item) for item in value]
        except ValueError:
            raise self._bad(name, "a list of hex strings", value) from None

    def obj(self, name: str) -> _Fields:
        return _Fields(self._raw(name), f"{self._where}: field {name!r}")


def _is(value: object, kind: type) -> bool:
    """``isinstance`` where a bool is not an int (JSON ``true`` is no member index)."""
    if kind is int and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _parse(raw: bytes, where: str) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRecord(f"{where}: not JSON: {exc}") from None


def _json(value: Mapping[str, Any]) -> bytes:
    # Sorted keys: the same record always serialises to the same bytes.
    return json.dumps(value, sort_keys=True).encode()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """The edge artifact a cohort trains from: blob digest and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class CohortRecord:
    """A sealed cohort as stored at ``cohort/<id>``.

    Attributes
    ----------
    cohort_id
        Unique id (32 hex characters); also the secure-aggregation session's cohort.
    device_class, rank
        The members' device class and its adapter rank.
    members
        Device ids; a member's position is its secure-aggregation index.
    version
        The oldest version a member's update trained on (all of them in records
        written before members trained first): a sum is dropped at commit by it.
    artifact
        The edge artifact of ``version`` for ``device_class``; empty (``sha256`` "") in
        cohorts of devices that trained first: they download nothing more.
    member_versions
        The version each member's update trained on, by member index; empty in records
        written before members trained first (every member then trained on ``version``).
    sealed_at, deadline_at
        Unix seconds: when membership became final, and the masked-upload deadline.
    threshold, bits, frac_bits, clip, neighbours, tensors
        Secure-aggregation parameters (see :meth:`CohortRecord.session_config`).
    active_adversary
        Whether the session runs in active-adversary mode (signed keys, consistency
        check). Records written before the mode existed read as ``False``: the passive
        sessions they described.
    identity_keys
        Active mode: each member's enrolled Ed25519 identity public key (raw 32 bytes), by
        member index, as the members had enrolled when the cohort was sealed; empty
        otherwise.
    stage
        The stage last noted by a tick (the log in :mod:`coordinator.cohort_log` is the
        truth; this copy dates ``stage_started`` and feeds the gauges).
    stage_started
        Unix seconds when ``stage`` was first noted: the start of its deadline.
    status
        ``active`` until a tick folds the cohort in: then ``completed`` or ``aborted``.
    abandoned
        Sorted member indices that gave up their task (asked for new work mid-task).
    finished_at
        Unix seconds of the fold-in; ``None`` while active.
    survivors, weight_total
        Completed cohorts: indices whose inputs are in the sum, and their ``Σ w``.
    abort_reason
        Aborted cohorts: why (``None`` when the protocol gave no reason).
    """

    cohort_id: str
    device_class: str
    rank: int
    members: tuple[str, ...]
    version: int
    artifact: ArtifactRef
    sealed_at: float
    deadline_at: float
    threshold: int
    bits: int
    frac_bits: int
    clip: float
    neighbours: int | None
    tensors: tuple[tuple[str, int], ...]
    stage: Stage
    stage_started: float
    active_adversary: bool = False
    identity_keys: tuple[bytes, ...] = ()
    status: CohortStatus = "active"
    abandoned: tuple[int, ...] = ()
    finished_at: float | None = None
    survivors: tuple[int, ...] | None = None
    weight_total: float | None = None
    abort_reason: str | None = None
    member_versions: tuple[int, ...] = ()

    # ------------------------------------------------------------------ reading

    @property
    def size(self) -> int:
        """Members invited (``n``)."""
        return len(self.members)

    @property
    def active(self) -> bool:
        """Whether the cohort is still under way (not yet folded in by a tick)."""
        return self.status == "active"

    def member_index(self, device_id: str) -> int | None:
        """Return the secure-aggregation index of ``device_id``, or None if not a member."""
        try:
            return self.members.index(device_id)
        except ValueError:
            return None

    def member_version(self, index: int) -> int:
        """Return the version member ``index``'s update trained on."""
        return self.member_versions[index] if self.member_versions else self.version

    def is_abandoned(self, index: int) -> bool:
        """Whether member ``index`` gave up its task."""
        return index in self.abandoned

    def task_id(self, index: int) -> str:
        """Return the task id of member ``index`` (``<cohort_id>-<index>``)."""
        return f"{self.cohort_id}-{index}"

    def session_config(self) -> SessionConfig:
        """Return the secure-aggregation parameters of this cohort."""
        return SessionConfig(
            cohort=self.cohort_id.encode(),
            cohort_size=self.size,
            threshold=self.threshold,
            tensors=self.tensors,
            fixed_point=FixedPoint(bits=self.bits, frac_bits=self.frac_bits, clip=self.clip),
            neighbours=self.neighbours,
            active=self.active_adversary,
        )

    def peer_identities(self) -> dict[int, Ed25519PublicKey] | None:
        """Return the members' identity keys by index (active mode), else None.

        Raises
        ------
        MalformedRecord
            If an active record does not hold one valid key per member.
        """
        if not self.active_adversary:
            return None
        if len(self.identity_keys) != self.size:
            raise MalformedRecord(
                f"cohort {self.cohort_id}: field 'identity_keys': expected one key per member "
                f"({self.size}), got {len(self.identity_keys)}"
            )
        out: dict[int, Ed25519PublicKey] = {}
        for index, key in enumerate(self.identity_keys):
            try:
                out[index] = Ed25519PublicKey.from_public_bytes(key)
            except ValueError:
                raise MalformedRecord(
                    f"cohort {self.cohort_id}: field 'identity_keys': entry {index} is not "
                    "an Ed25519 public key"
                ) from None
        return out

    # ------------------------------------------------------------------ changing

    def with_stage(self, stage: Stage, *, now: float) -> CohortRecord:
        """Return this record with ``stage`` noted as started at ``now``."""
        return replace(self, stage=stage, stage_started=now)

    def with_abandoned(self, index: int) -> CohortRecord:
        """Return this record with member ``index`` added to ``abandoned``."""
        return replace(self, abandoned=tuple(sorted({*self.abandoned, index})))

    def completed(
        self, *, stage: Stage, now: float, survivors: tuple[int, ...], weight_total: float
    ) -> CohortRecord:
        """Return this record finished with an unmasked sum of ``survivors``."""
        return replace(
            self,
            status="completed",
            stage=stage,
            finished_at=now,
            survivors=survivors,
            weight_total=weight_total,
        )

    def aborted(self, *, stage: Stage, now: float, reason: str | None) -> CohortRecord:
        """Return this record finished without a sum."""
        return replace(self, status="aborted", stage=stage, finished_at=now, abort_reason=reason)

    # ------------------------------------------------------------------ stored form

    def to_dict(self) -> dict[str, Any]:
        """Return the stored JSON object (outcome and active-mode fields only once set)."""
        value: dict[str, Any] = {
            "cohort_id": self.cohort_id,
            "device_class": self.device_class,
            "rank": self.rank,
            "members": list(self.members),
            "version": self.version,
            "artifact": {"sha256": self.artifact.sha256, "size": self.artifact.size},
            "sealed_at": self.sealed_at,
            "deadline_at": self.deadline_at,
            "threshold": self.threshold,
            "bits": self.bits,
            "frac_bits": self.frac_bits,
            "clip": self.clip,
            "neighbours": self.neighbours,
            "tensors": [[name, length] for name, length in self.tensors],
            "stage": self.stage.name,
            "stage_started": self.stage_started,
            "status": self.status,
            "abandoned": list(self.abandoned),
        }
        if self.member_versions:  # absent: every member trained on `version`
            value["member_versions"] = list(self.member_versions)
        if self.active_adversary:  # absent: passive, as in records written before the mode
            value["active_adversary"] = True
            value["identity_keys"] = [key.hex() for key in self.identity_keys]
        if self.finished_at is not None:
            value["finished_at"] = self.finished_at
        if self.survivors is not None:
            value["survivors"] = list(self.survivors)
        if self.weight_total is not None:
            value["weight_total"] = self.weight_total
        if self.status == "aborted":
            value["abort_reason"] = self.abort_reason
        return value

    def to_json(self) -> bytes:
        """Return the stored bytes (sorted-key JSON)."""
        return _json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: object, *, where: str = "cohort record") -> CohortRecord:
        """Parse a stored JSON object.

        Raises
        ------
        MalformedRecord
            A field is missing or of the wrong type; the message names it and ``where``.
        """
        f = _Fields(obj, where)
        artifact = f.obj("artifact")
        status = f.str_("status")
        if status not in _STATUSES:
            raise MalformedRecord(
                f"{where}: field 'status': expected one of {_STATUSES}, got {status!r}"
            )
        stage_name = f.str_("stage")
        if stage_name not in Stage.__members__:
            raise MalformedRecord(f"{where}: field 'stage': no stage named {stage_name!r}")
        tensors = f.list_of("tensors", list)
        if not all(len(t) == 2 and isinstance(t[0], str) and _is(t[1], int) for t in tensors):
            raise MalformedRecord(
                f"{where}: field 'tensors': expected [name, length] pairs, got {tensors!r}"
            )
        survivors = f.opt_list_of("survivors", int)
        members = tuple(f.list_of("members", str))
        member_versions = tuple(f.list_of("member_versions", int, default=[]))
        if member_versions and len(member_versions) != len(members):
            raise MalformedRecord(
                f"{where}: field 'member_versions': expected one per member ({len(members)}), "
                f"got {len(member_versions)}"
            )
        return cls(
            cohort_id=f.str_("cohort_id"),
            device_class=f.str_("device_class"),
            rank=f.int_("rank"),
            members=members,
            version=f.int_("version"),
            artifact=ArtifactRef(sha256=artifact.str_("sha256"), size=artifact.int_("size")),
            sealed_at=f.float_("sealed_at"),
            deadline_at=f.float_("deadline_at"),
            threshold=f.int_("threshold"),
            bits=f.int_("bits"),
            frac_bits=f.int_("frac_bits"),
            clip=f.float_("clip"),
            neighbours=f.opt_int("neighbours"),
            tensors=tuple((str(name), int(length)) for name, length in tensors),
            stage=Stage[stage_name],
            stage_started=f.float_("stage_started"),
            active_adversary=f.bool_("active_adversary", default=False),
            identity_keys=tuple(f.hex_list("identity_keys")),
            status=status,
            abandoned=tuple(f.list_of("abandoned", int, default=[])),
            finished_at=f.opt_float("finished_at"),
            survivors=None if survivors is None else tuple(survivors),
            weight_total=f.opt_float("weight_total"),
            abort_reason=f.opt_str("abort_reason"),
            member_versions=member_versions,
        )

    @classmethod
    def from_json(cls, raw: bytes, *, where: str = "cohort record") -> CohortRecord:
        """Parse stored bytes (see :meth:`from_dict`)."""
        return cls.from_dict(_parse(raw, where), where=where)


@dataclass(frozen=True, slots=True)
class FormingCohort:
    """A cohort gathering devices that have trained, stored at ``forming/<class>``.

    Attributes
    ----------
    cohort_id
        The id the cohort will keep once sealed.
    members
        Device ids in order of admission.
    versions
        The version each member's update trained on, in the order of ``members``; with
        ``tasks``, absent from records written before devices trained first (such a
        record's members never trained: it is discarded, not sealed).
    tasks
        The training task each member finished, in the order of ``members``.
    identity_keys
        Each member's Ed25519 identity public key (raw), in the order of ``members``; they
        become the sealed cohort's keys for active-adversary mode. A record written before
        keys were kept has none, and is sealed in passive mode.
    opened_at
        Unix seconds when the first device joined.
    full_at
        Unix seconds when it reached the minimum size; ``None`` before that.
    sealed_at
        Unix seconds when it was sealed; ``None`` while it forms. A sealed record is a
        marker: membership is final, and it stays until its cohort record and every
        member's assignment are written (whoever reads it next finishes that), so a
        coordinator that dies halfway through a seal loses no member's update.
    """

    cohort_id: str
    members: tuple[str, ...]
    opened_at: float
    full_at: float | None = None
    identity_keys: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ()
    sealed_at: float | None = None

    @property
    def trained(self) -> bool:
        """Whether every member's trained version and task are known (not an old record)."""
        n = len(self.members)
        return len(self.versions) == n and len(self.tasks) == n

    @property
    def has_identity_keys(self) -> bool:
        """Whether every member's identity key is known (active mode is possible)."""
        return len(self.identity_keys) == len(self.members)

    def joined(
        self,
        device_id: str,
        *,
        identity_key: bytes,
        version: int,
        task_id: str,
        min_size: int,
        now: float,
    ) -> FormingCohort:
        """Return this cohort with ``device_id`` and its identity key, version and task added.

        ``version``: the one its update trained on; ``task_id``: its training task.
        ``full_at`` is set when the cohort reaches ``min_size``.
        """
        members = (*self.members, device_id)
        keys = (*self.identity_keys, identity_key) if self.has_identity_keys else ()
        full_at = now if len(members) == min_size else self.full_at
        return replace(
            self,
            members=members,
            full_at=full_at,
            identity_keys=keys,
            versions=(*self.versions, version),
            tasks=(*self.tasks, task_id),
        )

    def without(self, indices: set[int], *, min_size: int) -> FormingCohort:
        """Return this cohort without the members at ``indices`` (their updates are out).

        ``full_at`` is kept while the cohort still has ``min_size`` members, else cleared.
        """
        keep = [i for i in range(len(self.members)) if i not in indices]

        def pick(values: tuple[_T, ...]) -> tuple[_T, ...]:
            return tuple(values[i] for i in keep) if values else ()

        return replace(
            self,
            members=pick(self.members),
            identity_keys=pick(self.identity_keys) if self.has_identity_keys else (),
            versions=pick(self.versions),
            tasks=pick(self.tasks),
            full_at=self.full_at if len(keep) >= min_size else None,
        )

    def to_json(self) -> bytes:
        """Return the stored bytes (``full_at`` and ``identity_keys`` only once set)."""
        value: dict[str, Any] = {
            "cohort_id": self.cohort_id,
            "members": list(self.members),
            "opened_at": self.opened_at,
        }
        if self.identity_keys:
            value["identity_keys"] = [key.hex() for key in self.identity_keys]
        if self.full_at is not None:
            value["full_at"] = self.full_at
        if self.versions or self.tasks:
            value["versions"] = list(self.versions)
            value["tasks"] = list(self.tasks)
        if self.sealed_at is not None:
            value["sealed_at"] = self.sealed_at
        return _json(value)

    @classmethod
    def from_json(cls, raw: bytes, *, where: str = "forming record") -> FormingCohort:
        """Parse stored bytes; :class:`MalformedRecord` names a bad field."""
        f = _Fields(_parse(raw, where), where)
        return cls(
            cohort_id=f.str_("cohort_id"),
            members=tuple(f.list_of("members", str)),
            opened_at=f.float_("opened_at"),
            full_at=f.opt_float("full_at"),
            identity_keys=tuple(f.hex_list("identity_keys")),
            versions=tuple(f.list_of("versions", int, default=[])),
            tasks=tuple(f.list_of("tasks", str, default=[])),
            sealed_at=f.opt_float("sealed_at"),
        )


@dataclass(frozen=True, slots=True)
class Assignment:
    """The cohort task a device holds, stored at ``assign/<device>``.

    ``trained_task_id``: the training task whose update the member aggregates (empty in
    records written before devices trained first).
    """

    cohort_id: str
    member_index: int
    task_id: str
    trained_task_id: str = ""

    def to_json(self) -> bytes:
        """Return the stored bytes."""
        value: dict[str, Any] = {
            "cohort_id": self.cohort_id,
            "member_index": self.member_index,
            "task_id": self.task_id,
        }
        if self.trained_task_id:  # absent in records from before devices trained first
            value["trained_task_id"] = self.trained_task_id
        return _json(value)

    @classmethod
    def from_json(cls, raw: bytes, *, where: str = "assignment") -> Assignment:
        """Parse stored bytes; :class:`MalformedRecord` names a bad field."""
        f = _Fields(_parse(raw, where), where)
        return cls(
            cohort_id=f.str_("cohort_id"),
            member_index=f.int_("member_index"),
            task_id=f.str_("task_id"),
            trained_task_id=f.opt_str("trained_task_id") or "",
        )


@dataclass(frozen=True, slots=True)
class TrainingTask:
    """The training task a device holds before it joins a cohort, at ``training/<device>``.

    Attributes
    ----------
    task_id
        Unique id; the device reports it finished with GetTask(trained_task_id).
    device_class
        The device's class when the task was given.
    version, artifact
        The version it trains from and that version's edge artifact for the class.
    column_seed
        The member number ``training.column_rule`` draws its columns with.
    started_at, deadline_at
        Unix seconds: when it was given, and by when it must be reported finished.
    """

    task_id: str
    device_class: str
    version: int
    artifact: ArtifactRef
    column_seed: int
    started_at: float
    deadline_at: float

    def to_json(self) -> bytes:
        """Return the stored bytes."""
        return _json(
            {
                "task_id": self.task_id,
                "device_class": self.device_class,
                "version": self.version,
                "artifact": {"sha256": self.artifact.sha256, "size": self.artifact.size},
                "column_seed": self.column_seed,
                "started_at": self.started_at,
                "deadline_at": self.deadline_at,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes, *, where: str = "training task") -> TrainingTask:
        """Parse stored bytes; :class:`MalformedRecord` names a bad field."""
        f = _Fields(_parse(raw, where), where)
        artifact = f.obj("artifact")
        return cls(
            task_id=f.str_("task_id"),
            device_class=f.str_("device_class"),
            version=f.int_("version"),
            artifact=ArtifactRef(sha256=artifact.str_("sha256"), size=artifact.int_("size")),
            column_seed=f.int_("column_seed"),
            started_at=f.float_("started_at"),
            deadline_at=f.float_("deadline_at"),
        )


def neighbours_for(n: int, wanted: int | None) -> int | None:
    """SecAgg+ k for a cohort of ``n``: None (complete graph) when k would reach n − 1."""
    if wanted is None:
        return None
    k = wanted - (wanted % 2)
    return None if k >= n - 1 else k
