"""In-process state store: the embedded default for single-process simulation.

:class:`MemoryStore` keeps everything in dictionaries behind one lock, so every
operation is atomic with respect to every other. It holds the same contract as
:class:`~estuary.state.redis_store.RedisStore` (one suite tests both), but its
data lives and dies with the process: it is for simulations and tests, never
for a deployment with more than one process.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from estuary.state.base import (
    Footprint,
    Job,
    Lease,
    PendingJob,
    Record,
    Store,
    check_name,
)
from estuary.state.errors import FencingError, LeaseLost, StoreError, VersionConflict

__all__ = ["MemoryStore", "shared_memory_store"]

_StreamId = tuple[int, int]


def _format_id(entry_id: _StreamId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def _parse_id(text: str) -> _StreamId | None:
    """Parse ``"<ms>-<seq>"``; ``None`` if ``text`` is not a well-formed id."""
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


class _ZSet:
    """A sorted set: member → score, and the members in Redis order.

    Redis orders by score, then by the member's bytes; ``order`` holds
    ``(score, UTF-8 member, member)`` in that order, so a range by score is two
    bisections and a slice, not a scan and a sort of the whole set (a sweep of expired
    enrolment tokens on every enrolment made enrolling 10 000 devices quadratic).
    """

    __slots__ = ("order", "scores")

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.order: list[tuple[float, bytes, str]] = []

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, member: str, score: float) -> bool:
        """Set ``member``'s score; return whether it is new."""
        old = self.scores.get(member)
        if old == score:
            return False
        if old is not None:
            self._unlink(member, old)
        self.scores[member] = score
        bisect.insort(self.order, (score, member.encode("utf-8"), member))
        return old is None

    def remove(self, member: str) -> bool:
        score = self.scores.pop(member, None)
        if score is None:
            return False
        self._unlink(member, score)
        return True

    def _unlink(self, member: str, score: float) -> None:
        entry = (score, member.encode("utf-8"), member)
        index = bisect.bisect_left(self.order, entry)
        del self.order[index]

    def range_by_score(self, lo: float, hi: float) -> list[tuple[str, float]]:
        start = bisect.bisect_left(self.order, lo, key=lambda e: e[0])
        end = bisect.bisect_right(self.order, hi, key=lambda e: e[0])
        return [(m, s) for s, _, m in self.order[start:end]]

    def count_by_score(self, lo: float, hi: float) -> int:
        start = bisect.bisect_left(self.order, lo, key=lambda e: e[0])
        return max(0, bisect.bisect_right(self.order, hi, key=lambda e: e[0]) - start)

    def max_score(self) -> float:
        return self.order[-1][0]


@dataclass
class _Delivery:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class _Group:
    last_delivered: _StreamId = (0, 0)
    pending: dict[_StreamId, _Delivery] = field(default_factory=dict)


@dataclass
class _Stream:
    ids: list[_StreamId] = field(default_factory=list)
    entries: dict[_StreamId, dict[str, bytes]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)


