"""Buffered asynchronous aggregation (FedBuff) and the version commit.

Unmasked cohort sums ``(Σ w ΔB, Σ w, n)`` enter a buffer in the store. When the buffer
holds at least ``K`` client updates, one replica (the holder of the ``aggregator``
lease) makes version ``v+1``::

    B_{v+1} = B_v + η · (Σ_cohorts Σ w ΔB) / (Σ_cohorts Σ w)

Durability and exactly-once, step by step:

1. ``add_cohort_sum`` stores a cohort's sum with insert-if-absent under the cohort id,
   then a permanent "seen" marker: a repeated delivery of the same cohort result, even
   long after its version was committed, is recognised and not counted twice. It
   returns only once the record is durable in the store.
2. ``try_commit`` runs under the lease. It writes the new adapter blob (content
   addressed) and the ``version/<v+1>`` record with fenced writes, then advances
   ``head/version`` with a fenced compare-and-set: that single write is the commit
   point, so versions strictly increase and a replica that lost its lease (older
   fencing token) cannot commit anything.
3. Buffer entries folded into a version are marked seen and deleted after the head
   moves. A crash in between leaves them behind; the next commit first drops every
   entry named in the head's ``cohorts`` list, so they are never counted again.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from estuary.adapters.blobs import get_adapter, put_adapter
from estuary.adapters.lora import GlobalAdapter
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.state.base import Lease, Store
from estuary.state.blobs import BlobStore
from estuary.state.errors import FencingError, LeaseLost, VersionConflict
from estuary.state.keys import (
    BUFFER_PREFIX,
    HEAD_KEY,
    buffer_key,
    buffer_seen_key,
    version_key,
)

log = logging.getLogger(__name__)

#: Lease guarding the version commit. Its TTL is long enough for one commit (reading
#: the buffer and writing one adapter blob: well under a second for adapters of a few
#: MB) with a wide margin, and short enough that a crashed replica blocks commits for
#: at most this long.
AGGREGATOR_LEASE = "aggregator"
DEFAULT_LEASE_TTL_S = 30.0


@dataclass(frozen=True)
class VersionInfo:
    """An announced version.

    Attributes
    ----------
    version
        Version number, 0 for the initial adapter.
    adapter_sha256
        Blob digest of the adapter file (:func:`estuary.adapters.put_adapter`).
    cohorts
        Cohort ids whose sums were folded into this version.
    updates
        Client updates folded into this version.
    """

    version: int
    adapter_sha256: str
    cohorts: tuple[str, ...]
    updates: int


#: Tensor name under which a buffer entry carries its JSON metadata (weight, count).
_META = "__meta__"


def _encode_entry(
    weighted_sum: Mapping[str, np.ndarray], *, weight_total: float, updates: int
) -> bytes:
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in weighted_sum.items()}
    meta = json.dumps({"weight_total": float(weight_total), "updates": int(updates)})
    tensors[_META] = np.frombuffer(meta.encode(), dtype=np.uint8)
    return bytes(save_tensors(tensors))


def _entry_meta(data: bytes) -> tuple[float, int]:
    """Return ``(Σ w, updates)`` of a stored buffer entry without decoding its tensors.

    Reads only the safetensors header (8-byte length + JSON) and the small metadata
    tensor it points to: the tick checks the buffer several times a second, and the
    tensors are needed only when a version is actually made.
    """
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    start, end = header[_META]["data_offsets"]
    meta = json.loads(data[8 + length + start : 8 + length + end])
    return float(meta["weight_total"]), int(meta["updates"])


def _decode_entry(data: bytes) -> tuple[dict[str, np.ndarray], float, int]:
    """Return ``(Σ w ΔB per tensor, Σ w, updates)`` of a stored buffer entry."""
    tensors = dict(load_tensors(data))
    meta = json.loads(tensors.pop(_META).tobytes())
    return tensors, float(meta["weight_total"]), int(meta["updates"])


def _head_info(data: bytes) -> VersionInfo:
    obj = json.loads(data)
    return VersionInfo(
        version=int(obj["version"]),
        adapter_sha256=str(obj["adapter_sha256"]),
        cohorts=tuple(obj["cohorts"]),
        updates=int(obj["updates"]),
    )


def _check_like(reference: Mapping[str, tuple[int, ...]], other: Mapping[str, np.ndarray]) -> None:
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(f"weighted_sum: tensor names differ (missing {missing}, extra {extra})")
    for name, shape in reference.items():
        if np.shape(other[name]) != shape:
            raise ValueError(
                f"weighted_sum: tensor {name!r} has shape {np.shape(other[name])}, expected {shape}"
            )


class VersionLedger:
    """The FedBuff buffer and version history of one federation, kept in the store.

    Parameters
    ----------
    store
        The state store (any replica's view of it).
    blobs
        Blob store holding adapter versions.
    holder
        This replica's id, recorded on the lease.
    buffer_size
        ``K``: client updates needed for a new version; ≥ 1.
    server_lr
        ``η``: server learning rate; > 0.
    lease_ttl_s
        Lease time-to-live in seconds; > 0.
    clock
        Stamps each version record's ``committed_at`` (Unix seconds). Lease expiry is the
        store's own business (Redis expires keys by its clock).
    """

    def __init__(
        self,
        store: Store,
        *,
        blobs: BlobStore,
        holder: str,
        buffer_size: int,
        server_lr: float = 1.0,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size: must be >= 1, got {buffer_size}")
        if not server_lr > 0:
            raise ValueError(f"server_lr: must be > 0, got {server_lr}")
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s: must be > 0, got {lease_ttl_s}")
        if not holder:
            raise ValueError("holder: must be a non-empty replica id")
        self._store = store
        self._blobs = blobs
        self._holder = holder
        self._k = buffer_size
        self._lr = server_lr
        self._ttl = lease_ttl_s
        self._clock = clock
        self._lease: Lease | None = None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    # ------------------------------------------------------------------ reading

    def head(self) -> VersionInfo | None:
        """Return the announced version, or ``None`` before :meth:`initialise`."""
        return self.head_of(self._store.get(HEAD_KEY))

    @staticmethod
    def head_of(record: Record | None) -> VersionInfo | None:
        """Return the version announced by a read of :data:`HEAD_KEY` (None: no record).

        For callers that read the head together with other records in one round trip
        (:meth:`~estuary.state.base.Store.get_many`).
        """
        return None if record is None else _head_info(record.value)

    def adapter(self, info: VersionInfo) -> GlobalAdapter:
        """Return the adapter of version ``info`` (hash verified)."""
        return get_adapter(self._blobs, info.adapter_sha256)

    def _b_shapes(self, info: VersionInfo) -> dict[str, tuple[int, ...]]:
        # Every cohort sum is checked against B's shapes; reading and hashing the adapter
        # blob for each one would be wasted work, and the shapes of a digest never change.
        shapes = self._shapes.get(info.adapter_sha256)
        if shapes is None:
            shapes = {n: b.shape for n, b in self.adapter(info).b.items()}
            self._shapes[info.adapter_sha256] = shapes
        return shapes

    def buffered_updates(self) -> int:
        """Return how many client updates wait in the buffer (leftovers excluded)."""
        head = self.head()
        done = set(head.cohorts) if head else set()
        return sum(
            _entry_meta(rec.value)[1]
            for key, rec in self._store.scan(BUFFER_PREFIX).items()
            if key[len(BUFFER_PREFIX) :] not in done
        )

    # ------------------------------------------------------------------ writing

    def initialise(self, adapter: GlobalAdapter) -> VersionInfo:
        """Record ``adapter`` as version 0 unless a version exists; return the head.

        Safe to call from every replica at start-up: only the first call writes.
        """
        if not adapter.b:
            raise ValueError("adapter: needs at least one module")
        digest = put_adapter(self._blobs, adapter)
        head = {"version": 0, "adapter_sha256": digest, "cohorts": [], "updates": 0}
        if self._store.insert_if_absent(HEAD_KEY, json.dumps(head).encode()):
            record = {**head, "committed_at": self._clock.time()}
            self._store.put(version_key(0), json.dumps(record).encode())
            log.info("initialised version 0 (adapter %s)", digest[:12])
        current = self.head()
        assert current is not None
        return current

    def add_cohort_sum(
        self,
        cohort_id: str,
        *,
        weighted_sum: Mapping[str, np.ndarray],
        weight_total: float,
        updates: int,
    ) -> bool:
        """Buffer one cohort's unmasked sum; return ``False`` if it was already buffered.

        Parameters
        ----------
        cohort_id
            Unique id of the cohort; the idempotency key.
        weighted_sum
            ``Σ w_i ΔB_i`` per tensor name, same names and shapes as the adapter.
        weight_total
            ``Σ w_i`` over the cohort's survivors; > 0.
        updates
            Number of client updates in the sum (survivors); ≥ 1.

        Raises
        ------
        ValueError
            If the sum does not match the adapter's tensors, holds non-finite values,
            or the weight or count is out of range. Nothing is stored.
        """
        if not cohort_id or "/" in cohort_id:
            raise ValueError(f"cohort_id: must be non-empty without '/', got {cohort_id!r}")
        if not (weight_total > 0 and np.isfinite(weight_total)):
            raise ValueError(f"weight_total: must be finite and > 0, got {weight_total}")
        if updates < 1:
            raise ValueError(f"updates: must be >= 1, got {updates}")
        if not 0 < weight_total <= updates * (1 + 1e-6):
            raise ValueError(
                f"weight_total: {weight_total} exceeds updates={updates} (each weight is <= 1)"
            )
        head = self.head()
        if head is None:
            raise RuntimeError("the ledger is not initialised: call initialise() first")
        if cohort_id in head.cohorts or self._store.get(buffer_seen_key(cohort_id)):
            log.info("cohort %s already accepted; not counted again", cohort_id)
            return False
        _check_like(self._b_shapes(head), weighted_sum)
        bad = [n for n, a in weighted_sum.items() if not np.all(np.isfinite(a))]
        if bad:
            raise ValueError(f"weighted_sum: non-finite values in {sorted(bad)}")
        entry = _encode_entry(weighted_sum, weight_total=weight_total, updates=updates)
        created = self._store.insert_if_absent(buffer_key(cohort_id), entry)
        # The marker goes second: if we crash before it, the buffered entry itself still
        # makes a re-delivery a duplicate, and a commit writes markers for what it folds in.
        self._store.put(buffer_seen_key(cohort_id), b"1")
        if not created:
            log.info("cohort %s already buffered; not counted again", cohort_id)
        return created

    def _retire(self, cohort_ids: list[str]) -> None:
        """Mark folded-in cohorts as seen, then drop their buffer entries."""
        for cohort_id in cohort_ids:
            self._store.put(buffer_seen_key(cohort_id), b"1")
            self._store.delete(buffer_key(cohort_id))

    def _ensure_lease(self) -> Lease | None:
        if self._lease is not None:
            try:
                self._lease = self._store.renew_lease(self._lease, ttl_s=self._ttl)
                return self._lease
            except LeaseLost:
                self._lease = None
        self._lease = self._store.acquire_lease(
            AGGREGATOR_LEASE, holder=self._holder, ttl_s=self._ttl
        )
        return self._lease

    def release(self) -> None:
        """Give up the aggregator lease, if held (on clean shutdown)."""
        if self._lease is not None:
            self._store.release_lease(self._lease)
            self._lease = None

    def try_commit(self) -> VersionInfo | None:
        """Make the next version if the buffer holds ≥ K updates and we hold the lease.

        Returns
        -------
        VersionInfo or None
            The new head, or ``None`` when there was nothing to do, another replica
            holds the lease, or our lease was superseded mid-commit (nothing announced).
        """
        lease = self._ensure_lease()
        if lease is None:
            return None
        head_record = self._store.get(HEAD_KEY)
        if head_record is None:
            raise RuntimeError("the ledger is not initialised: call initialise() first")
        head = _head_info(head_record.value)
        entries = {
            key[len(BUFFER_PREFIX) :]: record
            for key, record in self._store.scan(BUFFER_PREFIX).items()
        }
        # Leftovers of a commit that crashed after moving the head: already counted.
        leftovers = [cohort_id for cohort_id in entries if cohort_id in head.cohorts]
        self._retire(leftovers)
        for cohort_id in leftovers:
            del entries[cohort_id]
        total_updates = sum(_entry_meta(rec.value)[1] for rec in entries.values())
        if total_updates < self._k:
            return None  # before decoding anything: this is the common case
        decoded = {cohort_id: _decode_entry(rec.value) for cohort_id, rec in entries.items()}
        weight_total = sum(weight for _, weight, _ in decoded.values())
        current = self.adapter(head)
        summed = {name: np.zeros(b.shape, dtype=np.float64) for name, b in current.b.items()}
        cohorts = sorted(decoded)
        for cohort_id in cohorts:
            tensors = decoded[cohort_id][0]
            for name in summed:
                summed[name] += tensors[name]
        mean = {name: total / weight_total for name, total in summed.items()}
        digest = put_adapter(self._blobs, current.apply_update(mean, server_lr=self._lr))
        new_version = head.version + 1
        head_obj = {
            "version": new_version,
            "adapter_sha256": digest,
            "cohorts": cohorts,
            "updates": total_updates,
        }
        try:
            self._store.fenced_put(
                version_key(new_version),
                json.dumps(
                    {**head_obj, "committed_at": self._clock.time(), "holder": self._holder}
                ).encode(),
                lease=lease,
            )
            self._store.fenced_compare_and_set(
                HEAD_KEY,
                json.dumps(head_obj).encode(),
                lease=lease,
                expected_version=head_record.version,
            )
        except (FencingError, VersionConflict) as exc:
            log.warning("version %d not committed: %s", new_version, exc)
            self._lease = None
            return None
        self._retire(cohorts)
        log.info(
            "committed version %d from %d updates in %d cohorts",
            new_version,
            total_updates,
            len(cohorts),
        )
        return VersionInfo(new_version, digest, tuple(cohorts), total_updates)
