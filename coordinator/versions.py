"""Buffered asynchronous aggregation (FedBuff) and the version commit.

Unmasked cohort sums ``(Σ w ΔB, Σ w, n)`` enter a buffer in the store, each with the
version its cohort trained on. When the buffer holds at least ``K`` client updates,
one replica (the holder of the ``aggregator`` lease) makes version ``v+1``::

    step    = η · Σ_c d_c · (Σ_{i∈c} w_i ΔB_i) / N,     N = Σ_c n_c  (or / K)
    d_c     = min(1, Σ_{i∈c} f*(v − t_i) / Σ_{i∈c} w_i)
    B_{v+1} = B_v + clip(step, max_step_norm)

where ``t_i`` is the version member ``i`` of cohort ``c`` trained on (members train
before they form a cohort, so they may differ; ``t_c = min t_i``, the oldest) and ``f*``
the staleness weight capped at the stable gain
(:meth:`coordinator.staleness.StalenessPolicy.commit_weight`).
Why this form and not ``Σ w ΔB / Σ w``:

- Normalising by ``Σ w`` cancels the staleness weights whenever the updates of a
  version are equally stale, so a buffer of deltas computed 8 versions ago moved B by
  a full step in the direction of an 8-versions-old gradient. That delayed feedback
  oscillates with growing amplitude (x_{v+1} = x_v − g·x_{v−s} is unstable for
  g > 2 sin(π / (2(2s+1))), 0.18 at s = 8), which is how ‖B‖ grew without bound in
  issue 15. Dividing by a count of updates makes a stale update move B by ``f(s)``
  times as much as a fresh one.
- Which count is ``aggregation.step_divisor``. ``"updates"`` (the default) divides by
  the ``N ≥ K`` updates the version holds: one mean step per version. Cohorts arrive
  whole, so a version holds anything from ``K`` to ``K`` plus one cohort, and each
  update of a version of 18 is worth 10/18 of one in a version of 10: the fleet
  simulator's 500-device run needed 456 updates to reach its target where plain FedBuff
  (exactly K per version) needed 370. ``"buffer"`` divides by ``K`` (FedBuff's
  ``Σ / K``): every update moves B as much however updates group, 391 updates there,
  but a version of 2K updates takes a double step, and in ``estuary simulate`` (K = 8,
  cohorts of 8, 10 % dropouts: versions of 13-15) the held-out score swung by up to
  0.24 bits/byte and the regression guard rolled back twice.
- The weights ``w_i`` were fixed when each member finished training, against the
  head of that moment; more versions may be committed before its cohort's sum is
  folded in. ``d_c`` re-prices the cohort at the staleness its members actually land
  with (``v − t_i``, never smaller): the members keep their relative weights, the
  cohort's total weight becomes ``Σ_i f*(v − t_i)`` (``n_c · f*(v − t_c)`` when all
  trained on one version). A cohort whose oldest member is beyond ``max_staleness`` by then,
  or trained on a version the regression guard abandoned (:mod:`coordinator.guard`),
  is dropped, never folded in.
- ``max_step_norm`` bounds the L2 norm of the whole step (all tensors together), so no
  single version can move B far, whatever arrived.

The secure sum is untouched: ``d_c`` is one scalar per cohort, applied by the server
to the plain unmasked sum.

Before each commit the regression guard reviews the held-out scores written since; a
regression beyond its tolerance makes the commit a *rollback* instead
(:meth:`VersionLedger.try_commit`).

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
4. Reading the entries is a scan of the store's keyspace (on Redis, of every key), so
   ``try_commit`` reads them only when the count of buffered updates
   (:data:`~estuary.state.keys.BUFFER_COUNTS`, written after each entry) reaches ``K``,
   or when its last read is ``BUFFER_REREAD_S`` old: a sum whose count a crash lost is
   folded in at most that much later, never lost.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from coordinator.guard import GuardState, Verdict, review
from coordinator.staleness import StalenessPolicy
from estuary.adapters.blobs import get_adapter, put_adapter
from estuary.adapters.lora import GlobalAdapter
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.state.base import Lease, Record, Store
from estuary.state.blobs import BlobStore
from estuary.state.errors import FencingError, LeaseLost, VersionConflict
from estuary.state.keys import (
    BUFFER_COUNTS,
    BUFFER_PREFIX,
    HEAD_KEY,
    buffer_key,
    buffer_seen_key,
    version_key,
)

log = logging.getLogger(__name__)

#: Seconds between full reads of the buffer while its count stays below ``K`` (step 4
#: of the module docstring): the longest a sum whose count a crash lost waits.
BUFFER_REREAD_S = 5.0

#: Lease guarding the version commit. Its TTL is long enough for one commit (reading
#: the buffer and writing one adapter blob: well under a second for adapters of a few
#: MB) with a wide margin, and short enough that a crashed replica blocks commits for
#: at most this long.
AGGREGATOR_LEASE = "aggregator"

#: Versions the regression guard reads back from the head, at most, per commit attempt:
#: an evaluation that comes more than this many versions late judges a model far behind.
REVIEW_WINDOW = 64
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
    rolled_back_to
        For a rollback made by the regression guard, the version whose adapter this
        one repeats; ``None`` for an ordinary version.
    abandoned
        Closed ranges ``(first, last)`` of versions the regression guard rolled back as
        of this head (:attr:`coordinator.guard.GuardState.abandoned`): work trained on
        them never counts, so none is handed out on them.
    folded_staleness
        ``(staleness, updates)`` pairs, ascending: how many of the updates folded in
        landed how many versions stale (``v − t_c``, what their discount was priced at).
        Only on the :class:`VersionInfo` the commit returns (a head read back has ``()``,
        and equality ignores it; :meth:`VersionLedger.folded_staleness` reads it per
        cohort from the record).
    """

    version: int
    adapter_sha256: str
    cohorts: tuple[str, ...]
    updates: int
    rolled_back_to: int | None = None
    abandoned: tuple[tuple[int, int], ...] = ()
    #: Not part of what the version is: a head read back equals the commit's answer.
    folded_staleness: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def is_abandoned(self, version: int) -> bool:
        """Whether ``version`` lies in a range the guard rolled back (as of this head)."""
        return any(first <= version <= last for first, last in self.abandoned)


