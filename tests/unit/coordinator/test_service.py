"""The federation service end to end in one process: no gRPC, real secure aggregation.

Devices are simulated by secure_agg clients driven directly against the service; cloud
jobs are executed by a real ModelJobExecutor on the tiny preset (without the ONNX export,
which no test here reads). The committed version must equal the plain staleness-weighted
mean of the members' updates. Time is a VirtualClock (:mod:`service_fixtures`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
from service_fixtures import R_MAX, Fed, exchange_keys, tasks_for, training_for

from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.service import PaceOffer, TaskOffer
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.model.presets import build_preset
from secure_agg import Stage


def run_cohort(
    fed: Fed,
    devices: list[Device],
    *,
    rng: np.random.Generator,
    drop_after_keys: set[int] = frozenset(),  # type: ignore[assignment]
    offers: list[TaskOffer] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Drive one cohort to completion; return the plain Σ w ΔB and Σ w of survivors.

    ``offers``: the devices' cohort tasks if they hold them already (else they train and
    form the cohort now).
    """
    service = fed.service
    offers = tasks_for(fed, devices) if offers is None else offers
    cohort_id = offers[0].cohort_id
    assert {o.cohort_id for o in offers} == {cohort_id}
    by_index, clients = exchange_keys(fed, offers, devices)
    shapes = {
        n: (s[0], R_MAX)
        for n, s in GlobalAdapter.for_model(
            build_preset("tiny", seed=0), AdapterConfig(r_max=R_MAX)
        ).shapes.items()
    }
    plain = {n: np.zeros(s) for n, s in shapes.items()}
    weight_total = 0.0
    for i, client in clients.items():
        if i in drop_after_keys:
            continue
        reply = service.poll_secagg(by_index[i], cohort_id, Stage.SHARE_KEYS)
        assert reply is not None and reply.stage is Stage.MASKED_INPUT
        assert 0 < reply.weight <= 1
        client.handle(reply.payload)
        update = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items()}
        norm = np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update.values()))
        scale = min(1.0, offers[0].session.fixed_point.clip / norm)
        for n in plain:
            plain[n] += reply.weight * scale * update[n]
        weight_total += reply.weight
        masked = client.submit(
            {n: u.reshape(-1) for n, u in update.items()}, weight=reply.weight
        ).encode()
        sha = hashlib.sha256(masked).hexdigest()
        task = f"{cohort_id}-{i}"
        first = service.upload_masked(
            by_index[i], task_id=task, cohort_id=cohort_id, payload=masked, sha256=sha
        )
        assert first.accepted and not first.duplicate
        again = service.upload_masked(
            by_index[i], task_id=task, cohort_id=cohort_id, payload=masked, sha256=sha
        )
        assert again.accepted and again.duplicate
    if drop_after_keys:
        # The dropped member never heartbeats: once it has been silent for silence_s the
        # upload stage closes, well before deadline_s.
        service.tick()
        assert fed.settings.cohort.silence_s + 1 < fed.settings.cohort.deadline_s
        fed.clock.advance(fed.settings.cohort.silence_s / 2)
        service.tick()
        assert service.cohort_stage(cohort_id) is Stage.MASKED_INPUT
        fed.clock.advance(fed.settings.cohort.silence_s / 2 + 1)
        service.tick()
    after = Stage.MASKED_INPUT
    if offers[0].session.active:  # the default: every survivor signs the survivor set first
        for i, client in clients.items():
            if i in drop_after_keys:
                continue
            reply = service.poll_secagg(by_index[i], cohort_id, after)
            assert reply is not None and reply.stage is Stage.CONSISTENCY_CHECK, reply
            out = client.handle(reply.payload)
            assert out is not None
            service.send_secagg(by_index[i], cohort_id, Stage.CONSISTENCY_CHECK, out.encode())
        after = Stage.CONSISTENCY_CHECK
    for i, client in clients.items():
        if i in drop_after_keys:
            continue
        reply = service.poll_secagg(by_index[i], cohort_id, after)
        assert reply is not None and reply.stage is Stage.UNMASKING, reply
        out = client.handle(reply.payload)
        assert out is not None
        service.send_secagg(by_index[i], cohort_id, Stage.UNMASKING, out.encode())
    service.tick()
    for i in clients:
        if i not in drop_after_keys:
            reply = service.poll_secagg(by_index[i], cohort_id, Stage.UNMASKING)
            assert reply is not None and reply.stage is Stage.COMPLETED
    return plain, weight_total


