from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from estuary.proto import generate as gen


def test_committed_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the dev extra")
    written = gen.generate(tmp_path)
    assert written, "protoc generated nothing"
    committed_dir = gen.PROTO_DIR
    committed = sorted(p.name for p in committed_dir.iterdir() if "_pb2" in p.name)
    assert sorted(p.name for p in written) == committed, "generated file set differs"
    stale = [
        str(rel)
        for rel in written
        if not filecmp.cmp(tmp_path / rel, gen.ROOT / rel, shallow=False)
    ]
    assert not stale, f"regenerate with `make proto`; stale: {stale}"


def test_every_proto_has_pyi_stub() -> None:
    for proto in gen.proto_files():
        assert (proto.parent / f"{proto.stem}_pb2.pyi").is_file(), proto


def test_messages_round_trip_on_the_wire() -> None:
    from estuary.proto.v1 import edge_pb2

    task = edge_pb2.Task(task_id="t1", cohort_id="c1", version=7, rank=4, grad_clip_norm=1.5)
    response = edge_pb2.GetTaskResponse(task=task)
    decoded = edge_pb2.GetTaskResponse.FromString(response.SerializeToString())
    assert decoded.WhichOneof("outcome") == "task"
    assert decoded.task.version == 7
    assert decoded.task.grad_clip_norm == pytest.approx(1.5)
    pace = edge_pb2.GetTaskResponse(pace=edge_pb2.Pace(retry_after_ms=1500))
    assert edge_pb2.GetTaskResponse.FromString(pace.SerializeToString()).pace.retry_after_ms == 1500


def test_service_exposes_the_v1_methods() -> None:
    from estuary.proto.v1 import edge_pb2

    service = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Enroll": (False, False),
        "GetTask": (False, False),
        "FetchArtifact": (False, True),
        "SendSecAgg": (False, False),
        "AwaitSecAgg": (False, False),
        "UploadMasked": (True, False),
        "Heartbeat": (False, False),
    }


def test_transport_limits_are_consistent() -> None:
    from estuary import transport

    assert transport.MAX_CHUNK_BYTES < transport.MAX_MESSAGE_BYTES
    assert transport.DEFAULT_CHUNK_BYTES <= transport.MAX_CHUNK_BYTES
    # The server must tolerate the client's ping rate, or it would GOAWAY healthy clients.
    assert transport.SERVER_MIN_PING_INTERVAL_MS <= transport.KEEPALIVE_TIME_MS
    server = dict(transport.server_options())
    client = dict(transport.channel_options())
    assert server["grpc.max_receive_message_length"] == client["grpc.max_send_message_length"]
