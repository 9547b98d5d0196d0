"""TLS of the agent's channel, and telling a TLS mistake from an outage.

Both look alike to the agent: gRPC reports UNAVAILABLE for a coordinator that is down
and for one whose certificate this agent does not trust. But an outage ends by itself,
while a TLS mistake fails identically on every attempt until someone fixes a
configuration; retrying it forever (as a transient failure would be) only hides the
cause. :func:`diagnose` tells them apart:

- gRPC's status details name the failed handshake when the *client* side of TLS failed:
  ``CERTIFICATE_VERIFY_FAILED`` (unknown CA, expired certificate), a hostname the
  certificate does not name, ``WRONG_VERSION_NUMBER`` (a TLS agent facing a plaintext
  server). Those are read from the details.
- When the *server* side gave up, the agent sees only "Socket closed": a plaintext agent
  facing a TLS coordinator, or a coordinator that requires a client certificate this
  agent lacks or that it does not trust. Then a short probe with Python's ``ssl``
  repeats the handshake the way the channel would and looks at what the server does.
  A probe that cannot connect, or sees a working server, says nothing: the failure
  stays transient and is retried as before.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_client.errors import TLSFailure

__all__ = [
    "POST_HANDSHAKE_WAIT_S",
    "PROBE_TIMEOUT_S",
    "ChannelTLS",
    "details_cause",
    "diagnose",
    "probe",
    "tls_failure",
]

#: Seconds the probe allows to connect, and again to complete its handshake (one or two
#: round trips each): 5 s covers a slow mobile link yet bounds the pause before the
#: ordinary retry.
PROBE_TIMEOUT_S = 5.0
#: Seconds the probe waits, after its handshake, to hear from the server: a gRPC server
#: sends its HTTP/2 SETTINGS at once, and one refusing the client certificate closes at
#: once, so either arrives in milliseconds; hearing neither says nothing (no verdict).
POST_HANDSHAKE_WAIT_S = 2.0

_OPENSSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]+))?")
_HANDSHAKE_MARKERS = ("handshake failed", "ssl_error_ssl", "tsi_protocol_failure")
_CLOSED_MARKERS = ("socket closed", "connection reset", "broken pipe")
# Ends of a handshake that an overloaded or restarting server also produces: no verdict.
_TRANSIENT_SSL = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)


@dataclass(frozen=True)
class ChannelTLS:
    """The TLS material of the agent's channel to the coordinator.

    Parameters
    ----------
    ca_pem
        CA certificates (PEM) the coordinator's certificate must chain to; ``None``: the
        system trust store.
    cert_pem, key_pem
        Client certificate chain and private key (PEM) for mutual TLS; both or neither.
    ca_file, cert_file, key_file
        Where the material was read from, for messages and for the diagnostic probe
        (Python's ``ssl`` loads a client certificate only from files).
    """

    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_pem is None) != (self.key_pem is None):
            raise ValueError("cert_pem, key_pem: give both (mutual TLS) or neither")

    @classmethod
    def from_files(
        cls, *, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
    ) -> ChannelTLS:
        """Read and check the PEM files of an edge's ``[tls]`` section.

        Raises
        ------
        ValueError
            A file is unreadable, holds no PEM certificate (CA, client certificate) or
            no unencrypted PEM private key (client key), or only one of the client
            certificate and key is given; the message names the file.
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("tls.cert_file, tls.key_file: give both (mutual TLS) or neither")
        ca_pem = _read(ca_file, "tls.ca_file", "coordinator CA")
        cert_pem = _read(cert_file, "tls.cert_file", "client certificate")
        key_pem = _read(key_file, "tls.key_file", "client private key")
        for pem, path, field in ((ca_pem, ca_file, "ca_file"), (cert_pem, cert_file, "cert_file")):
            if pem is not None:
                try:
                    x509.load_pem_x509_certificates(pem)
                except ValueError as exc:
                    raise ValueError(
                        f"tls.{field}: {path} holds no PEM certificate ({exc})"
                    ) from None
        if key_pem is not None:
            try:
                serialization.load_pem_private_key(key_pem, password=None)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"tls.key_file: {key_file} is not an unencrypted PEM private key ({exc})"
                ) from None
        return cls(ca_pem, cert_pem, key_pem, ca_file, cert_file, key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        """Return the gRPC channel credentials of this material."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def trust_source(self) -> str:
        """Return, for messages, what the coordinator's certificate is checked against."""
        if self.ca_file is not None:
            return f"tls.ca_file {self.ca_file}"
        return "the configured CA" if self.ca_pem is not None else "the system trust store"


def _read(path: Path | None, field: str, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read the {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise ValueError(f"{field}: the {what} {path} is empty")
    return data


# --------------------------------------------------------------------------- diagnosis


def details_cause(details: str) -> tuple[str, str] | None:
    """Return ``(cause, detail)`` when gRPC status ``details`` name a TLS failure.

    ``cause`` is OpenSSL's reason (``CERTIFICATE_VERIFY_FAILED``, ``WRONG_VERSION_NUMBER``,
    …) or ``HOSTNAME_MISMATCH``; ``detail`` is OpenSSL's explanation, if given.
    """
    lowered = details.lower()
    if "hostname verification" in lowered:
        return "HOSTNAME_MISMATCH", "the certificate does not name the host connected to"
    match = _OPENSSL_REASON.search(details)
    if match is not None:
        return match.group(1), (match.group(2) or "").strip()
    if "certificate_verify_failed" in lowered:
        return "CERTIFICATE_VERIFY_FAILED", ""
    if any(marker in lowered for marker in _HANDSHAKE_MARKERS):
        return "TLS_HANDSHAKE_FAILED", ""
    return None


def _split_target(target: str) -> tuple[str, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _client_context(tls: ChannelTLS | None) -> ssl.SSLContext | None:
    """Return an ``ssl`` context that handshakes as the channel would; None if it cannot."""
    if tls is None:
        # A plaintext agent: only whether the server speaks TLS at all matters.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if tls.cert_pem is not None and (tls.cert_file is None or tls.key_file is None):
            return None  # the client certificate cannot be presented: no faithful probe
        cadata = tls.ca_pem.decode("ascii", errors="replace") if tls.ca_pem else None
        context = ssl.create_default_context(cadata=cadata)
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2"])  # gRPC servers expect HTTP/2 by ALPN
    return context


def probe(
    host: str,
    port: int,
    tls: ChannelTLS | None,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    wait_s: float = POST_HANDSHAKE_WAIT_S,
) -> tuple[str, str] | None:
    """Handshake with ``host:port`` as the channel would; return a TLS cause, or ``None``.

    Blocking (run it in a thread). ``None`` means no verdict: the server is unreachable,
    or accepts this agent, or behaves in a way an outage could explain.

    Returns
    -------
    tuple of str, or None
        ``("PLAINTEXT_TO_TLS_SERVER", …)`` when ``tls`` is ``None`` and the server
        completes a TLS handshake; ``("CERTIFICATE_VERIFY_FAILED", reason)``;
        ``("CLIENT_CERTIFICATE_REFUSED", …)`` when the server closes or alerts right
        after the handshake; another OpenSSL reason for a refused handshake.
    """
    try:
        context = _client_context(tls)
    except (ssl.SSLError, OSError):
        return None  # unusable material: the channel reports that itself
    if context is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            server_hostname = host if tls is not None else None
            with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
                if tls is None:
                    return (
                        "PLAINTEXT_TO_TLS_SERVER",
                        f"the server completed a {conn.version()} handshake",
                    )
                conn.settimeout(wait_s)
                try:
                    first = conn.recv(1)
                except _TRANSIENT_SSL:
                    first = b""
                except ssl.SSLError as exc:
                    return "CLIENT_CERTIFICATE_REFUSED", exc.reason or str(exc)
                except OSError:
                    return None  # timeout or reset: no verdict
                if first:
                    return None  # the server talks to us: the handshake is not the problem
                return (
                    "CLIENT_CERTIFICATE_REFUSED",
                    "the server closed the connection right after the handshake",
                )
    except ssl.SSLCertVerificationError as exc:
        return "CERTIFICATE_VERIFY_FAILED", str(exc.verify_message or exc.reason or "")
    except _TRANSIENT_SSL:
        return None
    except ssl.SSLError as exc:
        if tls is None:
            return None  # the server does not speak TLS either: a plaintext server's outage
        reason = exc.reason or "TLS_HANDSHAKE_FAILED"
        if ("ALERT" in reason and "CERTIFICATE" in reason) or "UNKNOWN_CA" in reason:
            return "CLIENT_CERTIFICATE_REFUSED", reason
        return reason, ""
    except OSError:
        return None


def _hint(cause: str, *, host: str, tls: ChannelTLS | None) -> str:
    if cause == "PLAINTEXT_TO_TLS_SERVER":
        return (
            "the coordinator speaks TLS, but this agent connects without it "
            "(tls.allow_plaintext = true): remove allow_plaintext and set tls.ca_file to "
            "the CA of the coordinator's certificate"
        )
    if cause == "CERTIFICATE_VERIFY_FAILED":
        source = tls.trust_source() if tls is not None else "the system trust store"
        return (
            f"the coordinator's certificate does not verify against {source}: set "
            "tls.ca_file to the CA that signed it, and check the certificate's validity dates"
        )
    if cause == "HOSTNAME_MISMATCH":
        return (
            f"the coordinator's certificate does not name {host}: connect by a name in its "
            "subjectAltName, or reissue it with this name"
        )
    if cause == "WRONG_VERSION_NUMBER":
        return (
            "the coordinator does not speak TLS on this port (it may run with "
            "tls.allow_plaintext = true): give it a certificate, or on loopback only set "
            "tls.allow_plaintext = true here too"
        )
    if cause == "CLIENT_CERTIFICATE_REFUSED":
        if tls is None or tls.cert_pem is None:
            return (
                "the coordinator requires a client certificate (mutual TLS) and this agent "
                "has none: enrol through the coordinator's enrolment port (enrol_coordinator "
                "= its tls.enrol_listen address), which issues one by CSR, or set "
                "tls.cert_file and tls.key_file"
            )
        return (
            f"the coordinator does not accept this agent's client certificate "
            f"({tls.cert_file or 'tls.cert_file'}): use one signed by the CA it trusts "
            "(its tls.client_ca_file)"
        )
    return "the TLS handshake with the coordinator fails: check both sides' [tls] settings"


def tls_failure(cause: str, detail: str, *, target: str, tls: ChannelTLS | None) -> TLSFailure:
    """Return the :class:`TLSFailure` for ``cause`` met while connecting to ``target``."""
    split = _split_target(target)
    host = split[0] if split else target
    said = f"{cause} ({detail})" if detail else cause
    return TLSFailure(
        f"TLS with the coordinator at {target} failed: {said}; "
        f"{_hint(cause, host=host, tls=tls)}. A configuration mistake, not an outage: "
        "not retrying",
        cause=cause,
    )


async def diagnose(
    exc: grpc.aio.AioRpcError, *, target: str, tls: ChannelTLS | None
) -> TLSFailure | None:
    """Return a :class:`TLSFailure` if failed call ``exc`` is a TLS mistake, else ``None``.

    Reads gRPC's status details first; probes the server (in a thread, bounded by
    2 × :data:`PROBE_TIMEOUT_S` + :data:`POST_HANDSHAKE_WAIT_S`, milliseconds on a LAN)
    only when the details say no more than that the connection was closed.
    """
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    details = exc.details() or ""
    found = details_cause(details)
    if found is None and any(marker in details.lower() for marker in _CLOSED_MARKERS):
        split = _split_target(target)
        if split is not None:
            found = await asyncio.to_thread(probe, split[0], split[1], tls)
    if found is None:
        return None
    return tls_failure(found[0], found[1], target=target, tls=tls)
