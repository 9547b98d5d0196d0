"""The key layout of a federation's records in the state store.

Every role reads and writes run state through these prefixes, so ``estuary status``
can show what a run holds without knowing which component wrote it. Each record's
value is a UTF-8 JSON object; the fields listed are the ones ``estuary status``
shows (writers may add more).
"""

from __future__ import annotations

#: ``version/<n:010d>`` → committed model versions: ``version``, ``adapter_sha256``,
#: ``committed_at`` (Unix s), ``updates`` (client updates folded in), ``eval_bpb``.
#: Zero-padded so lexical order is numeric order.
VERSION_PREFIX = "version/"

#: ``cohort/<cohort_id>`` → secure-aggregation cohorts: ``stage``, ``device_class``,
#: ``members``, ``version``, ``created_at``.
COHORT_PREFIX = "cohort/"

#: ``worker/<group>`` → worker-group heartbeats: ``last_seen`` (Unix s), ``jobs_done``,
#: ``stages``.
WORKER_PREFIX = "worker/"

#: ``device/<device_id>`` → enrolled devices: ``device_class``, ``enrolled_at``,
#: ``revoked``, ``last_seen``.
DEVICE_PREFIX = "device/"


def version_key(version: int) -> str:
    """Return the record key of model version ``version`` (≥ 0)."""
    if version < 0:
        raise ValueError(f"version: must be >= 0, got {version}")
    return f"{VERSION_PREFIX}{version:010d}"


def cohort_key(cohort_id: str) -> str:
    """Return the record key of cohort ``cohort_id``."""
    return f"{COHORT_PREFIX}{cohort_id}"


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


#: ``buffer-seen/<cohort_id>`` → marker that a cohort's sum was accepted; never deleted,
#: so a cohort result delivered again after its version was committed is still refused.
BUFFER_SEEN_PREFIX = "buffer-seen/"


def buffer_seen_key(cohort_id: str) -> str:
    """Return the key of the marker that cohort ``cohort_id``'s sum was accepted."""
    return f"{BUFFER_SEEN_PREFIX}{cohort_id}"
