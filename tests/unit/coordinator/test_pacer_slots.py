"""What the pacer counts, and when a forming cohort stops waiting for more members.

The pacer caps the devices whose update is still to come (``K × target_staleness``). A
member whose staleness weight is fixed at the share relay has trained: waiting for its
cohort to unmask, it holds no slot. While the cap is reached nobody can join a forming
cohort, so one that has ``min_size`` members is sealed without waiting ``formation_s``.
The count is one store call, however many cohorts run (issue 13: a full scan of every
forming and active cohort on each GetTask cost 308 ms per update at 10 000 devices).
"""

from __future__ import annotations

from typing import Any

import pytest
from service_fixtures import Fed, exchange_keys, tasks_for
from test_request_round_trips import CountingStore
from torch import nn

from coordinator.service import PaceOffer, TaskOffer
from secure_agg import Stage

COHORT = {
    "min_size": 3,
    "max_size": 3,
    "threshold_fraction": 0.6,
    "formation_s": 0.0,
    "deadline_s": 600.0,
    "key_timeout_s": 60.0,
    "bits": 32,
    "clip_norm": 1.0,
}


def _one_cohort_past_keys(
    tmp_path: Any, base: nn.Module, *, target_staleness: float
) -> tuple[Fed, list[TaskOffer], dict[int, Any]]:
    """A federation (K = 3) whose one cohort of 3 laptops has exchanged keys."""
    fed = Fed(
        tmp_path,
        base,
        pacing={"target_staleness": target_staleness, "retry_after_min_s": 0.5},
        cohort=COHORT,
    )
    devices = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, devices)
    by_index, _ = exchange_keys(fed, offers, devices)
    return fed, offers, by_index


def test_a_member_past_the_share_relay_frees_its_pacer_slot(tmp_path: Any, base: nn.Module) -> None:
    # Prepare: cap 3 (K = 3, target staleness 1): one cohort of 3 fills it.
    fed, offers, by_index = _one_cohort_past_keys(tmp_path, base, target_staleness=1.0)
    assert fed.service.pacer.max_concurrency == 3
    late = fed.device("laptop")
    paced = fed.service.get_task(late)
    assert isinstance(paced, PaceOffer) and "cap 3" in paced.reason
    assert fed.service.cohorts.training_devices() == 3

    # Execute: member 0 trained and asks for the share relay (its weight is fixed now).
    reply = fed.service.poll_secagg(by_index[0], offers[0].cohort_id, Stage.SHARE_KEYS)
    assert reply is not None and reply.stage is Stage.MASKED_INPUT and reply.weight > 0

    # Assert: its slot is free while its cohort still runs; the next device is admitted.
    assert fed.service.cohort_stage(offers[0].cohort_id) is Stage.MASKED_INPUT
    assert fed.service.cohorts.training_devices() == 2
    admitted = fed.service.get_task(late)
    assert isinstance(admitted, PaceOffer) and "waiting for the cohort to fill" in admitted.reason
    assert late.device_id in fed.service.cohorts.forming("laptop")[0].members  # type: ignore[index]
    assert fed.service.cohorts.training_devices() == 3


def test_finishing_or_abandoning_a_task_frees_its_slot(tmp_path: Any, base: nn.Module) -> None:
    fed, offers, by_index = _one_cohort_past_keys(tmp_path, base, target_staleness=2.0)
    assert fed.service.cohorts.training_devices() == 3

    # A member that asks for new work mid-task abandons it: its slot goes, a new one
    # (in a forming cohort) comes.
    again = fed.service.get_task(by_index[1])
    assert isinstance(again, PaceOffer)
    assert fed.service.cohorts.training_devices() == 3
    # The others are silent; the upload deadline aborts the cohort and the tick folds it
    # in: every one of its members' slots goes, the re-admitted device's stays.
    fed.clock.advance(601.0)
    fed.service.tick()
    fed.service.tick()
    assert fed.service.cohort_stage(offers[0].cohort_id) is Stage.ABORTED
    assert fed.service.cohorts.training_devices() == 1
    assert fed.service.cohorts.active_devices() == 1


