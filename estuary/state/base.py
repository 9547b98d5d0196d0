"""The state store interface: what coordinators and workers may rely on.

Every method's docstring states its guarantee in MUST language; both
implementations (:class:`~estuary.state.memory.MemoryStore` and
:class:`~estuary.state.redis_store.RedisStore`) are held to it by one contract
suite (``tests/contract/test_store_contract.py``).

Conventions shared by all methods:

- Keys, set names, stream names, group and consumer names are
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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from estuary.state.errors import StoreError, VersionConflict

#: Default compare-and-set rounds of :meth:`Store.update`. One small record loses only to
#: concurrent writers of that same record (a handful of replicas or groups); 50 rounds is
#: far more than such contention needs and still bounds a pathological loop.
UPDATE_ATTEMPTS = 50

__all__ = [
    "Footprint",
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
class Footprint:
    """Size of what a store holds (:meth:`Store.footprint`).

    Attributes
    ----------
    keys
        Records, sorted sets, streams and leases (on Redis: ``DBSIZE``).
    bytes
        Approximate bytes of keys and values (on Redis: ``used_memory`` of ``INFO memory``).
    """

    keys: int
    bytes: int


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
    """Abstract state store: records, leases, sorted sets and job streams.

    Implementations MUST be safe to call from several threads at once. All
    guarantees below hold across every client of the same backing store
    (every process connected to the same Redis, or every user of the same
    MemoryStore object).

    Each public method validates and normalises its arguments here, once, and
    then calls the protected method of the same name with a leading underscore
    (``reclaim`` calls ``_reclaim``), which is what a backend implements. A
    backend therefore receives only valid arguments: non-empty names, ``bytes``
    values, ``float`` scores and durations, and copied fields and members.
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

    def probe(self, *, timeout_s: float) -> None:
        """Check once, without retrying, that the backend answers within ``timeout_s``.

        For health watchers, which must notice a hung backend within about
        ``timeout_s`` rather than after :meth:`ping`'s bounded retry. MUST
        return ``None`` when the backend answered and MUST raise
        :class:`StoreUnavailable` otherwise, after waiting not much longer than
        ``timeout_s``, even when the backend accepts connections but never replies.
        """
        self._probe(check_seconds(timeout_s, parameter="timeout_s", allow_zero=False))

    def _probe(self, timeout_s: float) -> None:
        # A backend in this process cannot hang: its ping is the probe.
        self.ping()

    @abstractmethod
    def close(self) -> None:
        """Release connections. MUST be idempotent. Data MUST NOT be affected."""

    # ------------------------------------------------------------------ records

    def get(self, key: str) -> Record | None:
        """Return the record at ``key``, or ``None`` if there is none.

        The value and version returned MUST belong to the same write.
        """
        return self._get(check_name(key, parameter="key"))

    def put(self, key: str, value: bytes) -> int:
        """Write ``value`` unconditionally and return the new version.

        The new version MUST be 1 if the key did not exist, else the previous
        version + 1.
        """
        return self._put(check_name(key, parameter="key"), check_bytes(value, parameter="value"))

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
        return self._compare_and_set(
            check_name(key, parameter="key"),
            check_bytes(value, parameter="value"),
            expected_version=check_count(expected_version, parameter="expected_version", minimum=0),
        )

    def update(
        self,
        key: str,
        change: Callable[[bytes | None], bytes | None],
        *,
        attempts: int = UPDATE_ATTEMPTS,
    ) -> bytes | None:
        """Read-modify-write ``key`` with compare-and-set, retrying on concurrent writes.

        ``change`` gets the current value (``None`` if absent) and returns the new value,
        or ``None`` to write nothing; it may raise to abort, and may be called again after
        a conflict. Returns what was written, or ``None``. Built on :meth:`get` and
        :meth:`compare_and_set`, so it holds on every backend.

        Raises
        ------
        StoreError
            Other writers won ``attempts`` times in a row.
        """
        check_name(key, parameter="key")
        check_count(attempts, parameter="attempts")
        for _ in range(attempts):
            record = self.get(key)
            new = change(None if record is None else record.value)
            if new is None:
                return None
            try:
                self.compare_and_set(
                    key, new, expected_version=0 if record is None else record.version
                )
            except VersionConflict:
                continue
            return new
        raise StoreError(f"{key}: still contended after {attempts} compare-and-set attempts")

    def insert_if_absent(self, key: str, value: bytes) -> bool:
        """Create the record at version 1 if ``key`` does not exist.

        MUST return ``True`` if this call created it and ``False`` (writing
        nothing) if it existed. Of several concurrent calls for one key,
        exactly one MUST return ``True``. Use it for idempotency keys.
        """
        return self._insert_if_absent(
            check_name(key, parameter="key"), check_bytes(value, parameter="value")
        )

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
        check_name(key, parameter="key")
        if expected_version is not None:
            check_count(expected_version, parameter="expected_version", minimum=1)
        return self._delete(key, expected_version=expected_version)

    def scan(self, prefix: str) -> dict[str, Record]:
        """Return every record whose key starts with ``prefix`` (``""``: all).

        Each returned record MUST be a consistent (value, version) pair. The
        result as a whole is not a snapshot on every backend: a record written
        or deleted while the scan runs may or may not appear. Records that
        existed, unchanged, for the whole call MUST appear.
        """
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {type(prefix).__name__}")
        return self._scan(prefix)

    def get_many(self, keys: Sequence[str]) -> list[Record | None]:
        """Return the record at each of ``keys``, in order (``None`` where there is none).

        For hot paths that read several records: a networked backend MUST read them in
        one round trip. Each record MUST be a consistent (value, version) pair, and the
        reads MUST happen in the order given, so a caller that reads ``a`` before ``b``
        sees ``b`` at least as new as any write that preceded the write of ``a`` it saw.
        The result as a whole need not be a snapshot. An empty ``keys`` returns ``[]``.
        """
        if isinstance(keys, str):
            raise ValueError("keys must be a sequence of keys, not one str")
        checked = [check_name(key, parameter="keys[]") for key in keys]
        return self._get_many(checked) if checked else []

    @abstractmethod
    def _get(self, key: str) -> Record | None:
        """Implement :meth:`get`."""

    @abstractmethod
    def _put(self, key: str, value: bytes) -> int:
        """Implement :meth:`put`."""

    @abstractmethod
    def _compare_and_set(self, key: str, value: bytes, *, expected_version: int) -> int:
        """Implement :meth:`compare_and_set`."""

    @abstractmethod
    def _insert_if_absent(self, key: str, value: bytes) -> bool:
        """Implement :meth:`insert_if_absent`."""

    @abstractmethod
    def _delete(self, key: str, *, expected_version: int | None) -> bool:
        """Implement :meth:`delete`."""

    @abstractmethod
    def _scan(self, prefix: str) -> dict[str, Record]:
        """Implement :meth:`scan`."""

    def _get_many(self, keys: list[str]) -> list[Record | None]:
        """Implement :meth:`get_many` (``keys`` is never empty); this default reads one by one."""
        return [self._get(key) for key in keys]

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, name: str, *, holder: str, ttl_s: float) -> Lease | None:
        """Acquire lease ``name`` for ``ttl_s`` seconds if nobody holds it.

        MUST return ``None`` while a live (unexpired, unreleased) lease exists,
        whoever holds it, the same holder included (use :meth:`renew_lease`).
        On success the token MUST be strictly greater than every token issued
        for ``name`` before, forever: across expiry, release and store restart.
        """
        return self._acquire_lease(
            check_name(name, parameter="name"),
            holder=check_name(holder, parameter="holder"),
            ttl_s=check_seconds(ttl_s, parameter="ttl_s", allow_zero=False),
        )

    def renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Extend a live lease to expire ``ttl_s`` seconds from now; same token.

        Raises
        ------
        LeaseLost
            The lease has expired, was released, or another token is current.
            A holder that sees this MUST stop the work the lease guarded.
        """
        return self._renew_lease(
            lease, ttl_s=check_seconds(ttl_s, parameter="ttl_s", allow_zero=False)
        )

    def release_lease(self, lease: Lease) -> None:
        """Release ``lease`` if it is still the current one.

        MUST NOT remove a lease acquired by someone else since (a newer token);
        releasing a lost or already released lease is a no-op.
        """
        self._release_lease(lease)

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
        return self._fenced_put(
            check_name(key, parameter="key"), check_bytes(value, parameter="value"), lease=lease
        )

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
        return self._fenced_compare_and_set(
            check_name(key, parameter="key"),
            check_bytes(value, parameter="value"),
            lease=lease,
            expected_version=check_count(expected_version, parameter="expected_version", minimum=0),
        )

    @abstractmethod
    def _acquire_lease(self, name: str, *, holder: str, ttl_s: float) -> Lease | None:
        """Implement :meth:`acquire_lease`."""

    @abstractmethod
    def _renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Implement :meth:`renew_lease`."""

    @abstractmethod
    def _release_lease(self, lease: Lease) -> None:
        """Implement :meth:`release_lease`."""

    @abstractmethod
    def _fenced_put(self, key: str, value: bytes, *, lease: Lease) -> int:
        """Implement :meth:`fenced_put`."""

    @abstractmethod
    def _fenced_compare_and_set(
        self, key: str, value: bytes, *, lease: Lease, expected_version: int
    ) -> int:
        """Implement :meth:`fenced_compare_and_set`."""

    # ------------------------------------------------------------------ sorted sets

    def zadd(self, name: str, members: Mapping[str, float]) -> int:
        """Set each member's score (adding missing members); return how many were new."""
        check_name(name, parameter="name")
        if not members:
            raise ValueError("members must hold at least one member")
        scores = {
            check_name(m, parameter="member"): check_score(s, parameter=f"score of {m!r}")
            for m, s in members.items()
        }
        return self._zadd(name, scores)

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
        check_name(name, parameter="name")
        low = check_score(min_score, parameter="min_score")
        high = check_score(max_score, parameter="max_score")
        if limit is not None:
            check_count(limit, parameter="limit", minimum=0)
        return self._zrange_by_score(name, min_score=low, max_score=high, limit=limit)

    def zrem(self, name: str, *members: str) -> int:
        """Remove the given members; return how many existed."""
        check_name(name, parameter="name")
        if not members:
            raise ValueError("members must name at least one member")
        for m in members:
            check_name(m, parameter="member")
        return self._zrem(name, *members)

    def zcard(self, name: str) -> int:
        """Return the number of members (0 for an unknown set)."""
        return self._zcard(check_name(name, parameter="name"))

    def zcount(self, name: str, *, min_score: float, max_score: float) -> int:
        """Return how many members have ``min_score ≤ score ≤ max_score`` (bounds may be ±inf).

        A count, not the members: a networked backend MUST answer it without sending them.
        """
        check_name(name, parameter="name")
        low = check_score(min_score, parameter="min_score")
        high = check_score(max_score, parameter="max_score")
        return self._zcount(name, min_score=low, max_score=high)

    def zmax_many(self, names: Sequence[str]) -> list[float | None]:
        """Return the highest score of each set, in order (``None`` for an empty one).

        For reports over many sets (``estuary status`` reads when each device was last
        seen from its nonce set): a networked backend MUST read them in one round trip.
        An empty ``names`` returns ``[]``.
        """
        if isinstance(names, str):
            raise ValueError("names must be a sequence of set names, not one str")
        checked = [check_name(name, parameter="names[]") for name in names]
        return self._zmax_many(checked) if checked else []

    def zadd_pruned(
        self,
        name: str,
        members: Mapping[str, float],
        *,
        prune_max_score: float,
        read: Sequence[str] = (),
    ) -> tuple[int, list[Record | None]]:
        """Prune old members, add ``members`` and read records, in one step.

        Drops the members scored ≤ ``prune_max_score``, then does :meth:`zadd` of
        ``members``, then reads the records ``read``; returns (how many members were new,
        the records as :meth:`get_many` returns them).

        For remembering short-lived items (request nonces) in a set kept bounded by age: a
        networked backend MUST do all of it in one round trip. The prune MUST happen
        before the add, so a member given with a score ≤ ``prune_max_score`` is added
        (and counted) even if it was there. The records are read after the add. Like any
        write, a call whose reply was lost MUST NOT be repeated by the backend (a repeat
        would find its own members and count 0): it raises an outcome-unknown
        :class:`~estuary.state.errors.StoreUnavailable` instead.
        """
        check_name(name, parameter="name")
        if not members:
            raise ValueError("members must hold at least one member")
        scores = {
            check_name(m, parameter="member"): check_score(s, parameter=f"score of {m!r}")
            for m, s in members.items()
        }
        prune = check_score(prune_max_score, parameter="prune_max_score")
        if isinstance(read, str):
            raise ValueError("read must be a sequence of keys, not one str")
        keys = [check_name(key, parameter="read[]") for key in read]
        return self._zadd_pruned(name, scores, prune_max_score=prune, read=keys)

    def _zadd_pruned(
        self, name: str, members: dict[str, float], *, prune_max_score: float, read: list[str]
    ) -> tuple[int, list[Record | None]]:
        """Implement :meth:`zadd_pruned`; this default makes one call per step."""
        stale = self._zrange_by_score(
            name, min_score=-math.inf, max_score=prune_max_score, limit=None
        )
        if stale:
            self._zrem(name, *(member for member, _ in stale))
        added = self._zadd(name, members)
        return added, self._get_many(read) if read else []

    @abstractmethod
    def _zadd(self, name: str, members: dict[str, float]) -> int:
        """Implement :meth:`zadd`; ``members`` is a fresh dict of float scores."""

    @abstractmethod
    def _zrange_by_score(
        self, name: str, *, min_score: float, max_score: float, limit: int | None
    ) -> list[tuple[str, float]]:
        """Implement :meth:`zrange_by_score`."""

    @abstractmethod
    def _zrem(self, name: str, *members: str) -> int:
        """Implement :meth:`zrem`; ``members`` is never empty."""

    @abstractmethod
    def _zcard(self, name: str) -> int:
        """Implement :meth:`zcard`."""

    @abstractmethod
    def _zcount(self, name: str, *, min_score: float, max_score: float) -> int:
        """Implement :meth:`zcount`."""

    @abstractmethod
    def _zmax_many(self, names: list[str]) -> list[float | None]:
        """Implement :meth:`zmax_many`; ``names`` is never empty."""

    # ------------------------------------------------------------------ job streams

    def stream_add(self, stream: str, fields: Mapping[str, bytes]) -> str:
        """Append a job and return its id; ids MUST be strictly increasing per stream."""
        check_name(stream, parameter="stream")
        return self._stream_add(stream, check_fields(fields))

    def ensure_group(self, stream: str, group: str) -> None:
        """Create consumer group ``group`` on ``stream`` (and the stream) if missing.

        MUST be idempotent. A new group starts at the beginning of the stream:
        jobs added before it was created are delivered to it.
        """
        self._ensure_group(
            check_name(stream, parameter="stream"), check_name(group, parameter="group")
        )

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
        return self._read_group(
            check_name(stream, parameter="stream"),
            check_name(group, parameter="group"),
            check_name(consumer, parameter="consumer"),
            count=check_count(count, parameter="count"),
            block_s=check_seconds(block_s, parameter="block_s", allow_zero=True),
        )

    def ack(self, stream: str, group: str, *ids: str) -> int:
        """Acknowledge jobs; return how many were pending (each id counts once ever)."""
        check_name(stream, parameter="stream")
        check_name(group, parameter="group")
        return self._ack(stream, group, *check_stream_ids(ids))

    def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_s: float,
        count: int,
        from_consumers: Collection[str] | None = None,
    ) -> list[Job]:
        """Move up to ``count`` pending jobs idle for ≥ ``min_idle_s`` to ``consumer``.

        Used to take over the jobs of a consumer that died. With ``from_consumers``
        only jobs pending on those consumers qualify (so a live but slow consumer
        keeps its job); with ``None`` any idle pending job does, the caller's own
        included. MUST be atomic per job: two reclaimers never both receive the same
        job in one idle period. Each returned job's ``deliveries`` MUST count this
        delivery, and its idle time restarts at 0.
        """
        owners = None
        if from_consumers is not None:
            owners = frozenset(check_name(c, parameter="from_consumers") for c in from_consumers)
        return self._reclaim(
            check_name(stream, parameter="stream"),
            check_name(group, parameter="group"),
            check_name(consumer, parameter="consumer"),
            min_idle_s=check_seconds(min_idle_s, parameter="min_idle_s", allow_zero=True),
            count=check_count(count, parameter="count"),
            owners=owners,
        )

    def pending(self, stream: str, group: str) -> list[PendingJob]:
        """Return all pending (delivered, unacknowledged) jobs of ``group``, by id."""
        return self._pending(
            check_name(stream, parameter="stream"), check_name(group, parameter="group")
        )

    def stream_length(self, stream: str) -> int:
        """Return the number of entries in ``stream`` (0 for an unknown stream)."""
        return self._stream_length(check_name(stream, parameter="stream"))

    @abstractmethod
    def _stream_add(self, stream: str, fields: dict[str, bytes]) -> str:
        """Implement :meth:`stream_add`; ``fields`` is a checked copy the backend may keep."""

    @abstractmethod
    def _ensure_group(self, stream: str, group: str) -> None:
        """Implement :meth:`ensure_group`."""

    @abstractmethod
    def _read_group(
        self, stream: str, group: str, consumer: str, *, count: int, block_s: float
    ) -> list[Job]:
        """Implement :meth:`read_group`."""

    @abstractmethod
    def _ack(self, stream: str, group: str, *ids: str) -> int:
        """Implement :meth:`ack`; ``ids`` is never empty and each is a stream id."""

    @abstractmethod
    def _reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_s: float,
        count: int,
        owners: frozenset[str] | None,
    ) -> list[Job]:
        """Implement :meth:`reclaim` (``owners``: ``from_consumers``, checked)."""

    @abstractmethod
    def _pending(self, stream: str, group: str) -> list[PendingJob]:
        """Implement :meth:`pending`."""

    @abstractmethod
    def _stream_length(self, stream: str) -> int:
        """Implement :meth:`stream_length`."""

    # ------------------------------------------------------------------ retention

    def trim_stream(self, stream: str, group: str) -> int:
        """Remove the entries of ``stream`` that ``group`` is done with; return how many.

        An entry MUST be removed only if ``group`` has delivered it and it is no longer
        pending (acknowledged): entries not yet delivered, pending ones and every entry
        after the oldest pending one MUST stay, so a consumer that reclaims or
        acknowledges later finds its job. Safe to race with readers, acknowledgers and
        other trimmers. An unknown stream or group removes nothing (0). Used to keep a
        job stream bounded (:func:`estuary.jobs.trim_jobs`).
        """
        return self._trim_stream(
            check_name(stream, parameter="stream"), check_name(group, parameter="group")
        )

    def footprint(self) -> Footprint:
        """Return how many keys the backend holds and about how many bytes they take.

        For ``estuary status``. A backend shared with other data (a Redis database)
        MAY report the whole database; the memory store counts only its own keys.
        """
        return self._footprint()

    @abstractmethod
    def _trim_stream(self, stream: str, group: str) -> int:
        """Implement :meth:`trim_stream`."""

    @abstractmethod
    def _footprint(self) -> Footprint:
        """Implement :meth:`footprint`."""
