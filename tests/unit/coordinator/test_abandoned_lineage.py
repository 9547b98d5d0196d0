"""No work is handed out, or weighted, on a lineage the regression guard abandoned.

A rollback (:mod:`coordinator.guard`) commits a new head that repeats the best version's
adapter and abandons every version after the best: buffered sums trained on them are
dropped at commit. So admission must not hand out a training task on an artifact of an
abandoned version (however new it is), an update trained on one is refused when it is
reported, a device holding an unstarted cohort task on one gives it up, and the share
relay refuses to weight a member that trained on one. Everything runs on one virtual
clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import Fed, exchange_keys, tasks_for, training_for

from coordinator.cohorts import CohortRecord
from coordinator.errors import FailedPrecondition
from coordinator.service import PaceOffer, TaskOffer
from coordinator.versions import VersionInfo
from estuary.jobs import newest_done, update_version_record
from estuary.state.keys import version_key
from secure_agg import Stage

GUARD = {
    "aggregation": {
        "buffer_size": 1,
        "max_staleness": 8,
        "guard": True,
        "guard_tolerance_bpb": 0.1,
    },
    "pacing": {"target_staleness": 8.0, "retry_after_min_s": 0.5},  # room for two cohorts
}


def commit(fed: Fed) -> VersionInfo:
    """Commit one version (a cohort sum of zeros) and queue its jobs, as the tick does."""
    ledger = fed.service.ledger
    head = ledger.head()
    assert head is not None
    zeros = {n: np.zeros_like(b) for n, b in ledger.adapter(head).b.items()}
    ledger.add_cohort_sum(
        f"elsewhere-{head.version}", weighted_sum=zeros, weight_total=1.0, updates=1
    )
    info = ledger.try_commit()
    assert info is not None and info.version == head.version + 1 and info.rolled_back_to is None
    fed.service.jobs.submit(info)
    return info


def roll_back(fed: Fed) -> VersionInfo:
    """Score versions 1 (best), 2 (within tolerance) and 3 (a regression); commit the rollback.

    Every version has version 0's adapter (zero sums), so the scores are set around
    version 0's real one: the rollback's own evaluation is then no regression.
    """
    real = json.loads(fed.store.get(version_key(0)).value)["eval_bpb"]  # type: ignore[union-attr]
    for version, bpb in ((1, real - 0.01), (2, real + 0.05), (3, real + 0.5)):
        update_version_record(fed.store, version, {"eval_bpb": bpb}, stamp="eval_at")
    rollback = fed.service.ledger.try_commit()
    assert rollback is not None and rollback.version == 4 and rollback.rolled_back_to == 1
    assert rollback.abandoned == ((2, 3),)
    assert fed.service.ledger.head() == rollback
    fed.service.jobs.submit(rollback)  # as the tick does for every version it commits
    return rollback


def sealed(fed: Fed) -> list[CohortRecord]:
    return [CohortRecord.from_json(r.value, where=k) for k, r in fed.store.scan("cohort/").items()]


def test_no_training_task_on_an_abandoned_version_however_new_and_none_counts(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: versions 1-3, artifacts built for the newest (version 3); two laptops
    # train on it. Then the guard rolls back to version 1, abandoning 2 and 3.
    fed = Fed(tmp_path, base, **GUARD)
    for _ in range(3):
        commit(fed)
    fed.run_jobs()
    assert newest_done(fed.store, "build_artifacts", device_class="laptop") == (
        3,
        "build_artifacts-laptop-v3",
    )
    early = [fed.device("laptop") for _ in range(2)]
    on_abandoned = training_for(fed, early)
    assert {t.version for t in on_abandoned} == {3}
    rollback = roll_back(fed)
    laptops = [fed.device("laptop") for _ in range(3)]

    # Execute: the fleet asks for work before the rollback version's artifact exists.
    offers = [fed.service.get_task(d) for d in laptops]
    fed.service.tick()
    offers += [fed.service.get_task(d) for d in laptops]

    # Assert: training is on a version of the kept lineage (version 0's artifact, the
    # newest built one not abandoned), never on 2 or 3.
    assert all(isinstance(o, TaskOffer) and o.is_training for o in offers), offers
    assert {o.version for o in offers if isinstance(o, TaskOffer)} == {0}
    assert fed.service.admission.artifact_for("laptop") is not None
    assert fed.service.admission.artifact_for("laptop")[0] == 0  # type: ignore[index]

    # Execute: the two that trained on version 3 report; a heartbeat of theirs first.
    rejected = fed.service.counters.updates_rejected
    assert fed.service.heartbeat(early[0], on_abandoned[0].task_id).abandon

    # Assert: refused by name, as abandoned, each counted; neither joins a cohort.
    for device, task in zip(early, on_abandoned, strict=True):
        with pytest.raises(FailedPrecondition, match=r"trained_task_id: .*abandoned by a rollback"):
            fed.service.get_task(device, trained_task_id=task.task_id)
    assert fed.service.counters.updates_rejected == rejected + 2
    assert fed.service.cohorts.forming("laptop") is None

    # Assert: the three on version 0 form a cohort on it; once the rollback's artifact is
    # built, new devices train on it.
    trained = tasks_for(fed, laptops)
    assert {o.version for o in trained} == {0}
    assert [r.member_versions for r in sealed(fed)] == [(0, 0, 0)]
    fed.run_jobs()
    assert fed.service.admission.artifact_for("laptop")[0] == rollback.version  # type: ignore[index]
    more = tasks_for(fed, [fed.device("laptop") for _ in range(3)])
    assert {o.version for o in more} == {rollback.version}


def test_an_unstarted_task_on_an_abandoned_version_is_given_up(tmp_path: Path, base: Any) -> None:
    # Prepare: a cohort of three laptops sealed on version 3, keys not yet advertised;
    # then the guard rolls back, abandoning version 3.
    fed = Fed(tmp_path, base, **GUARD)
    for _ in range(3):
        commit(fed)
    fed.run_jobs()
    laptops = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, laptops)
    assert {o.version for o in offers} == {3}
    cohort_id = offers[0].cohort_id
    rollback = roll_back(fed)

    # Execute: member 0, still holding its update, asks for its cohort task again.
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(laptops[0], trained_task_id=offers[0].trained_task_id)

    # Assert: its cohort task is given up (the cohort counts it a dropout).
    record = fed.service.cohorts.record(cohort_id)
    assert record is not None and record.abandoned == (offers[0].member_index,)
    with pytest.raises(FailedPrecondition, match="abandoned"):
        fed.service.poll_secagg(laptops[0], cohort_id, Stage.ADVERTISE_KEYS)

    # Assert: its next training task is on the kept lineage. It last trained on version
    # 3, newer than version 0's artifact, so it waits while the rollback's artifact is
    # built, then trains on that.
    wait = fed.service.get_task(laptops[0])
    assert isinstance(wait, PaceOffer) and wait.mechanism == "next_version", wait
    fed.run_jobs()
    again = fed.service.get_task(laptops[0])
    assert isinstance(again, TaskOffer) and again.is_training, again
    assert again.version == rollback.version


def test_the_share_relay_refuses_to_weight_work_on_an_abandoned_version(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: a cohort on version 3 exchanges keys; then version 3 is abandoned.
    fed = Fed(tmp_path, base, **GUARD)
    for _ in range(3):
        commit(fed)
    fed.run_jobs()
    service = fed.service
    devices = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, devices)
    assert {o.version for o in offers} == {3}
    cohort_id = offers[0].cohort_id
    by_index, _ = exchange_keys(fed, offers, devices)
    roll_back(fed)
    rejected = service.counters.updates_rejected

    # Execute: each member, trained, asks for the share relay (where its weight is fixed).
    replies = [service.poll_secagg(by_index[i], cohort_id, Stage.SHARE_KEYS) for i in by_index]

    # Assert: refused (staleness 1 would have weighted it), counted once per member.
    for reply in replies:
        assert reply is not None and reply.stage is Stage.ABORTED, reply
        assert "abandoned" in reply.abort_reason
        assert reply.weight == 0.0
    assert service.poll_secagg(by_index[0], cohort_id, Stage.SHARE_KEYS).stage is Stage.ABORTED  # type: ignore[union-attr]
    assert service.counters.updates_rejected == rejected + len(by_index)