@dataclass(frozen=True)
class DroppedSum:
    """A buffered cohort sum retired without being folded into any version.

    Attributes
    ----------
    cohort_id
        The cohort whose sum it was.
    updates
        Client updates in the sum: accepted into the buffer, now lost work.
    trained_on
        The version the cohort trained on.
    reason
        Why: too many versions behind by the commit, or trained on a version the
        regression guard abandoned.
    """

    cohort_id: str
    updates: int
    trained_on: int
    reason: str


#: Tensor name under which a buffer entry carries its JSON metadata (weight, count).
_META = "__meta__"


def _encode_entry(
    weighted_sum: Mapping[str, np.ndarray],
    *,
    weight_total: float,
    updates: int,
    trained_on: int | None = None,
    trained_versions: Mapping[int, int] | None = None,
) -> bytes:
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in weighted_sum.items()}
    fields: dict[str, Any] = {"weight_total": float(weight_total), "updates": int(updates)}
    if trained_on is not None:
        fields["trained_on"] = int(trained_on)
    if trained_versions is not None:
        fields["versions"] = {str(t): int(n) for t, n in sorted(trained_versions.items())}
    meta = json.dumps(fields)
    tensors[_META] = np.frombuffer(meta.encode(), dtype=np.uint8)
    return bytes(save_tensors(tensors))


