"""The key layout of a federation's records in the state store.

Every role reads and writes run state through these prefixes, so ``estuary status``
can show what a run holds without knowing which component wrote it. Each record's
value is a UTF-8 JSON object; the fields listed are the ones ``estuary status``
shows (writers may add more).
"""

from __future__ import annotations

#: ``version/<n:010d>`` → committed model versions: ``version``, ``adapter_sha256``,
#: ``committed_at`` (Unix s), ``updates`` (client updates folded in), ``eval_bpb`` and
#: ``eval_at`` (Unix s) once evaluated.
#: Zero-padded so lexical order is numeric order.
VERSION_PREFIX = "version/"

#: ``cohort/<cohort_id>`` → secure-aggregation cohorts: ``stage``, ``status``,
#: ``device_class``, ``members``, ``version``, ``sealed_at``, ``survivors``, ``abort_reason``.
COHORT_PREFIX = "cohort/"

#: ``worker/<group>`` → worker-group heartbeats: ``last_seen`` (Unix s), ``jobs_done``,
#: ``jobs_skipped``, ``jobs_failed``, ``throughput_per_min``, ``current_job``,
#: ``last_lag_s``, ``last_eval_version``, ``stages``.
WORKER_PREFIX = "worker/"

#: ``device/<device_id>`` → enrolled devices: ``device_class``, ``enrolled_at``,
#: ``revoked``, ``last_seen`` (written at enrolment; ``estuary status`` shows the newer
#: of it and the device's newest request, from :data:`NONCE_PREFIX`).
DEVICE_PREFIX = "device/"

#: ``nonces/<device_id>`` → sorted set of the nonces of a device's signed requests, scored
#: by the request's timestamp (Unix ms, the device's clock, within the allowed skew of
#: the coordinator's). Written by every authenticated request (replay protection), pruned
#: to the skew window on each: its highest score is when the device last made a request.
NONCE_PREFIX = "nonces/"


#: ``forming/<class>`` → the cohort of a device class that is gathering devices (written
#: by the coordinator's admission, deleted when the cohort is sealed): ``cohort_id``,
#: ``members`` (device ids admitted so far), ``opened_at``, ``full_at`` (Unix s, once it
#: has ``min_size`` members). Cohorts never mix classes, so each class fills its own.
FORMING_PREFIX = "forming/"

#: ``federation/settings`` → what the coordinator publishes about how its federation
#: forms cohorts (:class:`estuary.federation.FederationRecord`): device classes, cohort
#: ``min_size`` / ``max_size``, ``formation_s``, ``buffer_size``. Rewritten by every
#: replica at start-up; ``estuary status`` reads it to say how many devices a class needs.
FEDERATION_KEY = "federation/settings"


def version_key(version: int) -> str:
    """Return the record key of model version ``version`` (≥ 0)."""
    if version < 0:
        raise ValueError(f"version: must be >= 0, got {version}")
    return f"{VERSION_PREFIX}{version:010d}"


def cohort_key(cohort_id: str) -> str:
    """Return the record key of cohort ``cohort_id``."""
    return f"{COHORT_PREFIX}{cohort_id}"


def forming_key(device_class: str) -> str:
    """Return the record key of the forming cohort of ``device_class``."""
    return f"{FORMING_PREFIX}{device_class}"


def worker_key(group: str) -> str:
    """Return the record key of worker group ``group``."""
    return f"{WORKER_PREFIX}{group}"


def device_key(device_id: str) -> str:
    """Return the record key of device ``device_id``."""
    return f"{DEVICE_PREFIX}{device_id}"


#: ``head/version`` → the announced (current) version: ``version``, ``adapter_sha256``,
#: ``cohorts`` (ids folded into it). Advanced only by a fenced compare-and-set, so it is
#: the single commit point of a new version; ``version/<n>`` is written before it.
HEAD_KEY = "head/version"

#: ``buffer/<cohort_id>`` → an unmasked cohort sum waiting for the next version.
#: Created with insert-if-absent, so a cohort's sum is counted at most once.
BUFFER_PREFIX = "buffer/"


def buffer_key(cohort_id: str) -> str:
    """Return the record key of cohort ``cohort_id``'s buffered sum."""
    return f"{BUFFER_PREFIX}{cohort_id}"


#: ``buffer-counts`` (sorted set) → each buffered cohort's id, scored by the client updates
#: in its sum: how many updates wait, in one read instead of a scan of the keyspace (the
#: admission asks on every request of a device that trained on the newest version). A
#: hint: written after the entry, dropped when the entry is folded in or dropped, and made
#: to match the entries again whenever the ledger reads the entries themselves (when the
#: count reaches K, and at least every ``coordinator.versions.BUFFER_REREAD_S``).
BUFFER_COUNTS = "buffer-counts"


#: ``pace-waiting`` (sorted set) → the devices the pacer deferred for a slot, each scored by
#: the time (Unix s) it was told to come back. Entries whose time has passed are pruned on
#: each deferral, so the set's size is the queue a new deferral is put behind (the
#: retry-after grows with it; :mod:`coordinator.pacing`). A hint, never more than one
#: entry per device: losing it only shortens the next retry-afters.
PACE_WAITING = "pace-waiting"


#: ``buffer-seen/<cohort_id>`` → marker that a cohort's sum was accepted, so a cohort
#: result delivered again after its version was committed is still refused. Removed with
#: the cohort's record and log (:mod:`coordinator.retention`), ``retention.grace_s`` after
#: the fold-in: by then no tick still holds the cohort to deliver it again.
BUFFER_SEEN_PREFIX = "buffer-seen/"


def buffer_seen_key(cohort_id: str) -> str:
    """Return the key of the marker that cohort ``cohort_id``'s sum was accepted."""
    return f"{BUFFER_SEEN_PREFIX}{cohort_id}"
