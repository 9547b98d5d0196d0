"""estuary.pki: the CAs, the coordinator's certificate and device certificates by CSR.

Chains are checked with cryptography's own X.509 path validation
(``cryptography.x509.verification``), the way a TLS peer would, not by re-reading our fields.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given, settings
from hypothesis import strategies as st

from estuary import pki
from estuary.auth import device_id_for, raw_public_key

NOW = 1_800_000_000.0  # a fixed instant: every validity below is relative to it


def _utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    pki.init_pki(tmp_path / "pki", now=NOW)
    return tmp_path / "pki"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- init


def test_init_writes_two_distinct_cas_with_private_keys_0600(folder: Path) -> None:
    paths = pki.PKIPaths(folder)
    fed = _cert(paths.federation_ca_cert)
    dev = _cert(paths.device_ca_cert)
    assert fed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Estuary federation CA"
    )
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Estuary device CA"
    assert fed.public_key() != dev.public_key()
    for cert in (fed, dev):
        assert cert.issuer == cert.subject  # self-signed roots
        cert.verify_directly_issued_by(cert)
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical and basic.value.ca and basic.value.path_length == 0
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
        assert cert.not_valid_before_utc == _utc(NOW - pki.BACKDATE_S)
        assert cert.not_valid_after_utc == _utc(NOW + pki.CA_VALIDITY_DAYS * 86_400)
    for key_path, cert_path in (
        (paths.federation_ca_key, paths.federation_ca_cert),
        (paths.device_ca_key, paths.device_ca_cert),
    ):
        assert _mode(key_path) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == _cert(cert_path).public_key()
    assert _mode(folder) == 0o700


def test_init_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = pki.init_pki(tmp_path / "p", now=NOW)
    finally:
        os.umask(old)
    assert _mode(paths.federation_ca_key) == 0o600
    assert _mode(paths.device_ca_key) == 0o600


def test_init_refuses_to_overwrite_and_leaves_the_keys_untouched(folder: Path) -> None:
    paths = pki.PKIPaths(folder)
    before = paths.device_ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pki.init_pki(folder, now=NOW)
    assert paths.device_ca_key.read_bytes() == before


def test_init_refuses_when_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / pki.DEVICE_CA_KEY).write_text("precious")
    with pytest.raises(FileExistsError, match=pki.DEVICE_CA_KEY):
        pki.init_pki(tmp_path / "p", now=NOW)
    assert not (tmp_path / "p" / pki.FEDERATION_CA_KEY).exists()  # nothing half-written
    assert (tmp_path / "p" / pki.DEVICE_CA_KEY).read_text() == "precious"


# --------------------------------------------------------------------------- server


def test_server_certificate_chains_to_the_federation_ca_for_each_name(folder: Path) -> None:
    paths = pki.issue_server_certificate(
        folder, dns=["coord.example", "coord.internal"], ips=["10.0.0.5", "::1"], now=NOW
    )
    leaf = _cert(paths.server_cert)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "coord.example"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example", "coord.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc == _utc(NOW + pki.SERVER_VALIDITY_DAYS * 86_400)
    assert _mode(paths.server_key) == 0o600
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()

    store = Store([_cert(paths.federation_ca_cert)])
    for name in (x509.DNSName("coord.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))):
        verifier = PolicyBuilder().store(store).time(_utc(NOW + 60)).build_server_verifier(name)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == _cert(paths.federation_ca_cert)
    # Not a name it was issued for; not the device CA's to vouch for.
    other = PolicyBuilder().store(store).time(_utc(NOW + 60))
    with pytest.raises(VerificationError):
        other.build_server_verifier(x509.DNSName("evil.example")).verify(leaf, [])
    wrong_ca = PolicyBuilder().store(Store([_cert(paths.device_ca_cert)])).time(_utc(NOW + 60))
    with pytest.raises(VerificationError):
        wrong_ca.build_server_verifier(x509.DNSName("coord.example")).verify(leaf, [])


def test_server_certificate_refuses_overwrite_and_bad_names(folder: Path) -> None:
    pki.issue_server_certificate(folder, dns=["a.example"], ips=[], now=NOW)
    with pytest.raises(FileExistsError, match="server"):
        pki.issue_server_certificate(folder, dns=["a.example"], ips=[], now=NOW)
    with pytest.raises(ValueError, match="ip: '10.0.0.300'"):
        pki.issue_server_certificate(folder, dns=[], ips=["10.0.0.300"], now=NOW)
    with pytest.raises(ValueError, match="dns: 'bad name'"):
        pki.issue_server_certificate(folder, dns=["bad name"], ips=[], now=NOW)
    with pytest.raises(ValueError, match="at least one name"):
        pki.issue_server_certificate(folder, dns=[], ips=[], now=NOW)


def test_server_certificate_needs_the_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match="federation-ca.pem"):
        pki.issue_server_certificate(tmp_path, dns=["a.example"], ips=[], now=NOW)


# --------------------------------------------------------------------------- devices


def _device_ca(folder: Path, *, lifetime_s: float = pki.DEVICE_CERT_LIFETIME_S) -> pki.DeviceCA:
    paths = pki.PKIPaths(folder)
    return pki.DeviceCA.from_files(paths.device_ca_cert, paths.device_ca_key, lifetime_s=lifetime_s)


def _identity() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    return key, device_id_for(raw_public_key(key))


def test_device_certificate_is_a_short_lived_client_certificate_for_the_csr_key(
    folder: Path,
) -> None:
    ca = _device_ca(folder)
    _, device_id = _identity()
    tls_key, csr = pki.make_device_csr(device_id)
    cert = ca.issue(csr, device_id=device_id, now=NOW)

    assert cert.public_key() == tls_key.public_key()
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:estuary:device:{device_id}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert cert.not_valid_after_utc == _utc(NOW + pki.DEVICE_CERT_LIFETIME_S)
    assert pki.device_id_of(cert) == device_id
    assert pki.verify_device_certificate(cert, ca=ca.cert, now=NOW + 10) == device_id
    verifier = PolicyBuilder().store(Store([ca.cert])).time(_utc(NOW + 10)).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert verified.chain[-1] == ca.cert


def test_device_certificate_refusals_by_time_and_ca(folder: Path, tmp_path: Path) -> None:
    ca = _device_ca(folder, lifetime_s=3600)
    _, device_id = _identity()
    cert = ca.issue(pki.make_device_csr(device_id)[1], device_id=device_id, now=NOW)
    with pytest.raises(pki.PKIError, match="expired"):
        pki.verify_device_certificate(cert, ca=ca.cert, now=NOW + 3601)
    with pytest.raises(pki.PKIError, match="not valid before"):
        pki.verify_device_certificate(cert, ca=ca.cert, now=NOW - pki.BACKDATE_S - 1)
    other = pki.init_pki(tmp_path / "other", now=NOW)
    other_ca = _cert(other.device_ca_cert)
    with pytest.raises(pki.PKIError, match="not issued by the device CA"):
        pki.verify_device_certificate(cert, ca=other_ca, now=NOW)
    # The federation CA of the same PKI cannot vouch for devices either.
    fed_ca = _cert(pki.PKIPaths(folder).federation_ca_cert)
    with pytest.raises(pki.PKIError, match="not issued by the device CA"):
        pki.verify_device_certificate(cert, ca=fed_ca, now=NOW)


def test_device_ca_never_outlives_itself(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "p", now=NOW, days=1)
    ca = pki.DeviceCA.from_files(paths.device_ca_cert, paths.device_ca_key)
    _, device_id = _identity()
    cert = ca.issue(pki.make_device_csr(device_id)[1], device_id=device_id, now=NOW)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_csr_refusals(folder: Path) -> None:
    ca = _device_ca(folder)
    _, device_id = _identity()
    _, other_id = _identity()
    with pytest.raises(pki.PKIError, match="subject common name must be the device id"):
        ca.issue(pki.make_device_csr(other_id)[1], device_id=device_id, now=NOW)
    with pytest.raises(pki.PKIError, match="not a DER certificate signing request"):
        ca.issue(b"\x30\x03junk", device_id=device_id, now=NOW)
    with pytest.raises(pki.PKIError, match="csr: missing"):
        ca.issue(b"", device_id=device_id, now=NOW)
    p384 = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(p384, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(pki.PKIError, match="P-256"):
        ca.issue(csr, device_id=device_id, now=NOW)


def test_csr_with_a_broken_self_signature_is_refused(folder: Path) -> None:
    ca = _device_ca(folder)
    _, device_id = _identity()
    _, csr = pki.make_device_csr(device_id)
    tampered = bytearray(csr)
    tampered[-5] ^= 0x01  # inside the signature at the end of the DER
    with pytest.raises(pki.PKIError):
        ca.issue(bytes(tampered), device_id=device_id, now=NOW)


def test_csr_proof_binds_csr_token_and_identity() -> None:
    key, device_id = _identity()
    other, _ = _identity()
    _, csr = pki.make_device_csr(device_id)
    proof = pki.csr_proof(key, csr, token="tok")
    pki.verify_csr_proof(raw_public_key(key), csr, token="tok", proof=proof)
    with pytest.raises(pki.PKIError, match="not signed by the identity key"):
        pki.verify_csr_proof(raw_public_key(other), csr, token="tok", proof=proof)
    with pytest.raises(pki.PKIError, match="not signed by the identity key"):
        pki.verify_csr_proof(raw_public_key(key), csr, token="other", proof=proof)
    _, csr2 = pki.make_device_csr(device_id)
    with pytest.raises(pki.PKIError, match="not signed by the identity key"):
        pki.verify_csr_proof(raw_public_key(key), csr2, token="tok", proof=proof)
    with pytest.raises(pki.PKIError, match="missing"):
        pki.verify_csr_proof(raw_public_key(key), csr, token="tok", proof=b"")


def test_device_id_of_refuses_inconsistent_names(folder: Path) -> None:
    paths = pki.PKIPaths(folder)
    server = pki.issue_server_certificate(folder, dns=["a.example"], ips=[], now=NOW)
    with pytest.raises(pki.PKIError, match="does not name one device"):
        pki.device_id_of(_cert(server.server_cert))
    ca_key = serialization.load_pem_private_key(paths.device_ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    mismatched = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a" * 32)]))
        .issuer_name(_cert(paths.device_ca_cert).subject)
        .public_key(leaf_key.public_key())
        .serial_number(1)
        .not_valid_before(_utc(NOW))
        .not_valid_after(_utc(NOW + 60))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:estuary:device:" + "b" * 32)]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(pki.PKIError, match="consistently"):
        pki.device_id_of(mismatched)


@settings(max_examples=40, deadline=None)
@given(
    lifetime=st.floats(min_value=600, max_value=90 * 86_400),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_renewal_is_due_exactly_in_the_last_third(lifetime: float, fraction: float) -> None:
    start, end = NOW, NOW + lifetime
    cert = _plain_cert(start, end)
    now = start + fraction * (end - start)
    start_s = cert.not_valid_before_utc.timestamp()
    end_s = cert.not_valid_after_utc.timestamp()  # whole seconds, as X.509 stores them
    expected = end_s - now < (end_s - start_s) / 3
    assert pki.renewal_due(cert, now=now) is expected
    if fraction < 0.6:
        assert not pki.renewal_due(cert, now=now)
    if fraction > 0.7:
        assert pki.renewal_due(cert, now=now)


_KEY = ec.generate_private_key(ec.SECP256R1())


def _plain_cert(start: float, end: float) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(end))
        .sign(_KEY, hashes.SHA256())
    )


def test_device_ca_refuses_a_key_that_is_not_its_own(folder: Path, tmp_path: Path) -> None:
    paths = pki.PKIPaths(folder)
    with pytest.raises(pki.PKIError, match="not the key of the device CA"):
        pki.DeviceCA.from_files(paths.device_ca_cert, paths.federation_ca_key)
