from __future__ import annotations

import hashlib
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.enrolment import (
    TOKEN_EXPIRY_SET,
    TOKEN_PREFIX,
    DeviceRegistry,
    EnrolmentError,
    TokenAlreadyUsed,
    Unauthenticated,
)
from estuary.auth import SignedAuth, raw_public_key, sign_request
from estuary.clock import VirtualClock
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
