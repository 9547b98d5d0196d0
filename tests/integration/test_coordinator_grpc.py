"""The coordinator's gRPC layer against a real server on loopback: bad input of every kind.

Each refusal is checked for its exact status code and that its message names the
problem; afterwards a good device's task is intact and the server still serves.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from federation_helpers import Device, ServerThread, channel, sign, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from cloud_workers.local import local_worker
from coordinator.grpc_service import MAX_UPLOAD_BYTES, stage_from_proto, stage_to_proto
from coordinator.server import CoordinatorServer, ServerStartError
from estuary.config.models import CoordinatorSettings
from estuary.model.presets import build_preset
from estuary.proto.session import identities_from_proto, session_from_proto
from estuary.proto.v1 import edge_pb2, edge_pb2_grpc
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from estuary.state.errors import StoreUnavailable
from estuary.state.memory import MemoryStore
from estuary.transport import MAX_MESSAGE_BYTES
from secure_agg import Client, Stage

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_settings(**overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {
        "node_id": "grpc-test",
        "server": {
            "listen": "127.0.0.1:0",
            "metrics_port": 0,
            "device_requests_per_s": 1000.0,
            "device_burst": 1000,
            # Tight upload-stream limits so the tests of them take a second or two.
            "upload_max_chunks": 64,
            "upload_idle_s": 1.0,
            "upload_max_s": 2.5,
        },
        "tls": {"allow_plaintext": True},
        "model": {"preset": "tiny", "r_max": 4},
        "device_classes": [{"name": "laptop", "rank": 4, "expected_task_s": 5.0}],
        "aggregation": {"buffer_size": 2},
        "pacing": {"target_staleness": 4.0, "retry_after_min_s": 0.1},
        "cohort": {
            # Three members: secure aggregation refuses smaller sessions (they reveal inputs).
            "min_size": 3,
            "max_size": 3,
            "threshold_fraction": 0.6,
            "formation_s": 0.0,
            "deadline_s": 120.0,
            "key_timeout_s": 60.0,
        },
        "training": {"local_steps": 1, "batch_size": 2, "seq_len": 16},
        "workers": "local",
    }
    values.update(overrides)
    return CoordinatorSettings(**values)


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = excinfo.value.code()
    return code


def details(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    text: str = excinfo.value.details() or ""
    return text


class FlakyStore(MemoryStore):
    """A MemoryStore that can be switched 'down': ping and reads then fail."""

    down = False

    def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("test: store is down")
        super().ping()

    def _get(self, key: str) -> Any:
        if self.down:
            raise StoreUnavailable("test: store is down")
        return super()._get(key)


@pytest.fixture(scope="module")
def base() -> Any:
    return build_preset("tiny", seed=0)


def _server_with_local_worker(base: Any, blob_dir: Path, store: MemoryStore) -> CoordinatorServer:
    """A coordinator (make_settings) whose local worker builds artifacts, ticking every 50 ms."""
    return CoordinatorServer(
        make_settings(),
        store=store,
        blobs=BlobStore(blob_dir, fsync=False),
        base=base,
        # No ONNX export: nothing here serves the merged model, and each export costs seconds.
        local_worker=functools.partial(
            local_worker, eval_windows=torch.randint(0, 256, (2, 17)), onnx=False
        ),
        tick_interval_s=0.05,
        health_interval_s=0.2,
    )


@pytest.fixture(scope="module")
def fed(base: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A coordinator with a local worker, three devices in a sealed cohort, and a bystander."""
    store = MemoryStore()
    server = _server_with_local_worker(base, tmp_path_factory.mktemp("blobs"), store)
    thread = ServerThread(server).start()
    ch = channel(thread.address)
    stub = edge_pb2_grpc.EdgeServiceStub(ch)
    registry = server.service.registry
    a, b, c, d = Device(stub), Device(stub), Device(stub), Device(stub)
    for device in (a, b, c, d):
        device.enroll(registry.issue_token(), "laptop")
    members = {"a": a, "b": b, "d": d}
    # The local worker builds the first artifacts meanwhile; then each trains (here: at
    # once) and reports its training task until the cohort is sealed.
    training = {name: device.wait_for_task(60.0) for name, device in members.items()}
    assert all(not t.cohort_id for t in training.values())
    tasks: dict[str, edge_pb2.Task] = {}
    for _ in range(600):
        replies = {n: members[n].get_task(training[n].task_id) for n in members}
        if all(r.WhichOneof("outcome") == "task" for r in replies.values()):
            tasks = {name: r.task for name, r in replies.items()}
            break
        time.sleep(0.1)
    assert tasks, "no cohort was sealed"
    yield {
        "server": server,
        "thread": thread,
        "stub": stub,
        "health": health_pb2_grpc.HealthStub(ch),
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "task_a": tasks["a"],
        "task_b": tasks["b"],
        "task_d": tasks["d"],
        "train_a": training["a"],
        "store": store,
    }
    ch.close()
    thread.stop()


