from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.enrolment import (
    DEVICE_CACHE_TTL_S,
    TOKEN_EXPIRY_SET,
    TOKEN_PREFIX,
    DeviceRegistry,
    EnrolmentError,
    TokenAlreadyUsed,
    Unauthenticated,
)
from estuary.auth import SignedAuth, raw_public_key, sign_request
from estuary.clock import VirtualClock
from estuary.state.keys import device_key
from estuary.state.memory import MemoryStore

BODY = hashlib.sha256(b"request").digest()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def registry(clock: VirtualClock) -> DeviceRegistry:
    return DeviceRegistry(
        MemoryStore(clock=clock.time), device_classes=["phone", "laptop"], clock=clock
    )


def _enrolled(registry: DeviceRegistry) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    registry.enroll(token, public_key=raw_public_key(key), device_class="phone")
    return key


def _sign(key: Ed25519PrivateKey, clock: VirtualClock, method: str = "GetTask") -> SignedAuth:
    return sign_request(key, method, BODY, timestamp_ms=clock.time_ms())


def test_enrol_then_authenticate(registry: DeviceRegistry, clock: VirtualClock) -> None:
    key = _enrolled(registry)
    device = registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    assert device.device_class == "phone"
    assert device.public_key == raw_public_key(key)


def test_token_is_single_use_even_under_a_race(registry: DeviceRegistry) -> None:
    token = registry.issue_token()
    results: list[str] = []

    def attempt() -> None:
        try:
            registry.enroll(
                token, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
            )
            results.append("ok")
        except TokenAlreadyUsed:
            results.append("already used")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["already used"] * 7 + ["ok"]


def test_reused_token_says_already_used_and_by_whom(
    registry: DeviceRegistry, clock: VirtualClock
) -> None:
    # Prepare: one device enrols with the token.
    token = registry.issue_token()
    first = registry.enroll(
        token, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
    )
    clock.advance(30)

    # Execute: a second device presents the same token.
    with pytest.raises(TokenAlreadyUsed) as info:
        registry.enroll(
            token, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
        )

    # Assert: not "unknown", and it names the device that used it and when.
    message = str(info.value)
    assert message.startswith("enrolment token already used")
    assert first.device_id in message
    assert "unknown" not in message


def test_re_sent_enrolment_is_answered_again(registry: DeviceRegistry) -> None:
    # The device's first answer was lost; it sends the same Enroll again.
    key = raw_public_key(Ed25519PrivateKey.generate())
    token = registry.issue_token()
    first = registry.enroll(token, public_key=key, device_class="phone")
    again = registry.enroll(token, public_key=key, device_class="phone")
    assert again == first
    # Once revoked, the same re-send is refused: revocation is not undone by a token.
    assert registry.revoke(first.device_id)
    with pytest.raises(TokenAlreadyUsed):
        registry.enroll(token, public_key=key, device_class="phone")


def test_expired_token_records_are_deleted_used_or_not(
    registry: DeviceRegistry, clock: VirtualClock
) -> None:
    store = registry._store
    used = registry.issue_token(ttl_s=60)
    registry.issue_token(ttl_s=60)  # never used
    registry.enroll(
        used, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
    )
    assert len(store.scan(TOKEN_PREFIX)) == 2
    clock.advance(61)
    fresh = registry.issue_token(ttl_s=60)  # issuing sweeps what has expired
    assert len(store.scan(TOKEN_PREFIX)) == 1
    assert store.zcard(TOKEN_EXPIRY_SET) == 1
    with pytest.raises(EnrolmentError, match="unknown or expired"):
        registry.enroll(
            used, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
        )
    clock.advance(61)
    with pytest.raises(EnrolmentError, match="unknown or expired"):  # enrolling sweeps too
        registry.enroll(
            fresh, public_key=raw_public_key(Ed25519PrivateKey.generate()), device_class="phone"
        )
    assert store.scan(TOKEN_PREFIX) == {} and store.zcard(TOKEN_EXPIRY_SET) == 0


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=1_000), st.integers(min_value=0, max_value=600)
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_only_unexpired_tokens_stay_in_the_store(steps: list[tuple[int, int]]) -> None:
    clock = VirtualClock()
    registry = DeviceRegistry(MemoryStore(clock=clock.time), device_classes=["phone"], clock=clock)
    expiries: dict[str, float] = {}
    for ttl, wait in steps:  # issue a token with this ttl, then let time pass
        token = registry.issue_token(ttl_s=ttl)
        expiries[token] = clock.time() + ttl
        if len(expiries) % 2 == 0:  # use every other token
            registry.enroll(
                token,
                public_key=raw_public_key(Ed25519PrivateKey.generate()),
                device_class="phone",
            )
        clock.advance(wait)
    registry.issue_token(ttl_s=1)  # the sweep runs on issue
    alive = sum(1 for at in expiries.values() if at > clock.time()) + 1
    assert len(registry._store.scan(TOKEN_PREFIX)) == alive
    assert registry._store.zcard(TOKEN_EXPIRY_SET) == alive


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_token", "unknown or expired"),
        ("expired", "expired"),
        ("wrong_class_token", "is for device class"),
        ("unknown_class", "unknown device class"),
        ("short_key", "identity public key"),
        ("same_key_twice", "already enrolled"),
    ],
)
def test_enrolment_refusals(
    registry: DeviceRegistry, clock: VirtualClock, case: str, message: str
) -> None:
    key = raw_public_key(Ed25519PrivateKey.generate())
    token, cls = registry.issue_token(ttl_s=60), "phone"
    if case == "unknown_token":
        token = "not-a-token"
    elif case == "expired":
        clock.advance(61)
    elif case == "wrong_class_token":
        token = registry.issue_token(device_class="laptop")
    elif case == "unknown_class":
        cls = "toaster"
    elif case == "short_key":
        key = key[:31]
    elif case == "same_key_twice":
        registry.enroll(registry.issue_token(), public_key=key, device_class="phone")
    with pytest.raises(EnrolmentError, match=message):
        registry.enroll(token, public_key=key, device_class=cls)