def _entry_versions(meta: Mapping[str, Any], head: int) -> dict[int, int]:
    """Return ``{version trained on: updates}`` of a buffer entry's metadata.

    Entries written before members trained first carry one version for all
    (``trained_on``; absent in the oldest: the head).
    """
    versions = meta.get("versions")
    if versions is None:
        return {int(meta.get("trained_on", head)): int(meta["updates"])}
    return {int(t): int(n) for t, n in versions.items()}


def _entry_fields(data: bytes) -> dict[str, Any]:
    """Return the JSON metadata of a stored buffer entry without decoding its tensors.

    Reads only the safetensors header (8-byte length + JSON) and the small metadata
    tensor it points to: the tick checks the buffer several times a second, and the
    tensors are needed only when a version is actually made.
    """
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    start, end = header[_META]["data_offsets"]
    meta: dict[str, Any] = json.loads(data[8 + length + start : 8 + length + end])
    return meta


def _entry_meta(data: bytes) -> tuple[float, int]:
    """Return ``(Σ w, updates)`` of a stored buffer entry without decoding its tensors."""
    meta = _entry_fields(data)
    return float(meta["weight_total"]), int(meta["updates"])


def _decode_entry(data: bytes) -> tuple[dict[str, np.ndarray], float, int]:
    """Return ``(Σ w ΔB per tensor, Σ w, updates)`` of a stored buffer entry."""
    tensors = dict(load_tensors(data))
    meta = json.loads(tensors.pop(_META).tobytes())
    return tensors, float(meta["weight_total"]), int(meta["updates"])


def _head_info(data: bytes) -> VersionInfo:
    obj = json.loads(data)
    rolled_back_to = obj.get("rollback_to")
    return VersionInfo(
        version=int(obj["version"]),
        adapter_sha256=str(obj["adapter_sha256"]),
        cohorts=tuple(obj["cohorts"]),
        updates=int(obj["updates"]),
        rolled_back_to=None if rolled_back_to is None else int(rolled_back_to),
        abandoned=GuardState.from_json(obj.get("guard")).abandoned,
    )


def _pending(counts: Mapping[str, float], head: VersionInfo | None) -> int:
    """Client updates in ``counts`` (:data:`BUFFER_COUNTS`) not yet folded into ``head``."""
    done = set(head.cohorts) if head else set()
    return sum(int(n) for cohort_id, n in counts.items() if cohort_id not in done)


