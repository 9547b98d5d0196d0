"""Admission never hands out work that cannot count, even when versions outrun the cloud.

Devices train first, then join a cohort. An update trained more than
``aggregation.max_staleness`` versions behind the head cannot count: no training task is
handed out on an artifact that old (the service paces instead, and the worker groups'
supersede rule keeps each class's newest artifact close behind the head), a heartbeat
tells a device training on a version gone that stale to give up, its report is refused,
no cohort is sealed with a member whose update went that stale while the cohort formed,
and a sealed member's unstarted task on such a version is given up. Everything runs on
one virtual clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import Events, Fed, report_trained, tasks_for, training_for

from cloud_workers.group import WorkerGroup
from coordinator.cohorts import CohortRecord
from coordinator.errors import FailedPrecondition
from coordinator.service import PaceOffer, TaskOffer
from coordinator.versions import VersionInfo
from estuary.jobs import newest_done
from estuary.proto.v1 import jobs_pb2
from estuary.state.keys import version_key
from secure_agg import Stage


def commit(fed: Fed) -> VersionInfo:
    """Commit one version (a cohort sum of zeros) and queue its jobs, as the tick does."""
    ledger = fed.service.ledger
    head = ledger.head()
    assert head is not None
    updates = fed.settings.aggregation.buffer_size
    zeros = {n: np.zeros_like(b) for n, b in ledger.adapter(head).b.items()}
    ledger.add_cohort_sum(
        f"elsewhere-{head.version}", weighted_sum=zeros, weight_total=1.0, updates=updates
    )
    info = ledger.try_commit()
    assert info is not None and info.version == head.version + 1
    fed.service.jobs.submit(info)
    return info


def sealed(fed: Fed) -> list[CohortRecord]:
    return [CohortRecord.from_json(r.value, where=k) for k, r in fed.store.scan("cohort/").items()]


def head_version(fed: Fed) -> int:
    head = fed.service.ledger.head()
    assert head is not None
    return head.version


STALE = {"aggregation": {"buffer_size": 1, "max_staleness": 2}}


def test_a_class_whose_newest_artifact_is_too_stale_is_paced_until_a_current_one(
    tmp_path: Path, base: Any
) -> None:
    fed = Fed(tmp_path, base, **STALE)
    for _ in range(3):
        commit(fed)  # version 3; the newest built artifact is still version 0's
    laptops = [fed.device("laptop") for _ in range(3)]
    for _ in range(2):
        offers = [fed.service.get_task(d) for d in laptops]
        fed.service.tick()
    assert all(isinstance(o, PaceOffer) and "edge artifact" in o.reason for o in offers), offers
    assert sealed(fed) == [] and fed.service.admission.artifact_for("laptop") is None
    fed.run_jobs()  # version 1's build entry runs version 3's build in its place
    assert {o.version for o in tasks_for(fed, laptops)} == {3}
    assert newest_done(fed.store, "build_artifacts", device_class="laptop") == (
        3,
        "build_artifacts-laptop-v3",
    )


def test_an_update_gone_too_stale_is_refused_when_reported(tmp_path: Path, base: Any) -> None:
    # Prepare: K = 1, max_staleness 2; four laptops train on version 0, then versions
    # 1 and 2 commit: 2 behind, version 0 still counts.
    events = Events()
    fed = Fed(tmp_path, base, observer=events, **STALE)
    laptops = [fed.device("laptop") for _ in range(4)]
    training = training_for(fed, laptops)
    assert {t.version for t in training} == {0}
    commit(fed)
    commit(fed)
    assert not fed.service.heartbeat(laptops[0], training[0].task_id).abandon

    # Execute: version 3 commits: version 0 is 3 behind.
    commit(fed)

    # Assert: a heartbeat tells the devices to give up; a report is refused as too stale,
    # counted and told once each; the slot frees, and no cohort forms of such updates.
    assert fed.service.heartbeat(laptops[0], training[0].task_id).abandon
    for device, task in zip(laptops[:3], training[:3], strict=True):
        with pytest.raises(FailedPrecondition, match=r"trained_task_id: .* too stale"):
            fed.service.get_task(device, trained_task_id=task.task_id)
    assert fed.service.counters.updates_rejected == 3
    reasons = [e["reason"] for e in events.of("update_rejected")]
    assert reasons == ["trained on version 0, more than 2 versions behind the current 3"] * 3
    assert fed.service.cohorts.training_devices() == 1
    assert fed.service.cohorts.forming("laptop") is None and sealed(fed) == []

    # Execute: the fourth asks again without reporting (its reply was lost).
    again = fed.service.get_task(laptops[3])

    # Assert: its task is not handed out again but dropped, and no new one is given on
    # version 0's artifact (the newest built): paced until a current one is built. A
    # report of the dropped task is refused by name.
    assert isinstance(again, PaceOffer) and "edge artifact" in again.reason, again
    assert fed.service.cohorts.training_devices() == 0
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(laptops[3], trained_task_id=training[3].task_id)
    assert fed.service.cohorts.forming("laptop") is None
    fed.run_jobs()
    offers = tasks_for(fed, laptops[:3])
    assert {o.version for o in offers} == {3}
    assert [(r.version, r.member_versions) for r in sealed(fed)] == [(3, (3, 3, 3))]


def test_no_cohort_is_sealed_with_members_gone_too_stale_while_it_formed(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: K = 1, max_staleness 2, cohorts of 3 with t = 2. Two laptops train on
    # version 0 and report: they wait in the forming cohort. Versions 1 to 3 commit and
    # version 3's artifact is built: their updates, 3 behind, can no longer count.
    fed = Fed(tmp_path, base, **STALE)
    waiting = [fed.device("laptop") for _ in range(2)]
    training = training_for(fed, waiting)
    offers = report_trained(fed, waiting, training)
    assert all(isinstance(o, PaceOffer) and o.mechanism == "cohort_formation" for o in offers)
    for _ in range(3):
        commit(fed)
    fed.run_jobs()

    # Execute: a third laptop trains on version 3 and reports; the tick runs.
    late = fed.device("laptop")
    (task,) = training_for(fed, [late])
    assert task.version == 3
    fed.service.get_task(late, trained_task_id=task.task_id)
    fed.service.tick()

    # Assert: no cohort is sealed with a member whose update cannot count (this one, of
    # two such members and t = 2, could never unmask a sum).
    oldest_useful = head_version(fed) - fed.settings.aggregation.max_staleness
    assert [r.member_versions for r in sealed(fed) if min(r.member_versions) < oldest_useful] == []


def test_an_unstarted_task_on_a_version_gone_too_stale_is_given_up(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: a cohort of three laptops that trained on version 0, sealed, keys not yet
    # advertised; then versions 1 to 3 commit: version 0 is 3 behind (limit 2).
    fed = Fed(tmp_path, base, **STALE)
    laptops = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, laptops)
    assert {o.version for o in offers} == {0}
    for _ in range(3):
        commit(fed)

    # Execute: member 0, still holding its update, asks for its cohort task again.
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(laptops[0], trained_task_id=offers[0].trained_task_id)

    # Assert: its cohort task is given up (a dropout of its cohort), and no new training
    # task is given on version 0's artifact, the newest built: it is paced.
    record = fed.service.cohorts.record(offers[0].cohort_id)
    assert record is not None and record.abandoned == (offers[0].member_index,)
    with pytest.raises(FailedPrecondition, match="abandoned"):
        fed.service.poll_secagg(laptops[0], offers[0].cohort_id, Stage.ADVERTISE_KEYS)
    again = fed.service.get_task(laptops[0])
    assert isinstance(again, PaceOffer) and "edge artifact" in again.reason, again


class SlowCloud:
    """The real executor, but each job takes ``job_s`` of virtual time while versions commit.

    One version every ``commit_s`` seconds, from a federation elsewhere (zero sums): the
    cloud falls behind by ``job_s / commit_s`` versions per job it runs.
    """

    def __init__(self, fed: Fed, *, job_s: float, commit_s: float, versions: int) -> None:
        self.fed = fed
        self.inner = fed.group.executor
        self.job_s = job_s
        self.commit_s = commit_s
        self.versions = versions
        self.next_commit = fed.clock.time() + commit_s
        self.ran = 0

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        out = self.inner.execute(job)
        end = self.fed.clock.time() + self.job_s
        while self.next_commit <= end and head_version(self.fed) < self.versions:
            self.fed.clock.advance_to(self.next_commit)
            commit(self.fed)
            self.next_commit += self.commit_s
        self.fed.clock.advance_to(end)
        self.ran += 1
        return out


def test_commits_faster_than_jobs_never_hand_out_work_that_cannot_count(
    tmp_path: Path, base: Any
) -> None:
    # Prepare: K = 1, max_staleness 6, a cloud whose every job takes three versions' time
    # (nine jobs arrive for each one it runs); four phones and four laptops that train,
    # then report their update the next round.
    max_staleness = 6
    fed = Fed(
        tmp_path,
        base,
        aggregation={"buffer_size": 1, "max_staleness": max_staleness},
        pacing={"target_staleness": 8.0, "retry_after_min_s": 0.5},
    )
    cloud = SlowCloud(fed, job_s=3.0, commit_s=1.0, versions=30)
    group = WorkerGroup(
        fed.store, executor=cloud, name="slow", heartbeat_s=1.0, reclaim_idle_s=3.0,
        clock=fed.clock,
    )  # fmt: skip
    devices = [fed.device(c) for c in ("phone", "laptop") for _ in range(4)]
    training: dict[str, TaskOffer] = {}  # by device: the training task it holds
    handed: dict[str, list[tuple[int, int]]] = {"phone": [], "laptop": []}
    reports = {"joined": 0, "refused": 0}
    seen: set[str] = set()
    joined: set[str] = set()  # training tasks reported and taken
    commit(fed)  # version 1: from here on versions outrun the cloud

    # Execute: rounds of requests, a tick, and one job (or, the cloud idle, one commit).
    for _ in range(5000):
        oldest_useful = head_version(fed) - max_staleness
        for device in devices:
            task = training.get(device.device_id)
            if task is None:
                offer = fed.service.get_task(device)
                if isinstance(offer, TaskOffer):
                    # Assert: training on a version this old could never count: it must
                    # not be handed out.
                    assert offer.is_training, offer
                    assert offer.version >= oldest_useful, (offer.version, head_version(fed))
                    training[device.device_id] = offer
                continue
            try:
                offer = fed.service.get_task(device, trained_task_id=task.task_id)
            except FailedPrecondition as refused:
                # Assert: a report is refused exactly when its update no longer counts
                # (reported too stale, or its cohort, sealed, went too stale before the
                # member picked its cohort task up), naming what was refused.
                assert task.version < oldest_useful, (task.version, head_version(fed), refused)
                assert str(refused).startswith(f"trained_task_id: {task.task_id!r}")
                reports["refused"] += 1
                del training[device.device_id]
                continue
            if task.task_id not in joined:  # its first report: it joins a forming cohort
                assert task.version >= oldest_useful, (task.version, head_version(fed))
                joined.add(task.task_id)
            if isinstance(offer, TaskOffer):  # sealed; it never runs the cohort (it times out)
                assert offer.cohort_id and offer.version == task.version, offer
                reports["joined"] += 1
                del training[device.device_id]
        fed.service.tick()  # seals ready cohorts; aborts those whose keys time out
        for record in sealed(fed):
            if record.cohort_id not in seen:
                seen.add(record.cohort_id)
                # Assert: every member of a sealed cohort trained on a version that counts.
                assert min(record.member_versions) >= oldest_useful, (
                    record.member_versions,
                    head_version(fed),
                )
                handed[record.device_class].append((record.version, head_version(fed)))
        if not group.step(block_s=0):
            if head_version(fed) >= cloud.versions:
                break
            fed.clock.advance(cloud.commit_s)  # the cloud is idle: time still passes
            commit(fed)

    # Assert: not vacuous: both classes kept training and forming cohorts, on versions
    # close behind the head, and some updates did go too stale between training and
    # reporting (a job's three commits at once) and were refused.
    assert head_version(fed) == cloud.versions
    assert all(len(h) >= 3 for h in handed.values()), handed
    assert reports["joined"] >= 9 and reports["refused"] >= 1, reports
    # Each class's newest artifact stayed within reach: at the end it is that of the head.
    for device_class in ("phone", "laptop"):
        done = newest_done(fed.store, "build_artifacts", device_class=device_class)
        assert done is not None and done[0] == cloud.versions
    head_record = json.loads(fed.store.get(version_key(cloud.versions)).value)  # type: ignore[union-attr]
    assert np.isfinite(head_record["eval_bpb"])  # the newest version got its evaluation
    assert cloud.ran < cloud.versions  # most jobs were superseded, not run late
