"""Test helpers: a coordinator in a background event loop, and a signing device client.

The coordinator runs on its own ``grpc.aio`` event loop in a thread, so tests use plain
synchronous gRPC stubs and need no asyncio plugin.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.server import CoordinatorServer
from estuary.auth import raw_public_key, sign_message
from estuary.clock import SYSTEM_CLOCK
from estuary.proto.v1 import edge_pb2, edge_pb2_grpc
from estuary.transport import channel_options


class ServerThread:
    """Run a :class:`CoordinatorServer` on an event loop in a daemon thread."""

    def __init__(self, server: CoordinatorServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def sign(key: Ed25519PrivateKey, method: str, message: Any) -> Any:
    """Set ``message.auth`` to a fresh signature for ``method``, now; return ``message``."""
    return sign_message(
        message, private_key=key, method=method, timestamp_ms=SYSTEM_CLOCK.time_ms()
    )


class Device:
    """One device: an identity key and a stub; every call is signed."""

    def __init__(self, stub: edge_pb2_grpc.EdgeServiceStub, key: Ed25519PrivateKey | None = None):
        self.stub = stub
        self.key = key or Ed25519PrivateKey.generate()
        self.device_id = ""

    def enroll(self, token: str, device_class: str) -> edge_pb2.EnrollResponse:
        response = self.stub.Enroll(
            edge_pb2.EnrollRequest(
                token=token,
                identity_public_key=raw_public_key(self.key),
                device_class=device_class,
            ),
            timeout=10,
        )
        self.device_id = response.device_id
        return response

    def signed(self, method: str, message: Any) -> Any:
        return sign(self.key, method, message)

    def get_task(self, trained_task_id: str = "") -> edge_pb2.GetTaskResponse:
        """GetTask; ``trained_task_id``: the training task this device reports finished."""
        request = edge_pb2.GetTaskRequest(trained_task_id=trained_task_id)
        return self.stub.GetTask(self.signed("GetTask", request), timeout=10)

    def wait_for_task(self, timeout_s: float = 45.0, trained_task_id: str = "") -> edge_pb2.Task:
        """Ask until a task comes: a training task, or with ``trained_task_id`` its cohort task."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = self.get_task(trained_task_id)
            if response.WhichOneof("outcome") == "task":
                return response.task
            time.sleep(0.1)
        raise AssertionError(f"no task within {timeout_s}s: last {response}")

    def fetch(self, sha256: str, *, offset: int = 0, chunk_bytes: int = 0) -> list[Any]:
        request = self.signed(
            "FetchArtifact",
            edge_pb2.FetchArtifactRequest(sha256=sha256, offset=offset, chunk_bytes=chunk_bytes),
        )
        return list(self.stub.FetchArtifact(request, timeout=10))

    def send(self, cohort_id: str, stage: int, payload: bytes) -> edge_pb2.SecAggAck:
        request = edge_pb2.SecAggClientMessage(cohort_id=cohort_id, stage=stage, payload=payload)
        return self.stub.SendSecAgg(self.signed("SendSecAgg", request), timeout=10)

    def await_secagg(
        self, cohort_id: str, after: int, wait_ms: int = 200
    ) -> edge_pb2.SecAggServerMessage:
        request = edge_pb2.AwaitSecAggRequest(
            cohort_id=cohort_id, after_stage=after, wait_ms=wait_ms
        )
        return self.stub.AwaitSecAgg(self.signed("AwaitSecAgg", request), timeout=30)

    def heartbeat(self, task_id: str = "t") -> edge_pb2.HeartbeatResponse:
        request = edge_pb2.HeartbeatRequest(task_id=task_id)
        return self.stub.Heartbeat(self.signed("Heartbeat", request), timeout=10)

    def upload(
        self,
        *,
        task_id: str,
        cohort_id: str,
        total_bytes: int,
        sha256: str,
        chunks: list[bytes],
        header_first: bool = True,
    ) -> edge_pb2.UploadAck:
        header = self.signed(
            "UploadMasked",
            edge_pb2.UploadHeader(
                task_id=task_id, cohort_id=cohort_id, total_bytes=total_bytes, sha256=sha256
            ),
        )
        messages = [edge_pb2.UploadChunk(data=c) for c in chunks]
        if header_first:
            messages.insert(0, edge_pb2.UploadChunk(header=header))
        return self.stub.UploadMasked(iter(messages), timeout=10)


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=channel_options())
    return grpc.secure_channel(address, credentials, options=channel_options())


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