def _step_norm(step: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of ``step`` together."""
    return float(np.sqrt(sum(float(np.sum(np.square(t))) for t in step.values())))


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
    staleness
        The weight rule ``f`` and ``max_staleness``, applied again at commit time to the
        staleness each cohort lands with.
    max_step_norm
        Largest L2 norm of one version's step ``B_{v+1} − B_v`` (adapter units, all
        tensors together); ``None``: unbounded.
    guard_tolerance_bpb
        Regression guard: a scored version more than this many bits/byte above the best
        so far is rolled back (:mod:`coordinator.guard`); ``None``: no guard.
    step_divisor
        ``"updates"``: the step divides the discounted sum by the ``N`` updates the
        version holds (one mean step per version); ``"buffer"``: by ``K`` (every update
        counts the same).
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
        staleness: StalenessPolicy | None = None,
        max_step_norm: float | None = None,
        guard_tolerance_bpb: float | None = None,
        step_divisor: Literal["updates", "buffer"] = "updates",
    ) -> None:
        if step_divisor not in ("buffer", "updates"):
            raise ValueError(f"step_divisor: 'buffer' or 'updates', got {step_divisor!r}")
        if max_step_norm is not None and not (max_step_norm > 0 and np.isfinite(max_step_norm)):
            raise ValueError(f"max_step_norm: must be a finite number > 0, got {max_step_norm}")
        if guard_tolerance_bpb is not None and not (
            guard_tolerance_bpb >= 0 and np.isfinite(guard_tolerance_bpb)
        ):
            raise ValueError(
                f"guard_tolerance_bpb: must be a finite number >= 0, got {guard_tolerance_bpb}"
            )
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
        self._policy = staleness if staleness is not None else StalenessPolicy()
        self._max_step = max_step_norm
        self._tolerance = guard_tolerance_bpb
        self._divide_by_k = step_divisor == "buffer"
        self._lease: Lease | None = None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._read_at: float | None = None  # this replica's last full read of the buffer
        self._dropped: list[DroppedSum] = []  # retired unused since take_dropped()

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

    def is_abandoned(self, version: int) -> bool:
        """Whether the regression guard rolled ``version`` back (work on it is dropped)."""
        head = self.head()
        return head is not None and head.is_abandoned(version)

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

    def _version_field(self, version: int, name: str, default: Any = None) -> Any:
        """Read field ``name`` of ``version``'s record; None if the record is gone.

        Raises ValueError naming the key when the record is not a JSON object, or when it
        lacks the field and no ``default`` is given.
        """
        where = version_key(version)
        rec = self._store.get(where)
        if rec is None:
            return None
        try:
            record = json.loads(rec.value)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a readable version record")
        if name not in record and default is None:
            raise ValueError(f"{where}: no readable {name}")
        return record.get(name, default)

    def committed_at(self, version: int) -> float | None:
        """Unix seconds when ``version`` was committed; None if its record is gone."""
        value = self._version_field(version, "committed_at")
        if value is None:
            return None
        where = version_key(version)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{where}: committed_at must be a number, got {value!r}")
        return float(value)

    def folded_staleness(self, version: int) -> dict[str, int] | None:
        """Return the staleness each cohort folded into ``version`` landed with, by id.

        ``v − t_c`` at the commit, of its oldest member (the members' own weights were
        fixed earlier, at the share relay, against an older head; the commit's
        :attr:`VersionInfo.folded_staleness` counts every update at its own). Empty
        for a rollback (it folds nothing in); None if the version's record is gone.
        """
        value = self._version_field(version, "staleness", default={})
        if value is None:
            return None
        where = version_key(version)
        if not isinstance(value, dict) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value.values()
        ):
            raise ValueError(f"{where}: staleness must map cohort ids to counts >= 0")
        return {str(cohort_id): s for cohort_id, s in value.items()}

    def buffered_updates(self) -> int:
        """Return how many client updates wait in the buffer (leftovers excluded).

        Two reads (the head and :data:`~estuary.state.keys.BUFFER_COUNTS`), whatever the
        store holds, not a scan: the admission asks on a device's request. A hint for
        pacing and metrics: a sum buffered by a replica that crashed before noting its
        count is missing from it until the next full read of the buffer notes it (at most
        ``BUFFER_REREAD_S`` later).
        """
        head = self.head()
        return _pending(self._counts(), head)

    def _counts(self) -> dict[str, float]:
        """Read :data:`BUFFER_COUNTS`: cohort id -> client updates in its buffered sum."""
        return dict(
            self._store.zrange_by_score(BUFFER_COUNTS, min_score=-math.inf, max_score=math.inf)
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
        trained_on: int | None = None,
        trained_versions: Sequence[int] | None = None,
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
        trained_on
            Version the cohort trained on, 0 ≤ ``trained_on`` ≤ head; the commit
            discounts the sum by the staleness it lands with. ``None``: the head now
            (for callers that fold in fresh work only), or the oldest of
            ``trained_versions``.
        trained_versions
            The version each update in the sum trained on (``updates`` of them, each
            0..head, the oldest ``trained_on``): the commit prices each at its own
            staleness. ``None``: all on ``trained_on``.

        Raises
        ------
        ValueError
            If the sum does not match the adapter's tensors, holds non-finite values,
            or the weight, count or version is out of range. Nothing is stored.
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
        by_version: dict[int, int] | None = None
        if trained_versions is not None:
            if len(trained_versions) != updates:
                raise ValueError(
                    f"trained_versions: expected one per update ({updates}), "
                    f"got {len(trained_versions)}"
                )
            bad_versions = [t for t in trained_versions if not 0 <= t <= head.version]
            if bad_versions:
                raise ValueError(
                    f"trained_versions: must be committed versions (0..{head.version}), "
                    f"got {sorted(set(bad_versions))}"
                )
            if trained_on is None:
                trained_on = min(trained_versions)
            elif trained_on != min(trained_versions):
                raise ValueError(
                    f"trained_on: {trained_on} is not the oldest of trained_versions "
                    f"({min(trained_versions)})"
                )
            by_version = dict(Counter(trained_versions))
        if trained_on is None:
            trained_on = head.version
        if not 0 <= trained_on <= head.version:
            raise ValueError(
                f"trained_on: must be a committed version (0..{head.version}), got {trained_on}"
            )
        if cohort_id in head.cohorts or self._store.get(buffer_seen_key(cohort_id)):
            log.info("cohort %s already accepted; not counted again", cohort_id)
            return False
        _check_like(self._b_shapes(head), weighted_sum)
        bad = [n for n, a in weighted_sum.items() if not np.all(np.isfinite(a))]
        if bad:
            raise ValueError(f"weighted_sum: non-finite values in {sorted(bad)}")
        entry = _encode_entry(
            weighted_sum,
            weight_total=weight_total,
            updates=updates,
            trained_on=trained_on,
            trained_versions=by_version,
        )
        created = self._store.insert_if_absent(buffer_key(cohort_id), entry)
        # The marker goes second: if we crash before it, the buffered entry itself still
        # makes a re-delivery a duplicate, and a commit writes markers for what it folds in.
        self._store.put(buffer_seen_key(cohort_id), b"1")
        if not created:
            log.info("cohort %s already buffered; not counted again", cohort_id)
            return False
        self._store.zadd(BUFFER_COUNTS, {cohort_id: float(updates)})
        return True

    def _retire(self, cohort_ids: list[str]) -> None:
        """Mark folded-in cohorts as seen, then drop their buffer entries and counts."""
        for cohort_id in cohort_ids:
            self._store.put(buffer_seen_key(cohort_id), b"1")
            self._store.delete(buffer_key(cohort_id))
        if cohort_ids:
            self._store.zrem(BUFFER_COUNTS, *cohort_ids)

    def _note_counts(self, entries: Mapping[str, Record], have: Mapping[str, float]) -> None:
        """Make :data:`BUFFER_COUNTS` (``have``, read before the scan) match ``entries``.

        Repairs what a crash between an entry and its count left. A count without an
        entry in this read is dropped only if its entry is still absent: another replica
        may have buffered it since the scan.
        """
        want = {cohort_id: float(_entry_meta(rec.value)[1]) for cohort_id, rec in entries.items()}
        extra = [cohort_id for cohort_id in have if cohort_id not in want]
        if extra:
            now = self._store.get_many([buffer_key(cohort_id) for cohort_id in extra])
            gone = [cohort_id for cohort_id, rec in zip(extra, now, strict=True) if rec is None]
            if gone:
                self._store.zrem(BUFFER_COUNTS, *gone)
        missing = {c: n for c, n in want.items() if have.get(c) != n}
        if missing:
            self._store.zadd(BUFFER_COUNTS, missing)

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

        With the regression guard on, the held-out scores written since the last review
        are reviewed first; a regression makes this commit a rollback
        (:meth:`_commit_rollback`) whatever the buffer holds.

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
        head_obj = json.loads(head_record.value)
        head = _head_info(head_record.value)
        guard = GuardState.from_json(head_obj.get("guard"))
        if self._tolerance is not None:
            verdict = self._review(guard, head)
            if verdict.regressed is not None:
                return self._commit_rollback(lease, head_record, head, verdict)
            guard = verdict.state
        counts = self._counts()
        now = self._clock.monotonic()  # an in-process interval: immune to clock steps
        if (
            self._read_at is not None
            and now - self._read_at < BUFFER_REREAD_S
            and _pending(counts, head) < self._k
        ):
            return None  # too few updates by their count, and the entries read lately
        entries = {
            key[len(BUFFER_PREFIX) :]: record
            for key, record in self._store.scan(BUFFER_PREFIX).items()
        }
        self._read_at = now
        # Leftovers of a commit that crashed after moving the head: already counted.
        leftovers = [cohort_id for cohort_id in entries if cohort_id in head.cohorts]
        self._retire(leftovers)
        for cohort_id in leftovers:
            del entries[cohort_id]
        self._note_counts(entries, counts)
        fields = {cohort_id: _entry_fields(rec.value) for cohort_id, rec in entries.items()}
        self._drop_unusable(fields, head=head.version, guard=guard)
        total_updates = sum(int(meta["updates"]) for meta in fields.values())
        if total_updates < self._k:
            return None  # before decoding anything: this is the common case
        cohorts = sorted(fields)
        current = self.adapter(head)
        summed = {name: np.zeros(b.shape, dtype=np.float64) for name, b in current.b.items()}
        staleness: dict[str, int] = {}
        by_staleness: dict[int, int] = {}
        for cohort_id in cohorts:
            tensors, weight_total, _updates = _decode_entry(entries[cohort_id].value)
            versions = _entry_versions(fields[cohort_id], head.version)
            staleness[cohort_id] = head.version - min(versions)
            priced = 0.0
            for t, n in versions.items():
                priced += n * self._policy.commit_weight(head.version - t)
                by_staleness[head.version - t] = by_staleness.get(head.version - t, 0) + n
            discount = min(1.0, priced / weight_total)
            for name in summed:
                summed[name] += discount * tensors[name].astype(np.float64)
        divisor = self._k if self._divide_by_k else total_updates
        step = {name: self._lr * total / divisor for name, total in summed.items()}
        norm = _step_norm(step)
        if self._max_step is not None and norm > self._max_step:
            log.info("step norm %.4g clipped to %.4g", norm, self._max_step)
            step = {name: t * (self._max_step / norm) for name, t in step.items()}
        digest = put_adapter(self._blobs, current.apply_update(step))
        new_version = head.version + 1
        new_head = {
            "version": new_version,
            "adapter_sha256": digest,
            "cohorts": cohorts,
            "updates": total_updates,
            "guard": guard.to_json(),
        }
        record = {
            **new_head,
            "committed_at": self._clock.time(),
            "holder": self._holder,
            # What the version was built from, for whoever asks why B moved as it did.
            "step_norm": norm,
            "step_clipped": self._max_step is not None and norm > self._max_step,
            "staleness": staleness,
        }
        if not self._write_head(lease, head_record.version, new_head, record):
            return None
        self._retire(cohorts)
        log.info(
            "committed version %d from %d updates in %d cohorts (staleness %s, step norm %.4g)",
            new_version,
            total_updates,
            len(cohorts),
            sorted(staleness.values()),
            norm,
        )
        return VersionInfo(
            new_version,
            digest,
            tuple(cohorts),
            total_updates,
            abandoned=guard.abandoned,
            folded_staleness=tuple(sorted(by_staleness.items())),
        )

    # ------------------------------------------------------------------ commit parts

    def _review(self, guard: GuardState, head: VersionInfo) -> Verdict:
        """Run :func:`coordinator.guard.review` on the version records written since."""
        assert self._tolerance is not None
        # Only the newest REVIEW_WINDOW versions are read: without evaluations (no worker
        # group running) `reviewed` never advances, and the read must not grow with the run.
        first = max(guard.reviewed + 1, head.version - REVIEW_WINDOW + 1)
        versions = list(range(first, head.version + 1))
        scored: dict[int, tuple[float, str]] = {}
        for version, rec in zip(
            versions, self._store.get_many([version_key(v) for v in versions]), strict=True
        ):
            if rec is None:
                continue  # removed by retention before it was scored: nothing to judge
            obj = json.loads(rec.value)
            if obj.get("eval_bpb") is not None:
                scored[version] = (float(obj["eval_bpb"]), str(obj["adapter_sha256"]))
        return review(guard, scored, head=head.version, tolerance=self._tolerance)

    def take_dropped(self) -> list[DroppedSum]:
        """Return the sums this replica retired unused since the last call, and forget them.

        A sum is retired unused when a commit finds it trained on a version too old by
        then (``max_staleness``) or abandoned by a rollback: its updates were accepted into
        the buffer and then never counted. The caller reports them (``update_dropped``).
        """
        dropped, self._dropped = self._dropped, []
        return dropped

    def _drop_unusable(
        self, fields: dict[str, dict[str, Any]], *, head: int, guard: GuardState
    ) -> None:
        """Retire (never fold in) buffered sums trained on abandoned or too old versions."""
        drop = []
        for cohort_id, meta in fields.items():
            trained_on = int(meta.get("trained_on", head))
            if guard.is_abandoned(trained_on):
                why = f"trained on version {trained_on}, abandoned by a rollback"
            elif head - trained_on > self._policy.max_staleness:
                why = (
                    f"trained on version {trained_on}, {head - trained_on} versions behind "
                    f"(limit {self._policy.max_staleness})"
                )
            else:
                continue
            log.warning("cohort %s dropped from the buffer: %s", cohort_id, why)
            drop.append(cohort_id)
            self._dropped.append(DroppedSum(cohort_id, int(meta["updates"]), trained_on, why))
        self._retire(drop)
        for cohort_id in drop:
            del fields[cohort_id]

    def _write_head(
        self, lease: Lease, expected: int, new_head: dict[str, object], record: dict[str, object]
    ) -> bool:
        """Write the version record, then move the head (the commit point), fenced."""
        version = int(str(new_head["version"]))
        try:
            self._store.fenced_put(version_key(version), json.dumps(record).encode(), lease=lease)
            self._store.fenced_compare_and_set(
                HEAD_KEY, json.dumps(new_head).encode(), lease=lease, expected_version=expected
            )
        except (FencingError, VersionConflict) as exc:
            log.warning("version %d not committed: %s", version, exc)
            self._lease = None
            return False
        return True

    def _commit_rollback(
        self, lease: Lease, head_record: Record, head: VersionInfo, verdict: Verdict
    ) -> VersionInfo | None:
        """Commit version ``head + 1`` with the best version's adapter (the same blob).

        The guard state written with it abandons every version after the best, so
        buffered sums trained on them are dropped; sums trained on the best or before
        stay buffered and are folded in later at the staleness they land with.
        """
        assert self._tolerance is not None
        state = verdict.state
        reason = verdict.reason(self._tolerance)
        get_adapter(self._blobs, state.best_sha256)  # present and intact, or raise here
        # The new head names no cohorts, so entries the current head folded in must be gone
        # before it moves (a crash mid-retire leaves them; the attempt may not have read the
        # buffer to find them), or they would be folded in again.
        self._retire(list(head.cohorts))
        new_version = head.version + 1
        new_head = {
            "version": new_version,
            "adapter_sha256": state.best_sha256,
            "cohorts": [],
            "updates": 0,
            "rollback_to": state.best_version,
            "guard": state.to_json(),
        }
        record = {
            **new_head,
            "committed_at": self._clock.time(),
            "holder": self._holder,
            "rollback_reason": reason,
        }
        if not self._write_head(lease, head_record.version, new_head, record):
            return None
        log.warning(
            "rolled back: version %d repeats version %d; %s",
            new_version,
            state.best_version,
            reason,
        )
        return VersionInfo(
            new_version,
            state.best_sha256,
            (),
            0,
            rolled_back_to=state.best_version,
            abandoned=state.abandoned,
        )
