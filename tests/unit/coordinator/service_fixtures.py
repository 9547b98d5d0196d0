"""A federation service in one process, on a virtual clock, for the coordinator's unit tests.

:class:`Fed` is a :class:`FederationService` over an in-memory store plus a synchronous
local worker group (a real :class:`ModelJobExecutor` on the tiny preset, without the ONNX
export, which costs seconds per version and which no coordinator test reads). The
service, the store and the worker all read one :class:`VirtualClock`: nothing here ever
waits in real time, and a test moves time with ``fed.clock.advance(...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import WorkerGroup
from coordinator.enrolment import Device
from coordinator.service import FederationService, PaceOffer, ServiceObserver, TaskOffer
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.auth import raw_public_key
from estuary.clock import VirtualClock
from estuary.config.models import CoordinatorSettings
from estuary.state.blobs import BlobStore
from estuary.state.memory import MemoryStore
from secure_agg import Client

R_MAX = 4


def make_settings(**overrides: Any) -> CoordinatorSettings:
    """Two device classes, cohorts of 3 with t = 2, K = 3; ``overrides`` replace sections."""
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


class Events:
    """A service observer that keeps every event, to assert on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The fields of every event of ``kind``, in order."""
        return [fields for k, fields in self.seen if k == kind]

    def event(self, kind: str, **fields: Any) -> None:
        self.seen.append((kind, fields))


class Fed:
    """A service plus a synchronous local worker over one in-memory store and one clock."""

    def __init__(
        self,
        tmp_path: Path,
        base: nn.Module,
        *,
        observer: ServiceObserver | None = None,
        **overrides: Any,
    ) -> None:
        self.clock = VirtualClock()
        self.store = MemoryStore(clock=self.clock.time)
        self.blobs = BlobStore(tmp_path / "blobs", fsync=False)
        self.settings = make_settings(**overrides)
        adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX))
        self.service = FederationService(
            self.settings,
            store=self.store,
            blobs=self.blobs,
            initial_adapter=adapter,
            clock=self.clock,
            observer=observer,
        )
        self.service.start()
        windows = np.random.default_rng(0).integers(0, 256, (2, 17))
        executor = ModelJobExecutor(
            self.store,
            blobs=self.blobs,
            base=base,
            eval_windows=torch.from_numpy(windows),
            onnx=False,
        )
        self.group = WorkerGroup(
            self.store,
            executor=executor,
            name="local",
            heartbeat_s=1.0,
            reclaim_idle_s=3.0,
            clock=self.clock,
        )
        self.identities: dict[str, Ed25519PrivateKey] = {}
        """Each enrolled device's identity key, by device id (it signs in active mode)."""
        self.run_jobs()

    def run_jobs(self) -> None:
        """Execute every queued job now (reads never block: there is nothing to wait for)."""
        while self.group.step(block_s=0.0):
            pass

    def device(self, device_class: str) -> Device:
        """Enrol a new device of ``device_class``."""
        key = Ed25519PrivateKey.generate()
        token = self.service.registry.issue_token(device_class=device_class)
        device = self.service.enroll(
            token, public_key=raw_public_key(key), device_class=device_class
        )
        self.identities[device.device_id] = key
        return device

    def client(self, offer: TaskOffer, device: Device) -> Client:
        """The secure-aggregation client of ``device`` for its task ``offer``.

        Active-adversary sessions (the default) sign with the device's identity key and
        check the others' signatures against the keys the task lists.
        """
        if not offer.session.active:
            return Client(offer.member_index, config=offer.session)
        peers = {
            i: Ed25519PublicKey.from_public_bytes(key) for i, key in enumerate(offer.identity_keys)
        }
        return Client(
            offer.member_index,
            config=offer.session,
            identity=self.identities[device.device_id],
            peer_identities=peers,
        )


def training_for(fed: Fed, devices: list[Device]) -> list[TaskOffer]:
    """Ask for work until every device holds a training task."""
    offers = [fed.service.get_task(d) for d in devices]
    for _ in range(3):
        if all(isinstance(o, TaskOffer) for o in offers):
            break
        fed.service.tick()
        offers = [fed.service.get_task(d) for d in devices]
    assert all(isinstance(o, TaskOffer) and o.is_training for o in offers), offers
    return [o for o in offers if isinstance(o, TaskOffer)]


def report_trained(
    fed: Fed, devices: list[Device], training: list[TaskOffer]
) -> list[TaskOffer | PaceOffer]:
    """Each device reports its training task finished once; its answers."""
    return [
        fed.service.get_task(d, trained_task_id=t.task_id)
        for d, t in zip(devices, training, strict=True)
    ]


def tasks_for(fed: Fed, devices: list[Device]) -> list[TaskOffer]:
    """Train every device, report it, until each holds a task of one sealed cohort."""
    training = training_for(fed, devices)
    offers = report_trained(fed, devices, training)
    for _ in range(3):
        if all(isinstance(o, TaskOffer) for o in offers):
            break
        fed.service.tick()
        offers = report_trained(fed, devices, training)
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in offers), offers
    return [o for o in offers if isinstance(o, TaskOffer)]


def exchange_keys(
    fed: Fed, offers: list[TaskOffer], devices: list[Device]
) -> tuple[dict[int, Device], dict[int, Client]]:
    """Run one cohort's key exchange (advertise, share keys); devices and clients by index."""
    from secure_agg import Stage

    service = fed.service
    cohort_id = offers[0].cohort_id
    by_index = {o.member_index: d for o, d in zip(offers, devices, strict=True)}
    clients = {o.member_index: fed.client(o, by_index[o.member_index]) for o in offers}
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
    return by_index, clients
