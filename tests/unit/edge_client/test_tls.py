"""TLS mistakes stop the agent at once, named; outages are still retried.

Real gRPC servers on loopback with certificates made by ``cryptography`` (tests/pki.py).
Every call runs on a recording virtual clock with a hook that stops the agent at its
first retry: a TLS mistake must raise :class:`TLSFailure` before any retry (so no wait
is asked of the clock), while an outage must reach the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from pki import make_pki
from recording_clock import RecordingClock

from edge_client.errors import AgentStopping, TLSFailure
from edge_client.hooks import AgentHooks, AgentStats
from edge_client.rpc import EdgeRpc
from edge_client.tls import ChannelTLS, details_cause
from estuary.auth import device_id_for, raw_public_key
from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc

KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


class EnrollOnly(edge_pb2_grpc.EdgeServiceServicer):  # type: ignore[misc]
    """Answers Enroll; reaching it proves the TLS handshake worked."""

    async def Enroll(self, request: Any, context: Any) -> Any:
        return edge_pb2.EnrollResponse(
            device_id=device_id_for(request.identity_public_key),
            device_class=common_pb2.DeviceClass(name=request.device_class, rank=2),
            r_max=4,
        )


def server_credentials(
    pki: dict[str, Path], *, cert: str = "server_cert", client_ca: bool = False
) -> grpc.ServerCredentials:
    pair = (pki["server_key"].read_bytes(), pki[cert].read_bytes())
    if not client_ca:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=pki["ca"].read_bytes(), require_client_auth=True
    )


@contextlib.asynccontextmanager
async def serving(credentials: grpc.ServerCredentials | None) -> AsyncIterator[str]:
    server = grpc.aio.server()
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(EnrollOnly(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def closing_server() -> AsyncIterator[str]:
    """A TCP server that accepts and closes at once, speaking no TLS: an outage."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def enroll_once(
    target: str, tls: ChannelTLS | None, events: list[tuple[str, dict[str, Any]]]
) -> tuple[edge_pb2.EnrollResponse, RecordingClock]:
    """Call Enroll through EdgeRpc; the agent is stopped at its first retry."""
    clock = RecordingClock()
    stop = asyncio.Event()

    def on_event(name: str, details: dict[str, Any]) -> None:
        events.append((name, details))
        if name == "retry":
            stop.set()

    rpc = EdgeRpc(
        target,
        credentials=tls,
        identity=lambda: KEY,
        clock=clock,
        rng=random.Random(1),
        max_backoff_s=300.0,
        stats=AgentStats(),
        hooks=AgentHooks(on_event=on_event),
    )
    rpc.stop = stop
    request = edge_pb2.EnrollRequest(
        token="t", identity_public_key=raw_public_key(KEY), device_class="phone"
    )
    try:
        response = await rpc.call(
            "Enroll", request, response_type=edge_pb2.EnrollResponse, sign=False, in_task=False
        )
    finally:
        await rpc.close()
    return response, clock


def tls_of(pki: dict[str, Path], ca: str | None = "ca", cert: str | None = None) -> ChannelTLS:
    return ChannelTLS.from_files(
        ca_file=None if ca is None else pki[ca],
        cert_file=None if cert is None else pki[cert],
        key_file=None if cert is None else pki["client_key"],
    )


def failure_of(scenario: Any) -> TLSFailure:
    with pytest.raises(TLSFailure) as info:
        asyncio.run(scenario())
    return info.value


# --------------------------------------------------------------------------- controls


def test_right_ca_and_client_certificate_reach_the_server(pki: dict[str, Path]) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> list[str]:
        ids = []
        async with serving(server_credentials(pki)) as target:
            response, clock = await enroll_once(target, tls_of(pki), events)
            ids.append(response.device_id)
            assert clock.sleeps == []
        async with serving(server_credentials(pki, client_ca=True)) as target:
            response, _ = await enroll_once(target, tls_of(pki, cert="client_cert"), events)
            ids.append(response.device_id)
        return ids

    expected = device_id_for(raw_public_key(KEY))
    assert asyncio.run(scenario()) == [expected, expected]
    assert events == []


def test_outages_are_still_retried() -> None:
    # A server that closes every connection without TLS, then a port nobody listens on:
    # both must reach the retry (which the hook turns into a stop), not a TLSFailure.
    events: list[tuple[str, dict[str, Any]]] = []

    async def closed() -> None:
        async with closing_server() as target:
            await enroll_once(target, None, events)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"

    async def refused() -> None:
        await enroll_once(dead, None, events)

    for scenario in (closed, refused):
        with pytest.raises(AgentStopping):
            asyncio.run(scenario())
    assert [(name, d["code"]) for name, d in events] == [("retry", "UNAVAILABLE")] * 2