def test_refused_enrolment_does_not_burn_the_token(registry: DeviceRegistry) -> None:
    token = registry.issue_token(device_class="phone")
    key = raw_public_key(Ed25519PrivateKey.generate())
    with pytest.raises(EnrolmentError):
        registry.enroll(token, public_key=key, device_class="laptop")
    assert registry.enroll(token, public_key=key, device_class="phone").device_class == "phone"


def test_store_holds_only_token_hashes(registry: DeviceRegistry) -> None:
    token = registry.issue_token()
    store = registry._store
    dump = repr(store.scan(""))
    assert token not in dump


@pytest.mark.parametrize(
    "case", ["unknown", "revoked", "forged", "other_method", "other_body", "stale", "replay"]
)
def test_authentication_refusals(registry: DeviceRegistry, clock: VirtualClock, case: str) -> None:
    key = _enrolled(registry)
    auth = _sign(key, clock)
    method, body = "GetTask", BODY
    if case == "unknown":
        auth = _sign(Ed25519PrivateKey.generate(), clock)
    elif case == "revoked":
        assert registry.revoke(auth.device_id)
    elif case == "forged":
        auth = SignedAuth(auth.device_id, auth.timestamp_ms, auth.nonce, bytes(64))
    elif case == "other_method":
        method = "Enroll"
    elif case == "other_body":
        body = hashlib.sha256(b"tampered").digest()
    elif case == "stale":
        clock.advance(3600)
    elif case == "replay":
        registry.authenticate(auth, method=method, body_sha256=body)
    with pytest.raises(Unauthenticated):
        registry.authenticate(auth, method=method, body_sha256=body)


def test_nonce_memory_is_pruned(registry: DeviceRegistry, clock: VirtualClock) -> None:
    key = _enrolled(registry)
    for _ in range(5):
        registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
        clock.advance(400)  # beyond twice the skew window over the loop
    device_id = _sign(key, clock).device_id
    assert registry._store.zcard("nonces/" + device_id) <= 2


# ---------------------------------------------------------------------- device cache


