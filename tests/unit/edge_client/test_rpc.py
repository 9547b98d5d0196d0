"""EdgeRpc without a network: a scripted stub, a virtual clock that records every wait.

Checks the exact backoff waits, a fresh verifiable signature per attempt at the clock's
time, refusal classification, and that a stop event ends waits and retries at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from offline_rpc import offline_rpc
from recording_clock import RecordingClock

from edge_client.errors import AgentError, AgentStopping, TaskAbandoned
from edge_client.hooks import AgentHooks, AgentStats
from edge_client.rpc import BACKOFF_BASE_S, EdgeRpc
from estuary.auth import raw_public_key, request_body_sha256, signed_auth_from, verify_request
from estuary.clock import Clock, VirtualClock
from estuary.proto.v1 import edge_pb2

KEY = Ed25519PrivateKey.generate()
PACE = edge_pb2.GetTaskResponse(pace=edge_pb2.Pace(retry_after_ms=10))


class NeverWakingClock(VirtualClock):
    """A clock whose sleeps never end: only a stop event can end a wait on it."""

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.Event().wait()


def failure(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


class Stub:
    """Answers each GetTask / Enroll with the next scripted response or failure.

    Records (request copy, clock time in ms) per attempt.
    """

    def __init__(self, clock: Clock, script: list[Any]) -> None:
        self.clock = clock
        self.script = list(script)
        self.seen: list[tuple[Any, int]] = []

    async def _answer(self, request: Any, timeout: float) -> Any:
        copy = type(request)()
        copy.CopyFrom(request)
        self.seen.append((copy, self.clock.time_ms()))
        step = self.script.pop(0)
        if isinstance(step, grpc.StatusCode):
            raise failure(step)
        return step

    GetTask = _answer
    Enroll = _answer


def make_rpc(
    clock: Clock,
    script: list[Any],
    *,
    max_backoff_s: float = 300.0,
    seed: int = 7,
    identity: Callable[[], Ed25519PrivateKey] = lambda: KEY,
    events: list[tuple[str, dict[str, Any]]] | None = None,
) -> tuple[EdgeRpc, Stub]:
    stub = Stub(clock, script)
    hooks = AgentHooks(
        on_event=None if events is None else lambda name, details: events.append((name, details))
    )
    rpc = offline_rpc(
        clock, stub, identity=identity, seed=seed, max_backoff_s=max_backoff_s, hooks=hooks
    )
    return rpc, stub


def get_task(rpc: EdgeRpc, *, in_task: bool = False) -> Any:
    request = edge_pb2.GetTaskRequest(held_version=3)
    return asyncio.run(
        rpc.call("GetTask", request, response_type=edge_pb2.GetTaskResponse, in_task=in_task)
    )


def test_transient_failures_wait_exact_backoffs_and_resign_each_attempt() -> None:
    # Prepare: the three transient codes, then an answer.
    clock = RecordingClock()
    events: list[tuple[str, dict[str, Any]]] = []
    script = [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        PACE,
    ]
    rpc, stub = make_rpc(clock, script, events=events)
    start_ms = clock.time_ms()

    # Execute
    response = get_task(rpc)

    # Assert: waits of full jitter under 0.5, 1 and 2 s, drawn from the seeded stream.
    assert response == PACE
    rng = random.Random(7)
    expected = [rng.uniform(0.0, BACKOFF_BASE_S * 2.0**k) for k in range(3)]
    assert clock.sleeps == expected
    assert [d["delay_s"] for _, d in events] == expected
    assert [d["code"] for _, d in events] == [
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    ]
    # Each attempt is signed anew, at the clock's time, and verifies.
    nonces = set()
    for request, at_ms in stub.seen:
        auth = signed_auth_from(request)
        assert auth.timestamp_ms == at_ms
        verify_request(
            auth,
            public_key=raw_public_key(KEY),
            method="GetTask",
            body_sha256=request_body_sha256(request),
            now_ms=at_ms,
        )
        nonces.add(auth.nonce)
    assert len(nonces) == 4
    times = [at for _, at in stub.seen]
    assert times[0] == start_ms and times[-1] - times[0] == pytest.approx(
        sum(expected) * 1000, abs=2
    )
    # Every attempt's bytes are counted.
    assert rpc.stats.bytes_up == sum(r.ByteSize() for r, _ in stub.seen)
    assert rpc.stats.bytes_down == PACE.ByteSize()


def test_backoff_ceiling_stops_at_max_backoff() -> None:
    clock = RecordingClock()
    rpc, _ = make_rpc(clock, [grpc.StatusCode.UNAVAILABLE] * 6 + [PACE], max_backoff_s=1.5)

    get_task(rpc)

    rng = random.Random(7)
    ceilings = [0.5, 1.0, 1.5, 1.5, 1.5, 1.5]
    assert clock.sleeps == [rng.uniform(0.0, c) for c in ceilings]


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    max_backoff_s=st.floats(min_value=1e-3, max_value=1e6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_within_its_ceiling(attempt: int, max_backoff_s: float, seed: int) -> None:
    rpc, _ = make_rpc(VirtualClock(), [], max_backoff_s=max_backoff_s, seed=seed)

    delay = rpc.backoff(attempt)

    ceiling = min(max_backoff_s, BACKOFF_BASE_S * 2.0 ** min(attempt, 30))
    assert 0.0 <= delay <= ceiling


@pytest.mark.parametrize(
    ("code", "in_task", "raised"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, True, AgentError),
        (grpc.StatusCode.UNAUTHENTICATED, False, AgentError),
        (grpc.StatusCode.PERMISSION_DENIED, True, TaskAbandoned),
        (grpc.StatusCode.NOT_FOUND, True, TaskAbandoned),
        (grpc.StatusCode.FAILED_PRECONDITION, False, grpc.aio.AioRpcError),
        (grpc.StatusCode.INVALID_ARGUMENT, False, grpc.aio.AioRpcError),
    ],
)
def test_refusals_are_not_retried_and_are_classified(
    code: grpc.StatusCode, in_task: bool, raised: type[Exception]
) -> None:
    clock = RecordingClock()
    rpc, stub = make_rpc(clock, [code, PACE])

    with pytest.raises(raised) as excinfo:
        get_task(rpc, in_task=in_task)

    assert len(stub.seen) == 1 and clock.sleeps == []
    if raised is grpc.aio.AioRpcError:
        assert excinfo.value.code() is code  # type: ignore[attr-defined]
    elif raised is AgentError:
        assert "not enrolled or revoked: GetTask" in str(excinfo.value)
    else:
        assert f"GetTask refused ({code.name})" in str(excinfo.value)


def test_unsigned_call_sends_no_auth_and_needs_no_identity() -> None:
    def not_enrolled() -> Ed25519PrivateKey:
        raise AgentError("not enrolled")

    clock = RecordingClock()
    answer = edge_pb2.EnrollResponse(device_id="d")
    rpc, stub = make_rpc(clock, [grpc.StatusCode.UNAVAILABLE, answer], identity=not_enrolled)
    request = edge_pb2.EnrollRequest(token="t", device_class="phone")

    response = asyncio.run(
        rpc.call("Enroll", request, response_type=edge_pb2.EnrollResponse, sign=False)
    )

    assert response == answer
    assert [r for r, _ in stub.seen] == [request, request]
    assert len(clock.sleeps) == 1


def test_unsigned_call_refused_unauthenticated_is_not_about_the_device() -> None:
    # Enroll carries no identity: its UNAUTHENTICATED is about the token, and the caller
    # (enrolment) reports the coordinator's reason; "not enrolled or revoked" is wrong.
    rpc, stub = make_rpc(RecordingClock(), [grpc.StatusCode.UNAUTHENTICATED])
    request = edge_pb2.EnrollRequest(token="t", device_class="phone")

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        asyncio.run(
            rpc.call(
                "Enroll", request, response_type=edge_pb2.EnrollResponse, sign=False, in_task=False
            )
        )

    assert excinfo.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert len(stub.seen) == 1


def test_signed_call_of_an_unenrolled_device_sends_nothing() -> None:
    def not_enrolled() -> Ed25519PrivateKey:
        raise AgentError("device not enrolled")

    rpc, stub = make_rpc(RecordingClock(), [PACE], identity=not_enrolled)

    with pytest.raises(AgentError, match="device not enrolled"):
        get_task(rpc)
    assert stub.seen == []


def test_retry_after_stop_raises_instead_of_spinning() -> None:
    clock = RecordingClock()
    rpc, stub = make_rpc(clock, [grpc.StatusCode.UNAVAILABLE] * 3 + [PACE])

    async def scenario() -> None:
        rpc.stop = asyncio.Event()
        rpc.stop.set()
        await rpc.call("GetTask", edge_pb2.GetTaskRequest(), response_type=edge_pb2.GetTaskResponse)

    with pytest.raises(AgentStopping):
        asyncio.run(scenario())
    # One attempt; the wait returned at once without moving the clock.
    assert len(stub.seen) == 1
    assert clock.sleeps == [] and clock.monotonic() == 0.0


def test_stop_event_ends_a_wait_that_would_never_end() -> None:
    rpc, _ = make_rpc(NeverWakingClock(), [])

    async def scenario() -> None:
        rpc.stop = asyncio.Event()
        asyncio.get_running_loop().call_soon(rpc.stop.set)
        await asyncio.wait_for(rpc.sleep(3600.0), timeout=10.0)

    asyncio.run(scenario())


def test_sleep_without_stop_event_waits_on_the_clock() -> None:
    clock = RecordingClock()
    rpc, _ = make_rpc(clock, [])

    asyncio.run(rpc.sleep(42.5))

    assert clock.sleeps == [42.5] and clock.monotonic() == 42.5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": ""}, "target"),
        ({"max_backoff_s": 0.0}, "max_backoff_s"),
        ({"max_backoff_s": float("inf")}, "max_backoff_s"),
        ({"max_backoff_s": float("nan")}, "max_backoff_s"),
    ],
)
def test_constructor_names_the_bad_argument(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "target": "coordinator.test:443",
        "credentials": None,
        "identity": lambda: KEY,
        "clock": VirtualClock(),
        "rng": random.Random(0),
        "max_backoff_s": 1.0,
        "stats": AgentStats(),
        "hooks": AgentHooks(),
    }
    args.update(kwargs)
    target = args.pop("target")

    with pytest.raises(ValueError, match=f"^{field}:"):
        EdgeRpc(target, **args)
