"""The secure-aggregation relay: members' messages in, each member's mailbox out.

Members send their key advertisements, encrypted shares, consistency signatures and
unmasking shares with :meth:`SecAggRelay.send`; each is checked (a sendable stage, the
cohort's current stage, a decodable message from this member's own index) and appended
to the cohort's replicated log (:mod:`coordinator.cohort_log`), which every replica
replays identically. Members collect what the server has for them with
:meth:`SecAggRelay.poll`.

The share relay is where a member's staleness weight is fixed: the member asks for it
when its cohort's keys are exchanged and it is about to upload, so the weight reflects
its own update's version (members of a cohort may have trained on different versions)
against the version current *then*. Work too stale for the policy, or trained on a
version the regression guard abandoned (:mod:`coordinator.guard`; its sum would be
dropped at commit), is refused there and the member drops out of the cohort (counted
once, however often it polls again).
"""

from __future__ import annotations

from typing import Any

from coordinator.cohort_book import CohortBook
from coordinator.cohort_log import ReplicatedCohort
from coordinator.cohorts import CohortRecord
from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition, InvalidArgument
from coordinator.outcomes import SecAggReply, ServiceCounters, ServiceObserver
from coordinator.staleness import StalenessPolicy, StaleUpdate
from coordinator.versions import VersionLedger
from secure_agg import Stage
from secure_agg import decode as decode_secagg

__all__ = ["SENDABLE", "SecAggRelay", "check_payload"]

#: Stages a device may send with SendSecAgg (the masked input has its own upload RPC).
SENDABLE = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.CONSISTENCY_CHECK, Stage.UNMASKING)


def check_payload(payload: bytes, index: int) -> Any:
    """Decode a member's secure-aggregation message and check it names the member.

    Raises
    ------
    InvalidArgument
        The bytes are not a secure-aggregation message, or its sender is another index.
    """
    try:
        message = decode_secagg(payload)
    except Exception as exc:  # the decoder raises several types for garbage
        raise InvalidArgument(f"payload: not a secure-aggregation message: {exc}") from exc
    sender = getattr(message, "sender", index)
    if sender != index:
        raise InvalidArgument(f"payload: sender {sender} is not this device's index {index}")
    return message


class SecAggRelay:
    """Takes and hands out the secure-aggregation messages of cohort members.

    Parameters
    ----------
    book
        The cohort records and this replica's cohort states.
    ledger
        The version history (staleness is measured against its head).
    policy
        Staleness limit and weights.
    counters, observer
        Told about weights assigned and updates rejected as too stale.
    """

    def __init__(
        self,
        book: CohortBook,
        *,
        ledger: VersionLedger,
        policy: StalenessPolicy,
        counters: ServiceCounters,
        observer: ServiceObserver,
    ) -> None:
        self._book = book
        self._ledger = ledger
        self._policy = policy
        self._counters = counters
        self._observer = observer
        self._rejected: set[tuple[str, int]] = set()

    def send(self, device: Device, cohort_id: str, stage: Stage, payload: bytes) -> Stage:
        """Take a member's message for ``stage``; return the cohort's stage after it."""
        if stage not in SENDABLE:
            raise InvalidArgument(
                f"stage: {stage.name} messages are not sent with SendSecAgg"
                + (" (use UploadMasked)" if stage is Stage.MASKED_INPUT else "")
            )
        record, index = self._book.membership(device, cohort_id)
        cohort = self._book.cohort(record)
        if cohort.stage is not stage:
            raise FailedPrecondition(
                f"cohort {cohort_id} is in stage {cohort.stage.name}, not {stage.name}"
            )
        check_payload(payload, index)
        outcome = cohort.submit_message(index, payload)
        if outcome.error is not None:
            raise FailedPrecondition(f"cohort {cohort_id}: message refused: {outcome.error}")
        return cohort.stage

    def poll(self, device: Device, cohort_id: str, after: Stage) -> SecAggReply | None:
        """Return the member's first message of a stage later than ``after``, or None.

        When that message is the share relay, the member's staleness weight is fixed now
        (the member is about to upload); work too stale is refused and the member drops.
        """
        record, index = self._book.membership(device, cohort_id)
        cohort = self._book.cohort(record)
        if cohort.stage is Stage.ABORTED:
            return SecAggReply(Stage.ABORTED, abort_reason=cohort.abort_reason or "aborted")
        for stage, payload in cohort.messages_for(index, after=after):
            if stage is Stage.MASKED_INPUT:
                weight = self._weight_for(cohort, record, index)
                if isinstance(weight, str):
                    return SecAggReply(Stage.ABORTED, abort_reason=weight)
                return SecAggReply(stage, payload, weight=weight)
            return SecAggReply(stage, payload)
        if cohort.stage is Stage.COMPLETED and after >= Stage.UNMASKING:
            result = cohort.server.result
            if result is not None and index in result.survivors:
                return SecAggReply(Stage.COMPLETED)
            return SecAggReply(Stage.ABORTED, abort_reason="not among the cohort's survivors")
        return None

    def _weight_for(
        self, cohort: ReplicatedCohort, record: CohortRecord, index: int
    ) -> float | str:
        """Return the member's weight (fixed now if not yet), or why its work cannot count.

        Refused: work on a version more than ``max_staleness`` behind the head, or on a
        version the regression guard abandoned (its sum would be dropped at commit).
        """
        weight = cohort.server.weight_of(index)
        if weight is not None:
            return weight
        head = self._ledger.head()
        current = head.version if head else 0
        version = record.member_version(index)
        refusal = reason = ""
        if head is not None and head.is_abandoned(version):
            refusal = reason = (
                f"update trained on version {version}, which the regression guard "
                "abandoned by a rollback"
            )
        else:
            try:
                staleness = self._policy.staleness(trained_on=version, current=current)
            except StaleUpdate as exc:
                refusal = (
                    f"update trained on version {version} is too stale "
                    f"(limit {self._policy.max_staleness})"
                )
                reason = str(exc)
        if refusal:
            key = (record.cohort_id, index)
            if key not in self._rejected:  # a refused member may poll again: count it once
                self._rejected.add(key)
                self._counters.updates_rejected += 1
                self._observer.event("update_rejected", cohort_id=record.cohort_id, reason=reason)
            return refusal
        self._book.mark_seen(record.cohort_id, index)
        cohort.assign_weight(index, self._policy.weight(staleness))
        assigned = cohort.server.weight_of(index)
        if assigned is None:  # the server took no weight for this member (as before: drop)
            return (
                f"update trained on version {version} is too stale "
                f"(limit {self._policy.max_staleness})"
            )
        self._counters.staleness[staleness] = self._counters.staleness.get(staleness, 0) + 1
        self._observer.event(
            "weight_assigned",
            cohort_id=record.cohort_id,
            member=index,
            staleness=staleness,
            weight=assigned,
        )
        return assigned