class CountingStore(MemoryStore):
    """A MemoryStore that counts calls of its public methods (one call: one round trip)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []

    def get(self, key: str) -> Any:
        self.calls.append("get")
        return super().get(key)

    def get_many(self, keys: Any) -> Any:
        self.calls.append("get_many")
        return super().get_many(keys)

    def zadd(self, name: str, members: Any) -> int:
        self.calls.append("zadd")
        return super().zadd(name, members)

    def zadd_pruned(self, name: str, members: Any, **kwargs: Any) -> Any:
        self.calls.append("zadd_pruned")
        return super().zadd_pruned(name, members, **kwargs)

    def zrange_by_score(self, name: str, **kwargs: Any) -> Any:
        self.calls.append("zrange_by_score")
        return super().zrange_by_score(name, **kwargs)

    def zrem(self, name: str, *members: str) -> int:
        self.calls.append("zrem")
        return super().zrem(name, *members)


def test_a_known_device_costs_one_store_round_trip(clock: VirtualClock) -> None:
    store = CountingStore(clock=clock.time)
    registry = DeviceRegistry(store, device_classes=["phone"], clock=clock)
    key = _enrolled(registry)
    registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    store.calls.clear()
    for _ in range(3):
        clock.advance(1.0)
        registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    assert store.calls == ["zadd_pruned"] * 3
    # A forged request of a cached device is refused without touching the store.
    auth = _sign(key, clock)
    with pytest.raises(Unauthenticated, match="signature"):
        registry.authenticate(
            SignedAuth(auth.device_id, auth.timestamp_ms, auth.nonce, bytes(64)),
            method="GetTask",
            body_sha256=BODY,
        )
    assert store.calls == ["zadd_pruned"] * 3


def test_revocation_on_another_replica_takes_effect_on_the_next_request(
    clock: VirtualClock,
) -> None:
    store = MemoryStore(clock=clock.time)
    here = DeviceRegistry(store, device_classes=["phone"], clock=clock)
    there = DeviceRegistry(store, device_classes=["phone"], clock=clock)
    key, other = _enrolled(here), _enrolled(here)
    for _ in range(2):  # cached on this replica now
        here.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
        here.authenticate(_sign(other, clock), method="GetTask", body_sha256=BODY)
    assert there.revoke(_sign(key, clock).device_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        here.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    with pytest.raises(Unauthenticated, match="revoked"):  # and stays refused
        here.authenticate(_sign(key, clock), method="Heartbeat", body_sha256=BODY)
    # Another device is unaffected (its record is read again once, then cached anew).
    assert here.authenticate(_sign(other, clock), method="GetTask", body_sha256=BODY)


def test_a_record_changed_behind_the_registry_is_read_again_after_the_ttl(
    clock: VirtualClock,
) -> None:
    store = MemoryStore(clock=clock.time)
    registry = DeviceRegistry(store, device_classes=["phone"], clock=clock)
    key = _enrolled(registry)
    device_id = _sign(key, clock).device_id
    registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    # Revoked by hand in the store (no epoch bump): the cache may serve it a little longer...
    record = store.get(device_key(device_id))
    assert record is not None
    store.put(
        device_key(device_id), json.dumps({**json.loads(record.value), "revoked": True}).encode()
    )
    registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)
    # ...but never past the TTL.
    clock.advance(DEVICE_CACHE_TTL_S + 0.1)
    with pytest.raises(Unauthenticated, match="revoked"):
        registry.authenticate(_sign(key, clock), method="GetTask", body_sha256=BODY)


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("revoke"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 10.0, 31.0])),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(steps=_STEPS)
def test_requests_are_refused_exactly_after_their_device_is_revoked(
    steps: list[tuple[Any, ...]],
) -> None:
    # Two replicas over one store; any interleaving of requests, revocations and time.
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    replicas = [DeviceRegistry(store, device_classes=["phone"], clock=clock) for _ in range(2)]
    keys = [_enrolled(replicas[0]) for _ in range(3)]
    revoked: set[int] = set()
    for step in steps:
        if step[0] == "advance":
            clock.advance(step[1])
            continue
        _, replica, device = step
        if step[0] == "revoke":
            assert replicas[replica].revoke(_sign(keys[device], clock).device_id)
            revoked.add(device)
            continue
        auth = _sign(keys[device], clock)
        if device in revoked:
            with pytest.raises(Unauthenticated, match="revoked"):
                replicas[replica].authenticate(auth, method="GetTask", body_sha256=BODY)
        else:
            got = replicas[replica].authenticate(auth, method="GetTask", body_sha256=BODY)
            assert got.device_id == auth.device_id and not got.revoked


def test_status_shows_when_a_device_last_made_a_request(clock: VirtualClock) -> None:
    """``estuary status`` reads a device's last request from its nonces, not its enrolment."""
    from estuary.cli.status_report import build_report, collect_records

    store = MemoryStore(clock=clock.time)
    registry = DeviceRegistry(store, device_classes=["phone"], clock=clock)
    enrolled_at = clock.time()
    ids: dict[Ed25519PrivateKey, str] = {}
    for _ in range(2):
        key = Ed25519PrivateKey.generate()
        token = registry.issue_token()
        ids[key] = registry.enroll(
            token, public_key=raw_public_key(key), device_class="phone"
        ).device_id
    active, silent = ids
    clock.advance(100.0)
    registry.authenticate(_sign(active, clock), method="GetTask", body_sha256=BODY)
    clock.advance(40.0)
    requested_at = clock.time()
    registry.authenticate(_sign(active, clock, "Heartbeat"), method="Heartbeat", body_sha256=BODY)
    clock.advance(5.0)
    report = build_report(collect_records(store), now=clock.time())
    seen = {d.device_id: d.last_seen for d in report.devices}
    assert seen[ids[active]] == pytest.approx(requested_at)
    assert seen[ids[silent]] == pytest.approx(enrolled_at)
    # A device clock ahead of the coordinator's (within the allowed skew) is not "in
    # the future": it reads as now.
    ahead = requested_at + 50.0
    registry.authenticate(
        sign_request(active, "GetTask", BODY, timestamp_ms=int(ahead * 1000)),
        method="GetTask",
        body_sha256=BODY,
    )
    report = build_report(collect_records(store), now=clock.time())
    assert {d.device_id: d.last_seen for d in report.devices}[ids[active]] == clock.time()
