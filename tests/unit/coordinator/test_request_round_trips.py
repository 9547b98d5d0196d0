"""Store round trips of the requests every idle device makes (GetTask, Heartbeat).

One replica serves a fleet's polls; each store call is one network round trip on Redis,
so the count per request is what bounds a replica's request rate (issue 11, item 10).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from service_fixtures import R_MAX, make_settings
from torch import nn

from coordinator.service import FederationService, PaceOffer
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.auth import raw_public_key, sign_request
from estuary.clock import VirtualClock
from estuary.state.base import Store
from estuary.state.blobs import BlobStore
from estuary.state.memory import MemoryStore

BODY = hashlib.sha256(b"request").digest()

#: Every public Store method that talks to the backend.
_CALLS = [
    name
    for name, member in vars(Store).items()
    if callable(member) and not name.startswith("_") and name not in {"close", "url"}
]


class CountingStore(MemoryStore):
    """A MemoryStore recording each public call (on Redis: one round trip each)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in _CALLS:
            calls = super().__getattribute__("calls")

            def counted(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return attribute(*args, **kwargs)

            return counted
        return attribute


def _service(tmp_path: Path, base: nn.Module) -> tuple[FederationService, CountingStore]:
    clock = VirtualClock()
    store = CountingStore(clock=clock.time)
    service = FederationService(
        make_settings(),
        store=store,
        blobs=BlobStore(tmp_path / "blobs", fsync=False),
        initial_adapter=GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX)),
        clock=clock,
    )
    service.start()
    return service, store


def test_heartbeat_without_a_task_is_one_round_trip_after_authentication(
    tmp_path: Path, base: nn.Module
) -> None:
    service, store = _service(tmp_path, base)
    key = Ed25519PrivateKey.generate()
    token = service.registry.issue_token(device_class="laptop")
    service.enroll(token, public_key=raw_public_key(key), device_class="laptop")
    clock = service.clock
    assert isinstance(clock, VirtualClock)
    service.authenticate(
        sign_request(key, "Heartbeat", BODY, timestamp_ms=clock.time_ms()),
        method="Heartbeat",
        body_sha256=BODY,
    )  # caches the device record
    store.calls.clear()
    device = service.authenticate(
        sign_request(key, "Heartbeat", BODY, timestamp_ms=clock.time_ms()),
        method="Heartbeat",
        body_sha256=BODY,
    )
    reply = service.heartbeat(device, "no-such-task")
    assert reply.abandon and reply.current_version == 0
    assert store.calls == ["zadd_pruned", "get_many"]


def test_a_paced_get_task_is_one_round_trip_after_authentication(
    tmp_path: Path, base: nn.Module
) -> None:
    # Prepare: no worker runs, so no edge artifact exists: every GetTask is paced, which
    # is what an idle fleet costs a replica.
    service, store = _service(tmp_path, base)
    key = Ed25519PrivateKey.generate()
    token = service.registry.issue_token(device_class="laptop")
    device = service.enroll(token, public_key=raw_public_key(key), device_class="laptop")
    clock = service.clock
    assert isinstance(clock, VirtualClock)

    def signed() -> Any:
        return sign_request(key, "GetTask", BODY, timestamp_ms=clock.time_ms())

    service.get_task(service.authenticate(signed(), method="GetTask", body_sha256=BODY))
    for _ in range(3):
        clock.advance(1.0)
        store.calls.clear()

        # Execute
        offer = service.get_task(service.authenticate(signed(), method="GetTask", body_sha256=BODY))

        # Assert: the nonce write, then the device's task, the forming cohort, the head
        # and the newest build read together.
        assert isinstance(offer, PaceOffer) and "edge artifact" in offer.reason
        assert store.calls == ["zadd_pruned", "get_many"]
    assert device.device_id not in {m for f in service.cohorts.all_forming() for m in f.members}


def test_signed_get_task_and_heartbeat_are_one_round_trip_each(
    tmp_path: Path, base: nn.Module
) -> None:
    # Prepare: a known (cached) device of an idle fleet: no artifact, no task.
    service, store = _service(tmp_path, base)
    key = Ed25519PrivateKey.generate()
    token = service.registry.issue_token(device_class="laptop")
    service.enroll(token, public_key=raw_public_key(key), device_class="laptop")
    clock = service.clock
    assert isinstance(clock, VirtualClock)

    def signed(method: str) -> Any:
        return sign_request(key, method, BODY, timestamp_ms=clock.time_ms())

    service.get_task_signed(signed("GetTask"), body_sha256=BODY)  # caches the device record
    for _ in range(3):
        clock.advance(1.0)
        store.calls.clear()

        # Execute
        _device, offer = service.get_task_signed(signed("GetTask"), body_sha256=BODY)
        after_get_task = list(store.calls)
        store.calls.clear()
        reply = service.heartbeat_signed(
            signed("Heartbeat"), task_id="no-such-task", body_sha256=BODY
        )

        # Assert: the reads travel with the nonce write.
        assert isinstance(offer, PaceOffer) and "edge artifact" in offer.reason
        assert after_get_task == ["zadd_pruned"]
        assert reply.abandon and reply.current_version == 0
        assert store.calls == ["zadd_pruned"]
