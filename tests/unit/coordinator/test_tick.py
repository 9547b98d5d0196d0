"""Stage deadlines and silence fire on the virtual clock, exactly at the rule's boundary.

Every test here moves time only with ``fed.clock.advance`` / ``advance_to``: a tick one
millisecond before a deadline leaves the stage open, a tick at the deadline closes it.
Nothing waits in real time, so the outcome does not depend on the machine's speed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from service_fixtures import Events, Fed, tasks_for

from coordinator.enrolment import Device
from coordinator.service import TaskOffer
from coordinator.tick import stage_deadline
from secure_agg import Client, Stage

#: Just short of a boundary: well above float rounding of Unix-epoch seconds (~1e-7).
EPSILON_S = 0.001


@dataclass
class Cohort:
    """One sealed cohort of three laptops and their secure-aggregation clients."""

    fed: Fed
    cohort_id: str
    devices: dict[int, Device]
    offers: dict[int, TaskOffer]
    clients: dict[int, Client]

    def stage(self) -> Stage | None:
        return self.fed.service.cohort_stage(self.cohort_id)

    def after_upload(self) -> Stage:
        """The stage a closed upload stage leads to: the consistency check in active mode."""
        active = self.offers[0].session.active
        return Stage.CONSISTENCY_CHECK if active else Stage.UNMASKING

    def advertise(self, *members: int) -> None:
        for i in members:
            payload = self.clients[i].advertise().encode()
            self.fed.service.send_secagg(
                self.devices[i], self.cohort_id, Stage.ADVERTISE_KEYS, payload
            )

    def share_keys(self, *members: int) -> None:
        for i in members:
            reply = self.fed.service.poll_secagg(
                self.devices[i], self.cohort_id, Stage.ADVERTISE_KEYS
            )
            assert reply is not None and reply.stage is Stage.SHARE_KEYS
            out = self.clients[i].handle(reply.payload)
            assert out is not None
            self.fed.service.send_secagg(
                self.devices[i], self.cohort_id, Stage.SHARE_KEYS, out.encode()
            )

    def take_share_relay(self, i: int) -> float:
        """Member ``i`` collects its shares and its staleness weight (it is seen alive)."""
        reply = self.fed.service.poll_secagg(self.devices[i], self.cohort_id, Stage.SHARE_KEYS)
        assert reply is not None and reply.stage is Stage.MASKED_INPUT
        self.clients[i].handle(reply.payload)
        return reply.weight

    def upload(self, i: int, weight: float) -> None:
        tensors = self.offers[i].session.tensors
        update = {name: np.full(length, 0.01, dtype=np.float32) for name, length in tensors}
        masked = self.clients[i].submit(update, weight=weight).encode()
        result = self.fed.service.upload_masked(
            self.devices[i],
            task_id=self.offers[i].task_id,
            cohort_id=self.cohort_id,
            payload=masked,
            sha256=hashlib.sha256(masked).hexdigest(),
        )
        assert result.accepted and not result.duplicate

    def unmask(self, *members: int) -> None:
        after = Stage.MASKED_INPUT
        if self.offers[members[0]].session.active:  # the default: sign the survivor set first
            for i in members:
                reply = self.fed.service.poll_secagg(self.devices[i], self.cohort_id, after)
                assert reply is not None and reply.stage is Stage.CONSISTENCY_CHECK, reply
                out = self.clients[i].handle(reply.payload)
                assert out is not None
                self.fed.service.send_secagg(
                    self.devices[i], self.cohort_id, Stage.CONSISTENCY_CHECK, out.encode()
                )
            after = Stage.CONSISTENCY_CHECK
        for i in members:
            reply = self.fed.service.poll_secagg(self.devices[i], self.cohort_id, after)
            assert reply is not None and reply.stage is Stage.UNMASKING, reply
            out = self.clients[i].handle(reply.payload)
            assert out is not None
            self.fed.service.send_secagg(
                self.devices[i], self.cohort_id, Stage.UNMASKING, out.encode()
            )


def sealed(tmp_path: Path, base: Any) -> Cohort:
    fed = Fed(tmp_path, base)
    devices = [fed.device("laptop") for _ in range(3)]
    listed = tasks_for(fed, devices)  # in the order of ``devices``
    offers = {o.member_index: o for o in listed}
    by_index = {o.member_index: d for o, d in zip(listed, devices, strict=True)}
    (cohort_id,) = {o.cohort_id for o in listed}
    clients = {i: fed.client(o, by_index[i]) for i, o in offers.items()}
    return Cohort(fed, cohort_id, by_index, offers, clients)


def in_upload_stage(tmp_path: Path, base: Any) -> Cohort:
    """A cohort whose keys are exchanged; a tick has noted MASKED_INPUT at this time."""
    cohort = sealed(tmp_path, base)
    cohort.advertise(0, 1, 2)
    cohort.share_keys(0, 1, 2)
    assert cohort.stage() is Stage.MASKED_INPUT
    cohort.fed.service.tick()
    record = cohort.fed.service.cohorts.record(cohort.cohort_id)
    assert record is not None and record.stage is Stage.MASKED_INPUT
    assert record.stage_started == cohort.fed.clock.time()
    return cohort


def test_a_key_stage_closes_exactly_key_timeout_after_it_started(tmp_path: Path, base: Any) -> None:
    cohort = sealed(tmp_path, base)
    fed, service = cohort.fed, cohort.fed.service
    record = service.cohorts.record(cohort.cohort_id)
    assert record is not None
    deadline = stage_deadline(
        record, Stage.ADVERTISE_KEYS, key_timeout_s=fed.settings.cohort.key_timeout_s
    )
    assert deadline == record.sealed_at + fed.settings.cohort.key_timeout_s
    cohort.advertise(0, 1)  # member 2 never advertises its keys

    fed.clock.advance_to(deadline - EPSILON_S)
    service.tick()
    assert cohort.stage() is Stage.ADVERTISE_KEYS

    fed.clock.advance_to(deadline)
    service.tick()
    # Two of three advertised, t = 2: the cohort goes on without member 2.
    assert cohort.stage() is Stage.SHARE_KEYS
    server = service.cohorts.cohort(record).server
    assert server.advertised(0) and server.advertised(1) and not server.advertised(2)
    cohort.share_keys(0, 1)
    assert cohort.stage() is Stage.MASKED_INPUT


def test_too_few_keys_by_the_deadline_aborts_and_frees_the_members(
    tmp_path: Path, base: Any
) -> None:
    cohort = sealed(tmp_path, base)
    fed, service = cohort.fed, cohort.fed.service
    cohort.advertise(0)  # one of three: below t = 2
    fed.clock.advance(fed.settings.cohort.key_timeout_s - EPSILON_S)
    service.tick()
    assert cohort.stage() is Stage.ADVERTISE_KEYS
    assert service.counters.cohorts_aborted == 0

    fed.clock.advance(EPSILON_S)
    service.tick()
    record = service.cohorts.record(cohort.cohort_id)
    assert record is not None and record.status == "aborted" and record.stage is Stage.ABORTED
    assert record.finished_at == fed.clock.time()
    assert service.counters.cohorts_aborted == 1
    assert service.cohorts.active_ids() == []
    assert all(service.cohorts.assignment(d.device_id) is None for d in cohort.devices.values())
    # The members are free: asking again forms a new cohort, not the aborted one.
    fresh = tasks_for(fed, list(cohort.devices.values()))
    assert {o.cohort_id for o in fresh} != {cohort.cohort_id}


def test_silent_members_close_the_upload_stage_after_silence_s(tmp_path: Path, base: Any) -> None:
    cohort = in_upload_stage(tmp_path, base)
    fed, service = cohort.fed, cohort.fed.service
    silence_s = fed.settings.cohort.silence_s
    record = service.cohorts.record(cohort.cohort_id)
    assert record is not None and record.stage_started + silence_s < record.deadline_at
    for i in (0, 1):
        cohort.upload(i, cohort.take_share_relay(i))
    cohort.take_share_relay(2)  # member 2 is seen now, then goes silent without uploading

    fed.clock.advance(silence_s - EPSILON_S)
    service.tick()
    assert cohort.stage() is Stage.MASKED_INPUT

    fed.clock.advance(EPSILON_S)
    service.tick()
    assert cohort.stage() is cohort.after_upload()  # well before deadline_at
    assert fed.clock.time() < record.deadline_at
    cohort.unmask(0, 1)
    service.tick()
    finished = service.cohorts.record(cohort.cohort_id)
    assert finished is not None and finished.status == "completed"
    assert finished.survivors == (0, 1)
    assert service.counters.updates_accepted == 2


def test_heartbeats_hold_the_upload_stage_open_until_the_deadline(
    tmp_path: Path, base: Any
) -> None:
    cohort = in_upload_stage(tmp_path, base)
    fed, service = cohort.fed, cohort.fed.service
    record = service.cohorts.record(cohort.cohort_id)
    assert record is not None
    for i in (0, 1):
        cohort.upload(i, cohort.take_share_relay(i))
    cohort.take_share_relay(2)
    slow = cohort.devices[2]
    # Member 2 keeps training: a heartbeat every 5 s, far inside silence_s.
    while fed.clock.time() + 5 < record.deadline_at:
        fed.clock.advance(5)
        reply = service.heartbeat(slow, cohort.offers[2].task_id)
        assert not reply.abandon
        service.tick()
        assert cohort.stage() is Stage.MASKED_INPUT

    fed.clock.advance_to(record.deadline_at - EPSILON_S)
    service.tick()
    assert cohort.stage() is Stage.MASKED_INPUT

    fed.clock.advance_to(record.deadline_at)
    service.tick()
    assert cohort.stage() is cohort.after_upload()  # closed by the deadline, 2 dropped
    cohort.unmask(0, 1)
    service.tick()
    finished = service.cohorts.record(cohort.cohort_id)
    assert finished is not None and finished.survivors == (0, 1)
    # Folded in: the late member's task is gone, so its next heartbeat says abandon.
    assert service.heartbeat(slow, cohort.offers[2].task_id).abandon


def test_a_sum_dropped_at_the_commit_is_reported_not_lost_silently(
    tmp_path: Path, base: Any
) -> None:
    events = Events()
    fed = Fed(
        tmp_path, base, observer=events,
        aggregation={"buffer_size": 1, "max_staleness": 1},
        pacing={"target_staleness": 4.0, "retry_after_min_s": 0.5},
    )  # fmt: skip
    ledger = fed.service.ledger

    def zeros() -> dict[str, np.ndarray]:
        head = ledger.head()
        assert head is not None
        return {n: np.zeros_like(b) for n, b in ledger.adapter(head).b.items()}

    for version in (0, 1):  # two versions, each from one fresh sum, committed by ticks
        ledger.add_cohort_sum(f"fresh{version}", weighted_sum=zeros(), weight_total=1.0,
                              updates=1, trained_on=version)  # fmt: skip
        assert fed.service.tick() is not None
    # A cohort of 2 that trained on version 0, folded in only now (head 2): 2 behind.
    ledger.add_cohort_sum("late", weighted_sum=zeros(), weight_total=2.0, updates=2,
                          trained_on=0)  # fmt: skip
    assert fed.service.tick() is None  # nothing left to fold in
    dropped = [fields for kind, fields in events.seen if kind == "update_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["cohort_id"] == "late" and dropped[0]["updates"] == 2
    assert dropped[0]["trained_on"] == 0 and "limit 1" in dropped[0]["reason"]
    assert fed.service.counters.updates_dropped == 2
    fed.service.tick()
    assert len([k for k, _ in events.seen if k == "update_dropped"]) == 1  # once
