from __future__ import annotations

import filecmp
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from estuary.proto import generate as gen

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _pyproject() -> dict[str, Any]:
    with (gen.ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _requirement(requirements: list[str], name: str) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == name]
    assert len(found) == 1, f"{name}: expected one requirement, found {found}"
    return found[0]


def _committed_gencode_versions() -> tuple[set[Version], set[Version]]:
    """Return the protobuf and grpc versions the committed files were generated for."""
    protobuf: set[Version] = set()
    grpc: set[Version] = set()
    for path in gen.PROTO_DIR.glob("*_pb2.py"):
        found = re.search(r"^# Protobuf Python Version: (\S+)$", path.read_text(), re.M)
        assert found, f"{path.name}: no 'Protobuf Python Version' header"
        protobuf.add(Version(found.group(1)))
    for path in gen.PROTO_DIR.glob("*_pb2_grpc.py"):
        found = re.search(r"^GRPC_GENERATED_VERSION = '(\S+)'$", path.read_text(), re.M)
        assert found, f"{path.name}: no GRPC_GENERATED_VERSION"
        grpc.add(Version(found.group(1)))
    return protobuf, grpc


def test_committed_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    # The dev extra pins the generator; another release (or none) is a failure here, not
    # a skip: the comparison is only meaningful with the generator that wrote the files.
    gen.check_generator()
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


def test_generation_refuses_another_grpcio_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gen, "GRPCIO_TOOLS_VERSION", "1.85.1")
    with pytest.raises(gen.WrongGeneratorError, match=r"grpcio-tools==1\.85\.1"):
        gen.generate(tmp_path)
    assert not (tmp_path / "estuary").exists(), "nothing may be written by a refused run"


def test_pyproject_pins_the_generator_and_the_runtimes_the_gencode_needs() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    dev = _requirement(project["optional-dependencies"]["dev"], "grpcio-tools")
    assert str(dev.specifier) == f"=={gen.GRPCIO_TOOLS_VERSION}"

    protobuf_versions, grpc_versions = _committed_gencode_versions()
    assert len(protobuf_versions) == 1, f"mixed generators: {protobuf_versions}"
    assert grpc_versions == {Version(gen.GRPCIO_TOOLS_VERSION)}
    (gencode,) = protobuf_versions
    # Gencode of major V runs on runtimes >= itself within V and on V+1, never V+2:
    # exactly what the core's protobuf range must admit.
    protobuf = _requirement(project["dependencies"], "protobuf")
    assert protobuf.specifier == Requirement(f"protobuf>={gencode},<{gencode.major + 2}").specifier
    grpcio = _requirement(project["dependencies"], "grpcio")
    assert str(grpcio.specifier) == f">={gen.GRPCIO_TOOLS_VERSION}"
    # Flower 1.42 caps protobuf below 7: the range must leave a runtime for it.
    assert protobuf.specifier.contains("6.33.6") and protobuf.specifier.contains("7.36.2")


def test_committed_gencode_loads_on_the_installed_runtime() -> None:
    from google.protobuf import __version__ as runtime

    from estuary.proto.v1 import common_pb2, edge_pb2, jobs_pb2

    protobuf = _requirement(_pyproject()["project"]["dependencies"], "protobuf")
    assert protobuf.specifier.contains(runtime), f"runtime {runtime} outside {protobuf}"
    assert {common_pb2.DESCRIPTOR.package, edge_pb2.DESCRIPTOR.package} == {"estuary.v1"}
    assert jobs_pb2.DESCRIPTOR.name == "estuary/proto/v1/jobs.proto"


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
        "RenewCertificate": (False, False),
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
