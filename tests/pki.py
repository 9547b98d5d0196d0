"""Test helper: a throw-away PKI written as PEM files, made with ``cryptography``.

Two unrelated CAs; a server certificate for ``localhost`` / ``127.0.0.1`` and one that
names another host, both signed by the first CA; a client certificate signed by the first
CA and one (same key) signed by the second. Valid from five minutes ago for one day.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(folder: Path) -> dict[str, Path]:
    """Write a test PKI into ``folder``; return name → path.

    Names: ``ca``, ``other_ca``, ``server_cert``, ``server_key``, ``wrong_name_cert``
    (server key, names only ``elsewhere.example``), ``client_cert``, ``client_key``,
    ``stranger_cert`` (client key, signed by ``other_ca``).
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, None, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("unrelated CA", other_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", server_key, (ca.subject, ca_key), ca=False, sans=local)
    wrong_name = _cert(
        "elsewhere",
        server_key,
        (ca.subject, ca_key),
        ca=False,
        sans=[x509.DNSName("elsewhere.example")],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("device", client_key, (ca.subject, ca_key), ca=False)
    stranger = _cert("device", client_key, (other.subject, other_key), ca=False)
    files = {
        "ca": _cert_pem(ca),
        "other_ca": _cert_pem(other),
        "server_cert": _cert_pem(server),
        "server_key": _key_pem(server_key),
        "wrong_name_cert": _cert_pem(wrong_name),
        "client_cert": _cert_pem(client),
        "client_key": _key_pem(client_key),
        "stranger_cert": _cert_pem(stranger),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = path
    return paths