def test_versions_equal_weighted_mean_of_plain_updates(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base)
    service = fed.service
    rng = np.random.default_rng(1)
    laptops = [fed.device("laptop") for _ in range(3)]
    phones = [fed.device("phone") for _ in range(3)]
    stale = tasks_for(fed, phones)  # trained on version 0, finishes after version 1
    assert {o.version for o in stale} == {0}
    v0 = service.ledger.adapter(service.ledger.head())  # type: ignore[arg-type]
    plain, weights = run_cohort(fed, laptops, rng=rng)
    assert weights == 3.0  # fresh work: w = 1 each
    head = service.ledger.head()
    assert head is not None and head.version == 1 and head.updates == 3
    v1 = service.ledger.adapter(head)
    for name in plain:
        np.testing.assert_allclose(v1.b[name], v0.b[name] + plain[name] / weights, atol=1e-5)
    # Version 1's jobs were queued; the local worker evaluates it and builds artifacts.
    fed.run_jobs()
    record = json.loads(fed.store.get("version/0000000001").value)  # type: ignore[union-attr]
    assert np.isfinite(record["eval_bpb"])
    # The phones trained on version 0: staleness 1, polynomial weight (1 + 1) ** -0.5.
    plain2, weights2 = run_cohort(fed, phones, rng=rng, offers=stale)
    assert weights2 == pytest.approx(3 * 2**-0.5)
    assert service.counters.staleness == {0: 3, 1: 3}
    head2 = service.ledger.head()
    assert head2 is not None and head2.version == 2
    v2 = service.ledger.adapter(head2)
    # Stale work moves B by f(1) times a fresh step: the step is Σ w ΔB / N, not / Σ w
    # (coordinator.versions; issue 15).
    for name in plain2:
        np.testing.assert_allclose(
            v2.b[name], v1.b[name] + 2**-0.5 * plain2[name] / weights2, atol=1e-5
        )
    # A new laptop task now trains from version 2's artifact.
    fed.run_jobs()
    fresh = tasks_for(fed, [fed.device("laptop") for _ in range(3)])
    assert {o.version for o in fresh} == {2}


def test_dropout_after_keys_still_commits_survivors(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base, aggregation={"buffer_size": 2})
    devices = [fed.device("laptop") for _ in range(3)]
    v0 = fed.service.ledger.adapter(fed.service.ledger.head())  # type: ignore[arg-type]
    plain, weights = run_cohort(fed, devices, rng=np.random.default_rng(2), drop_after_keys={1})
    head = fed.service.ledger.head()
    assert head is not None and head.version == 1 and head.updates == 2
    v1 = fed.service.ledger.adapter(head)
    for name in plain:
        np.testing.assert_allclose(v1.b[name], v0.b[name] + plain[name] / weights, atol=1e-5)


@pytest.mark.parametrize(("divisor", "by"), [("updates", 3.0), ("buffer", 2.0)])
def test_a_version_of_more_than_k_updates_steps_by_the_configured_divisor(
    tmp_path: Any, base: Any, divisor: str, by: float
) -> None:
    # K = 2, one cohort of 3: the version holds 3 updates. "updates": their mean;
    # "buffer": their sum over K (each update counts as in a version of exactly K).
    aggregation = {"buffer_size": 2, "staleness": "polynomial", "step_divisor": divisor}
    fed = Fed(tmp_path, base, aggregation=aggregation)
    devices = [fed.device("laptop") for _ in range(3)]
    v0 = fed.service.ledger.adapter(fed.service.ledger.head())  # type: ignore[arg-type]
    plain, weights = run_cohort(fed, devices, rng=np.random.default_rng(5))
    assert weights == 3.0
    head = fed.service.ledger.head()
    assert head is not None and head.version == 1 and head.updates == 3
    v1 = fed.service.ledger.adapter(head)
    for name in plain:
        np.testing.assert_allclose(v1.b[name], v0.b[name] + plain[name] / by, atol=1e-5)


def test_pace_until_cohort_is_full_then_same_task_again(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base)
    a, b, c = (fed.device("laptop") for _ in range(3))
    training = training_for(fed, [a, b, c])
    # Asked again before reporting it (a lost reply): the same training task.
    repeat = fed.service.get_task(a)
    assert isinstance(repeat, TaskOffer) and repeat.task_id == training[0].task_id
    # Trained: each reports it and waits for the cohort to fill.
    first = fed.service.get_task(a, trained_task_id=training[0].task_id)
    assert isinstance(first, PaceOffer) and "1/3" in first.reason
    assert first.mechanism == "cohort_formation"
    fed.service.get_task(b, trained_task_id=training[1].task_id)
    offer = fed.service.get_task(c, trained_task_id=training[2].task_id)  # full: sealed at once
    assert isinstance(offer, TaskOffer) and offer.member_index == 2
    assert offer.trained_task_id == training[2].task_id and offer.session is not None
    again = fed.service.get_task(c, trained_task_id=training[2].task_id)
    assert isinstance(again, TaskOffer) and again.task_id == offer.task_id
    # A device naming a training task it does not hold is refused by name.
    with pytest.raises(FailedPrecondition, match="trained_task_id"):
        fed.service.get_task(fed.device("laptop"), trained_task_id=training[0].task_id)


