"""What the pacer counts, and when a forming cohort stops waiting for more members.

Devices train first: the pacer caps the devices holding a training task
(``K × target_staleness``). A device that reports its training task finished leaves the
count at once; waiting in a forming cohort, or aggregating in a sealed one, it trains
nothing and holds no slot. A training task that expires (its deadline, or a device silent
for ``silence_s``) is dropped by the tick, which frees its slot too. While no device
trains nobody can join a forming cohort, so one that has ``min_size`` members is sealed
without waiting ``formation_s``. The count is one store call, however many cohorts run
(issue 13: a full scan of every forming and active cohort on each GetTask cost 308 ms per
update at 10 000 devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from service_fixtures import Events, Fed, exchange_keys, report_trained, tasks_for, training_for
from test_admission_liveness import commit, sealed
from test_request_round_trips import CountingStore
from torch import nn

from coordinator.admission import SEAL_POLL_S
from coordinator.errors import FailedPrecondition
from coordinator.service import PaceOffer, TaskOffer
from secure_agg import Stage

COHORT = {
    "min_size": 3,
    "max_size": 3,
    "threshold_fraction": 0.6,
    "formation_s": 0.0,
    "deadline_s": 600.0,
    "key_timeout_s": 60.0,
    "silence_s": 30.0,
    "bits": 32,
    "clip_norm": 1.0,
}


def _cap_filled(
    tmp_path: Any, base: nn.Module, **overrides: Any
) -> tuple[Fed, list[Any], list[TaskOffer]]:
    """A federation (K = 3, cap 3) whose three laptops each hold a training task."""
    fed = Fed(
        tmp_path,
        base,
        pacing={"target_staleness": 1.0, "retry_after_min_s": 0.5},
        cohort=COHORT,
        **overrides,
    )
    assert fed.service.pacer.max_concurrency == 3
    trainers = [fed.device("laptop") for _ in range(3)]
    training = training_for(fed, trainers)
    assert fed.service.cohorts.training_devices() == 3
    return fed, trainers, training


def test_reporting_the_training_task_frees_its_slot_and_members_hold_none(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 3, filled by three laptops training; a fourth is deferred.
    fed, trainers, training = _cap_filled(tmp_path, base)
    late = fed.device("laptop")
    paced = fed.service.get_task(late)
    assert isinstance(paced, PaceOffer) and "3 devices training, cap 3" in paced.reason

    # Execute: one trainer reports its update finished.
    waiting = fed.service.get_task(trainers[0], trained_task_id=training[0].task_id)

    # Assert: it waits in the forming cohort, holding no slot; the late device is
    # admitted into training in its place.
    assert isinstance(waiting, PaceOffer) and waiting.mechanism == "cohort_formation"
    forming = fed.service.cohorts.forming("laptop")
    assert forming is not None and forming[0].members == (trainers[0].device_id,)
    assert fed.service.cohorts.training_devices() == 2
    admitted = fed.service.get_task(late)
    assert isinstance(admitted, TaskOffer) and admitted.is_training
    assert fed.service.cohorts.training_devices() == 3

    # Execute: the other two report; the third report fills the cohort (max_size 3).
    offers = report_trained(fed, trainers[1:], training[1:])

    # Assert: sealed; its members hold no slot, only the late device trains.
    assert isinstance(offers[-1], TaskOffer) and offers[-1].cohort_id
    assert fed.service.cohorts.forming("laptop") is None
    assert fed.service.cohorts.training_devices() == 1
    # Every device still to deliver an update counts for the metrics: 1 training + 3 sealed.
    assert fed.service.cohorts.active_devices() == 4


def test_a_restarted_member_takes_a_slot_only_with_its_new_training_task(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 6 (K = 3, target staleness 2); one cohort of three laptops that trained
    # and exchanged keys: none of them holds a slot.
    fed = Fed(
        tmp_path,
        base,
        pacing={"target_staleness": 2.0, "retry_after_min_s": 0.5},
        cohort=COHORT,
    )
    devices = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, devices)
    cohort_id = offers[0].cohort_id
    by_index, _ = exchange_keys(fed, offers, devices)
    fed.service.tick()  # notes the upload stage: its silence is counted from now
    assert fed.service.cohort_stage(cohort_id) is Stage.MASKED_INPUT
    assert fed.service.cohorts.training_devices() == 0

    # Execute: member 1 restarts (asks with no trained update): it abandons its cohort
    # task and trains afresh.
    again = fed.service.get_task(by_index[1])

    # Assert: its new training task holds the one slot.
    assert isinstance(again, TaskOffer) and again.is_training
    assert fed.service.cohorts.training_devices() == 1

    # Execute: it heartbeats while training; the other members stay silent past silence_s,
    # so the tick closes the upload stage (nobody uploaded: aborted) and folds it in.
    fed.clock.advance(20.0)
    assert not fed.service.heartbeat(by_index[1], again.task_id).abandon
    fed.clock.advance(11.0)
    fed.service.tick()
    fed.service.tick()

    # Assert: the cohort's end frees no slot (its members held none); the training one stays.
    assert fed.service.cohort_stage(cohort_id) is Stage.ABORTED
    assert fed.service.cohorts.active_ids() == []
    assert fed.service.cohorts.training_devices() == 1
    assert fed.service.cohorts.active_devices() == 1


def test_a_cohort_at_min_size_is_sealed_at_once_when_no_device_trains(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cohorts of 3 to 5 that would stay open 1000 s for more members; three
    # laptops train, and no other device does.
    cohort = {**COHORT, "max_size": 5, "formation_s": 1000.0}
    fed = Fed(
        tmp_path, base, pacing={"target_staleness": 4.0, "retry_after_min_s": 0.5}, cohort=cohort
    )
    devices = [fed.device("laptop") for _ in range(3)]
    training = training_for(fed, devices)

    # Execute: they report one after another, then each reports again.
    first = report_trained(fed, devices, training)
    offers = report_trained(fed, devices, training)

    # Assert: the third report leaves nobody training: sealed with 3 members, no 1000 s
    # wait (no virtual time passed at all).
    assert all(isinstance(o, PaceOffer) and o.mechanism == "cohort_formation" for o in first[:2])
    assert isinstance(first[2], TaskOffer) and not first[2].is_training
    assert all(isinstance(o, TaskOffer) for o in offers), offers
    assert len({o.cohort_id for o in offers if isinstance(o, TaskOffer)}) == 1
    assert [o.member_index for o in offers if isinstance(o, TaskOffer)] == [0, 1, 2]
    assert fed.service.cohorts.forming("laptop") is None


def _three_of_five_waiting(
    tmp_path: Any, base: nn.Module, *, formation_s: float
) -> tuple[Fed, list[Any], list[TaskOffer], list[Any]]:
    """Cohorts of 3 to 5; five laptops train, three report (twice, a tick between).

    Returns the federation, the devices, their training tasks and the second reports'
    answers: Pace for each of the three, waiting in the forming cohort.
    """
    cohort = {**COHORT, "max_size": 5, "formation_s": formation_s}
    fed = Fed(
        tmp_path, base, pacing={"target_staleness": 4.0, "retry_after_min_s": 10.0}, cohort=cohort
    )
    devices = [fed.device("laptop") for _ in range(5)]
    training = training_for(fed, devices)
    report_trained(fed, devices[:3], training[:3])
    fed.service.tick()
    paced = report_trained(fed, devices[:3], training[:3])
    assert all(isinstance(o, PaceOffer) and o.mechanism == "cohort_formation" for o in paced)
    return fed, devices, training, paced


def test_while_a_device_trains_a_cohort_waits_for_it_up_to_formation_s(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cohorts of 3 to 5 open 20 s for more (less than silence_s, so the device
    # still training stays alive throughout); five laptops train, three report.
    fed, devices, training, paced = _three_of_five_waiting(tmp_path, base, formation_s=20.0)

    # Assert: two devices still train, so the cohort at min_size stays open; its members
    # are told to come back no later than it is due (at most retry_after_min_s, 10 s).
    assert [o.retry_after_s for o in paced] == [10.0] * 3

    # Execute: a fourth reports within formation_s: it joins (max 5, so not sealed yet).
    forming = fed.service.cohorts.forming("laptop")
    assert forming is not None and forming[0].full_at is not None
    due = forming[0].full_at + 20.0
    fed.clock.advance_to(due - 5.0)
    joined = fed.service.get_task(devices[3], trained_task_id=training[3].task_id)

    # Assert: due in 5 s: told to come back then, not 10 s later.
    assert isinstance(joined, PaceOffer) and joined.retry_after_s == pytest.approx(5.0)
    forming = fed.service.cohorts.forming("laptop")
    assert forming is not None and len(forming[0].members) == 4

    # Execute: just short of formation_s the cohort is still open (a member asking is told
    # to come back at the next tick); at it, the tick seals it with the four that
    # reported, though the fifth still trains.
    fed.clock.advance_to(due - 0.1)
    fed.service.tick()
    close = fed.service.get_task(devices[0], trained_task_id=training[0].task_id)
    assert isinstance(close, PaceOffer) and close.retry_after_s == SEAL_POLL_S
    fed.clock.advance_to(due)
    fed.service.tick()

    # Assert
    assert fed.service.cohorts.forming("laptop") is None
    assert fed.service.cohorts.training_devices() == 1
    offers = report_trained(fed, devices[:4], training[:4])
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in offers), offers
    assert len({o.cohort_id for o in offers if isinstance(o, TaskOffer)}) == 1


def test_an_expired_training_task_is_dropped_by_the_tick_and_its_report_refused(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 3 filled by three trainers (silence_s 30, deadline 600 s); a fourth
    # device is deferred. Trainers 1 and 2 keep asking (GetTask keeps a task alive).
    events = Events()
    fed, trainers, training = _cap_filled(tmp_path, base, observer=events)
    start = fed.clock.time()
    late = fed.device("laptop")
    assert isinstance(fed.service.get_task(late), PaceOffer)

    # Execute: trainer 0 is silent for just under silence_s, then for silence_s.
    fed.clock.advance_to(start + 20.0)
    for device, task in zip(trainers[1:], training[1:], strict=True):
        again = fed.service.get_task(device)
        assert isinstance(again, TaskOffer) and again.task_id == task.task_id  # the same task
    fed.clock.advance_to(start + 29.9)
    fed.service.tick()
    assert fed.service.cohorts.training_devices() == 3
    fed.clock.advance_to(start + 30.0)
    fed.service.tick()

    # Assert: dropped by the tick, once, with an event; its slot frees for the late device.
    expired = events.of("training_expired")
    assert [e["task_id"] for e in expired] == [training[0].task_id]
    assert expired[0]["version"] == 0 and expired[0]["device_class"] == "laptop"
    assert fed.service.cohorts.training_task(trainers[0].device_id) is None
    assert fed.service.cohorts.training_devices() == 2
    admitted = fed.service.get_task(late)
    assert isinstance(admitted, TaskOffer) and admitted.is_training
    fed.service.tick()
    assert len(events.of("training_expired")) == 1

    # Assert: a report of the expired task is refused by name; the update is not wanted.
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(trainers[0], trained_task_id=training[0].task_id)
    assert fed.service.cohorts.forming("laptop") is None
    # A heartbeat for it says give up.
    assert fed.service.heartbeat(trainers[0], training[0].task_id).abandon


def test_heartbeats_keep_a_training_task_past_silence_s_but_not_past_its_deadline(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: training tasks due 100 s after they are given, silence_s 30.
    events = Events()
    fed = Fed(
        tmp_path,
        base,
        observer=events,
        pacing={"target_staleness": 1.0, "retry_after_min_s": 0.5},
        cohort={**COHORT, "deadline_s": 100.0},
    )
    device = fed.device("laptop")
    (task,) = training_for(fed, [device])
    start = fed.clock.time()

    # Execute: a heartbeat every 20 s, a tick every 10 s, up to 90 s.
    for t in range(10, 100, 10):
        fed.clock.advance_to(start + t)
        fed.service.tick()

        # Assert: alive throughout, well past silence_s after it was given.
        assert fed.service.cohorts.training_devices() == 1, t
        if t % 20 == 0:
            reply = fed.service.heartbeat(device, task.task_id)
            assert not reply.abandon and reply.current_version == 0

    # Assert: heartbeats do not reach past the deadline: alive just short of it,
    # dropped at it (10 s before the last heartbeat's silence would have run out).
    fed.clock.advance_to(start + 99.9)
    fed.service.tick()
    assert fed.service.cohorts.training_devices() == 1
    assert events.of("training_expired") == []
    fed.clock.advance_to(start + 100.0)
    fed.service.tick()
    assert fed.service.cohorts.training_devices() == 0
    assert [e["task_id"] for e in events.of("training_expired")] == [task.task_id]
    assert fed.service.heartbeat(device, task.task_id).abandon
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(device, trained_task_id=task.task_id)


def test_a_deferred_get_task_costs_the_same_store_calls_however_many_cohorts_run(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: cap 3 and a device to defer. Each round three new laptops fill the cap,
    # then report and form one more sealed cohort (whose members hold no slot).
    import service_fixtures

    monkeypatch.setattr(service_fixtures, "MemoryStore", CountingStore)
    fed = Fed(
        tmp_path,
        base,
        pacing={"target_staleness": 1.0, "retry_after_min_s": 0.5},
        cohort=COHORT,
    )
    store = fed.store
    assert isinstance(store, CountingStore)
    late = fed.device("laptop")
    calls = []
    for running in range(5):
        trainers = [fed.device("laptop") for _ in range(3)]
        training = training_for(fed, trainers)
        assert len(fed.service.cohorts.active_ids()) == running
        fed.service.get_task(late)  # the first deferred call may fill a cache
        store.calls.clear()

        # Execute
        offer = fed.service.get_task(late)
        calls.append(list(store.calls))

        assert isinstance(offer, PaceOffer) and "3 devices training, cap 3" in offer.reason, offer
        sealed = report_trained(fed, trainers, training)
        assert isinstance(sealed[-1], TaskOffer) and sealed[-1].cohort_id

    # Assert: deferred at the cap with 0 to 4 cohorts running, at the same cost: the
    # slots and the queue are counted with one call each and the device joins the queue
    # with one more; no scan.
    assert len(fed.service.cohorts.active_ids()) == 5
    assert calls == [["get_many", "zcard", "zcount", "zadd_pruned"]] * 5


def test_deferred_devices_are_told_to_come_back_one_after_another(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 3 filled by three training laptops (expected task 5 s: a slot frees
    # every 5 / 3 s); then a herd of devices asks at the same instant.
    fed, _trainers, _training = _cap_filled(tmp_path, base)
    herd = [fed.device("laptop") for _ in range(6)]

    # Execute
    offers = [fed.service.get_task(d) for d in herd]

    # Assert: each is put behind the ones before it, not all told the same 0.5 s.
    assert all(isinstance(o, PaceOffer) and o.mechanism == "pacing" for o in offers)
    retries = [o.retry_after_s for o in offers if isinstance(o, PaceOffer)]
    assert retries == pytest.approx([(n + 1) * 5.0 / 3 for n in range(6)])
    assert "5 waiting" in offers[-1].reason  # type: ignore[union-attr]

    # A device asking again before its time is moved to the back of the line, where its
    # own earlier place counts; it stays one entry, not one per request.
    again = fed.service.get_task(herd[0])
    assert isinstance(again, PaceOffer) and again.retry_after_s == pytest.approx(7 * 5.0 / 3)
    assert fed.service.admission.queue.waiting() == 6

    # Once the first ones' times have passed they no longer count (they came back or
    # went away): at 5 s the two told 3.3 and 5.0 s are out of the queue; herd[0] (now
    # 11.7 s) and the three told 6.7, 8.3 and 10 s are still in it. The trainers are
    # still training (silence_s is 30 s).
    fed.clock.advance(5.0)
    late = fed.service.get_task(fed.device("laptop"))
    assert isinstance(late, PaceOffer) and "4 waiting" in late.reason
    assert late.retry_after_s == pytest.approx(5 * 5.0 / 3)


def test_a_cohort_at_min_size_is_sealed_once_a_newer_version_is_committed(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cohorts of 3 to 5 that would stay open 1000 s for more members; five
    # laptops train on version 0, three report and wait while two still train.
    fed, devices, training, _paced = _three_of_five_waiting(tmp_path, base, formation_s=1000.0)

    # Execute: version 1 is committed (by updates from elsewhere); the tick runs. No
    # virtual time passes.
    assert commit(fed).version == 1
    fed.service.tick()

    # Assert: waiting longer would only make the three updates staler: sealed with them,
    # though two laptops still train and formation_s is far off.
    assert fed.service.cohorts.forming("laptop") is None
    offers = report_trained(fed, devices[:3], training[:3])
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in offers), offers
    assert len({o.cohort_id for o in offers if isinstance(o, TaskOffer)}) == 1
    (record,) = sealed(fed)
    assert record.member_versions == (0, 0, 0)
    assert fed.service.cohorts.training_devices() == 2


def test_a_tick_seals_without_scanning_the_store(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scan walks the whole keyspace (every device's records on Redis); the tick reads
    # the forming cohort of each configured class instead.
    import service_fixtures

    monkeypatch.setattr(service_fixtures, "MemoryStore", CountingStore)
    fed = Fed(tmp_path, base, cohort={**COHORT, "max_size": 5, "formation_s": 5.0})
    store = fed.store
    assert isinstance(store, CountingStore)
    # Prepare: four phones train, three report: their cohort waits formation_s for the
    # fourth, which is still training.
    devices = [fed.device("phone") for _ in range(4)]
    training = training_for(fed, devices)
    waiting = report_trained(fed, devices[:3], training[:3])
    assert all(isinstance(o, PaceOffer) for o in waiting)
    fed.service.tick()  # retention's first sweep, if due, is not what is measured
    assert fed.service.cohorts.forming("phone") is not None
    fed.clock.advance(5.0)
    store.calls.clear()

    # Execute
    fed.service.tick()

    # Assert: one scan is left: the ledger's read of its buffer entries (try_commit), not
    # expiring training tasks or sealing.
    before_commit = store.calls[: store.calls.index("renew_lease")]
    assert "scan" not in before_commit, " ".join(store.calls)
    assert store.calls.count("scan") == 1, " ".join(store.calls)
    assert fed.service.cohorts.forming("phone") is None  # sealed by this tick
    offers = report_trained(fed, devices[:3], training[:3])
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in offers), offers


def test_an_unchanged_cohort_record_is_not_parsed_again(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every poll, upload and heartbeat reads the cohort record; parsing it (identity keys
    # of every member) was a large part of the coordinator's cost per update.
    from coordinator.cohorts import CohortRecord

    fed = Fed(tmp_path, base, cohort=COHORT)
    devices = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, devices)
    cohort_id = offers[0].cohort_id
    fed.service.cohort_stage(cohort_id)
    original = CohortRecord.from_json.__func__  # type: ignore[attr-defined]
    parsed: list[str] = []

    def counting(cls: type[CohortRecord], raw: bytes, *, where: str = "") -> CohortRecord:
        parsed.append(where)
        return original(cls, raw, where=where)  # type: ignore[no-any-return]

    monkeypatch.setattr(CohortRecord, "from_json", classmethod(counting))

    for _ in range(5):
        assert fed.service.cohort_stage(cohort_id) is Stage.ADVERTISE_KEYS
        fed.service.heartbeat(devices[0], offers[0].task_id)
    assert parsed == []

    # A changed record is parsed afresh, once.
    fed.service.cohorts.update(cohort_id, lambda r: r.with_abandoned(1))
    parsed.clear()
    record = fed.service.cohorts.record(cohort_id)
    assert record is not None and record.abandoned == (1,)
    assert fed.service.cohorts.record(cohort_id) is record
    assert len(parsed) == 1


def _sealed_at_next_tick(
    tmp_path: Any, base: nn.Module
) -> tuple[Fed, list[Any], list[TaskOffer], list[Any]]:
    """Three of five laptops wait in a cohort at min_size; a commit makes the next tick seal it."""
    fed, devices, training, paced = _three_of_five_waiting(tmp_path, base, formation_s=1000.0)
    assert commit(fed).version == 1
    return fed, devices, training, paced


def _tick_killed_in(
    fed: Fed,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    instead: Callable[..., None] | None = None,
) -> None:
    """Tick, with ``CohortBook.<method>`` (or ``instead``) ending the coordinator there."""

    def killed(*_args: Any, **_kwargs: Any) -> None:
        raise SystemExit(f"coordinator killed in {method}")

    with monkeypatch.context() as patch:
        patch.setattr(type(fed.service.cohorts), method, instead or killed)
        with pytest.raises(SystemExit):
            fed.service.tick()


def test_a_coordinator_killed_between_sealing_and_assigning_loses_no_reported_update(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: three laptops reported and wait in a cohort at min_size; a commit makes
    # the next tick seal it.
    fed, devices, training, _paced = _sealed_at_next_tick(tmp_path, base)

    # Execute: the sealing coordinator dies after the seal (the forming record marked
    # sealed) and before the cohort record is written; another replica ticks.
    _tick_killed_in(fed, monkeypatch, "create")
    found = fed.service.cohorts.forming("laptop")
    assert found is not None and found[0].sealed_at is not None  # the marker stayed
    assert sealed(fed) == []
    fed.service.tick()

    # Assert: the seal was finished once: one cohort of the three, the marker gone, and
    # each member is offered its cohort task (before the fix: told to drop its update).
    assert fed.service.cohorts.forming("laptop") is None
    (record,) = sealed(fed)
    assert set(record.members) == {d.device_id for d in devices[:3]}
    offers = report_trained(fed, devices[:3], training[:3])
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in offers), offers
    assert {o.cohort_id for o in offers if isinstance(o, TaskOffer)} == {record.cohort_id}


def test_a_member_asking_while_its_seal_is_half_written_finishes_it(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: as above; the sealer dies after writing the cohort record and the first
    # member's assignment.
    fed, devices, training, _paced = _sealed_at_next_tick(tmp_path, base)
    book_type = type(fed.service.cohorts)
    assign = book_type.assign
    written: list[str] = []

    def assign_then_die(book: Any, device_id: str, assignment: Any) -> None:
        if written:
            raise SystemExit("coordinator killed while assigning")
        written.append(device_id)
        assign(book, device_id, assignment)

    _tick_killed_in(fed, monkeypatch, "assign", assign_then_die)
    assert len(written) == 1 and len(sealed(fed)) == 1

    # Execute: the third member, not yet assigned, reports again before any tick.
    offer = fed.service.get_task(devices[2], trained_task_id=training[2].task_id)

    # Assert: its call finished the seal: it holds its cohort task, the others theirs.
    (record,) = sealed(fed)
    assert isinstance(offer, TaskOffer) and offer.cohort_id == record.cohort_id
    assert fed.service.cohorts.forming("laptop") is None
    offers = report_trained(fed, devices[:3], training[:3])
    assert {o.cohort_id for o in offers if isinstance(o, TaskOffer)} == {record.cohort_id}
    assert len({o.task_id for o in offers if isinstance(o, TaskOffer)}) == 3


def test_finishing_a_seal_gives_no_task_back_to_a_member_that_gave_its_up(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the sealer wrote everything and died before deleting the marker; then a
    # member restarted without its update (it asks with no trained task): it is
    # abandoned and its assignment cleared.
    fed, devices, _training, _paced = _sealed_at_next_tick(tmp_path, base)
    _tick_killed_in(fed, monkeypatch, "seal_forming")
    (record,) = sealed(fed)
    fed.service.get_task(devices[0])
    assert fed.service.cohorts.assignment(devices[0].device_id) is None

    # Execute: the next tick finds the marker and finishes the seal.
    fed.service.tick()

    # Assert: the marker is gone, the cohort is still the one, and the member that gave
    # its task up was not handed it again; the others keep theirs.
    assert fed.service.cohorts.forming("laptop") is None
    assert [r.cohort_id for r in sealed(fed)] == [record.cohort_id]
    assert fed.service.cohorts.assignment(devices[0].device_id) is None
    for device in devices[1:3]:
        held = fed.service.cohorts.assignment(device.device_id)
        assert held is not None and held.cohort_id == record.cohort_id
