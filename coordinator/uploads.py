"""Masked uploads: the exact size a member's input must have, and storing it durably.

A member uploads its masked input once it holds its staleness weight (fixed at the share
relay, :mod:`coordinator.relay`). Before a byte is read the servicer asks
:meth:`Uploads.expected_size`: the encoding of a masked input is fully determined by the
cohort's tensors and fixed-point width, so any other announced size is refused up front.
The upload itself is checked (task, digest, stage, weight, sender) and appended to the
cohort's log; it is acknowledged only once durable, and a byte-identical repeat is
acknowledged as a duplicate and not counted again.
"""

from __future__ import annotations

import hashlib

from coordinator.cohort_book import CohortBook
from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition, InvalidArgument
from coordinator.outcomes import ServiceCounters, ServiceObserver, UploadResult
from coordinator.relay import check_payload
from secure_agg import Stage
from secure_agg.messages import MaskedInput

__all__ = ["Uploads"]


class Uploads:
    """Checks and stores members' masked inputs.

    Parameters
    ----------
    book
        The cohort records and this replica's cohort states.
    counters, observer
        Told about every upload stored (not about duplicates).
    """

    def __init__(
        self, book: CohortBook, *, counters: ServiceCounters, observer: ServiceObserver
    ) -> None:
        self._book = book
        self._counters = counters
        self._observer = observer

    def expected_size(self, device: Device, cohort_id: str) -> int:
        """Exact size of this member's encoded masked input (checked before reading it)."""
        record, index = self._book.membership(device, cohort_id)
        config = record.session_config()
        # The encoding of empty tensors gives the framing; the packed elements add the rest
        # (no need to build a payload-sized probe for every upload).
        frame = MaskedInput(
            session=b"\0" * 32,
            sender=index,
            tensors=tuple((name, b"") for name, _ in config.tensors),
        )
        per_element = (config.fixed_point.bits + 7) // 8
        return len(frame.encode()) + per_element * sum(n for _, n in config.tensors)

    def store(
        self, device: Device, *, task_id: str, cohort_id: str, payload: bytes, sha256: str
    ) -> UploadResult:
        """Store a member's masked input durably; a repeat is acknowledged as duplicate."""
        record, index = self._book.membership(device, cohort_id)
        if task_id != record.task_id(index):
            raise FailedPrecondition(f"task_id: {task_id!r} is not this device's task")
        if hashlib.sha256(payload).hexdigest() != sha256.lower():
            raise InvalidArgument("sha256: the uploaded bytes do not match the header's digest")
        cohort = self._book.cohort(record)
        if cohort.server.has_masked_input(index):
            return UploadResult(accepted=True, duplicate=True, durable_bytes=len(payload))
        if cohort.stage is not Stage.MASKED_INPUT:
            raise FailedPrecondition(
                f"cohort {cohort_id} is in stage {cohort.stage.name}, not MASKED_INPUT"
            )
        if cohort.server.weight_of(index) is None:
            raise FailedPrecondition(
                "no staleness weight assigned yet: await the share relay (AwaitSecAgg after "
                "SHARE_KEYS) before uploading"
            )
        message = check_payload(payload, index)
        if not isinstance(message, MaskedInput):
            raise InvalidArgument(f"payload: a {type(message).__name__}, not a masked input")
        outcome = cohort.submit_message(index, payload)
        if outcome.error is not None:
            raise FailedPrecondition(f"cohort {cohort_id}: masked input refused: {outcome.error}")
        if not outcome.duplicate:  # another replica may have stored the same bytes first
            self._counters.uploads += 1
            self._observer.event(
                "upload", cohort_id=cohort_id, member=index, bytes=len(payload), duplicate=False
            )
        return UploadResult(accepted=True, duplicate=outcome.duplicate, durable_bytes=len(payload))
