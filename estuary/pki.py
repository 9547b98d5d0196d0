"""The federation's X.509 material: CAs, the coordinator's certificate, device certificates.

Everything is built with ``cryptography.x509`` (no hand-written ASN.1). Two CAs, kept apart
so that neither can stand in for the other:

- the **federation CA** signs the coordinator's server certificate (``pki server``); edge
  agents trust it (``tls.ca_file``) to know they talk to the federation;
- the **device CA** signs short-lived client certificates for enrolled devices; the
  coordinator trusts it for mutual TLS (``tls.client_ca_file``) and holds its key
  (``tls.device_ca_cert_file`` / ``tls.device_ca_key_file``) to answer CSRs.

A device never receives a private key: it generates its TLS key itself and sends a CSR.
The CSR is bound to the device's Ed25519 identity (the key that signs every request,
:mod:`estuary.auth`) in two ways: its subject common name must be the device id derived
from that identity key, and the request carrying it is signed by the identity key over
the CSR's DER — at enrolment by :func:`csr_proof` (Enroll carries no ``DeviceAuth``; the
proof also covers the token, so it cannot be moved to another enrolment), at renewal by
the ordinary request signature, whose body hash covers the CSR. A CSR whose proof was made
by any key but the one being enrolled is refused (:class:`PKIError`).

A device certificate names its device twice, in the subject common name and as the URI
``urn:estuary:device:<id>`` in the subjectAltName; :func:`device_id_of` requires both and
that they agree. The coordinator compares that id with the signer of every request.

Layout of a PKI directory (``pki init`` / ``pki server``): ``federation-ca.pem``,
``federation-ca.key``, ``device-ca.pem``, ``device-ca.key``, ``server.pem``,
``server.key``. Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_VALIDITY_DAYS",
    "CSR_PROOF_LABEL",
    "DEVICE_CA_CERT",
    "DEVICE_CA_KEY",
    "DEVICE_CERT_LIFETIME_S",
    "DEVICE_URI_PREFIX",
    "FEDERATION_CA_CERT",
    "FEDERATION_CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "SERVER_VALIDITY_DAYS",
    "DeviceCA",
    "PKIError",
    "csr_proof",
    "device_id_of",
    "init_pki",
    "issue_server_certificate",
    "load_certificate",
    "make_device_csr",
    "renewal_due",
    "verify_csr_proof",
    "verify_device_certificate",
    "write_private_key",
]

FEDERATION_CA_CERT = "federation-ca.pem"
FEDERATION_CA_KEY = "federation-ca.key"
DEVICE_CA_CERT = "device-ca.pem"
DEVICE_CA_KEY = "device-ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

#: CA lifetime: 10 years. A CA is rotated deliberately (README, "PKI and enrolment"), not
#: by expiry; ten years outlives any fleet's hardware without being unbounded.
CA_VALIDITY_DAYS = 3650
#: Server certificate lifetime: 397 days, the longest that browsers' CA/B Forum rules
#: accept, so the same certificate also works behind standard TLS tooling.
SERVER_VALIDITY_DAYS = 397
#: Device certificate lifetime: 7 days. Short, so a stolen device key is useful for at most
#: a week even without revocation, yet long enough that a device offline over a weekend
#: renews on its own when it comes back (it renews once a third of the lifetime is left).
DEVICE_CERT_LIFETIME_S = 7 * 86_400
#: Backdating of every certificate's notBefore: 5 minutes, the same clock-skew allowance
#: as request timestamps (:data:`estuary.auth.MAX_CLOCK_SKEW_MS`), so a peer whose clock
#: is slightly behind does not reject a certificate issued a moment ago.
BACKDATE_S = 300
#: Fraction of a device certificate's lifetime left at which the agent renews it: one
#: third (2⅓ days of a 7-day certificate) leaves many retries for an agent that is offline.
RENEW_AT_FRACTION_LEFT = 1 / 3

#: subjectAltName URI prefix naming a device; the id follows.
DEVICE_URI_PREFIX = "urn:estuary:device:"
#: Domain-separation label of the enrolment CSR proof (see :func:`csr_proof`).
CSR_PROOF_LABEL = b"estuary/v1/enrol-csr\x00"

# P-256 for every TLS key: supported by every TLS stack gRPC builds on (BoringSSL,
# OpenSSL), and by phone keystores; Ed25519 TLS certificates are not.
_CURVE = ec.SECP256R1()


class PKIError(Exception):
    """A certificate, CSR or proof is unacceptable; the message says which and why."""


# --------------------------------------------------------------------------- files


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a new file with mode 0600.

    Raises
    ------
    FileExistsError
        If ``path`` exists: a private key is never overwritten.
    """
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: refuse an existing file atomically; mode at creation, so the key is never
    # readable by others even for an instant (umask can only remove bits).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_certificate(path: Path, cert: x509.Certificate) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, cert.public_bytes(serialization.Encoding.PEM))
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite {', '.join(existing)}; move them away first "
            "(rotating a CA: see README, 'PKI and enrolment')"
        )


