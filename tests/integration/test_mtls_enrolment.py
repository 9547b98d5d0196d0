"""Mutual TLS end to end: `estuary pki` material, enrolment by CSR, the peer rule, revocation.

Two coordinator replicas over one real Redis, each with a mutual-TLS port and an
enrolment port (TLS without client certificates). Devices enrol with the real agent code
(:func:`edge_client.enrolment.enroll` via :class:`EdgeAgent`), which generates the TLS key
on the device and sends a CSR; later requests go over mutual TLS with the issued
certificate. Every refusal the issue lists is exercised over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from federation_helpers import ServerThread, sign
from redis_server import RedisServer
from typer.testing import CliRunner

from coordinator.server import CoordinatorServer
from edge_client.agent import EdgeAgent
from edge_client.certificate import DeviceCertificate, renew_if_due
from edge_client.state import EdgeState
from edge_client.tls import ChannelTLS
from estuary import pki
from estuary.auth import device_id_for, raw_public_key
from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode
from estuary.config.models import CoordinatorSettings
from estuary.model.presets import build_preset
from estuary.proto.v1 import edge_pb2, edge_pb2_grpc
from estuary.state import open_store
from estuary.state.blobs import BlobStore

pytestmark = pytest.mark.redis

#: Device certificate lifetime here: 120 s, so a fresh certificate is already due for
#: renewal (a third of 120 s + the 300 s backdating is left at once) and renewal runs.
LIFETIME_S = 120.0


def _settings(folder: Path, url: str, node: str) -> CoordinatorSettings:
    return CoordinatorSettings(
        node_id=node,
        server={"listen": "127.0.0.1:0", "metrics_port": 0},
        state={"url": url},
        tls={
            "cert_file": folder / pki.SERVER_CERT,
            "key_file": folder / pki.SERVER_KEY,
            "client_ca_file": folder / pki.DEVICE_CA_CERT,
            "device_ca_cert_file": folder / pki.DEVICE_CA_CERT,
            "device_ca_key_file": folder / pki.DEVICE_CA_KEY,
            "device_cert_lifetime_s": LIFETIME_S,
            "enrol_listen": "127.0.0.1:0",
        },
        model={"preset": "tiny", "r_max": 4},
        device_classes=[{"name": "laptop", "rank": 4, "expected_task_s": 5.0}],
        workers="groups",
    )


@pytest.fixture(scope="module")
def fleet(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mtls")
    folder = root / "pki"
    pki.init_pki(folder, now=time.time())
    pki.issue_server_certificate(folder, dns=["localhost"], ips=["127.0.0.1"], now=time.time())
    redis = RedisServer(root / "redis", binary=redis_binary)
    redis.start()
    base = build_preset("tiny", seed=0)
    threads = []
    try:
        for node in ("a", "b"):
            server = CoordinatorServer(
                _settings(folder, redis.url, node),
                store=open_store(redis.url),
                blobs=BlobStore(root / "blobs", fsync=False),
                base=base,
                health_interval_s=0.2,
            )
            threads.append(ServerThread(server).start())
        yield {"pki": folder, "replicas": threads, "root": root, "redis": redis}
    finally:
        for thread in threads:
            thread.stop()
        redis.kill()


def _ca(fleet: dict[str, Any]) -> ChannelTLS:
    path = fleet["pki"] / pki.FEDERATION_CA_CERT
    return ChannelTLS(ca_pem=path.read_bytes(), ca_file=path)


def _main(thread: ServerThread) -> str:
    return f"127.0.0.1:{thread.server.port}"


def _enrol_target(thread: ServerThread) -> str:
    assert thread.server.enrol_port is not None
    return f"127.0.0.1:{thread.server.enrol_port}"


def _enrol(fleet: dict[str, Any], name: str) -> tuple[EdgeState, Ed25519PrivateKey, str]:
    """Enrol a device with the real agent through replica a's enrolment port."""
    replica = fleet["replicas"][0]
    token = replica.server.service.registry.issue_token()
    state = EdgeState(fleet["root"] / name)
    agent = EdgeAgent(state, _enrol_target(replica), credentials=_ca(fleet), data=None)

    async def run() -> dict[str, Any]:
        try:
            return await agent.enroll(token, "laptop")
        finally:
            await agent.close()

    record = asyncio.run(run())
    return state, state.identity_key(), str(record["device_id"])


