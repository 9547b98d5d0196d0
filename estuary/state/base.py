"""The state store interface: what coordinators and workers may rely on.

Every method's docstring states its guarantee in MUST language; both
implementations (:class:`~estuary.state.memory.MemoryStore` and
:class:`~estuary.state.redis_store.RedisStore`) are held to it by one contract
suite (``tests/contract/test_store_contract.py``).

Conventions shared by all methods:

- Keys, queue names, set names, stream names, group and consumer names are
  non-empty ``str``; values and payloads are ``bytes``. Invalid arguments raise
  ``ValueError`` naming the parameter (never a :class:`StoreError`), so a bug is
  never retried as if it were an outage.
- A backend that cannot be reached raises :class:`StoreUnavailable` after a
  bounded retry; no method blocks longer than its documented bound.
- Record versions start at 1 on creation and grow by exactly 1 per write. A
  deleted record is gone: a later write creates it again at version 1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Job",
    "Lease",
    "PendingJob",
    "Record",
    "Store",
    "check_bytes",
    "check_count",
    "check_fields",
    "check_name",
    "check_score",
    "check_seconds",
    "check_stream_ids",
]


@dataclass(frozen=True)
class Record:
    """A value and its version.

    Attributes
    ----------
    value
        The stored bytes.
    version
        1 after creation, +1 per write since.
    """

    value: bytes
    version: int


@dataclass(frozen=True)
class Lease:
    """Proof of holding a named lease, carrying its fencing token.

    Attributes
    ----------
    name
        The lease's name (for example ``"aggregator"``).
    holder
        Who acquired it (a replica id); informational, not secret.
    token
        Fencing token: strictly greater than every token issued before for this
        name, including across expiry and store restarts.
    expires_at
        Expiry in seconds since the epoch *on the store's clock* (Redis server
        time, or the MemoryStore's clock). Holders should renew well before
        ``ttl_s`` has passed on their own monotonic clock rather than compare
        this with their wall clock.
    """

    name: str
    holder: str
    token: int
    expires_at: float


@dataclass(frozen=True)
class Job:
    """One entry of a job stream, as delivered to a consumer.

    Attributes
    ----------
    stream
        The stream it came from.
    id
        The stream entry id (``"<ms>-<seq>"``), strictly increasing in a stream.
    fields
        The job's fields.
    deliveries
        How many times it has been delivered in its group, this delivery
        included (1 on first delivery).
    """

    stream: str
    id: str
    fields: dict[str, bytes]
    deliveries: int


@dataclass(frozen=True)
class PendingJob:
    """A job delivered in a group and not yet acknowledged.

    Attributes
    ----------
    id
        The stream entry id.
    consumer
        The consumer it is pending on.
    idle_s
        Seconds since it was last delivered.
    deliveries
        How many times it has been delivered.
    """

    id: str
    consumer: str
    idle_s: float
    deliveries: int


def check_name(value: str, *, parameter: str) -> str:
    """Return ``value`` if it is a non-empty ``str``, else raise ``ValueError`` naming it.

    Parameters
    ----------
    value
        The key or name to check.
    parameter
        The parameter's name, for the error message.

    Returns
    -------
    str
        ``value`` unchanged.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{parameter} must be a non-empty str, got {value!r}")
    return value


def check_bytes(value: bytes, *, parameter: str) -> bytes:
    """Return ``value`` if it is ``bytes``, else raise ``ValueError`` naming the parameter."""
    if not isinstance(value, bytes):
        raise ValueError(f"{parameter} must be bytes, got {type(value).__name__}")
    return value


