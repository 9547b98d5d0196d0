"""The secure-aggregation exchange without a network: deadlines read from the clock.

A scripted stub answers through a real EdgeRpc on a virtual clock, so the deadline and
post-deadline grace are checked in virtual time, and the upload's retry waits exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from offline_rpc import offline_rpc
from recording_clock import RecordingClock

from edge_client.errors import TaskAbandoned
from edge_client.exchange import POST_DEADLINE_GRACE_S, SecAggExchange, clipped_update
from estuary.auth import signed_auth_from
from estuary.clock import VirtualClock
from estuary.proto.session import session_to_proto
from estuary.proto.v1 import edge_pb2
from estuary.transport import DEFAULT_CHUNK_BYTES
from secure_agg import FixedPoint, SessionConfig

KEY = Ed25519PrivateKey.generate()
S = edge_pb2.SecAggStage
CONFIG = SessionConfig(
    cohort=b"c1",
    cohort_size=3,
    threshold=2,
    tensors=(("a", 6), ("b", 2)),
    fixed_point=FixedPoint.for_cohort(3, bits=32, clip=4.0),
)
POLL_S = 60.0  # virtual seconds one pending long poll takes in these tests


class Stub:
    """AwaitSecAgg: always pending, each poll taking POLL_S of the clock (or ABORTED).

    UploadMasked: the scripted failures, then an acceptance; records every stream.
    """

    def __init__(self, clock: VirtualClock, *, upload_failures: int = 0, abort: str = "") -> None:
        self.clock = clock
        self.upload_failures = upload_failures
        self.abort = abort
        self.polls = 0
        self.uploads: list[list[edge_pb2.UploadChunk]] = []

    async def AwaitSecAgg(self, request: Any, timeout: float) -> Any:
        self.polls += 1
        if self.abort:
            return edge_pb2.SecAggServerMessage(
                stage=S.SECAGG_STAGE_ABORTED, abort_reason=self.abort
            )
        self.clock.advance(POLL_S)
        return edge_pb2.SecAggServerMessage(cohort_id=request.cohort_id, pending=True)

    async def UploadMasked(self, chunks: Any, timeout: float) -> Any:
        stream = [edge_pb2.UploadChunk.FromString(c.SerializeToString()) for c in chunks]
        self.uploads.append(stream)
        if self.upload_failures:
            self.upload_failures -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        return edge_pb2.UploadAck(accepted=True)


def exchange_for(clock: RecordingClock, stub: Stub, *, deadline_ms: int) -> SecAggExchange:
    rpc = offline_rpc(clock, stub, identity=lambda: KEY)
    task = edge_pb2.Task(
        task_id="t1",
        cohort_id="c1",
        member_index=0,
        deadline_ms=deadline_ms,
        secagg=session_to_proto(CONFIG),
    )
    return SecAggExchange(rpc, task, identity=KEY)


def test_upload_after_the_deadline_on_the_clock_is_abandoned_unsent() -> None:
    clock = RecordingClock()
    stub = Stub(clock)
    exchange = exchange_for(clock, stub, deadline_ms=clock.time_ms() + 1_000)
    clock.advance(1.001)

    with pytest.raises(TaskAbandoned, match="upload deadline has passed"):
        asyncio.run(exchange.upload(b"masked"))
    assert stub.uploads == []


def test_upload_is_chunked_retried_after_exact_backoff_and_resigned() -> None:
    # Prepare: 2.5 chunks of payload; the first stream fails.
    clock = RecordingClock()
    stub = Stub(clock, upload_failures=1)
    exchange = exchange_for(clock, stub, deadline_ms=clock.time_ms() + 600_000)
    payload = bytes(range(256)) * (DEFAULT_CHUNK_BYTES * 5 // 2 // 256)

    # Execute
    asyncio.run(exchange.upload(payload))

    # Assert
    assert clock.sleeps == [random.Random(5).uniform(0.0, 0.5)]
    assert len(stub.uploads) == 2
    nonces = set()
    for stream in stub.uploads:
        header = stream[0].header
        assert header.total_bytes == len(payload)
        assert header.sha256 == hashlib.sha256(payload).hexdigest()
        assert [len(c.data) for c in stream[1:]] == [DEFAULT_CHUNK_BYTES] * 2 + [
            DEFAULT_CHUNK_BYTES // 2
        ]
        assert b"".join(c.data for c in stream[1:]) == payload
        nonces.add(signed_auth_from(header).nonce)
    assert len(nonces) == 2


def test_polling_gives_up_a_grace_period_after_the_deadline_in_clock_time() -> None:
    clock = RecordingClock()
    stub = Stub(clock)
    exchange = exchange_for(clock, stub, deadline_ms=clock.time_ms())

    with pytest.raises(TaskAbandoned, match="600 s past the task's deadline"):
        asyncio.run(exchange.await_relay())

    # The first poll that ends more than the grace after the deadline is the last.
    assert stub.polls == int(POST_DEADLINE_GRACE_S // POLL_S) + 1
    assert clock.sleeps == []  # long polls are the server's waiting, not the agent's


def test_an_aborted_cohort_abandons_with_its_reason() -> None:
    clock = RecordingClock()
    stub = Stub(clock, abort="too few survivors")
    exchange = exchange_for(clock, stub, deadline_ms=0)

    with pytest.raises(TaskAbandoned, match="the cohort aborted: too few survivors"):
        asyncio.run(exchange.unmask())
    assert stub.polls == 1


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"a": np.zeros((3, 2), np.float32)}, "names tensor 'b', which the adapter lacks"),
        (
            {"a": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)},
            "tensor 'b' has 3 elements, the session expects 2",
        ),
        (
            {
                "a": np.zeros((3, 2), np.float32),
                "b": np.zeros(2, np.float32),
                "c": np.zeros(1, np.float32),
            },
            r"omits adapter tensors \['c'\]",
        ),
    ],
)
def test_update_that_disagrees_with_the_session_abandons(
    delta: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(TaskAbandoned, match=message):
        clipped_update(CONFIG, delta)


@pytest.mark.parametrize(
    ("b", "words"),
    [
        (np.array([0.5, 1.0], np.complex64), "has dtype complex64: only real numbers"),
        (np.array([0.5, np.nan], np.float32), "has non-finite values"),
        (np.array([np.inf, 0.0], np.float32), "has non-finite values"),
    ],
)
def test_update_that_is_not_real_and_finite_abandons(b: np.ndarray, words: str) -> None:
    # A diverged or complex ΔB is refused with a reason, never masked (a complex update used
    # to lose its imaginary part silently, a NaN to escape as a bare ValueError).
    delta = {"a": np.zeros((3, 2), np.float32), "b": b}
    with pytest.raises(TaskAbandoned, match=rf"cannot mask the update: update tensor 'b' {words}"):
        clipped_update(CONFIG, delta)


def test_update_is_flattened_row_major_and_clipped() -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([0.0, 0.0], dtype=np.float32)

    update = clipped_update(CONFIG, {"a": a, "b": b})

    norm = float(np.linalg.norm(a))  # 7.4 > clip 4: scaled down to the clip
    np.testing.assert_allclose(update["a"], a.reshape(-1) * 4.0 / norm, rtol=1e-6)
    assert update["b"].shape == (2,) and not update["b"].any()