# --------------------------------------------------------------------------- TLS mistakes


def test_unknown_ca_is_certificate_verify_failed(pki: dict[str, Path]) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> None:
        async with serving(server_credentials(pki)) as target:
            await enroll_once(target, tls_of(pki, ca="other_ca"), events)

    failure = failure_of(scenario)
    assert failure.cause == "CERTIFICATE_VERIFY_FAILED"
    message = str(failure)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert f"tls.ca_file {pki['other_ca']}" in message
    assert "not retrying" in message
    assert events == []


def test_system_trust_store_does_not_know_a_private_ca(pki: dict[str, Path]) -> None:
    async def scenario() -> None:
        async with serving(server_credentials(pki)) as target:
            await enroll_once(target, tls_of(pki, ca=None), [])

    failure = failure_of(scenario)
    assert failure.cause == "CERTIFICATE_VERIFY_FAILED"
    assert "system trust store" in str(failure)


def test_plaintext_agent_against_a_tls_coordinator(pki: dict[str, Path]) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> None:
        async with serving(server_credentials(pki)) as target:
            await enroll_once(target, None, events)

    failure = failure_of(scenario)
    assert failure.cause == "PLAINTEXT_TO_TLS_SERVER"
    assert "allow_plaintext" in str(failure) and "speaks TLS" in str(failure)
    assert events == []


def test_tls_agent_against_a_plaintext_coordinator(pki: dict[str, Path]) -> None:
    async def scenario() -> None:
        async with serving(None) as target:
            await enroll_once(target, tls_of(pki), [])

    failure = failure_of(scenario)
    assert failure.cause == "WRONG_VERSION_NUMBER"
    assert "does not speak TLS" in str(failure)


def test_certificate_for_another_host(pki: dict[str, Path]) -> None:
    async def scenario() -> None:
        async with serving(server_credentials(pki, cert="wrong_name_cert")) as target:
            await enroll_once(target, tls_of(pki), [])

    failure = failure_of(scenario)
    assert failure.cause == "HOSTNAME_MISMATCH"
    assert "does not name 127.0.0.1" in str(failure)


@pytest.mark.parametrize(("cert", "hint"), [(None, "has none"), ("stranger_cert", "not accept")])
def test_client_certificate_missing_or_untrusted(
    pki: dict[str, Path], cert: str | None, hint: str
) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> None:
        async with serving(server_credentials(pki, client_ca=True)) as target:
            await enroll_once(target, tls_of(pki, cert=cert), events)

    failure = failure_of(scenario)
    assert failure.cause == "CLIENT_CERTIFICATE_REFUSED"
    assert hint in str(failure)
    assert events == []


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("details", "cause"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
            "certificate: OK",
            ("CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate"),
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
            "Verification Check failed.",
            ("HOSTNAME_MISMATCH", "the certificate does not name the host connected to"),
        ),
        # Older gRPC wording: the reason without OpenSSL's prefix.
        (
            "Ssl handshake failed: SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED",
            ("CERTIFICATE_VERIFY_FAILED", ""),
        ),
        ("failed to connect to all addresses; last error: UNAVAILABLE: Socket closed", None),
        ("Failed to connect to remote host: Connection refused", None),
        ("scripted", None),
    ],
)
def test_details_cause(details: str, cause: tuple[str, str] | None) -> None:
    assert details_cause(details) == cause


@given(st.text(max_size=200))
def test_details_without_tls_words_are_no_tls_failure(text: str) -> None:
    lowered = text.lower()
    words = ("handshake", "ssl", "tsi", "certificate", "hostname verification", "openssl")
    if not any(word in lowered for word in words):
        assert details_cause(text) is None


def test_channel_tls_names_the_unusable_file(pki: dict[str, Path], tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"tls.ca_file: {not_pem} holds no PEM certificate"):
        ChannelTLS.from_files(ca_file=not_pem, cert_file=None, key_file=None)
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=rf"tls.ca_file: cannot read the coordinator CA {missing}"):
        ChannelTLS.from_files(ca_file=missing, cert_file=None, key_file=None)
    with pytest.raises(ValueError, match=rf"tls.key_file: {pki['ca']} is not an unencrypted PEM"):
        ChannelTLS.from_files(ca_file=None, cert_file=pki["client_cert"], key_file=pki["ca"])
    with pytest.raises(ValueError, match="both"):
        ChannelTLS.from_files(ca_file=None, cert_file=pki["client_cert"], key_file=None)