class MemoryStore(Store):
    """Thread-safe in-memory :class:`~estuary.state.base.Store`.

    Parameters
    ----------
    name
        Optional name, shown in :attr:`url` (``memory://name``); instances
        shared by name come from :func:`shared_memory_store`.
    clock
        Returns the current time in seconds since the epoch. Lease expiry,
        job idle times and stream ids use it; tests inject a fake one.
    """

    def __init__(self, name: str = "", *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(name, str):
            raise ValueError(f"name must be a str, got {type(name).__name__}")
        if not callable(clock):
            raise ValueError("clock must be callable")
        self._name = name
        self._clock = clock
        # One lock for everything: simple, and every operation is O(small) so
        # contention is not a concern for a single-process simulation. A
        # Condition on it wakes blocked read_group callers on stream_add.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._records: dict[str, Record] = {}
        self._leases: dict[str, Lease] = {}
        self._tokens: dict[str, int] = {}
        self._zsets: dict[str, _ZSet] = {}
        self._streams: dict[str, _Stream] = {}
        self._last_id: dict[str, _StreamId] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``memory://`` or ``memory://<name>``."""
        return f"memory://{self._name}"

    def ping(self) -> None:
        """Return at once: the data lives in this process, so it is always reachable."""

    def close(self) -> None:
        """Do nothing: other users of a shared instance keep their data."""

    # ------------------------------------------------------------------ records

    def _get(self, key: str) -> Record | None:
        with self._lock:
            return self._records.get(key)

    def _get_many(self, keys: list[str]) -> list[Record | None]:
        with self._lock:
            return [self._get(key) for key in keys]

    def _put(self, key: str, value: bytes) -> int:
        with self._lock:
            return self._write(key, value)

    def _compare_and_set(self, key: str, value: bytes, *, expected_version: int) -> int:
        with self._lock:
            self._check_version(key, expected_version)
            return self._write(key, value)

    def _insert_if_absent(self, key: str, value: bytes) -> bool:
        with self._lock:
            if key in self._records:
                return False
            self._records[key] = Record(value=value, version=1)
            return True

    def _delete(self, key: str, *, expected_version: int | None) -> bool:
        with self._lock:
            if expected_version is not None:
                self._check_version(key, expected_version)
            return self._records.pop(key, None) is not None

    def _scan(self, prefix: str) -> dict[str, Record]:
        """Scan under the lock, so here the result is a consistent snapshot."""
        with self._lock:
            return {k: r for k, r in self._records.items() if k.startswith(prefix)}

    def _write(self, key: str, value: bytes) -> int:
        current = self._records.get(key)
        version = 1 if current is None else current.version + 1
        self._records[key] = Record(value=value, version=version)
        return version

    def _check_version(self, key: str, expected: int) -> None:
        current = self._records.get(key)
        actual = 0 if current is None else current.version
        if actual != expected:
            raise VersionConflict(key, expected=expected, actual=actual)

    # ------------------------------------------------------------------ leases

    def _acquire_lease(self, name: str, *, holder: str, ttl_s: float) -> Lease | None:
        with self._lock:
            now = self._clock()
            if self._live_lease(name, now) is not None:
                return None
            token = self._tokens.get(name, 0) + 1
            self._tokens[name] = token
            lease = Lease(name=name, holder=holder, token=token, expires_at=now + ttl_s)
            self._leases[name] = lease
            return lease

    def _renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        with self._lock:
            now = self._clock()
            current = self._live_lease(lease.name, now)
            if current is None or current.token != lease.token:
                raise LeaseLost(lease.name, token=lease.token)
            renewed = Lease(
                name=current.name,
                holder=current.holder,
                token=current.token,
                expires_at=now + ttl_s,
            )
            self._leases[lease.name] = renewed
            return renewed

    def _release_lease(self, lease: Lease) -> None:
        with self._lock:
            current = self._leases.get(lease.name)
            if current is not None and current.token == lease.token:
                del self._leases[lease.name]

    def _fenced_put(self, key: str, value: bytes, *, lease: Lease) -> int:
        with self._lock:
            self._check_fence(key, lease)
            return self._write(key, value)

    def _fenced_compare_and_set(
        self, key: str, value: bytes, *, lease: Lease, expected_version: int
    ) -> int:
        with self._lock:
            self._check_fence(key, lease)
            self._check_version(key, expected_version)
            return self._write(key, value)

    def _live_lease(self, name: str, now: float) -> Lease | None:
        current = self._leases.get(name)
        if current is not None and now >= current.expires_at:
            del self._leases[name]
            return None
        return current

    def _check_fence(self, key: str, lease: Lease) -> None:
        newest = self._tokens.get(lease.name, 0)
        if lease.token < newest:
            raise FencingError(
                key, lease_name=lease.name, token=lease.token, reason=f"superseded by {newest}"
            )
        current = self._live_lease(lease.name, self._clock())
        if current is None or current.token != lease.token:
            raise FencingError(
                key, lease_name=lease.name, token=lease.token, reason="expired or released"
            )

    # ------------------------------------------------------------------ sorted sets

    def _zadd(self, name: str, members: dict[str, float]) -> int:
        with self._lock:
            zset = self._zsets.setdefault(name, _ZSet())
            return sum(zset.add(m, s) for m, s in members.items())

    def _zrange_by_score(
        self, name: str, *, min_score: float, max_score: float, limit: int | None
    ) -> list[tuple[str, float]]:
        with self._lock:
            zset = self._zsets.get(name)
            items = [] if zset is None else zset.range_by_score(min_score, max_score)
        return items if limit is None else items[:limit]

    def _zrem(self, name: str, *members: str) -> int:
        with self._lock:
            zset = self._zsets.get(name)
            if zset is None:
                return 0
            removed = sum(zset.remove(m) for m in set(members))
            if not zset:
                del self._zsets[name]
            return removed

    def _zcard(self, name: str) -> int:
        with self._lock:
            zset = self._zsets.get(name)
            return 0 if zset is None else len(zset)

    def _zcount(self, name: str, *, min_score: float, max_score: float) -> int:
        with self._lock:
            zset = self._zsets.get(name)
            return 0 if zset is None else zset.count_by_score(min_score, max_score)

    def _zmax_many(self, names: list[str]) -> list[float | None]:
        with self._lock:
            return [z.max_score() if (z := self._zsets.get(n)) else None for n in names]

    def _zadd_pruned(
        self, name: str, members: dict[str, float], *, prune_max_score: float, read: list[str]
    ) -> tuple[int, list[Record | None]]:
        with self._lock:  # one step, as one round trip is on Redis
            return super()._zadd_pruned(name, members, prune_max_score=prune_max_score, read=read)

    # ------------------------------------------------------------------ job streams

    def _stream_add(self, stream: str, fields: dict[str, bytes]) -> str:
        with self._lock:
            ms = int(self._clock() * 1000)
            last = self._last_id.get(stream, (0, 0))
            # Like Redis: ids never go backwards, even if the clock does.
            new_id = (ms, 0) if ms > last[0] else (last[0], last[1] + 1)
            self._last_id[stream] = new_id
            s = self._streams.setdefault(stream, _Stream())
            s.ids.append(new_id)
            s.entries[new_id] = fields
            self._changed.notify_all()
            return _format_id(new_id)

    def _ensure_group(self, stream: str, group: str) -> None:
        with self._lock:
            self._streams.setdefault(stream, _Stream()).groups.setdefault(group, _Group())

    def _read_group(
        self, stream: str, group: str, consumer: str, *, count: int, block_s: float
    ) -> list[Job]:
        deadline = time.monotonic() + block_s
        with self._lock:
            while True:
                s, g = self._group(stream, group)
                start = bisect.bisect_right(s.ids, g.last_delivered)
                new_ids = s.ids[start : start + count]
                if new_ids or time.monotonic() >= deadline:
                    break
                self._changed.wait(timeout=deadline - time.monotonic())
            now = self._clock()
            jobs = []
            for entry_id in new_ids:
                g.pending[entry_id] = _Delivery(consumer=consumer, delivered_at=now, deliveries=1)
                jobs.append(
                    Job(
                        stream=stream,
                        id=_format_id(entry_id),
                        fields=dict(s.entries[entry_id]),
                        deliveries=1,
                    )
                )
            if new_ids:
                g.last_delivered = new_ids[-1]
            return jobs

    def _ack(self, stream: str, group: str, *ids: str) -> int:
        parsed = {_parse_id(i) for i in ids}
        with self._lock:
            s = self._streams.get(stream)
            g = None if s is None else s.groups.get(group)
            if g is None:
                return 0
            return sum(1 for i in parsed if i is not None and g.pending.pop(i, None) is not None)

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
        with self._lock:
            s, g = self._group(stream, group)
            now = self._clock()
            jobs: list[Job] = []
            for entry_id in sorted(g.pending):
                if len(jobs) >= count:
                    break
                delivery = g.pending[entry_id]
                if now - delivery.delivered_at < min_idle_s:
                    continue
                if owners is not None and delivery.consumer not in owners:
                    continue
                if entry_id not in s.entries:
                    # Matches XAUTOCLAIM: an entry deleted from the stream is
                    # dropped from the pending list instead of being delivered.
                    del g.pending[entry_id]
                    continue
                delivery.consumer = consumer
                delivery.delivered_at = now
                delivery.deliveries += 1
                jobs.append(
                    Job(
                        stream=stream,
                        id=_format_id(entry_id),
                        fields=dict(s.entries[entry_id]),
                        deliveries=delivery.deliveries,
                    )
                )
            return jobs

    def _pending(self, stream: str, group: str) -> list[PendingJob]:
        with self._lock:
            _, g = self._group(stream, group)
            now = self._clock()
            return [
                PendingJob(
                    id=_format_id(i),
                    consumer=d.consumer,
                    idle_s=max(0.0, now - d.delivered_at),
                    deliveries=d.deliveries,
                )
                for i, d in sorted(g.pending.items())
            ]

    def _stream_length(self, stream: str) -> int:
        with self._lock:
            s = self._streams.get(stream)
            return 0 if s is None else len(s.ids)

    # ------------------------------------------------------------------ retention

    def _trim_stream(self, stream: str, group: str) -> int:
        with self._lock:
            s = self._streams.get(stream)
            g = None if s is None else s.groups.get(group)
            if s is None or g is None:
                return 0
            # Everything before the oldest pending entry, and at most up to the last
            # delivered one, has been acknowledged.
            end = min(g.pending) if g.pending else (g.last_delivered[0], g.last_delivered[1] + 1)
            keep = [i for i in s.ids if i >= end]
            removed = len(s.ids) - len(keep)
            for i in s.ids[:removed]:
                del s.entries[i]
            s.ids = keep
            return removed

    def _footprint(self) -> Footprint:
        with self._lock:
            size = sum(len(k) + len(r.value) for k, r in self._records.items())
            size += sum(len(k) + sum(len(m) + 8 for m in z.scores) for k, z in self._zsets.items())
            for name, st in self._streams.items():
                size += len(name) + sum(
                    16 + sum(len(f) + len(v) for f, v in st.entries[i].items()) for i in st.ids
                )
            size += sum(len(k) + len(v.holder) for k, v in self._leases.items())
            keys = len(self._records) + len(self._zsets) + len(self._streams) + len(self._leases)
            return Footprint(keys=keys, bytes=size)

    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        s = self._streams.get(stream)
        g = None if s is None else s.groups.get(group)
        if s is None or g is None:
            raise StoreError(f"no consumer group {group!r} on stream {stream!r}")
        return s, g


_shared_lock = threading.Lock()
_shared: dict[str, MemoryStore] = {}


def shared_memory_store(name: str) -> MemoryStore:
    """Return the process-wide :class:`MemoryStore` called ``name``, creating it once.

    Parameters
    ----------
    name
        Non-empty instance name; every caller in this process passing the same
        name gets the same store (``memory://name``).

    Returns
    -------
    MemoryStore
        The shared instance.
    """
    check_name(name, parameter="name")
    with _shared_lock:
        store = _shared.get(name)
        if store is None:
            store = _shared[name] = MemoryStore(name)
        return store