def load_certificate(path: Path) -> x509.Certificate:
    """Read the first PEM certificate of ``path``; :class:`PKIError` naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PKIError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PKIError(f"{path} holds no PEM certificate ({exc})") from None


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PKIError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


# --------------------------------------------------------------------------- building


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, name: x509.Name, now: float, days: int
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE_S))
        .not_valid_after(_utc(now + days * 86_400))
        # path_length 0: a CA of ours signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_builder(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    not_before: float,
    not_after: float,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )


@dataclass(frozen=True)
class PKIPaths:
    """Where :func:`init_pki` and :func:`issue_server_certificate` write, in one directory."""

    folder: Path

    @property
    def federation_ca_cert(self) -> Path:
        """The federation CA certificate (edges' ``tls.ca_file``)."""
        return self.folder / FEDERATION_CA_CERT

    @property
    def federation_ca_key(self) -> Path:
        """The federation CA key (0600; keep it offline once the server is issued)."""
        return self.folder / FEDERATION_CA_KEY

    @property
    def device_ca_cert(self) -> Path:
        """The device CA certificate (coordinator's ``tls.client_ca_file``)."""
        return self.folder / DEVICE_CA_CERT

    @property
    def device_ca_key(self) -> Path:
        """The device CA key (0600; coordinator's ``tls.device_ca_key_file``)."""
        return self.folder / DEVICE_CA_KEY

    @property
    def server_cert(self) -> Path:
        """The coordinator's certificate (``tls.cert_file``)."""
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        """The coordinator's key (0600; ``tls.key_file``)."""
        return self.folder / SERVER_KEY


def init_pki(
    folder: Path,
    *,
    organization: str = "Estuary federation",
    now: float,
    days: int = CA_VALIDITY_DAYS,
) -> PKIPaths:
    """Create the federation CA and the device CA in ``folder`` (created if missing).

    Parameters
    ----------
    folder
        Directory to write into; created with mode 0700 if missing.
    organization
        Organization name in both CAs' subjects.
    now
        Unix seconds: the start of validity (less :data:`BACKDATE_S`).
    days
        Validity of both CAs in days (> 0).

    Raises
    ------
    FileExistsError
        If any of the four files exists (nothing is written then).
    ValueError
        If ``days`` is not positive or ``organization`` is empty.
    """
    if days <= 0:
        raise ValueError(f"days: must be > 0, got {days}")
    if not organization:
        raise ValueError("organization: must be non-empty")
    paths = PKIPaths(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_existing(
        [
            paths.federation_ca_key,
            paths.federation_ca_cert,
            paths.device_ca_key,
            paths.device_ca_cert,
        ]
    )
    for cert_path, key_path, common_name in (
        (paths.federation_ca_cert, paths.federation_ca_key, "Estuary federation CA"),
        (paths.device_ca_cert, paths.device_ca_key, "Estuary device CA"),
    ):
        key = ec.generate_private_key(_CURVE)
        write_private_key(key_path, key)
        _write_certificate(
            cert_path,
            _ca_certificate(key, name=_name(common_name, organization), now=now, days=days),
        )
    return paths


def issue_server_certificate(
    folder: Path,
    *,
    dns: Sequence[str],
    ips: Sequence[str],
    now: float,
    days: int = SERVER_VALIDITY_DAYS,
) -> PKIPaths:
    """Issue the coordinator's certificate, signed by the federation CA of ``folder``.

    The key is generated here and written next to the certificate (0600). The subject's
    common name is the first DNS name (else the first IP); every name goes into the
    subjectAltName, which is what TLS clients check.

    Raises
    ------
    ValueError
        No names given, an IP that does not parse, a DNS name with a character outside
        ``[A-Za-z0-9.-*]``, or ``days`` not positive.
    FileExistsError
        If ``server.pem`` or ``server.key`` exists.
    PKIError
        If the federation CA is missing or unreadable.
    """
    if not dns and not ips:
        raise ValueError("dns, ips: give at least one name the coordinator is reached by")
    if days <= 0:
        raise ValueError(f"days: must be > 0, got {days}")
    sans: list[x509.GeneralName] = []
    for name in dns:
        if not name or any(not (c.isalnum() or c in ".-*") for c in name) or not name.isascii():
            raise ValueError(f"dns: {name!r} is not a DNS name")
        sans.append(x509.DNSName(name))
    for text in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            raise ValueError(f"ip: {text!r} is not an IPv4 or IPv6 address") from None
    paths = PKIPaths(folder)
    ca_cert = load_certificate(paths.federation_ca_cert)
    ca_key = _load_ec_key(paths.federation_ca_key)
    _refuse_existing([paths.server_key, paths.server_cert])
    key = ec.generate_private_key(_CURVE)
    common_name = dns[0] if dns else ips[0]
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    organization = str(org[0].value) if org else "Estuary federation"
    cert = _leaf_builder(
        subject=_name(common_name, organization),
        public_key=key.public_key(),
        issuer=ca_cert,
        not_before=now - BACKDATE_S,
        not_after=min(now + days * 86_400, ca_cert.not_valid_after_utc.timestamp()),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    ).sign(ca_key, hashes.SHA256())
    write_private_key(paths.server_key, key)
    _write_certificate(paths.server_cert, cert)
    return paths


# --------------------------------------------------------------------------- devices


def make_device_csr(device_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """Generate a device TLS key and a CSR for it naming ``device_id``; return (key, DER).

    Runs on the device: the key never leaves it.
    """
    if not device_id:
        raise ValueError("device_id: must be non-empty")
    key = ec.generate_private_key(_CURVE)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def _proof_message(csr_der: bytes, token: str) -> bytes:
    token_hash = hashlib.sha256(token.encode("utf-8")).digest()
    csr_hash = hashlib.sha256(csr_der).digest()
    return CSR_PROOF_LABEL + b"".join(struct.pack(">I", len(p)) + p for p in (token_hash, csr_hash))


def csr_proof(identity_key: Ed25519PrivateKey, csr_der: bytes, *, token: str) -> bytes:
    """Return the identity key's signature binding ``csr_der`` to the enrolment ``token``."""
    return identity_key.sign(_proof_message(csr_der, token))


def verify_csr_proof(public_key: bytes, csr_der: bytes, *, token: str, proof: bytes) -> None:
    """Check that identity key ``public_key`` signed ``csr_der`` for ``token``.

    Raises
    ------
    PKIError
        If the proof is absent or does not verify under ``public_key`` (the CSR was signed
        for another identity, another token, or altered).
    """
    if not proof:
        raise PKIError("csr_proof: missing; the identity key must sign the CSR")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(proof, _proof_message(csr_der, token))
    except (InvalidSignature, ValueError):
        raise PKIError(
            "csr_proof: the CSR is not signed by the identity key being enrolled"
        ) from None


class DeviceCA:
    """The device CA as the coordinator holds it: signs CSRs into short-lived certificates.

    Parameters
    ----------
    cert, key
        The device CA certificate and its private key.
    lifetime_s
        Lifetime of an issued certificate, seconds (> 0); capped by the CA's own expiry.
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        *,
        lifetime_s: float = DEVICE_CERT_LIFETIME_S,
    ) -> None:
        if not lifetime_s > 0:
            raise ValueError(f"lifetime_s: must be > 0, got {lifetime_s}")
        if cert.public_key() != key.public_key():
            raise ValueError("key: is not the private key of the device CA certificate")
        self.cert = cert
        self.lifetime_s = lifetime_s
        self._key = key

    @classmethod
    def from_files(
        cls, cert_file: Path, key_file: Path, *, lifetime_s: float = DEVICE_CERT_LIFETIME_S
    ) -> DeviceCA:
        """Load the device CA from PEM files; :class:`PKIError` naming a bad file."""
        cert = load_certificate(cert_file)
        key = _load_ec_key(key_file)
        try:
            return cls(cert, key, lifetime_s=lifetime_s)
        except ValueError:
            raise PKIError(f"{key_file} is not the key of the device CA {cert_file}") from None

    @property
    def cert_pem(self) -> bytes:
        """The device CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def check_csr(csr_der: bytes, *, device_id: str) -> x509.CertificateSigningRequest:
        """Return the parsed CSR if it is acceptable for ``device_id``.

        It must carry a valid self-signature (proof that the requester holds the TLS key),
        an EC P-256 key, and exactly ``device_id`` as subject common name.

        Raises
        ------
        PKIError
            Naming what is wrong.
        """
        if not csr_der:
            raise PKIError("csr: missing")
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as exc:
            raise PKIError(f"csr: not a DER certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise PKIError("csr: its signature does not verify with its own public key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise PKIError("csr: the TLS key must be an EC P-256 key")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [str(n.value) for n in names] != [device_id]:
            got = [str(n.value) for n in names]
            raise PKIError(f"csr: subject common name must be the device id {device_id}, got {got}")
        return csr

    def issue(self, csr_der: bytes, *, device_id: str, now: float) -> x509.Certificate:
        """Sign a device's CSR (checked by :meth:`check_csr`); return its client certificate.

        The certificate's subject and SAN are set from ``device_id`` (not copied from the
        CSR), with clientAuth only, valid from ``now`` (less :data:`BACKDATE_S`) for
        ``lifetime_s``, never beyond the CA's own expiry.

        Raises
        ------
        PKIError
            If the CSR is unacceptable (see :meth:`check_csr`).
        """
        public_key = self.check_csr(csr_der, device_id=device_id).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # check_csr ensures it
        not_after = min(now + self.lifetime_s, self.cert.not_valid_after_utc.timestamp())
        return _leaf_builder(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            public_key=public_key,
            issuer=self.cert,
            not_before=now - BACKDATE_S,
            not_after=not_after,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=[x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)],
        ).sign(self._key, hashes.SHA256())


def device_id_of(cert: x509.Certificate) -> str:
    """Return the device id a device certificate names (subject CN = SAN URI).

    Raises
    ------
    PKIError
        If the certificate does not name exactly one device, consistently.
    """
    names = [str(n.value) for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate names no device (no subjectAltName)") from None
    uris = [
        u[len(DEVICE_URI_PREFIX) :]
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(DEVICE_URI_PREFIX)
    ]
    if len(names) != 1 or len(uris) != 1 or names[0] != uris[0] or not names[0]:
        raise PKIError(
            f"certificate does not name one device consistently (CN {names}, device URIs {uris})"
        )
    return names[0]


def verify_device_certificate(cert: x509.Certificate, *, ca: x509.Certificate, now: float) -> str:
    """Check a device certificate against the device CA at time ``now``; return its id.

    The TLS handshake checks the same chain with the machine's clock; this is the check
    with the federation's clock, and the one the edge applies to a certificate it was
    issued before using it.

    Raises
    ------
    PKIError
        Not signed by ``ca``, outside its validity (expired or not yet valid), not for
        client authentication, or not naming one device.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError("certificate is not issued by the device CA") from None
    if now < cert.not_valid_before_utc.timestamp():
        raise PKIError(f"certificate not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc.timestamp():
        raise PKIError(f"certificate expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate has no extended key usage (clientAuth needed)") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise PKIError("certificate is not for client authentication")
    return device_id_of(cert)


def renewal_due(cert: x509.Certificate, *, now: float) -> bool:
    """Return whether ``cert`` has less than :data:`RENEW_AT_FRACTION_LEFT` of its life left."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return end - now < (end - start) * RENEW_AT_FRACTION_LEFT