def test_a_forming_member_that_lost_its_update_leaves_the_cohort(tmp_path: Any, base: Any) -> None:
    # Prepare: three laptops (cohorts of 3) train; two report and wait for the third.
    fed = Fed(tmp_path, base)
    a, b, c = (fed.device("laptop") for _ in range(3))
    training = training_for(fed, [a, b, c])
    for device, task in ((a, training[0]), (b, training[1])):
        assert isinstance(fed.service.get_task(device, trained_task_id=task.task_id), PaceOffer)

    # Execute: a restarts (its update was in memory) and asks without trained_task_id.
    again = fed.service.get_task(a)

    # Assert: a left the forming cohort and trains afresh; the cohort seals without it,
    # once the third report and a new member fill it again.
    assert (
        isinstance(again, TaskOffer) and again.is_training and again.task_id != training[0].task_id
    )
    forming = fed.service.cohorts.forming("laptop")
    assert forming is not None and forming[0].members == (b.device_id,)
    assert forming[0].tasks == (training[1].task_id,) and forming[0].full_at is None
    fed.service.get_task(c, trained_task_id=training[2].task_id)
    offer = fed.service.get_task(a, trained_task_id=again.task_id)
    assert isinstance(offer, TaskOffer) and offer.session is not None
    assert offer.trained_task_id == again.task_id


def test_restarted_device_abandons_and_is_readmitted(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base)  # cohorts of 3: secure aggregation refuses fewer
    a, b, c = (fed.device("laptop") for _ in range(3))
    offers = tasks_for(fed, [a, b, c])
    client = fed.client(offers[0], a)
    fed.service.send_secagg(
        a, offers[0].cohort_id, Stage.ADVERTISE_KEYS, client.advertise().encode()
    )
    again = fed.service.get_task(a)  # a lost its keys and its update: task abandoned
    assert isinstance(again, TaskOffer) and again.is_training  # and it trains afresh
    with pytest.raises(FailedPrecondition, match="abandoned"):
        fed.service.poll_secagg(a, offers[0].cohort_id, Stage.ADVERTISE_KEYS)


def test_bad_input_is_refused_without_touching_others(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base)  # cohorts of 3: secure aggregation refuses fewer
    a, b, c = (fed.device("laptop") for _ in range(3))
    outsider = fed.device("laptop")
    offers = tasks_for(fed, [a, b, c])
    cohort_id = offers[0].cohort_id
    with pytest.raises(FailedPrecondition, match="not a member"):
        fed.service.send_secagg(outsider, cohort_id, Stage.ADVERTISE_KEYS, b"x")
    with pytest.raises(FailedPrecondition, match="no such cohort"):
        fed.service.send_secagg(a, "nope", Stage.ADVERTISE_KEYS, b"x")
    with pytest.raises(InvalidArgument, match="not a secure-aggregation message"):
        fed.service.send_secagg(a, cohort_id, Stage.ADVERTISE_KEYS, b"garbage")
    with pytest.raises(InvalidArgument, match="UploadMasked"):
        fed.service.send_secagg(a, cohort_id, Stage.MASKED_INPUT, b"x")
    with pytest.raises(FailedPrecondition, match="not SHARE_KEYS"):
        fed.service.send_secagg(a, cohort_id, Stage.SHARE_KEYS, b"x")
    with pytest.raises(NotFound):
        list(fed.service.read_blob("0" * 64, offset=0, chunk_bytes=10))
    with pytest.raises(InvalidArgument):
        list(fed.service.read_blob("../etc", offset=0, chunk_bytes=10))
    # The good members still complete their key exchange.
    members = [a, b, c]
    clients = [fed.client(o, d) for o, d in zip(offers, members, strict=True)]
    for d, cl in zip(members, clients, strict=True):
        fed.service.send_secagg(d, cohort_id, Stage.ADVERTISE_KEYS, cl.advertise().encode())
    reply = fed.service.poll_secagg(a, cohort_id, Stage.ADVERTISE_KEYS)
    assert reply is not None and reply.stage is Stage.SHARE_KEYS