def test_a_cohort_at_min_size_is_sealed_at_once_while_the_pacer_is_full(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 3, cohorts of 3 to 5 that would stay open 1000 s for more members.
    cohort = {**COHORT, "max_size": 5, "formation_s": 1000.0}
    fed = Fed(
        tmp_path, base, pacing={"target_staleness": 1.0, "retry_after_min_s": 0.5}, cohort=cohort
    )
    devices = [fed.device("laptop") for _ in range(3)]

    # Execute: three devices fill the pacer; nobody else can be admitted.
    first = [fed.service.get_task(d) for d in devices]
    offers = [fed.service.get_task(d) for d in devices]

    # Assert: sealed with 3 members, no 1000 s wait (no virtual time passed at all).
    assert all(isinstance(o, PaceOffer) for o in first[:2])
    assert all(isinstance(o, TaskOffer) for o in offers), offers
    assert len({o.cohort_id for o in offers if isinstance(o, TaskOffer)}) == 1
    assert fed.service.cohorts.forming("laptop") is None


def test_below_the_cap_a_cohort_waits_formation_s_for_more(tmp_path: Any, base: nn.Module) -> None:
    cohort = {**COHORT, "max_size": 5, "formation_s": 1000.0}
    fed = Fed(
        tmp_path, base, pacing={"target_staleness": 4.0, "retry_after_min_s": 0.5}, cohort=cohort
    )
    devices = [fed.device("laptop") for _ in range(3)]
    for d in devices:
        fed.service.get_task(d)
    fed.service.tick()
    assert all(isinstance(fed.service.get_task(d), PaceOffer) for d in devices)
    fed.clock.advance(1000.0)
    fed.service.tick()
    assert all(isinstance(fed.service.get_task(d), TaskOffer) for d in devices)


def test_a_deferred_get_task_costs_the_same_store_calls_however_many_cohorts_run(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: cap 3; four cohorts whose members all passed the share relay (waiting to
    # unmask, no slot held), then a fifth that fills the cap, then a device to defer.
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
    for n in range(5):
        devices = [fed.device("laptop") for _ in range(3)]
        offers = tasks_for(fed, devices)
        by_index, _ = exchange_keys(fed, offers, devices)
        if n < 4:
            for device in by_index.values():
                reply = fed.service.poll_secagg(device, offers[0].cohort_id, Stage.SHARE_KEYS)
                assert reply is not None and reply.stage is Stage.MASKED_INPUT
        else:
            fed.service.get_task(late)  # the first deferred call may fill a cache
        store.calls.clear()

        # Execute
        offer = fed.service.get_task(late) if n == 4 else None
        calls.append(list(store.calls))

    # Assert: deferred at the cap with 5 cohorts running: the slots and the queue are
    # counted with one call each and the device joins the queue with one more; no scan.
    assert len(fed.service.cohorts.active_ids()) == 5
    assert isinstance(offer, PaceOffer) and "3 devices training, cap 3" in offer.reason, offer
    assert calls[-1] == ["get_many", "zcard", "zcount", "zadd_pruned"]


def test_deferred_devices_are_told_to_come_back_one_after_another(
    tmp_path: Any, base: nn.Module
) -> None:
    # Prepare: cap 3 filled by one cohort of laptops (expected task 5 s: a slot frees
    # every 5 / 3 s); then a herd of devices asks at the same instant.
    fed, _offers, _ = _one_cohort_past_keys(tmp_path, base, target_staleness=1.0)
    herd = [fed.device("laptop") for _ in range(6)]

    # Execute
    offers = [fed.service.get_task(d) for d in herd]

    # Assert: each is put behind the ones before it, not all told the same 0.5 s.
    assert all(isinstance(o, PaceOffer) and o.mechanism == "pacing" for o in offers)
    retries = [o.retry_after_s for o in offers if isinstance(o, PaceOffer)]
    assert retries == pytest.approx([(n + 1) * 5.0 / 3 for n in range(6)])
    assert "5 waiting" in offers[-1].reason

    # A device asking again before its time is moved to the back of the line, where its
    # own earlier place counts; it stays one entry, not one per request.
    again = fed.service.get_task(herd[0])
    assert isinstance(again, PaceOffer) and again.retry_after_s == pytest.approx(7 * 5.0 / 3)
    assert fed.service.admission.queue.waiting() == 6

    # Once the first ones' times have passed they no longer count (they came back or
    # went away): at 5 s the two told 3.3 and 5.0 s are out of the queue; herd[0] (now
    # 11.7 s) and the three told 6.7, 8.3 and 10 s are still in it.
    fed.clock.advance(5.0)
    late = fed.service.get_task(fed.device("laptop"))
    assert isinstance(late, PaceOffer) and "4 waiting" in late.reason
    assert late.retry_after_s == pytest.approx(5 * 5.0 / 3)


def test_a_tick_seals_without_scanning_the_store(
    tmp_path: Any, base: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scan walks the whole keyspace (every device's records on Redis); the tick reads
    # the forming cohort of each configured class instead.
    import service_fixtures

    monkeypatch.setattr(service_fixtures, "MemoryStore", CountingStore)
    fed = Fed(tmp_path, base, cohort={**COHORT, "formation_s": 5.0})
    store = fed.store
    assert isinstance(store, CountingStore)
    devices = [fed.device("phone") for _ in range(3)]
    for d in devices:
        fed.service.get_task(d)
    fed.service.tick()  # retention's first sweep, if due, is not what is measured
    fed.clock.advance(5.0)
    store.calls.clear()

    fed.service.tick()

    # One scan is left: the ledger's read of its buffer entries (try_commit), not sealing.
    before_commit = store.calls[: store.calls.index("renew_lease")]
    assert "scan" not in before_commit, " ".join(store.calls)
    assert store.calls.count("scan") == 1, " ".join(store.calls)
    assert fed.service.cohorts.forming("phone") is None  # sealed by this tick
    assert all(isinstance(fed.service.get_task(d), TaskOffer) for d in devices)


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