def assert_intact(fed: dict[str, Any]) -> None:
    """The good device still holds the same task and the server serves."""
    check = fed["health"].Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert check.status == SERVING
    again = fed["a"].get_task(fed["train_a"].task_id)
    assert again.WhichOneof("outcome") == "task"
    assert again.task.task_id == fed["task_a"].task_id
    assert again.task.cohort_id == fed["task_a"].cohort_id


# --------------------------------------------------------------------------- mapping


def test_stage_mapping_round_trips_and_refuses_unspecified() -> None:
    for stage in Stage:
        assert stage_from_proto(stage_to_proto(stage)) is stage
    assert stage_to_proto(Stage.ADVERTISE_KEYS) == edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS
    assert stage_to_proto(Stage.COMPLETED) == edge_pb2.SECAGG_STAGE_DONE
    with pytest.raises(Exception, match="stage: 0"):
        stage_from_proto(0)


def test_task_carries_cohort_parameters(fed: dict[str, Any]) -> None:
    task = fed["task_a"]
    assert task.secagg.cohort_size == 3
    assert task.secagg.cohort == task.cohort_id.encode()
    assert task.trained_task_id == fed["train_a"].task_id
    assert task.version == fed["train_a"].version
    assert len(task.secagg.tensors) > 0 and all(t.length > 0 for t in task.secagg.tensors)
    # The training task carried what to train, and no cohort.
    training = fed["train_a"]
    assert training.rank == 4 and training.artifact.size_bytes > 0
    assert not training.cohort_id and not training.HasField("secagg")


# --------------------------------------------------------------------------- authentication


def test_unknown_device_is_unauthenticated_on_every_rpc(fed: dict[str, Any]) -> None:
    stranger = Device(fed["stub"], Ed25519PrivateKey.generate())
    task = fed["task_a"]
    calls = [
        lambda: stranger.get_task(),
        lambda: stranger.fetch(task.artifact.sha256),
        lambda: stranger.send(task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, b"x"),
        lambda: stranger.await_secagg(task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS),
        lambda: stranger.heartbeat(task.task_id),
        lambda: stranger.upload(
            task_id=task.task_id, cohort_id=task.cohort_id, total_bytes=1, sha256="0", chunks=[]
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as excinfo:
            call()
        assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
        assert "unknown device" in details(excinfo)
    assert_intact(fed)


def test_missing_auth_names_what_is_missing(fed: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].GetTask(edge_pb2.GetTaskRequest(), timeout=5)
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "auth: missing" in details(excinfo)
    request = fed["a"].signed("GetTask", edge_pb2.GetTaskRequest())
    request.auth.ClearField("signature")
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].GetTask(request, timeout=5)
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "signature" in details(excinfo)
    assert_intact(fed)


def test_bad_signature_and_replay_are_unauthenticated(fed: dict[str, Any]) -> None:
    a = fed["a"]
    forged = a.signed("Heartbeat", edge_pb2.HeartbeatRequest(task_id="x"))
    forged.auth.signature = bytes([forged.auth.signature[0] ^ 1]) + forged.auth.signature[1:]
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].Heartbeat(forged, timeout=5)
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not verify" in details(excinfo)
    # Signed for another method: the signature binds the method name.
    other = a.signed("GetTask", edge_pb2.HeartbeatRequest(task_id="x"))
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].Heartbeat(other, timeout=5)
    assert "signature does not verify" in details(excinfo)
    good = a.signed("Heartbeat", edge_pb2.HeartbeatRequest(task_id="x"))
    fed["stub"].Heartbeat(good, timeout=5)
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].Heartbeat(good, timeout=5)
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in details(excinfo)
    assert_intact(fed)


def test_revoked_device_and_reused_token_are_unauthenticated(fed: dict[str, Any]) -> None:
    registry = fed["server"].service.registry
    token = registry.issue_token()
    device = Device(fed["stub"])
    device.enroll(token, "laptop")
    device.heartbeat()
    assert registry.revoke(device.device_id)
    with pytest.raises(grpc.RpcError) as excinfo:
        device.heartbeat()
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        Device(fed["stub"]).enroll(token, "laptop")
    assert code_of(excinfo) is grpc.StatusCode.UNAUTHENTICATED
    assert "token" in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        Device(fed["stub"]).enroll(registry.issue_token(), "tablet")
    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    assert "device_class" in details(excinfo)
    assert_intact(fed)


