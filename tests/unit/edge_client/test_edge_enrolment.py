"""What a device is told when its enrolment is refused, over real gRPC on loopback.

The in-test EdgeService answers Enroll with the coordinator's own
:class:`~coordinator.enrolment.DeviceRegistry` and status mapping, so the refusal text
the agent shows is the one a real coordinator sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.enrolment import DeviceRegistry, EnrolmentError
from coordinator.grpc_service import status_of
from edge_client.agent import AgentError, EdgeAgent
from edge_client.state import EdgeState
from estuary.clock import VirtualClock
from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from estuary.state.memory import MemoryStore


class RegistryEnroll(edge_pb2_grpc.EdgeServiceServicer):  # type: ignore[misc]
    """Enroll only, answered by a real DeviceRegistry."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    async def Enroll(self, request: Any, context: Any) -> Any:
        try:
            device = self.registry.enroll(
                request.token,
                public_key=request.identity_public_key,
                device_class=request.device_class,
            )
        except EnrolmentError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        return edge_pb2.EnrollResponse(
            device_id=device.device_id,
            device_class=common_pb2.DeviceClass(name=device.device_class, rank=4),
            r_max=16,
        )


@contextlib.asynccontextmanager
async def serving(registry: DeviceRegistry) -> AsyncIterator[str]:
    server = grpc.aio.server()
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(RegistryEnroll(registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def test_a_reused_token_says_token_already_used(tmp_path: Path) -> None:
    # Prepare: one token; the first device enrols with it.
    clock = VirtualClock()
    registry = DeviceRegistry(MemoryStore(clock=clock.time), device_classes=["phone"], clock=clock)
    token = registry.issue_token()

    async def scenario() -> tuple[str, str]:
        async with serving(registry) as target:
            first = EdgeAgent(EdgeState(tmp_path / "a"), target, credentials=None, data=None)
            second = EdgeAgent(EdgeState(tmp_path / "b"), target, credentials=None, data=None)
            try:
                record = await first.enroll(token, "phone")
                # Execute: a second device uses the same token.
                with pytest.raises(AgentError) as info:
                    await second.enroll(token, "phone")
            finally:
                await first.close()
                await second.close()
        return str(record["device_id"]), str(info.value)

    device_id, message = asyncio.run(scenario())

    # Assert: the coordinator's reason, not a claim that the device is unknown.
    assert "token already used" in message
    assert device_id in message
    assert "not enrolled or revoked" not in message
    assert message.startswith("enrolment refused (UNAUTHENTICATED): enrolment token already used")
    assert not (tmp_path / "b" / "enrolment.json").exists()
