"""A secure-aggregation cohort replicated through the state store by event sourcing.

The :class:`secure_agg.Server` state machine is deterministic: its state is a function
of the ordered events it was given (client messages, deadlines, assigned weights). So
the durable state of a cohort is simply that ordered list, kept in the store as
``cohort-log/<cohort_id>/<seq>`` records created with insert-if-absent:

- **Append** claims the next sequence number; if another replica claimed it first the
  append catches up and retries, so the log is one total order shared by every replica.
- **Any replica** rebuilds the server by replaying the log (and keeps it cached,
  applying only new events afterwards), so a replica can die at any moment and another
  serves the same devices with the same state.
- **Durability**: an event is acknowledged to the device only after its record is in
  the store, so an acknowledged masked input survives the replica that took it.
- **Outcomes are replicated too**: a message the server refuses is refused identically
  on every replica, since every replica applies the same events in the same order.
- **Outgoing messages** (key broadcast, share relays, unmask requests) are derived
  state: every replica computes the same mailbox per recipient, so nothing extra is
  stored and a device may poll any replica.

Deadline events carry the stage they close and are ignored if the cohort has moved on,
so several replicas noticing the same deadline close the stage once.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from estuary.state.base import Store
from secure_agg import Server, Stage
from secure_agg.errors import CohortAborted, ProtocolViolation

log = logging.getLogger(__name__)

LOG_PREFIX = "cohort-log/"

#: Event kinds: one byte on the wire.
MESSAGE, DEADLINE, WEIGHT = 1, 2, 3

#: ``kind (u8) | client (u32) | stage (u8) | weight (f64) | payload`` — fixed header
#: followed by the raw secure-aggregation message bytes (already length-delimited by
#: the record itself).
_HEADER = struct.Struct(">BIBd")

#: Appends retried at most this many times when other replicas keep winning the race
#: for the next sequence number; each retry first applies the events that won, so this
#: only runs out under a pathological flood, which then surfaces as an error.
MAX_APPEND_ATTEMPTS = 64


@dataclass(frozen=True)
class CohortEvent:
    """One input of the cohort's state machine."""

    kind: int
    client: int = 0
    stage: int = 0
    weight: float = 0.0
    payload: bytes = b""

    def encode(self) -> bytes:
        """Return the stored bytes of this event."""
        return _HEADER.pack(self.kind, self.client, self.stage, self.weight) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> CohortEvent:
        """Parse stored bytes; ``ValueError`` if they are not an event."""
        if len(data) < _HEADER.size:
            raise ValueError("cohort event: record shorter than its header")
        kind, client, stage, weight = _HEADER.unpack_from(data)
        if kind not in (MESSAGE, DEADLINE, WEIGHT):
            raise ValueError(f"cohort event: unknown kind {kind}")
        return cls(kind, client, stage, weight, data[_HEADER.size :])


@dataclass(frozen=True)
class Outcome:
    """What applying one event did: ``error`` is ``None`` when it was accepted."""

    seq: int
    error: str | None = None
    error_type: str | None = None
    duplicate: bool = False


@dataclass
class _Replica:
    server: Server
    applied: int = 0
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    mailbox: dict[int, list[tuple[Stage, bytes]]] = field(default_factory=dict)
    abort_reason: str | None = None
    seen: dict[tuple[int, bytes], int] = field(default_factory=dict)


def _log_key(cohort_id: str, seq: int) -> str:
    return f"{LOG_PREFIX}{cohort_id}/{seq:08d}"


