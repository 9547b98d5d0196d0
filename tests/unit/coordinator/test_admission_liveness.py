"""Admission never hands out work that cannot count, even when versions outrun the cloud.

An update trained more than ``aggregation.max_staleness`` versions behind the head is
refused at the share relay, so a cohort sealed on an artifact that old is doomed from
the start. The service paces instead, and the worker groups' supersede rule keeps each
class's newest artifact close behind the head. Everything runs on one virtual clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import Fed, tasks_for

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


def test_a_formed_cohort_is_not_sealed_on_an_artifact_gone_too_stale(
    tmp_path: Path, base: Any
) -> None:
    fed = Fed(tmp_path, base, cohort={"min_size": 3, "max_size": 4, "formation_s": 5.0}, **STALE)
    laptops = [fed.device("laptop") for _ in range(3)]
    waits = [fed.service.get_task(d) for d in laptops]  # admitted: the cohort is forming
    assert all(isinstance(o, PaceOffer) and "fill" in o.reason for o in waits)
    for _ in range(3):
        commit(fed)
    fed.clock.advance(6.0)  # formation_s has passed: the cohort is ready but for its artifact
    fed.service.tick()
    offers = [fed.service.get_task(d) for d in laptops]
    assert sealed(fed) == []
    assert all(isinstance(o, PaceOffer) and "edge artifact" in o.reason for o in offers), offers
    fed.run_jobs()
    fed.service.tick()
    offers = [fed.service.get_task(d) for d in laptops]
    assert all(isinstance(o, TaskOffer) for o in offers)
    assert [(r.version, r.size) for r in sealed(fed)] == [(3, 3)]


def test_an_unstarted_task_on_a_version_gone_too_stale_is_given_up(
    tmp_path: Path, base: Any
) -> None:
    fed = Fed(tmp_path, base, **STALE)
    laptops = [fed.device("laptop") for _ in range(3)]
    offers = tasks_for(fed, laptops)  # sealed on version 0, keys not yet advertised
    assert {o.version for o in offers} == {0}
    for _ in range(3):
        commit(fed)
    again = fed.service.get_task(laptops[0])
    assert isinstance(again, PaceOffer), again
    with pytest.raises(FailedPrecondition, match="abandoned"):
        fed.service.poll_secagg(laptops[0], offers[0].cohort_id, Stage.ADVERTISE_KEYS)


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


def test_commits_faster_than_jobs_never_seal_a_doomed_cohort(tmp_path: Path, base: Any) -> None:
    max_staleness = 6
    fed = Fed(
        tmp_path,
        base,
        aggregation={"buffer_size": 1, "max_staleness": max_staleness},
        pacing={"target_staleness": 8.0, "retry_after_min_s": 0.5},
    )
    # Three versions per job: nine jobs arrive for each one the cloud runs.
    cloud = SlowCloud(fed, job_s=3.0, commit_s=1.0, versions=30)
    group = WorkerGroup(
        fed.store, executor=cloud, name="slow", heartbeat_s=1.0, reclaim_idle_s=3.0,
        clock=fed.clock,
    )  # fmt: skip
    devices = [fed.device(c) for c in ("phone", "laptop") for _ in range(4)]
    handed: dict[str, list[tuple[int, int]]] = {"phone": [], "laptop": []}
    seen: set[str] = set()
    commit(fed)  # version 1: from here on versions outrun the cloud
    for _ in range(5000):
        oldest_useful = head_version(fed) - max_staleness
        for device in devices:
            offer = fed.service.get_task(device)
            if isinstance(offer, TaskOffer):
                # Work on a version this old could never count: it must not be handed out.
                assert offer.version >= oldest_useful, (offer.version, head_version(fed))
        fed.service.tick()  # seals ready cohorts; aborts those whose keys time out
        for record in sealed(fed):
            if record.cohort_id not in seen:
                seen.add(record.cohort_id)
                assert record.version >= oldest_useful, (record.version, head_version(fed))
                handed[record.device_class].append((record.version, head_version(fed)))
        if not group.step(block_s=0):
            if head_version(fed) >= cloud.versions:
                break
            fed.clock.advance(cloud.commit_s)  # the cloud is idle: time still passes
            commit(fed)
    assert head_version(fed) == cloud.versions
    # Not vacuous: both classes kept training, on versions close behind the head.
    assert all(len(h) >= 3 for h in handed.values()), handed
    # Each class's newest artifact stayed within reach: at the end it is that of the head.
    for device_class in ("phone", "laptop"):
        done = newest_done(fed.store, "build_artifacts", device_class=device_class)
        assert done is not None and done[0] == cloud.versions
    head_record = json.loads(fed.store.get(version_key(cloud.versions)).value)  # type: ignore[union-attr]
    assert np.isfinite(head_record["eval_bpb"])  # the newest version got its evaluation
    assert cloud.ran < cloud.versions  # most jobs were superseded, not run late