def test_request_over_the_message_limit_is_resource_exhausted(fed: dict[str, Any]) -> None:
    big = fed["a"].signed(
        "GetTask", edge_pb2.GetTaskRequest(held_artifacts=["x" * (MAX_MESSAGE_BYTES + 1)])
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        fed["stub"].GetTask(big, timeout=10)
    assert code_of(excinfo) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_intact(fed)


# --------------------------------------------------------------------------- artifacts


def test_fetch_artifact_resumes_from_an_offset(fed: dict[str, Any]) -> None:
    a = fed["a"]
    whole = b"".join(c.data for c in a.fetch(fed["train_a"].artifact.sha256))
    assert len(whole) == fed["train_a"].artifact.size_bytes
    assert hashlib.sha256(whole).hexdigest() == fed["train_a"].artifact.sha256
    cut = len(whole) // 3
    chunks = a.fetch(fed["train_a"].artifact.sha256, offset=cut, chunk_bytes=64)
    assert chunks[0].offset == cut and all(c.total_bytes == len(whole) for c in chunks)
    assert all(len(c.data) <= 64 for c in chunks)
    assert [c.offset for c in chunks] == [cut + 64 * i for i in range(len(chunks))]
    resumed = whole[:cut] + b"".join(c.data for c in chunks)
    assert hashlib.sha256(resumed).hexdigest() == fed["train_a"].artifact.sha256
    assert a.fetch(fed["train_a"].artifact.sha256, offset=len(whole)) == []


def test_fetch_artifact_refuses_bad_digests_and_offsets(fed: dict[str, Any]) -> None:
    a = fed["a"]
    with pytest.raises(grpc.RpcError) as excinfo:
        a.fetch("not-a-digest")
    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        a.fetch("0" * 64)
    assert code_of(excinfo) is grpc.StatusCode.NOT_FOUND
    assert "0" * 64 in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        a.fetch(fed["train_a"].artifact.sha256, offset=fed["train_a"].artifact.size_bytes + 1)
    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    assert "offset" in details(excinfo)
    assert_intact(fed)


# --------------------------------------------------------------------------- secure aggregation


def test_secagg_refusals(fed: dict[str, Any]) -> None:
    a, c, task = fed["a"], fed["c"], fed["task_a"]
    cases = [
        (a, task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, grpc.StatusCode.INVALID_ARGUMENT,
         "payload"),
        (a, task.cohort_id, edge_pb2.SECAGG_STAGE_UNSPECIFIED, grpc.StatusCode.INVALID_ARGUMENT,
         "stage"),
        (a, task.cohort_id, 42, grpc.StatusCode.INVALID_ARGUMENT, "stage"),
        (a, task.cohort_id, edge_pb2.SECAGG_STAGE_MASKED_INPUT, grpc.StatusCode.INVALID_ARGUMENT,
         "UploadMasked"),
        (a, task.cohort_id, edge_pb2.SECAGG_STAGE_SHARE_KEYS, grpc.StatusCode.FAILED_PRECONDITION,
         "not SHARE_KEYS"),
        (a, "no-such-cohort", edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS,
         grpc.StatusCode.FAILED_PRECONDITION, "no such cohort"),
        (c, task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS,
         grpc.StatusCode.FAILED_PRECONDITION, "not a member"),
    ]  # fmt: skip
    for device, cohort_id, stage, code, words in cases:
        with pytest.raises(grpc.RpcError) as excinfo:
            device.send(cohort_id, stage, b"\x00garbage")
        assert code_of(excinfo) is code, (stage, details(excinfo))
        assert words in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        a.await_secagg(task.cohort_id, edge_pb2.SECAGG_STAGE_UNSPECIFIED)
    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    assert "after_stage" in details(excinfo)
    with pytest.raises(grpc.RpcError) as excinfo:
        c.await_secagg(task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS)
    assert code_of(excinfo) is grpc.StatusCode.FAILED_PRECONDITION
    pending = a.await_secagg(task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, wait_ms=150)
    assert pending.pending and pending.cohort_id == task.cohort_id
    assert_intact(fed)


def test_upload_refusals(fed: dict[str, Any]) -> None:
    a, task = fed["a"], fed["task_a"]
    expected = fed["server"].service.expected_upload_bytes(
        fed["server"].service.registry.get(a.device_id), task.cohort_id
    )
    common = {"task_id": task.task_id, "cohort_id": task.cohort_id, "sha256": "0" * 64}
    cases = [
        ({"total_bytes": MAX_UPLOAD_BYTES + 1, "chunks": []},
         grpc.StatusCode.RESOURCE_EXHAUSTED, "upload limit"),
        ({"total_bytes": 4, "chunks": [b"x" * 8], "cohort_id": "nope"},
         grpc.StatusCode.FAILED_PRECONDITION, "no such cohort"),
        ({"total_bytes": expected + 1, "chunks": []},
         grpc.StatusCode.INVALID_ARGUMENT, f"exactly {expected} bytes"),
        ({"total_bytes": expected, "chunks": [b"\0" * expected, b"\0"]},
         grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds"),
        ({"total_bytes": expected, "chunks": [b"\0" * (expected - 1)]},
         grpc.StatusCode.INVALID_ARGUMENT, "ended after"),
        ({"total_bytes": expected, "chunks": [b"\0" * expected]},
         grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
        ({"total_bytes": expected, "chunks": [b"\0"], "header_first": False},
         grpc.StatusCode.INVALID_ARGUMENT, "UploadHeader"),
    ]  # fmt: skip
    for overrides, code, words in cases:
        with pytest.raises(grpc.RpcError) as excinfo:
            a.upload(**{**common, **overrides})
        assert code_of(excinfo) is code, (overrides.get("total_bytes"), details(excinfo))
        assert words in details(excinfo)
    payload = b"\0" * expected
    with pytest.raises(grpc.RpcError) as excinfo:
        a.upload(**{**common, "sha256": hashlib.sha256(payload).hexdigest()},
                 total_bytes=expected, chunks=[payload])  # fmt: skip
    assert code_of(excinfo) is grpc.StatusCode.FAILED_PRECONDITION  # not in MASKED_INPUT yet
    assert_intact(fed)


def _upload_stream(
    device: Device, task: edge_pb2.Task, total: int, chunks: Iterator[bytes]
) -> Iterator[edge_pb2.UploadChunk]:
    header = device.signed(
        "UploadMasked",
        edge_pb2.UploadHeader(
            task_id=task.task_id, cohort_id=task.cohort_id, total_bytes=total, sha256="0" * 64
        ),
    )
    yield edge_pb2.UploadChunk(header=header)
    for data in chunks:
        yield edge_pb2.UploadChunk(data=data)


def test_upload_stream_limits(fed: dict[str, Any]) -> None:
    """Empty chunks, too many chunks, a stalled stream and a slow one are cut by the server."""
    a, task, stub = fed["a"], fed["task_a"], fed["stub"]
    expected = fed["server"].service.expected_upload_bytes(
        fed["server"].service.registry.get(a.device_id), task.cohort_id
    )
    assert expected > 64  # so 1-byte chunks reach the fixture's 64-chunk limit

    def refused(chunks: Iterator[bytes]) -> tuple[grpc.StatusCode, str, float]:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.UploadMasked(_upload_stream(a, task, expected, chunks), timeout=20)
        return code_of(excinfo), details(excinfo), time.monotonic() - started

    # 100 000 empty chunks: refused at the first, not after reading them all.
    code, text, _ = refused(iter([b""] * 100_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "chunk 1 is empty" in text
    # 1-byte chunks: the 65th is one too many.
    code, text, _ = refused(iter([b"\0"] * expected))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 64 data chunks" in text and "server.upload_max_chunks" in text

    def stalled() -> Iterator[bytes]:
        yield b"\0"
        time.sleep(3.0)  # beyond the 1 s idle limit; the server gives up first
        yield b"\0"

    code, text, elapsed = refused(stalled())
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no chunk for 1 s" in text and "server.upload_idle_s" in text
    assert elapsed < 2.9  # cut at the idle limit, before the client's next chunk

    def trickle() -> Iterator[bytes]:
        for _ in range(60):  # each gap below the idle limit, the whole far beyond 2.5 s
            time.sleep(0.4)
            yield b"\0"

    code, text, elapsed = refused(trickle())
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "longer than 2.5 s" in text and "server.upload_max_s" in text
    assert elapsed < 10.0
    metrics = fed["server"].metrics
    for code_name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
        counted = metrics.value("estuary_rpcs_total", {"method": "UploadMasked", "code": code_name})
        assert counted is not None and counted >= 1, code_name
    assert_intact(fed)


# --------------------------------------------------------------------------- malformed bytes

#: Bytes that are no valid encoding of any message: a truncated varint tag, a field
#: whose length runs past the end, field number 0, and invalid UTF-8 in a string field.
GARBAGE = (b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x00", b"\x0a\x01\xff")

_EDGE_METHODS = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].methods


def _raw_call(ch: grpc.Channel, method: Any, payloads: list[bytes]) -> None:
    """Send raw bytes (identity serializers) to ``method``; raise its grpc.RpcError."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        ch.stream_unary(path)(iter(payloads), timeout=10)
    elif method.server_streaming:
        list(ch.unary_stream(path)(payloads[0], timeout=10))
    else:
        ch.unary_unary(path)(payloads[0], timeout=10)


def test_malformed_payloads_are_invalid_argument_logged_once_and_counted(
    fed: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = fed["server"].metrics
    ch = channel(fed["thread"].address)
    a, task = fed["a"], fed["task_a"]
    expected = fed["server"].service.expected_upload_bytes(
        fed["server"].service.registry.get(a.device_id), task.cohort_id
    )

    def header() -> bytes:  # freshly signed: a header's nonce is good once
        return next(_upload_stream(a, task, expected, iter([]))).SerializeToString()

    sent: dict[str, int] = {}
    before = {
        m.name: metrics.value("estuary_rpcs_total", {"method": m.name, "code": "INVALID_ARGUMENT"})
        or 0
        for m in _EDGE_METHODS
    }
    try:
        with caplog.at_level(logging.DEBUG):
            for method in _EDGE_METHODS:
                streams = [[g] for g in GARBAGE]
                if method.client_streaming:  # also garbage after a good header
                    streams += [[header(), g] for g in GARBAGE]
                for payloads in streams:
                    with pytest.raises(grpc.RpcError) as excinfo:
                        _raw_call(ch, method, payloads)
                    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT, (
                        method.name, payloads, details(excinfo))  # fmt: skip
                    text = details(excinfo)
                    assert "malformed" in text and method.input_type.full_name in text, text
                    assert "Error" not in text and "Exception" not in text, text
                    sent[method.name] = sent.get(method.name, 0) + 1
    finally:
        ch.close()
    for method in _EDGE_METHODS:
        after = metrics.value(
            "estuary_rpcs_total", {"method": method.name, "code": "INVALID_ARGUMENT"}
        )
        assert after == before[method.name] + sent[method.name], method.name
    assert (metrics.value("estuary_rpc_bytes_in_total", {"rpc": "Heartbeat"}) or 0) > 0
    about = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(about) == sum(sent.values())
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in about)
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert_intact(fed)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=64), index=st.integers(0, len(_EDGE_METHODS) - 1))
def test_arbitrary_bytes_are_refused_with_a_client_error(
    fed: dict[str, Any], data: bytes, index: int
) -> None:
    """Whatever the bytes, the answer is a client error, never UNKNOWN or INTERNAL."""
    method = _EDGE_METHODS[index]
    ch = channel(fed["thread"].address)
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            _raw_call(ch, method, [data])
    finally:
        ch.close()
    assert code_of(excinfo) in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    ), (method.name, data, details(excinfo))


def test_heartbeat_and_metrics_after_refusals(fed: dict[str, Any]) -> None:
    a, task = fed["a"], fed["task_a"]
    assert a.heartbeat(task.task_id).action == edge_pb2.HeartbeatResponse.ACTION_CONTINUE
    assert a.heartbeat("other").action == edge_pb2.HeartbeatResponse.ACTION_ABANDON
    # A stranger's GetTask, a download and a refused upload of its own: the counters below
    # must not depend on which tests of this module ran before (pytest-xdist splits them).
    with pytest.raises(grpc.RpcError):
        Device(fed["stub"], Ed25519PrivateKey.generate()).get_task()
    assert a.fetch(fed["train_a"].artifact.sha256)
    with pytest.raises(grpc.RpcError):
        a.upload(task_id=task.task_id, cohort_id="nope", sha256="0" * 64, total_bytes=4,
                 chunks=[b"x" * 8])  # fmt: skip
    metrics = fed["server"].metrics
    refused = metrics.value("estuary_rpcs_total", {"method": "GetTask", "code": "UNAUTHENTICATED"})
    assert refused is not None and refused >= 1
    assert (metrics.value("estuary_rpc_bytes_in_total", {"rpc": "UploadMasked"}) or 0) > 0
    assert (metrics.value("estuary_rpc_bytes_out_total", {"rpc": "FetchArtifact"}) or 0) > 0
    assert metrics.value("estuary_version") == 0


def test_good_devices_still_run_the_protocol(fed: dict[str, Any]) -> None:
    """Last: after all the refusals, the members advertise and get the key broadcast."""
    for name in ("a", "b", "d"):
        device, task = fed[name], fed[f"task_{name}"]
        config = session_from_proto(task.secagg)
        peers = identities_from_proto(task.secagg)
        client = Client(
            task.member_index,
            config=config,
            identity=device.key if peers is not None else None,  # active mode signs
            peer_identities=peers,
        )
        ack = device.send(
            task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, client.advertise().encode()
        )
        assert ack.stage in (edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, edge_pb2.SECAGG_STAGE_SHARE_KEYS)
    a, task = fed["a"], fed["task_a"]
    reply = a.await_secagg(task.cohort_id, edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS, wait_ms=5000)
    assert not reply.pending
    assert reply.stage == edge_pb2.SECAGG_STAGE_SHARE_KEYS and reply.payload


# --------------------------------------------------------------------------- own servers


def _small_server(base: Any, tmp_path: Path, store: Any = None, **overrides: Any) -> ServerThread:
    settings = make_settings(workers="groups", **overrides)
    server = CoordinatorServer(
        settings,
        store=store if store is not None else MemoryStore(),
        blobs=BlobStore(tmp_path / "blobs", fsync=False),
        base=base,
        health_interval_s=0.1,
    )
    return ServerThread(server).start()


def test_rate_limit_is_resource_exhausted_per_device(base: Any, tmp_path: Path) -> None:
    thread = _small_server(
        base,
        tmp_path,
        server={
            "listen": "127.0.0.1:0",
            "metrics_port": 0,  # never the default 9464, which a real replica may hold
            "device_requests_per_s": 0.5,
            "device_burst": 2,
        },
    )
    try:
        stub = edge_pb2_grpc.EdgeServiceStub(channel(thread.address))
        registry = thread.server.service.registry
        noisy, quiet = Device(stub), Device(stub)
        noisy.enroll(registry.issue_token(), "laptop")
        quiet.enroll(registry.issue_token(), "laptop")
        noisy.heartbeat()
        noisy.heartbeat()
        with pytest.raises(grpc.RpcError) as excinfo:
            noisy.heartbeat()
        assert code_of(excinfo) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests/s" in details(excinfo)
        assert quiet.heartbeat().current_version == 0
    finally:
        thread.stop()


def test_health_follows_the_store(base: Any, tmp_path: Path) -> None:
    store = FlakyStore()
    thread = _small_server(base, tmp_path, store=store)
    try:
        ch = channel(thread.address)
        health = health_pb2_grpc.HealthStub(ch)
        stub = edge_pb2_grpc.EdgeServiceStub(ch)
        device = Device(stub)
        device.enroll(thread.server.service.registry.issue_token(), "laptop")

        def status() -> int:
            response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return int(response.status)

        assert status() == SERVING
        store.down = True
        assert wait_until(lambda: status() == NOT_SERVING, timeout_s=5)
        with pytest.raises(grpc.RpcError) as excinfo:
            device.heartbeat()
        assert code_of(excinfo) is grpc.StatusCode.UNAVAILABLE
        assert "state store unavailable" in details(excinfo)
        store.down = False
        assert wait_until(lambda: status() == SERVING, timeout_s=5)
        assert device.heartbeat().current_version == 0
    finally:
        thread.stop()


def test_plaintext_health_port_serves_health_only(base: Any, tmp_path: Path) -> None:
    # Kubernetes' native gRPC probes cannot speak TLS: server.health_listen gives them the
    # same verdict on a plaintext port that serves no edge method.
    store = FlakyStore()
    thread = _small_server(
        base,
        tmp_path,
        store=store,
        server={"listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0", "metrics_port": 0},
    )
    try:
        port = thread.server.health_port
        assert port and port != thread.server.port
        ch = channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(ch)

        def status() -> int:
            response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return int(response.status)

        assert status() == SERVING
        with pytest.raises(grpc.RpcError) as excinfo:
            Device(edge_pb2_grpc.EdgeServiceStub(ch)).heartbeat()
        assert code_of(excinfo) is grpc.StatusCode.UNIMPLEMENTED
        store.down = True
        assert wait_until(lambda: status() == NOT_SERVING, timeout_s=5)
        store.down = False
        assert wait_until(lambda: status() == SERVING, timeout_s=5)
    finally:
        thread.stop()


@pytest.mark.redis
def test_hung_store_turns_health_not_serving_and_requests_fail_fast(
    base: Any, tmp_path: Path, own_redis_server: RedisServer
) -> None:
    """A SIGSTOPped redis-server: NOT_SERVING within one probe; requests get UNAVAILABLE fast.

    The store keeps its production timeouts (5 s per reply, 3 tries): only the health
    watcher's own short probe and the handlers' refusal to wait on a store known silent
    make the replica answer within the bounds asserted here.
    """
    store = open_store(own_redis_server.url, prefix="hung:")
    server = {
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "device_requests_per_s": 1000.0,
        "device_burst": 1000,
        "handler_threads": 4,  # fewer than the requests below: some wait in the queue
    }
    thread = _small_server(base, tmp_path, store=store, server=server)
    paused = False
    try:
        ch = channel(thread.address)
        health = health_pb2_grpc.HealthStub(ch)
        devices = [Device(edge_pb2_grpc.EdgeServiceStub(ch)) for _ in range(12)]
        for device in devices:
            device.enroll(thread.server.service.registry.issue_token(), "laptop")

        def status() -> int:
            response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return int(response.status)

        def heartbeat(device: Device) -> tuple[grpc.StatusCode, float]:
            started = time.monotonic()
            try:
                device.heartbeat()
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            return code, time.monotonic() - started

        assert status() == SERVING
        own_redis_server.pause()
        paused = True
        stopped_at = time.monotonic()
        # Requests in flight when the store goes silent, 4 blocked on it in the pool's
        # threads and 8 queued behind them, each with a 10 s client deadline.
        with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
            results = list(pool.map(heartbeat, devices))
        # The watcher probes every 0.1 s with a 0.5 s timeout; the bounds leave a loaded
        # machine several times that, and stay far below the store's own 15 s retry.
        assert wait_until(lambda: status() == NOT_SERVING, timeout_s=4.0)
        assert time.monotonic() - stopped_at < 5.0
        assert [code for code, _ in results] == [grpc.StatusCode.UNAVAILABLE] * len(devices)
        assert max(elapsed for _, elapsed in results) < 5.0  # not the 10 s deadline
        # While it stays silent, new requests are refused at once.
        code, elapsed = heartbeat(devices[0])
        assert code is grpc.StatusCode.UNAVAILABLE and elapsed < 2.0
        own_redis_server.resume()
        paused = False
        assert wait_until(lambda: status() == SERVING, timeout_s=5.0)
        assert devices[0].heartbeat().current_version == 0
        metrics = thread.server.metrics
        unavailable = metrics.value(
            "estuary_rpcs_total", {"method": "Heartbeat", "code": "UNAVAILABLE"}
        )
        assert unavailable == len(devices) + 1
        ch.close()
    finally:
        if paused:
            own_redis_server.resume()
        thread.stop()
        store.close()


def test_groups_mode_leaves_cloud_jobs_to_worker_groups(base: Any, tmp_path: Path) -> None:
    """With workers = "groups" the coordinator only queues jobs; a worker group serves them."""
    from cloud_workers.executor import ModelJobExecutor
    from cloud_workers.group import WorkerGroup
    from estuary.jobs import CONSUMER_GROUP, JOB_STREAM, RESULT_PREFIX

    store = MemoryStore()
    thread = _small_server(base, tmp_path, store=store)
    try:
        device = Device(edge_pb2_grpc.EdgeServiceStub(channel(thread.address)))
        device.enroll(thread.server.service.registry.issue_token(), "laptop")
        time.sleep(1.0)  # a local worker, had one been started, would have taken jobs by now
        # Per class its artifacts, then the evaluation and the ONNX export for serving.
        jobs = len(thread.server.service.settings.device_classes) + 2
        assert store.stream_length(JOB_STREAM) == jobs
        assert store.scan(RESULT_PREFIX) == {}
        assert store.pending(JOB_STREAM, CONSUMER_GROUP) == []
        paced = device.get_task()
        assert paced.WhichOneof("outcome") == "pace"
        assert "artifact" in paced.pace.reason
        # A worker group on the same store (what `estuary worker run` starts) serves them.
        group = WorkerGroup(
            store,
            executor=ModelJobExecutor(
                store,
                blobs=thread.server.service.blobs,
                base=base,
                eval_windows=torch.randint(0, 256, (2, 17)),
                onnx=False,
            ),
            name="gpu-a",
            heartbeat_s=0.5,
            reclaim_idle_s=2.0,
        )
        while group.step(block_s=0.05):
            pass
        outcomes = {k: json.loads(r.value) for k, r in store.scan(RESULT_PREFIX).items()}
        assert len(outcomes) == jobs
        assert {o["group"] for o in outcomes.values()} == {"gpu-a"}
        assert {o["status"] for o in outcomes.values()} == {"done"}
    finally:
        thread.stop()


def test_plaintext_is_refused_unless_allowed(base: Any, tmp_path: Path) -> None:
    settings = make_settings(workers="groups")
    settings.tls.allow_plaintext = False
    with pytest.raises(ServerStartError, match="allow_plaintext"):
        CoordinatorServer(settings, store=MemoryStore(), base=base)


# --------------------------------------------------------------------------- TLS


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, Any] | None, *,
    ca: bool, sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
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


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(
        obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "localhost", server_key, (ca.subject, ca_key), ca=False,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )  # fmt: skip
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("device", client_key, (ca.subject, ca_key), ca=False)
    files = {
        "ca": _pem(ca),
        "server_cert": _pem(server),
        "server_key": _pem(server_key),
        "client_cert": _pem(client),
        "client_key": _pem(client_key),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


def _health_status(address: str, credentials: grpc.ChannelCredentials) -> int:
    ch = channel(address, credentials)
    try:
        response = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(response.status)
    finally:
        ch.close()


def test_tls_and_mtls(base: Any, tmp_path: Path, pki: dict[str, Path]) -> None:
    ca = pki["ca"].read_bytes()
    tls = {"cert_file": pki["server_cert"], "key_file": pki["server_key"]}
    thread = _small_server(base, tmp_path / "tls", tls=tls)
    try:
        assert _health_status(thread.address, grpc.ssl_channel_credentials(ca)) == SERVING
    finally:
        thread.stop()
    thread = _small_server(base, tmp_path / "mtls", tls={**tls, "client_ca_file": pki["ca"]})
    try:
        with_cert = grpc.ssl_channel_credentials(
            ca,
            private_key=pki["client_key"].read_bytes(),
            certificate_chain=pki["client_cert"].read_bytes(),
        )
        assert _health_status(thread.address, with_cert) == SERVING
        with pytest.raises(grpc.RpcError) as excinfo:
            _health_status(thread.address, grpc.ssl_channel_credentials(ca))
        assert code_of(excinfo) is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            _health_status(thread.address, grpc.ssl_channel_credentials())  # wrong trust
    finally:
        thread.stop()


def test_signing_helper_matches_the_servicer_body_hash() -> None:
    key = Ed25519PrivateKey.generate()
    request = sign(key, "GetTask", edge_pb2.GetTaskRequest(held_version=3))
    assert request.auth.device_id and len(request.auth.signature) == 64


# --------------------------------------------------------------------------- held GetTask


def test_a_reporting_members_get_task_is_held_until_its_cohort_is_sealed(
    base: Any, tmp_path: Path
) -> None:
    # Prepare: cohorts of exactly three; three laptops hold training tasks.
    server = _server_with_local_worker(base, tmp_path / "blobs", MemoryStore())
    thread = ServerThread(server).start()
    ch = channel(thread.address)
    try:
        stub = edge_pb2_grpc.EdgeServiceStub(ch)
        devices = [Device(stub) for _ in range(3)]
        for device in devices:
            device.enroll(server.service.registry.issue_token(), "laptop")
        training = [device.wait_for_task(60.0) for device in devices]

        def report(i: int, wait_ms: int) -> edge_pb2.GetTaskResponse:
            request = edge_pb2.GetTaskRequest(trained_task_id=training[i].task_id, wait_ms=wait_ms)
            response: edge_pb2.GetTaskResponse = stub.GetTask(
                devices[i].signed("GetTask", request), timeout=30
            )
            return response

        # Execute: device 0 reports without waiting (Pace: 1 of 3), then asks with a
        # 300 ms wait while nobody else reports.
        first = report(0, 0)
        assert first.WhichOneof("outcome") == "pace" and first.pace.retry_after_ms > 0
        started = time.monotonic()
        waited = report(0, 300)

        # Assert: held for the wait, then told to ask again at once.
        assert time.monotonic() - started >= 0.3
        assert waited.WhichOneof("outcome") == "pace" and waited.pace.retry_after_ms == 0

        # Execute: device 0 asks with a 20 s wait; device 1 reports meanwhile (2 of 3).
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(report, 0, 20_000)
            assert report(1, 0).WhichOneof("outcome") == "pace"
            time.sleep(0.5)
            assert not held.done()  # still held: the cohort is not sealed

            # Execute: device 2's report fills the cohort (max_size 3): sealed.
            sealed = report(2, 0)
            reply = held.result(timeout=15)

        # Assert: the held call answers with device 0's cohort task, the cohort device 2
        # was given.
        assert sealed.WhichOneof("outcome") == "task" and sealed.task.cohort_id
        assert reply.WhichOneof("outcome") == "task"
        assert reply.task.cohort_id == sealed.task.cohort_id
        assert reply.task.trained_task_id == training[0].task_id
        assert reply.task.member_index != sealed.task.member_index
    finally:
        ch.close()
        thread.stop()
