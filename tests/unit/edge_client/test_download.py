"""ArtifactDownloader against a scripted FetchArtifact stream, on a virtual clock.

Each scripted stream serves the blob from the requested offset and can stop early,
fail mid-stream or serve wrong bytes; the waits between attempts are checked exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from offline_rpc import offline_rpc
from recording_clock import RecordingClock

from edge_client.download import MAX_HASH_FAILURES, ArtifactDownloader
from edge_client.errors import TaskAbandoned
from edge_client.state import EdgeState
from estuary.auth import signed_auth_from
from estuary.clock import VirtualClock
from estuary.proto.v1 import edge_pb2

KEY = Ed25519PrivateKey.generate()
BLOB = bytes(range(256)) * 3  # 768 bytes
DIGEST = hashlib.sha256(BLOB).hexdigest()
CHUNK = 100


class Stub:
    """FetchArtifact per scripted stream: ``"full"``, ``("stop", n)`` (end after n
    chunks), ``("fail", n)`` (UNAVAILABLE after n chunks), ``"corrupt"`` or a status code.
    """

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.requests: list[edge_pb2.FetchArtifactRequest] = []

    def FetchArtifact(self, request: Any) -> AsyncIterator[edge_pb2.ArtifactChunk]:
        copy = edge_pb2.FetchArtifactRequest()
        copy.CopyFrom(request)
        self.requests.append(copy)
        return self._stream(request.offset, self.script.pop(0))

    async def _stream(self, offset: int, step: Any) -> AsyncIterator[edge_pb2.ArtifactChunk]:
        if isinstance(step, grpc.StatusCode):
            raise grpc.aio.AioRpcError(step, grpc.aio.Metadata(), grpc.aio.Metadata())
        data = bytes(len(BLOB)) if step == "corrupt" else BLOB
        kind, limit = step if isinstance(step, tuple) else (step, None)
        for n, start in enumerate(range(offset, len(data), CHUNK)):
            if limit is not None and n == limit:
                if kind == "fail":
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
                    )
                return
            yield edge_pb2.ArtifactChunk(
                offset=start, data=data[start : start + CHUNK], total_bytes=len(data)
            )


def downloader_for(
    tmp_path: Path, clock: VirtualClock, stub: Stub
) -> tuple[ArtifactDownloader, EdgeState]:
    state = EdgeState(tmp_path / "edge")
    rpc = offline_rpc(clock, stub, identity=lambda: KEY)
    return ArtifactDownloader(state, rpc), state


def test_early_end_and_broken_stream_resume_after_exact_backoffs(tmp_path: Path) -> None:
    # Prepare: a stream that ends after 2 chunks, one that breaks after 3 more, then the rest.
    clock = RecordingClock()
    stub = Stub([("stop", 2), ("fail", 3), "full"])
    downloads, state = downloader_for(tmp_path, clock, stub)

    # Execute
    asyncio.run(downloads.fetch(DIGEST, len(BLOB)))

    # Assert: resumed where each stream left off, after backoffs of attempts 0 and 1.
    assert [r.offset for r in stub.requests] == [0, 2 * CHUNK, 5 * CHUNK]
    rng = random.Random(5)
    assert clock.sleeps == [rng.uniform(0.0, 0.5), rng.uniform(0.0, 1.0)]
    assert state.has_artifact(DIGEST) and state.read_artifact(DIGEST) == BLOB
    assert len({signed_auth_from(r).nonce for r in stub.requests}) == 3


def test_cached_blob_is_not_fetched(tmp_path: Path) -> None:
    clock = RecordingClock()
    downloads, _ = downloader_for(tmp_path, clock, Stub(["full"]))
    asyncio.run(downloads.fetch(DIGEST, None))
    again = Stub([])
    downloads, _ = downloader_for(tmp_path, clock, again)

    asyncio.run(downloads.fetch(DIGEST, None))

    assert again.requests == []


def test_blob_failing_its_hash_check_is_refetched_then_abandoned(tmp_path: Path) -> None:
    clock = RecordingClock()
    stub = Stub(["corrupt"] * MAX_HASH_FAILURES)
    downloads, state = downloader_for(tmp_path, clock, stub)

    with pytest.raises(TaskAbandoned, match=f"failed its hash check {MAX_HASH_FAILURES} times"):
        asyncio.run(downloads.fetch(DIGEST, len(BLOB)))

    # Each retry starts from 0 (the corrupt file is deleted) and waits for nothing.
    assert [r.offset for r in stub.requests] == [0] * MAX_HASH_FAILURES
    assert clock.sleeps == []
    assert not state.has_artifact(DIGEST) and state.partial_size(DIGEST) == 0


def test_refused_fetch_abandons_the_task(tmp_path: Path) -> None:
    clock = RecordingClock()
    downloads, _ = downloader_for(tmp_path, clock, Stub([grpc.StatusCode.NOT_FOUND]))

    with pytest.raises(TaskAbandoned, match=r"FetchArtifact refused \(NOT_FOUND\)"):
        asyncio.run(downloads.fetch(DIGEST, None))
    assert clock.sleeps == []


def test_malformed_digest_abandons_without_a_request(tmp_path: Path) -> None:
    stub = Stub([])
    downloads, _ = downloader_for(tmp_path, RecordingClock(), stub)

    with pytest.raises(TaskAbandoned, match="bad artifact digest"):
        asyncio.run(downloads.fetch("../../etc/passwd", None))
    assert stub.requests == []


def test_task_without_artifact_is_abandoned(tmp_path: Path) -> None:
    downloads, _ = downloader_for(tmp_path, RecordingClock(), Stub([]))

    with pytest.raises(TaskAbandoned, match="names no artifact"):
        asyncio.run(downloads.fetch_training_files(edge_pb2.Task().artifact))
