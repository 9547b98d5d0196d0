"""The device's TLS client certificate: requested by CSR, kept in the state directory, renewed.

The TLS key is generated here, on the device, and never sent anywhere: the coordinator
sees only a CSR for it (:func:`estuary.pki.make_device_csr`), at enrolment together with
the identity key's proof over it (:func:`estuary.pki.csr_proof`), at renewal inside a
signed ``RenewCertificate`` request. The certificate that comes back is checked before it
is stored: it must be for this key and name this device. Key (mode 0600) and certificate
live in the state directory as ``tls-key.pem`` and ``tls-cert.pem``; both are replaced
atomically, the key first written to a new file, so a crash leaves either the old pair or
the new one usable (a new key without its certificate is never installed: the pair is
written only once the certificate is in hand).

:class:`DeviceCertificate` renews when a third of the lifetime is left
(:func:`estuary.pki.renewal_due`), while the current certificate still opens the mutual-TLS
connection the renewal travels over; a certificate that expired (the device was off for
days) cannot renew, and the device must enrol again with a new token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_client.errors import AgentError
from edge_client.rpc import EdgeRpc
from edge_client.state import EdgeState, atomic_write
from edge_client.tls import ChannelTLS
from estuary import pki
from estuary.proto.v1 import edge_pb2

__all__ = ["CERT_FILE", "KEY_FILE", "DeviceCertificate", "IssuedPair", "renew_if_due"]

logger = logging.getLogger(__name__)

KEY_FILE = "tls-key.pem"
CERT_FILE = "tls-cert.pem"


@dataclass(frozen=True)
class IssuedPair:
    """A TLS key generated here and the CSR that asks for its certificate."""

    key: ec.EllipticCurvePrivateKey
    csr_der: bytes


class DeviceCertificate:
    """The client certificate of one device's state directory.

    Parameters
    ----------
    state
        The device's state directory.
    """

    def __init__(self, state: EdgeState) -> None:
        self._state = state

    @property
    def key_path(self) -> Path:
        """Where the TLS private key is kept (0600)."""
        return self._state.root / KEY_FILE

    @property
    def cert_path(self) -> Path:
        """Where the client certificate is kept."""
        return self._state.root / CERT_FILE

    def exists(self) -> bool:
        """Return whether a certificate and key are stored."""
        return self.cert_path.exists() and self.key_path.exists()

    @staticmethod
    def request(device_id: str) -> IssuedPair:
        """Generate a new TLS key on this device and a CSR naming ``device_id``."""
        key, csr = pki.make_device_csr(device_id)
        return IssuedPair(key, csr)

    def install(self, pair: IssuedPair, cert_pem: bytes, *, device_id: str) -> x509.Certificate:
        """Check the issued ``cert_pem`` against ``pair`` and ``device_id``; store both.

        Raises
        ------
        AgentError
            If the certificate does not parse, is not for ``pair``'s key, or names another
            device (the coordinator answered wrongly): nothing is stored.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise AgentError(
                f"the coordinator's client certificate does not parse: {exc}"
            ) from None
        if cert.public_key() != pair.key.public_key():
            raise AgentError("the coordinator's client certificate is not for this device's key")
        try:
            named = pki.device_id_of(cert)
        except pki.PKIError as exc:
            raise AgentError(f"the coordinator's client certificate: {exc}") from None
        if named != device_id:
            raise AgentError(
                f"the coordinator's client certificate names device {named}, not {device_id}"
            )
        key_pem = pair.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(self.key_path, key_pem, mode=0o600)
        atomic_write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        logger.info(
            "stored client certificate for device %s, valid until %s",
            device_id,
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return cert

    def load(self) -> x509.Certificate | None:
        """Return the stored certificate, or ``None`` if there is none."""
        if not self.exists():
            return None
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise AgentError(f"{self.cert_path}: unusable client certificate: {exc}") from None

    def renewal_due(self, *, now: float) -> bool:
        """Return whether the stored certificate has a third or less of its lifetime left."""
        cert = self.load()
        return cert is not None and pki.renewal_due(cert, now=now)

    def channel(self, base: ChannelTLS | None) -> ChannelTLS | None:
        """Return ``base`` with this device's certificate added, when it should be.

        The stored certificate is used when the channel speaks TLS (``base`` not ``None``)
        and has no client certificate configured (``tls.cert_file``): a configured one
        wins, plaintext stays plaintext.
        """
        if base is None or base.cert_pem is not None or not self.exists():
            return base
        return ChannelTLS(
            ca_pem=base.ca_pem,
            cert_pem=self.cert_path.read_bytes(),
            key_pem=self.key_path.read_bytes(),
            ca_file=base.ca_file,
            cert_file=self.cert_path,
            key_file=self.key_path,
        )


async def renew_if_due(rpc: EdgeRpc, certificate: DeviceCertificate, *, device_id: str) -> bool:
    """Renew the stored certificate over ``rpc`` if it is due; return whether it was.

    A new TLS key is generated for every renewal (the old one is not reused), sent as a
    CSR in a signed ``RenewCertificate``; once the new pair is stored the channel is
    reopened with it. Does nothing without a stored certificate.

    Raises
    ------
    AgentError
        If the coordinator refuses (revoked device: UNAUTHENTICATED) or answers with a
        certificate that is not for the new key and this device.
    """
    if not certificate.renewal_due(now=rpc.clock.time()):
        return False
    pair = certificate.request(device_id)
    response = await rpc.call(
        "RenewCertificate",
        edge_pb2.RenewCertificateRequest(tls_csr=pair.csr_der),
        response_type=edge_pb2.RenewCertificateResponse,
        in_task=False,
    )
    certificate.install(pair, bytes(response.client_certificate_pem), device_id=device_id)
    base = rpc.credentials
    if base is not None:
        await rpc.use_credentials(
            certificate.channel(ChannelTLS(ca_pem=base.ca_pem, ca_file=base.ca_file))
        )
    logger.info("renewed the client certificate of device %s", device_id)
    return True