def _stub(
    target: str, fleet: dict[str, Any], *, cert: bytes | None, key: bytes | None
) -> tuple[grpc.Channel, Any]:
    ca = (fleet["pki"] / pki.FEDERATION_CA_CERT).read_bytes()
    creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
    ch = grpc.secure_channel(target, creds)
    return ch, edge_pb2_grpc.EdgeServiceStub(ch)


def _files(state: EdgeState) -> tuple[bytes, bytes]:
    cert = DeviceCertificate(state)
    return cert.cert_path.read_bytes(), cert.key_path.read_bytes()


def _get_task(stub: Any, key: Ed25519PrivateKey) -> edge_pb2.GetTaskResponse:
    return stub.GetTask(sign(key, "GetTask", edge_pb2.GetTaskRequest()), timeout=10)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value.code(), excinfo.value.details() or ""


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_enrolled_device_works_over_mtls_on_every_replica(fleet: dict[str, Any]) -> None:
    state, key, device_id = _enrol(fleet, "dev-ok")
    certificate = DeviceCertificate(state)
    issued = certificate.load()
    assert issued is not None
    assert pki.device_id_of(issued) == device_id == device_id_for(raw_public_key(key))
    assert stat.S_IMODE(certificate.key_path.stat().st_mode) == 0o600
    # The private key the certificate is for was made on the device: it is the stored one.
    tls_key = serialization.load_pem_private_key(certificate.key_path.read_bytes(), None)
    assert tls_key.public_key() == issued.public_key()
    cert_pem, key_pem = _files(state)
    for replica in fleet["replicas"]:
        ch, stub = _stub(_main(replica), fleet, cert=cert_pem, key=key_pem)
        with ch:
            response = _get_task(stub, key)
        assert response.WhichOneof("outcome") in ("pace", "task")


def test_certificate_of_device_a_with_requests_signed_by_device_b_is_refused(
    fleet: dict[str, Any],
) -> None:
    state_a, _, device_a = _enrol(fleet, "dev-a")
    _, key_b, device_b = _enrol(fleet, "dev-b")
    cert_pem, key_pem = _files(state_a)
    ch, stub = _stub(_main(fleet["replicas"][1]), fleet, cert=cert_pem, key=key_pem)
    with ch:
        code, text = _refusal(lambda: _get_task(stub, key_b))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert f"device {device_a}'s, but the request is signed by device {device_b}" in text


def test_no_certificate_is_refused_on_both_ports(fleet: dict[str, Any]) -> None:
    _, key, _ = _enrol(fleet, "dev-nocert")
    replica = fleet["replicas"][0]
    ch, stub = _stub(_main(replica), fleet, cert=None, key=None)
    with ch:
        code, _ = _refusal(lambda: _get_task(stub, key))
    assert code is grpc.StatusCode.UNAVAILABLE  # the handshake demands a certificate
    ch, stub = _stub(_enrol_target(replica), fleet, cert=None, key=None)
    with ch:
        code, text = _refusal(lambda: _get_task(stub, key))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in text


@pytest.mark.parametrize("offset_s", [-10 * LIFETIME_S, 3600.0], ids=["expired", "not-yet-valid"])
def test_certificate_outside_its_validity_is_refused(
    fleet: dict[str, Any], offset_s: float
) -> None:
    _, key, device_id = _enrol(fleet, f"dev-time{offset_s:+.0f}")
    ca = pki.DeviceCA.from_files(
        fleet["pki"] / pki.DEVICE_CA_CERT, fleet["pki"] / pki.DEVICE_CA_KEY, lifetime_s=LIFETIME_S
    )
    tls_key, csr = pki.make_device_csr(device_id)
    cert = ca.issue(csr, device_id=device_id, now=time.time() + offset_s)
    key_pem = tls_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ch, stub = _stub(_main(fleet["replicas"][0]), fleet, cert=_pem(cert), key=key_pem)
    with ch:
        code, _ = _refusal(lambda: _get_task(stub, key))
    assert code is grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(fleet: dict[str, Any], tmp_path: Path) -> None:
    _, key, device_id = _enrol(fleet, "dev-wrongca")
    other = pki.init_pki(tmp_path / "other", now=time.time())
    # Right device, right name, but signed by another federation's device CA, and by
    # this federation's own federation CA (which vouches for servers, not devices).
    for ca_cert, ca_key in (
        (other.device_ca_cert, other.device_ca_key),
        (fleet["pki"] / pki.FEDERATION_CA_CERT, fleet["pki"] / pki.FEDERATION_CA_KEY),
    ):
        ca = pki.DeviceCA.from_files(ca_cert, ca_key)
        tls_key, csr = pki.make_device_csr(device_id)
        cert = ca.issue(csr, device_id=device_id, now=time.time())
        key_pem = tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ch, stub = _stub(_main(fleet["replicas"][0]), fleet, cert=_pem(cert), key=key_pem)
        with ch:
            code, _ = _refusal(lambda stub=stub: _get_task(stub, key))
        assert code is grpc.StatusCode.UNAVAILABLE


