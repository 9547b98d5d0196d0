"""Enrolment by CSR, renewal, revocation, and the peer-certificate rule (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import peer_identity
from coordinator.enrolment import (
    TOKEN_PREFIX,
    DeviceRegistry,
    EnrolmentError,
    TokenAlreadyUsed,
    Unauthenticated,
)
from estuary import pki
from estuary.auth import device_id_for, raw_public_key
from estuary.clock import VirtualClock
from estuary.state.memory import MemoryStore


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def ca(tmp_path: Path, clock: VirtualClock) -> pki.DeviceCA:
    paths = pki.init_pki(tmp_path / "pki", now=clock.time())
    return pki.DeviceCA.from_files(paths.device_ca_cert, paths.device_ca_key, lifetime_s=3600)


@pytest.fixture
def registry(clock: VirtualClock, ca: pki.DeviceCA) -> DeviceRegistry:
    return DeviceRegistry(
        MemoryStore(clock=clock.time), device_classes=["phone"], clock=clock, device_ca=ca
    )


def _request(
    token: str, key: Ed25519PrivateKey, *, proof_key: Ed25519PrivateKey | None = None
) -> dict[str, bytes]:
    device_id = device_id_for(raw_public_key(key))
    _, csr = pki.make_device_csr(device_id)
    return {"csr": csr, "csr_proof": pki.csr_proof(proof_key or key, csr, token=token)}


def _token_used(registry: DeviceRegistry, token: str) -> bool:
    import hashlib

    record = registry._store.get(TOKEN_PREFIX + hashlib.sha256(token.encode()).hexdigest())
    assert record is not None
    return json.loads(record.value).get("used_by") is not None


def test_enrol_with_csr_returns_a_certificate_for_this_device(
    registry: DeviceRegistry, ca: pki.DeviceCA, clock: VirtualClock
) -> None:
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    device, pem = registry.enroll_with_csr(
        token, public_key=raw_public_key(key), device_class="phone", **_request(token, key)
    )
    cert = x509.load_pem_x509_certificate(pem)
    assert device.device_id == device_id_for(raw_public_key(key))
    assert pki.verify_device_certificate(cert, ca=ca.cert, now=clock.time()) == device.device_id
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(clock.time() + 3600, abs=1)


def test_csr_proved_by_another_key_is_refused_and_the_token_survives(
    registry: DeviceRegistry,
) -> None:
    key = Ed25519PrivateKey.generate()
    intruder = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    with pytest.raises(EnrolmentError, match="not signed by the identity key being enrolled"):
        registry.enroll_with_csr(
            token,
            public_key=raw_public_key(key),
            device_class="phone",
            **_request(token, key, proof_key=intruder),
        )
    assert not _token_used(registry, token)
    # The rightful device can still use its token.
    device, pem = registry.enroll_with_csr(
        token, public_key=raw_public_key(key), device_class="phone", **_request(token, key)
    )
    assert pem and device.device_id == device_id_for(raw_public_key(key))


def test_csr_naming_another_device_is_refused(registry: DeviceRegistry) -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    _, csr = pki.make_device_csr(device_id_for(raw_public_key(other)))
    with pytest.raises(EnrolmentError, match="subject common name must be the device id"):
        registry.enroll_with_csr(
            token,
            public_key=raw_public_key(key),
            device_class="phone",
            csr=csr,
            csr_proof=pki.csr_proof(key, csr, token=token),
        )
    assert not _token_used(registry, token)


def test_proof_made_for_another_token_is_refused(registry: DeviceRegistry) -> None:
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    with pytest.raises(EnrolmentError, match="not signed by the identity key"):
        registry.enroll_with_csr(
            token,
            public_key=raw_public_key(key),
            device_class="phone",
            **_request("some other token", key),
        )


def test_missing_csr_is_refused_when_certificates_are_required(registry: DeviceRegistry) -> None:
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    with pytest.raises(EnrolmentError, match="tls_csr: missing"):
        registry.enroll_with_csr(
            token, public_key=raw_public_key(key), device_class="phone", csr=b"", csr_proof=b""
        )
    assert not _token_used(registry, token)


def test_reused_token_is_refused_even_with_a_valid_csr(registry: DeviceRegistry) -> None:
    first = Ed25519PrivateKey.generate()
    second = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    registry.enroll_with_csr(
        token, public_key=raw_public_key(first), device_class="phone", **_request(token, first)
    )
    with pytest.raises(TokenAlreadyUsed, match="already used"):
        registry.enroll_with_csr(
            token,
            public_key=raw_public_key(second),
            device_class="phone",
            **_request(token, second),
        )


def test_renewal_issues_a_new_certificate_until_revoked(
    registry: DeviceRegistry, ca: pki.DeviceCA, clock: VirtualClock
) -> None:
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    device, _ = registry.enroll_with_csr(
        token, public_key=raw_public_key(key), device_class="phone", **_request(token, key)
    )
    clock.advance(3000)
    new_key, csr = pki.make_device_csr(device.device_id)
    cert = x509.load_pem_x509_certificate(registry.renew_certificate(device, csr))
    assert cert.public_key() == new_key.public_key()
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(clock.time() + 3600, abs=1)
    assert registry.revoke(device.device_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        registry.renew_certificate(device, pki.make_device_csr(device.device_id)[1])


def test_without_a_device_ca_a_csr_is_not_answered(clock: VirtualClock) -> None:
    registry = DeviceRegistry(MemoryStore(clock=clock.time), device_classes=["phone"], clock=clock)
    key = Ed25519PrivateKey.generate()
    token = registry.issue_token()
    device, pem = registry.enroll_with_csr(
        token, public_key=raw_public_key(key), device_class="phone", **_request(token, key)
    )
    assert pem == b"" and device.device_class == "phone"
    with pytest.raises(EnrolmentError, match="issues no device certificates"):
        registry.renew_certificate(device, pki.make_device_csr(device.device_id)[1])


# --------------------------------------------------------------------------- peer rule


def _context(pem: bytes | None) -> object:
    class Context:
        def auth_context(self) -> dict[str, list[bytes]]:
            return {"x509_pem_cert": [pem]} if pem is not None else {}

    return Context()


def _certified(ca: pki.DeviceCA, clock: VirtualClock) -> tuple[str, bytes]:
    device_id = device_id_for(raw_public_key(Ed25519PrivateKey.generate()))
    cert = ca.issue(pki.make_device_csr(device_id)[1], device_id=device_id, now=clock.time())
    from cryptography.hazmat.primitives.serialization import Encoding

    return device_id, cert.public_bytes(Encoding.PEM)


def test_peer_rule_accepts_only_the_certificate_of_the_signer(
    ca: pki.DeviceCA, clock: VirtualClock
) -> None:
    a, a_pem = _certified(ca, clock)
    b, _ = _certified(ca, clock)
    peer_identity._record(_context(a_pem))
    peer_identity.check(a, required=True)
    with pytest.raises(
        Unauthenticated, match=f"device {a}'s, but the request is signed by device {b}"
    ):
        peer_identity.check(b, required=True)
    peer_identity.check(b, required=False)  # no device CA: the rule is off


def test_peer_rule_without_a_certificate_fails_closed(
    ca: pki.DeviceCA, clock: VirtualClock
) -> None:
    a, _ = _certified(ca, clock)
    peer_identity._record(_context(None))
    with pytest.raises(Unauthenticated, match="no client certificate"):
        peer_identity.check(a, required=True)
    server_pem = ca.cert_pem  # a certificate that names no device
    peer_identity._record(_context(server_pem))
    with pytest.raises(Unauthenticated, match="names no device"):
        peer_identity.check(a, required=True)
