"""The federation service end to end in one process: no gRPC, real secure aggregation.

Devices are simulated by secure_agg clients driven directly against the service; cloud
jobs are executed by a real ModelJobExecutor on the tiny preset. The committed version
must equal the plain staleness-weighted mean of the members' updates.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import WorkerGroup
from coordinator.enrolment import Device
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.service import FederationService, PaceOffer, TaskOffer
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.auth import raw_public_key
from estuary.config.models import CoordinatorSettings
from estuary.model.presets import build_preset
from estuary.state.blobs import BlobStore
from estuary.state.memory import MemoryStore
from secure_agg import Client, Stage

R_MAX = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def base() -> Any:
    return build_preset("tiny", seed=0)


def make_settings(**overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {
        "node_id": "test",
        "tls": {"allow_plaintext": True},
        "model": {"preset": "tiny", "r_max": R_MAX},
        "device_classes": [
            {"name": "phone", "rank": 2, "expected_task_s": 10.0},
            {"name": "laptop", "rank": 4, "expected_task_s": 5.0},
        ],
        "aggregation": {"buffer_size": 3, "staleness": "polynomial", "staleness_a": 0.5},
        "pacing": {"target_staleness": 4.0, "retry_after_min_s": 0.5},
        "cohort": {
            "min_size": 3,
            "max_size": 3,
            "threshold_fraction": 0.6,
            "formation_s": 0.0,
            "deadline_s": 60.0,
            "key_timeout_s": 10.0,
            "bits": 32,
            "clip_norm": 1.0,
        },
        "training": {"local_steps": 1, "batch_size": 2, "seq_len": 16, "grad_clip_norm": 1.0},
    }
    values.update(overrides)
    return CoordinatorSettings(**values)


class Fed:
    """A service plus a synchronous local worker over one in-memory store."""

    def __init__(self, tmp_path: Any, base: Any, **overrides: Any) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.blobs = BlobStore(tmp_path / "blobs", fsync=False)
        self.settings = make_settings(**overrides)
        adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX))
        self.service = FederationService(
            self.settings,
            store=self.store,
            blobs=self.blobs,
            initial_adapter=adapter,
            clock=self.clock,
        )
        self.service.start()
        windows = np.random.default_rng(0).integers(0, 256, (2, 17))
        import torch

        executor = ModelJobExecutor(
            self.store, blobs=self.blobs, base=base, eval_windows=torch.from_numpy(windows)
        )
        self.group = WorkerGroup(
            self.store, executor=executor, name="local", heartbeat_s=1.0, reclaim_idle_s=3.0
        )
        self.run_jobs()

    def run_jobs(self) -> None:
        while self.group.step(block_s=0.01):
            pass

    def device(self, device_class: str) -> Device:
        key = Ed25519PrivateKey.generate()
        token = self.service.registry.issue_token(device_class=device_class)
        return self.service.enroll(token, public_key=raw_public_key(key), device_class=device_class)


def tasks_for(fed: Fed, devices: list[Device]) -> list[TaskOffer]:
    offers = [fed.service.get_task(d) for d in devices]
    for _ in range(3):
        if all(isinstance(o, TaskOffer) for o in offers):
            break
        fed.service.tick()
        offers = [fed.service.get_task(d) for d in devices]
    assert all(isinstance(o, TaskOffer) for o in offers), offers
    return [o for o in offers if isinstance(o, TaskOffer)]


def run_cohort(
    fed: Fed,
    devices: list[Device],
    *,
    rng: np.random.Generator,
    drop_after_keys: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, np.ndarray], float]:
    """Drive one cohort to completion; return the plain Σ w ΔB and Σ w of survivors."""
    service = fed.service
    offers = tasks_for(fed, devices)
    cohort_id = offers[0].cohort_id
    assert {o.cohort_id for o in offers} == {cohort_id}
    clients = {o.member_index: Client(o.member_index, config=o.session) for o in offers}
    by_index = {o.member_index: d for o, d in zip(offers, devices, strict=True)}
    for i, client in clients.items():
        service.send_secagg(
            by_index[i], cohort_id, Stage.ADVERTISE_KEYS, client.advertise().encode()
        )
    for i, client in clients.items():
        reply = service.poll_secagg(by_index[i], cohort_id, Stage.ADVERTISE_KEYS)
        assert reply is not None and reply.stage is Stage.SHARE_KEYS
        out = client.handle(reply.payload)
        assert out is not None
        service.send_secagg(by_index[i], cohort_id, Stage.SHARE_KEYS, out.encode())
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
        fed.clock.now += fed.settings.cohort.silence_s / 2
        service.tick()
        assert service._cohort(service._record(cohort_id) or {}).stage is Stage.MASKED_INPUT
        fed.clock.now += fed.settings.cohort.silence_s / 2 + 1
        service.tick()
    for i, client in clients.items():
        if i in drop_after_keys:
            continue
        reply = service.poll_secagg(by_index[i], cohort_id, Stage.MASKED_INPUT)
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
    stale = tasks_for(fed, phones)  # sealed on version 0, finishes after version 1
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
    plain2, weights2 = run_cohort(fed, phones, rng=rng)
    assert weights2 == pytest.approx(3 * 2**-0.5)
    assert service.counters.staleness == {0: 3, 1: 3}
    head2 = service.ledger.head()
    assert head2 is not None and head2.version == 2
    v2 = service.ledger.adapter(head2)
    for name in plain2:
        np.testing.assert_allclose(v2.b[name], v1.b[name] + plain2[name] / weights2, atol=1e-5)
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


def test_pace_until_cohort_is_full_then_same_task_again(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base)
    a, b, c = (fed.device("laptop") for _ in range(3))
    first = fed.service.get_task(a)
    assert isinstance(first, PaceOffer) and "1/3" in first.reason
    fed.service.get_task(b)
    offer = fed.service.get_task(c)  # third member fills the cohort: sealed at once
    assert isinstance(offer, TaskOffer) and offer.member_index == 2
    again = fed.service.get_task(c)
    assert isinstance(again, TaskOffer) and again.task_id == offer.task_id


def test_restarted_device_abandons_and_is_readmitted(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base, cohort={"min_size": 2, "max_size": 2, "formation_s": 0.0})
    a, b = fed.device("laptop"), fed.device("laptop")
    offers = tasks_for(fed, [a, b])
    client = Client(offers[0].member_index, config=offers[0].session)
    fed.service.send_secagg(
        a, offers[0].cohort_id, Stage.ADVERTISE_KEYS, client.advertise().encode()
    )
    again = fed.service.get_task(a)  # a lost its keys: its task is abandoned
    assert isinstance(again, PaceOffer)
    with pytest.raises(FailedPrecondition, match="abandoned"):
        fed.service.poll_secagg(a, offers[0].cohort_id, Stage.ADVERTISE_KEYS)


def test_bad_input_is_refused_without_touching_others(tmp_path: Any, base: Any) -> None:
    fed = Fed(tmp_path, base, cohort={"min_size": 2, "max_size": 2, "formation_s": 0.0})
    a, b = fed.device("laptop"), fed.device("laptop")
    outsider = fed.device("laptop")
    offers = tasks_for(fed, [a, b])
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
    clients = [Client(o.member_index, config=o.session) for o in offers]
    for d, c in zip([a, b], clients, strict=True):
        fed.service.send_secagg(d, cohort_id, Stage.ADVERTISE_KEYS, c.advertise().encode())
    reply = fed.service.poll_secagg(a, cohort_id, Stage.ADVERTISE_KEYS)
    assert reply is not None and reply.stage is Stage.SHARE_KEYS