def check_count(value: int, *, parameter: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` ≥ ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{parameter} must be an int >= {minimum}, got {value!r}")
    return value


def check_score(value: float, *, parameter: str) -> float:
    """Return ``value`` as a float if it is a number and not NaN (±inf allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{parameter} must be a number and not NaN, got {value!r}")
    return float(value)


def check_seconds(value: float, *, parameter: str, allow_zero: bool) -> float:
    """Return ``value`` as a float if it is a finite duration (> 0, or ≥ 0 if allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{parameter} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{parameter} must be {bound} seconds, got {value!r}")
    return float(value)


def check_stream_ids(ids: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``ids`` if there is at least one and each is a ``"<ms>-<seq>"`` stream id."""
    if not ids:
        raise ValueError("ids must name at least one job")
    for entry_id in ids:
        ms, sep, seq = entry_id.partition("-") if isinstance(entry_id, str) else ("", "", "")
        if not (sep and ms.isdigit() and seq.isdigit()):
            raise ValueError(f"ids must be stream ids like '1700000000000-0', got {entry_id!r}")
    return ids


def check_fields(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    """Return a copy of a job's fields after checking names and values."""
    if not fields:
        raise ValueError("fields must hold at least one field")
    out: dict[str, bytes] = {}
    for name, value in fields.items():
        check_name(name, parameter="fields key")
        out[name] = check_bytes(value, parameter=f"fields[{name!r}]")
    return out


class Store(ABC):
    """Abstract state store: records, leases, queues, sorted sets and job streams.

    Implementations MUST be safe to call from several threads at once. All
    guarantees below hold across every client of the same backing store
    (every process connected to the same Redis, or every user of the same
    MemoryStore object).
    """

    # ------------------------------------------------------------------ lifecycle

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL with any password redacted; safe to log and print."""

    @abstractmethod
    def ping(self) -> None:
        """Check the backend answers.

        MUST return ``None`` when the backend is reachable and MUST raise
        :class:`StoreUnavailable` (after the bounded retry) when it is not.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections. MUST be idempotent. Data MUST NOT be affected."""

    # ------------------------------------------------------------------ records

    @abstractmethod
    def get(self, key: str) -> Record | None:
        """Return the record at ``key``, or ``None`` if there is none.

        The value and version returned MUST belong to the same write.
        """

    @abstractmethod
    def put(self, key: str, value: bytes) -> int:
        """Write ``value`` unconditionally and return the new version.

        The new version MUST be 1 if the key did not exist, else the previous
        version + 1.
        """

    @abstractmethod
    def compare_and_set(self, key: str, value: bytes, *, expected_version: int) -> int:
        """Write ``value`` only if the record is at ``expected_version``.

        ``expected_version=0`` means the key MUST NOT exist. The check and the
        write MUST be atomic: of several concurrent calls with the same expected
        version, at most one succeeds. Returns the new version
        (``expected_version + 1``).

        Raises
        ------
        VersionConflict
            The record's version is not ``expected_version``; nothing was written.
        """

    @abstractmethod
    def insert_if_absent(self, key: str, value: bytes) -> bool:
        """Create the record at version 1 if ``key`` does not exist.

        MUST return ``True`` if this call created it and ``False`` (writing
        nothing) if it existed. Of several concurrent calls for one key,
        exactly one MUST return ``True``. Use it for idempotency keys.
        """

    @abstractmethod
    def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete the record at ``key``.

        Without ``expected_version`` MUST return ``True`` if a record was
        deleted and ``False`` if there was none. With ``expected_version``
        (≥ 1) the check and the delete MUST be atomic.

        Raises
        ------
        VersionConflict
            ``expected_version`` was given and the record (version 0 if absent)
            is at another version; nothing was deleted.
        """

    @abstractmethod
    def scan(self, prefix: str) -> dict[str, Record]:
        """Return every record whose key starts with ``prefix`` (``""``: all).

        Each returned record MUST be a consistent (value, version) pair. The
        result as a whole is not a snapshot on every backend: a record written
        or deleted while the scan runs may or may not appear. Records that
        existed, unchanged, for the whole call MUST appear.
        """

    # ------------------------------------------------------------------ leases

    @abstractmethod
    def acquire_lease(self, name: str, *, holder: str, ttl_s: float) -> Lease | None:
        """Acquire lease ``name`` for ``ttl_s`` seconds if nobody holds it.

        MUST return ``None`` while a live (unexpired, unreleased) lease exists,
        whoever holds it, the same holder included (use :meth:`renew_lease`).
        On success the token MUST be strictly greater than every token issued
        for ``name`` before, forever: across expiry, release and store restart.
        """

    @abstractmethod
    def renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Extend a live lease to expire ``ttl_s`` seconds from now; same token.

        Raises
        ------
        LeaseLost
            The lease has expired, was released, or another token is current.
            A holder that sees this MUST stop the work the lease guarded.
        """

    @abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """Release ``lease`` if it is still the current one.

        MUST NOT remove a lease acquired by someone else since (a newer token);
        releasing a lost or already released lease is a no-op.
        """

    @abstractmethod
    def fenced_put(self, key: str, value: bytes, *, lease: Lease) -> int:
        """Write like :meth:`put`, only if ``lease`` is current; return the new version.

        The check and the write MUST be atomic: the write MUST be refused when
        ``lease.token`` is older than the newest token issued for
        ``lease.name`` or when the lease has expired or been released.

        Raises
        ------
        FencingError
            The lease is superseded or expired; nothing was written.
        """

    @abstractmethod
    def fenced_compare_and_set(
        self, key: str, value: bytes, *, lease: Lease, expected_version: int
    ) -> int:
        """Write like :meth:`compare_and_set`, only if ``lease`` is current.

        Fencing is checked first, then the version, then the write, all atomic.

        Raises
        ------
        FencingError
            The lease is superseded or expired; nothing was written.
        VersionConflict
            The lease is current but the version differs; nothing was written.
        """

    # ------------------------------------------------------------------ queues

    @abstractmethod
    def push_message(self, recipient: str, payload: bytes) -> int:
        """Append ``payload`` to ``recipient``'s queue; return the queue's new length.

        Once this returns, the message MUST be durable to the backend's
        guarantee (fsynced for Redis with ``appendfsync always``).
        """

    @abstractmethod
    def pop_messages(self, recipient: str, *, max_count: int) -> list[bytes]:
        """Remove and return up to ``max_count`` messages, oldest first.

        MUST be atomic and FIFO: concurrent poppers never receive the same
        message, and every pushed message is returned by at most one call.
        Delivery is at most once: a caller that crashes after this returns has
        consumed the messages, so it must persist what it still needs. Returns
        ``[]`` for an empty or unknown queue.
        """

    @abstractmethod
    def queue_length(self, recipient: str) -> int:
        """Return the number of messages waiting for ``recipient`` (0 if none)."""

    # ------------------------------------------------------------------ sorted sets

    @abstractmethod
    def zadd(self, name: str, members: Mapping[str, float]) -> int:
        """Set each member's score (adding missing members); return how many were new."""

    @abstractmethod
    def zrange_by_score(
        self,
        name: str,
        *,
        min_score: float,
        max_score: float,
        limit: int | None = None,
    ) -> list[tuple[str, float]]:
        """Return members with ``min_score ≤ score ≤ max_score``, ascending.

        Ties MUST be ordered by member, comparing UTF-8 bytes. ``limit`` caps
        the number returned (``None``: no cap). Bounds may be ±inf.
        """

    @abstractmethod
    def zrem(self, name: str, *members: str) -> int:
        """Remove the given members; return how many existed."""

    @abstractmethod
    def zcard(self, name: str) -> int:
        """Return the number of members (0 for an unknown set)."""

    @abstractmethod
    def zpop_min(self, name: str, *, count: int = 1) -> list[tuple[str, float]]:
        """Atomically remove and return up to ``count`` lowest-scored members.

        Order and tie-breaking as in :meth:`zrange_by_score`; concurrent callers
        MUST never receive the same member.
        """

    # ------------------------------------------------------------------ job streams

    @abstractmethod
    def stream_add(self, stream: str, fields: Mapping[str, bytes]) -> str:
        """Append a job and return its id; ids MUST be strictly increasing per stream."""

    @abstractmethod
    def ensure_group(self, stream: str, group: str) -> None:
        """Create consumer group ``group`` on ``stream`` (and the stream) if missing.

        MUST be idempotent. A new group starts at the beginning of the stream:
        jobs added before it was created are delivered to it.
        """

    @abstractmethod
    def read_group(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_s: float = 0.0,
    ) -> list[Job]:
        """Deliver up to ``count`` jobs never delivered in ``group`` to ``consumer``.

        Each job MUST be delivered to exactly one consumer of the group (until
        reclaimed) and stays pending on it until acknowledged. With
        ``block_s > 0`` and no new job, MUST wait up to about ``block_s``
        seconds for one; ``0`` returns at once. The group MUST exist
        (:meth:`ensure_group`), else :class:`StoreError` is raised.
        """

    @abstractmethod
    def ack(self, stream: str, group: str, *ids: str) -> int:
        """Acknowledge jobs; return how many were pending (each id counts once ever)."""

    @abstractmethod
    def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_s: float,
        count: int,
    ) -> list[Job]:
        """Move up to ``count`` pending jobs idle for ≥ ``min_idle_s`` to ``consumer``.

        Used to take over the jobs of a consumer that died. Any idle pending job
        qualifies (the caller's own included). MUST be atomic per job: two
        reclaimers never both receive the same job in one idle period. Each
        returned job's ``deliveries`` MUST count this delivery, and its idle
        time restarts at 0.
        """

    @abstractmethod
    def pending(self, stream: str, group: str) -> list[PendingJob]:
        """Return all pending (delivered, unacknowledged) jobs of ``group``, by id."""

    @abstractmethod
    def stream_length(self, stream: str) -> int:
        """Return the number of entries in ``stream`` (0 for an unknown stream)."""