def _enroll_request(
    token: str, key: Ed25519PrivateKey, *, proof_key: Ed25519PrivateKey
) -> edge_pb2.EnrollRequest:
    _, csr = pki.make_device_csr(device_id_for(raw_public_key(key)))
    return edge_pb2.EnrollRequest(
        token=token,
        identity_public_key=raw_public_key(key),
        device_class="laptop",
        tls_csr=csr,
        tls_csr_proof=pki.csr_proof(proof_key, csr, token=token),
    )


def test_reused_token_and_csr_signed_by_another_key_are_refused(fleet: dict[str, Any]) -> None:
    replica = fleet["replicas"][1]
    registry = replica.server.service.registry
    ch, stub = _stub(_enrol_target(replica), fleet, cert=None, key=None)
    with ch:
        token = registry.issue_token()
        key = Ed25519PrivateKey.generate()
        intruder = Ed25519PrivateKey.generate()
        code, text = _refusal(
            lambda: stub.Enroll(_enroll_request(token, key, proof_key=intruder), timeout=10)
        )
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert "not signed by the identity key being enrolled" in text
        first = stub.Enroll(_enroll_request(token, key, proof_key=key), timeout=10)
        assert first.client_certificate_pem  # the refused attempt did not burn the token
        other = Ed25519PrivateKey.generate()
        code, text = _refusal(
            lambda: stub.Enroll(_enroll_request(token, other, proof_key=other), timeout=10)
        )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in text


def test_renewal_gives_a_new_key_and_certificate_that_work(fleet: dict[str, Any]) -> None:
    state, key, device_id = _enrol(fleet, "dev-renew")
    certificate = DeviceCertificate(state)
    old_cert = certificate.load()
    old_key = certificate.key_path.read_bytes()
    assert old_cert is not None
    agent = EdgeAgent(state, _main(fleet["replicas"][1]), credentials=_ca(fleet), data=None)

    async def run() -> bool:
        try:
            return await renew_if_due(agent._rpc, certificate, device_id=device_id)
        finally:
            await agent.close()

    assert asyncio.run(run()) is True
    new_cert = certificate.load()
    assert new_cert is not None and new_cert.serial_number != old_cert.serial_number
    assert certificate.key_path.read_bytes() != old_key  # a new key, made on the device
    assert pki.device_id_of(new_cert) == device_id
    cert_pem, key_pem = _files(state)
    ch, stub = _stub(_main(fleet["replicas"][0]), fleet, cert=cert_pem, key=key_pem)
    with ch:
        assert _get_task(stub, key).WhichOneof("outcome") in ("pace", "task")


def test_revocation_by_cli_takes_effect_on_the_next_request_on_every_replica(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    state, key, device_id = _enrol(fleet, "dev-revoke")
    cert_pem, key_pem = _files(state)
    stubs = [
        _stub(_main(replica), fleet, cert=cert_pem, key=key_pem) for replica in fleet["replicas"]
    ]
    for _, stub in stubs:
        _get_task(stub, key)  # works on both replicas first
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'node_id = "cli"\n[state]\nurl = "{fleet["redis"].url}"\n[tls]\nallow_plaintext = true\n'
        '[model]\npreset = "tiny"\nr_max = 4\n'
        '[[device_classes]]\nname = "laptop"\nrank = 4\nexpected_task_s = 5.0\n'
    )
    result = CliRunner().invoke(app, ["coordinator", "revoke", device_id, "--config", str(config)])
    assert result.exit_code == ExitCode.OK, result.output
    assert f"revoked device {device_id}" in result.stdout
    for ch, stub in stubs:
        with ch:
            code, text = _refusal(lambda stub=stub: _get_task(stub, key))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in text
    unknown = CliRunner().invoke(app, ["coordinator", "revoke", "0" * 32, "--config", str(config)])
    assert unknown.exit_code == ExitCode.INPUT
    assert "not enrolled" in unknown.output
