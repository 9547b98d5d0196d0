"""What the federation service hands back: replies to devices, events, running counters.

The reply types are what :class:`~coordinator.service.FederationService` returns to the
servicer (which maps them to protobuf); :class:`ServiceObserver` is told about every
commit, cohort and upload (metrics, the simulator's log); :class:`ServiceCounters` are
this replica's running totals. Every part of the service shares one observer and one
set of counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from secure_agg import SessionConfig, Stage

__all__ = [
    "HeartbeatReply",
    "NoObserver",
    "PaceOffer",
    "SecAggReply",
    "ServiceCounters",
    "ServiceObserver",
    "TaskOffer",
    "UploadResult",
]


@dataclass(frozen=True)
class TaskOffer:
    """A training task, or a cohort task (the fields of ``edge_pb2.Task``).

    A training task has no ``cohort_id`` (empty) and no ``session``: the device trains
    and then reports it finished. A cohort task names the cohort, the member's index, the
    secure-aggregation session and ``trained_task_id``, the training task whose update
    it aggregates; its ``version`` is the one that update trained on.
    """

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
    session: SessionConfig | None
    identity_keys: tuple[bytes, ...] = ()
    """Active-adversary sessions: every member's Ed25519 identity public key, by index."""
    columns: tuple[int, ...] = ()
    """Columns of ``B`` the member trains (``training.column_rule``); empty: the first ``rank``."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (``training.warmup_steps``); 0: none."""
    trained_task_id: str = ""
    """A cohort task: the training task whose update it aggregates; empty otherwise."""

    @property
    def is_training(self) -> bool:
        """Whether this is a training task (no cohort yet)."""
        return not self.cohort_id


#: What a paced device waits for (:attr:`PaceOffer.mechanism`).
PaceMechanism = Literal["cohort_formation", "next_version", "pacing"]


@dataclass(frozen=True)
class PaceOffer:
    """Come back after ``retry_after_s`` seconds.

    ``mechanism`` says what the device waits for, for whoever accounts waiting time (the
    fleet simulator): ``"cohort_formation"`` (admitted, its cohort is not sealed yet),
    ``"next_version"`` (it already trained on the newest version and the next one is
    under way), ``"pacing"`` (deferred: the concurrency cap, no artifact yet, a class too
    slow for the deadline). The first two expect the device back after exactly
    ``retry_after_s``; a deferred device may come back later.
    """

    retry_after_s: float
    reason: str
    mechanism: PaceMechanism = "pacing"
    forming_cohort_id: str = ""
    """The forming cohort the device is a member of, waiting for it to be sealed; empty
    otherwise. The gRPC service may hold such a device's GetTask until the seal
    (``GetTaskRequest.wait_ms``)."""


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
        update_rejected, update_dropped (a buffered sum retired at a commit without being
        folded in), weight_assigned, member_abandoned, paced, upload, job_submitted.
        """


class NoObserver:
    """A :class:`ServiceObserver` that ignores every event."""

    def event(self, kind: str, **fields: Any) -> None:
        """Ignore the event."""


@dataclass
class ServiceCounters:
    """Running totals of this replica (exported as metrics)."""

    uploads: int = 0
    updates_accepted: int = 0
    updates_rejected: int = 0
    #: Accepted into the buffer, then retired at a commit without being folded in.
    updates_dropped: int = 0
    cohorts_completed: int = 0
    cohorts_aborted: int = 0
    staleness: dict[int, int] = field(default_factory=dict)