class ReplicatedCohort:
    """One replica's view of a cohort, kept in step with the log in the store.

    Parameters
    ----------
    store
        The shared state store.
    cohort_id
        The cohort's id (no ``/``).
    make_server
        Builds a fresh :class:`secure_agg.Server` with the cohort's fixed parameters;
        called once, and again never (the server is rebuilt only by replay).
    """

    def __init__(self, store: Store, cohort_id: str, *, make_server: Callable[[], Server]) -> None:
        if not cohort_id or "/" in cohort_id:
            raise ValueError(f"cohort_id: must be non-empty without '/', got {cohort_id!r}")
        self._store = store
        self.cohort_id = cohort_id
        self._lock = threading.Lock()
        self._replica = _Replica(server=make_server())

    # ------------------------------------------------------------------ replay

    def _apply(self, seq: int, event: CohortEvent) -> None:
        r = self._replica
        server = r.server
        outcome = Outcome(seq)
        try:
            if event.kind == MESSAGE:
                r.seen.setdefault((event.client, hashlib.sha256(event.payload).digest()), seq)
                server.handle(event.client, event.payload)
            elif event.kind == DEADLINE:
                if server.stage == Stage(event.stage):
                    server.deadline()
            elif server.weight_of(event.client) is None:
                # First weight wins: the device was told that one, and replicas racing to
                # assign a weight must not change it afterwards.
                server.assign_weight(event.client, event.weight)
        except (ProtocolViolation, CohortAborted, ValueError) as exc:
            outcome = Outcome(seq, str(exc), type(exc).__name__)
        if server.stage is Stage.ABORTED and r.abort_reason is None:
            r.abort_reason = outcome.error or "aborted"
        for recipient, data in server.drain_encoded():
            r.mailbox.setdefault(recipient, []).append((server.stage, data))
        r.outcomes[seq] = outcome
        r.applied = seq

    def _catch_up(self) -> None:
        while True:
            seq = self._replica.applied + 1
            record = self._store.get(_log_key(self.cohort_id, seq))
            if record is None:
                return
            self._apply(seq, CohortEvent.decode(record.value))

    def sync(self) -> None:
        """Apply every event appended (by any replica) since the last call."""
        with self._lock:
            self._catch_up()

    # ------------------------------------------------------------------ appending

    def append(self, event: CohortEvent) -> Outcome:
        """Make ``event`` durable as the next event of the log, apply it, return its outcome.

        Raises
        ------
        RuntimeError
            If other replicas won the race for the next slot ``MAX_APPEND_ATTEMPTS``
            times in a row.
        """
        data = event.encode()
        with self._lock:
            for _ in range(MAX_APPEND_ATTEMPTS):
                self._catch_up()
                seq = self._replica.applied + 1
                if self._store.insert_if_absent(_log_key(self.cohort_id, seq), data):
                    self._apply(seq, event)
                    return self._replica.outcomes[seq]
            raise RuntimeError(
                f"cohort {self.cohort_id}: lost the append race {MAX_APPEND_ATTEMPTS} times"
            )

    def submit_message(self, client: int, payload: bytes) -> Outcome:
        """Append a client's stage message (the caller has authenticated ``client``).

        A byte-identical message the client already sent (a transport retry, or a
        device resending after a lost acknowledgement) is not appended again: the
        original's outcome is returned with ``duplicate=True``. Only a *different*
        second message reaches the server, which treats it as the protocol violation
        it is.
        """
        digest = hashlib.sha256(payload).digest()
        with self._lock:
            self._catch_up()
            original = self._replica.seen.get((client, digest))
            if original is not None:
                return replace(self._replica.outcomes[original], duplicate=True)
        return self.append(CohortEvent(MESSAGE, client=client, payload=payload))

    def assign_weight(self, client: int, weight: float) -> Outcome:
        """Append the staleness weight given to ``client`` (before its masked input).

        Only the first weight appended for a client takes effect, on every replica.
        """
        return self.append(CohortEvent(WEIGHT, client=client, weight=weight))

    def close_stage_if(self, stage: Stage) -> Outcome | None:
        """Append a deadline for ``stage``; ``None`` if the cohort already left it."""
        with self._lock:
            self._catch_up()
            if self._replica.server.stage != stage:
                return None
        return self.append(CohortEvent(DEADLINE, stage=int(stage)))

    # ------------------------------------------------------------------ reading

    @property
    def stage(self) -> Stage:
        """The cohort's stage as of the last sync."""
        return self._replica.server.stage

    @property
    def abort_reason(self) -> str | None:
        """Why the cohort aborted, or ``None``."""
        return self._replica.abort_reason

    @property
    def server(self) -> Server:
        """The replayed server (read its ``result`` once the stage is COMPLETED)."""
        return self._replica.server

    def messages_for(self, client: int, *, after: Stage) -> list[tuple[Stage, bytes]]:
        """Return the messages for ``client`` that belong to stages later than ``after``."""
        with self._lock:
            self._catch_up()
            return [(s, m) for s, m in self._replica.mailbox.get(client, []) if s > after]

    def events(self) -> int:
        """Return how many events this replica has applied."""
        return self._replica.applied
