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
