"""The edge-facing gRPC servicer: protobuf in, :class:`FederationService` calls, protobuf out.

Thin by design. Each RPC authenticates its request (every call but Enroll), calls the
service in a worker thread (the service does blocking store I/O, and grpc.aio runs every
handler on one event loop), maps the result to protobuf and the service's exceptions
(:mod:`coordinator.errors`) to status codes through :data:`STATUS_OF`. Unexpected
exceptions become INTERNAL with a generic message; their traceback is logged, never sent.

Blocking calls run in the replica's :class:`~coordinator.handler_pool.HandlerPool`, which
refuses them (UNAVAILABLE) while the store is known silent or the pool is saturated, so a
hung store makes requests fail fast instead of piling up. Requests are decoded leniently
(:func:`add_edge_service`): bytes that are no valid message are refused INVALID_ARGUMENT,
logged in one line and counted like any other refusal, instead of surfacing as gRPC's
UNKNOWN or INTERNAL with a traceback. Upload streams are read under
:class:`~coordinator.stream_limits.StreamLimits`.

Stage numbers differ on the wire: ``SecAggStage`` reserves 0 for "unspecified", so a
:class:`secure_agg.Stage` ``s`` in ADVERTISE_KEYS..UNMASKING travels as ``s + 1``;
COMPLETED travels as DONE and ABORTED as ABORTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message

from coordinator import peer_identity
from coordinator.enrolment import Device, EnrolmentError, Unauthenticated
from coordinator.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MalformedRequest,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from coordinator.handler_pool import HandlerPool
from coordinator.outcomes import HeartbeatReply
from coordinator.service import FederationService, PaceOffer, SecAggReply, TaskOffer
from coordinator.stream_limits import LimitedStream, StreamLimits
from estuary.auth import AuthError, SignedAuth, request_body_sha256, signed_auth_from
from estuary.proto import stages
from estuary.proto.session import session_to_proto
from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from estuary.state.blobs import BlobCorrupt, BlobNotFound
from estuary.state.errors import StoreError, VersionConflict
from estuary.transport import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_LONG_POLL_MS,
    MAX_MESSAGE_BYTES,
)
from secure_agg import Stage

__all__ = [
    "AWAIT_POLL_INTERVAL_S",
    "DEFAULT_LONG_POLL_MS",
    "MAX_UPLOAD_BYTES",
    "STATUS_OF",
    "EdgeServicer",
    "Malformed",
    "RpcRecorder",
    "add_edge_service",
    "stage_from_proto",
    "stage_to_proto",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Long-poll bound when a client sends ``wait_ms`` 0: 10 s, half of MAX_LONG_POLL_MS, so a
#: client that forgot to choose still returns well before middleboxes drop idle streams.
DEFAULT_LONG_POLL_MS = 10_000

#: How often a long poll re-reads the cohort: 75 ms. Secure-aggregation messages arrive
#: at human/network time scales (seconds), so this adds negligible latency while keeping
#: a waiting device to ~13 store reads a second.
AWAIT_POLL_INTERVAL_S = 0.075

#: Largest masked upload announced in a header: 64 × the message limit = 256 MiB. An
#: adapter's ΔB at rank 256 in 32-bit fixed point for a 7B model is about 100 MiB; any
#: header above this is refused before a byte is buffered, so a peer cannot make the
#: server hold an arbitrary amount of memory. (The exact expected size is checked too.)
MAX_UPLOAD_BYTES = 64 * MAX_MESSAGE_BYTES

#: Status code of each refusal; looked up along the exception's MRO, most specific first.
STATUS_OF: dict[type[BaseException], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    EnrolmentError: grpc.StatusCode.UNAUTHENTICATED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    BlobNotFound: grpc.StatusCode.NOT_FOUND,
    BlobCorrupt: grpc.StatusCode.DATA_LOSS,
    VersionConflict: grpc.StatusCode.ABORTED,
    StoreError: grpc.StatusCode.UNAVAILABLE,
}

#: What the client is told for store trouble: the details stay in the server's log.
_STORE_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "state store unavailable, retry",
    grpc.StatusCode.ABORTED: "concurrent update of the same record, retry",
    grpc.StatusCode.DATA_LOSS: "stored blob is corrupt; the operator has been told",
}


def stage_from_proto(value: int, *, field: str = "stage") -> Stage:
    """Return the secure_agg stage of a wire ``SecAggStage``; InvalidArgument if none."""
    try:
        return stages.stage_from_proto(value)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


stage_to_proto = stages.stage_to_proto


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Return the status code and client-facing message for a refused request."""
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)
        if code is None:
            continue
        if isinstance(exc, StoreError) and code in _STORE_MESSAGES:
            return code, _STORE_MESSAGES[code]
        return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


class Malformed:
    """A request whose bytes are no valid encoding of its message (see :func:`add_edge_service`).

    Attributes
    ----------
    type_name
        Full name of the message type expected, e.g. ``estuary.v1.GetTaskRequest``.
    size
        Length of the bytes received.
    """

    __slots__ = ("size", "type_name")

    def __init__(self, type_name: str, size: int) -> None:
        self.type_name = type_name
        self.size = size

    def refusal(self, where: str = "request") -> MalformedRequest:
        """Return the error refusing it: it names the type, never an exception class."""
        return MalformedRequest(
            f"malformed {where}: not a valid {self.type_name} message ({self.size} bytes)"
        )


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """Return a request deserializer that gives :class:`Malformed` instead of raising."""
    type_name = cls.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except Exception:  # DecodeError, or anything else the parser raises
            return Malformed(type_name, len(data))

    return decode


class RpcRecorder(Protocol):
    """Told about every finished RPC (the metrics implement it)."""

    def rpc(self, method: str, code: str, *, bytes_in: int, bytes_out: int) -> None:
        """Record one RPC: its method, final status code name and serialised sizes."""


class _NoRecorder:
    def rpc(self, method: str, code: str, *, bytes_in: int, bytes_out: int) -> None:
        pass


class _Call:
    """Byte counts of one RPC in progress."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.bytes_in = 0
        self.bytes_out = 0


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    """``estuary.v1.EdgeService`` for ``grpc.aio`` over a :class:`FederationService`.

    Parameters
    ----------
    service
        The federation logic.
    recorder
        Told about every finished RPC (method, status code, bytes in and out).
    poll_interval_s
        Seconds between cohort reads of a long poll (AwaitSecAgg).
    pool
        Runs the service's blocking calls; ``None``: a pool of ``server.handler_threads``
        threads and ``server.handler_queue`` waiting calls (the server passes its own, which
        its store watcher shuts while the store is silent).
    upload_limits
        Limits of an UploadMasked stream; ``None``: the ``server.upload_*`` settings.

    A long poll's wait and the upload limits are measured and slept on the service's
    clock (:attr:`FederationService.clock`), the one clock of the replica.
    """

    def __init__(
        self,
        service: FederationService,
        *,
        recorder: RpcRecorder | None = None,
        poll_interval_s: float = AWAIT_POLL_INTERVAL_S,
        pool: HandlerPool | None = None,
        upload_limits: StreamLimits | None = None,
    ) -> None:
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s: must be > 0, got {poll_interval_s}")
        server = service.settings.server
        self.service = service
        self.recorder: RpcRecorder = recorder or _NoRecorder()
        self.poll_interval_s = poll_interval_s
        self.clock = service.clock
        self.pool = pool or HandlerPool(threads=server.handler_threads, queue=server.handler_queue)
        self.upload_limits = upload_limits or StreamLimits.from_settings(server)

    # ------------------------------------------------------------------ plumbing

    def _signed(self, request: Message) -> tuple[SignedAuth, bytes]:
        """Check what needs no store: the signature fields and the peer certificate.

        Runs on the event loop (the peer identity is a context variable of this call).
        The signing rule (what is signed, which fields must be present) is estuary.auth's,
        the same code the edge agent signs with.
        """
        try:
            auth = signed_auth_from(request)
        except AuthError as exc:
            raise Unauthenticated(str(exc)) from None
        peer_identity.check(auth.device_id, required=self.service.requires_device_certificates)
        return auth, request_body_sha256(request)

    async def _authenticate(self, request: Message, method: str) -> Device:
        auth, body = self._signed(request)
        return await self._thread(self.service.authenticate, auth, method=method, body_sha256=body)

    def _finish(self, call: _Call, code: grpc.StatusCode) -> None:
        try:
            self.recorder.rpc(
                call.method, code.name, bytes_in=call.bytes_in, bytes_out=call.bytes_out
            )
        except Exception:  # metrics must never fail a request
            log.exception("recording RPC %s failed", call.method)

    async def _refuse(self, call: _Call, exc: Exception, context: Any) -> None:
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s: unexpected error", call.method, exc_info=exc)
        elif isinstance(exc, MalformedRequest):
            # One line per request: its sender may be unauthenticated and hostile.
            log.info("%s refused from %s: %s", call.method, _peer(context), message)
        elif isinstance(exc, StoreError) and code is not grpc.StatusCode.NOT_FOUND:
            log.warning("%s: store error: %s", call.method, exc)
        else:
            log.debug("%s refused (%s): %s", call.method, code.name, message)
        self._finish(call, code)
        await context.abort(code, message)

    async def _unary(
        self,
        method: str,
        request: Message,
        context: Any,
        handler: Callable[[Any, _Call], Awaitable[Message]],
    ) -> Message:
        call = _Call(method)
        call.bytes_in = request.ByteSize()
        return await self._answer(call, handler(request, call), context)

    async def _answer(self, call: _Call, work: Awaitable[Message], context: Any) -> Message:
        """Await ``work``; record the RPC and map a refusal to its status code."""
        try:
            response = await work
        except asyncio.CancelledError:
            self._finish(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            await self._refuse(call, exc, context)
            raise AssertionError("context.abort returned") from exc  # pragma: no cover
        call.bytes_out = response.ByteSize()
        self._finish(call, grpc.StatusCode.OK)
        return response

    async def _thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.pool.run(fn, *args, **kwargs)

    async def refuse_malformed(self, method: str, request: Malformed, context: Any) -> None:
        """Refuse a request that did not decode: INVALID_ARGUMENT, logged and counted."""
        call = _Call(method)
        call.bytes_in = request.size
        await self._refuse(call, request.refusal(), context)

    # ------------------------------------------------------------------ Enroll

    async def Enroll(self, request: edge_pb2.EnrollRequest, context: Any) -> Message:
        """Register a device with a one-time token."""
        return await self._unary("Enroll", request, context, self._enroll)

    async def _enroll(self, request: edge_pb2.EnrollRequest, call: _Call) -> Message:
        device, certificate = await self._thread(
            self.service.enroll_with_csr,
            request.token,
            public_key=bytes(request.identity_public_key),
            device_class=request.device_class,
            csr=bytes(request.tls_csr),
            csr_proof=bytes(request.tls_csr_proof),
        )
        name, rank = self.service.device_class(device)
        return edge_pb2.EnrollResponse(
            device_id=device.device_id,
            device_class=common_pb2.DeviceClass(name=name, rank=rank),
            r_max=self.service.settings.model.r_max,
            client_certificate_pem=certificate,
        )

    # ------------------------------------------------------------------ RenewCertificate

    async def RenewCertificate(
        self, request: edge_pb2.RenewCertificateRequest, context: Any
    ) -> Message:
        """Issue a new client certificate for a device-generated key (mutual TLS only)."""
        return await self._unary("RenewCertificate", request, context, self._renew)

    async def _renew(self, request: edge_pb2.RenewCertificateRequest, call: _Call) -> Message:
        device = await self._authenticate(request, "RenewCertificate")
        certificate = await self._thread(
            self.service.renew_certificate, device, bytes(request.tls_csr)
        )
        return edge_pb2.RenewCertificateResponse(client_certificate_pem=certificate)

    # ------------------------------------------------------------------ GetTask

    async def GetTask(self, request: edge_pb2.GetTaskRequest, context: Any) -> Message:
        """Return a task, or when to come back."""
        return await self._unary("GetTask", request, context, self._get_task)

    async def _get_task(self, request: edge_pb2.GetTaskRequest, call: _Call) -> Message:
        # Authentication and the task in one trip to the handler pool and one to the
        # store: the two hot requests (GetTask, Heartbeat) pay one thread hop, not two.
        auth, body = self._signed(request)
        service = self.service

        device, offer = await self._thread(
            service.get_task_signed,
            auth,
            body_sha256=body,
            trained_task_id=request.trained_task_id,
        )
        if isinstance(offer, PaceOffer) and offer.forming_cohort_id and request.wait_ms:
            offer = await self._until_sealed(device, request, offer)
        if isinstance(offer, PaceOffer):
            return edge_pb2.GetTaskResponse(
                pace=edge_pb2.Pace(
                    retry_after_ms=max(0, round(offer.retry_after_s * 1000)), reason=offer.reason
                )
            )
        return edge_pb2.GetTaskResponse(task=_task(offer))

    async def _until_sealed(
        self, device: Device, request: edge_pb2.GetTaskRequest, offer: PaceOffer
    ) -> TaskOffer | PaceOffer:
        """Hold the GetTask of a forming cohort's member until the cohort is sealed.

        At most ``request.wait_ms`` (capped at MAX_LONG_POLL_MS); every ``poll_interval_s``
        one store read asks whether the device has been assigned its cohort task (a tick,
        or another member's report, seals the cohort). Sealed: its cohort task. The wait
        over: Pace with no retry-after, since the device has waited already.
        """
        wait_s = min(request.wait_ms, MAX_LONG_POLL_MS) / 1000
        deadline = self.clock.monotonic() + wait_s
        while True:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return PaceOffer(0.0, offer.reason, offer.mechanism)
            await self.clock.sleep_async(min(self.poll_interval_s, remaining))
            if await self._thread(self.service.sealed_for, device, request.trained_task_id):
                found = await self._thread(
                    self.service.get_task, device, trained_task_id=request.trained_task_id
                )
                if not (isinstance(found, PaceOffer) and found.forming_cohort_id):
                    return found
                offer = found

    # ------------------------------------------------------------------ FetchArtifact

    async def FetchArtifact(
        self, request: edge_pb2.FetchArtifactRequest, context: Any
    ) -> AsyncIterator[edge_pb2.ArtifactChunk]:
        """Stream a blob from ``offset`` in chunks; every refusal comes before any chunk."""
        call = _Call("FetchArtifact")
        call.bytes_in = request.ByteSize()
        try:
            await self._authenticate(request, "FetchArtifact")
            chunk_bytes = min(request.chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
            total = await self._thread(self.service.blob_size, request.sha256)
            chunks = self.service.read_blob(
                request.sha256, offset=request.offset, chunk_bytes=chunk_bytes
            )
            offset = request.offset
            while True:
                data = await self._thread(_next_or_none, chunks)
                if data is None:
                    break
                chunk = edge_pb2.ArtifactChunk(offset=offset, data=data, total_bytes=total)
                call.bytes_out += chunk.ByteSize()
                offset += len(data)
                yield chunk
        except asyncio.CancelledError:
            self._finish(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            await self._refuse(call, exc, context)
            return
        self._finish(call, grpc.StatusCode.OK)

    # ------------------------------------------------------------------ SendSecAgg

    async def SendSecAgg(self, request: edge_pb2.SecAggClientMessage, context: Any) -> Message:
        """Take a member's message for the cohort's current stage."""
        return await self._unary("SendSecAgg", request, context, self._send_secagg)

    async def _send_secagg(self, request: edge_pb2.SecAggClientMessage, call: _Call) -> Message:
        device = await self._authenticate(request, "SendSecAgg")
        stage = stage_from_proto(request.stage)
        after = await self._thread(
            self.service.send_secagg, device, request.cohort_id, stage, bytes(request.payload)
        )
        return edge_pb2.SecAggAck(stage=stage_to_proto(after))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ AwaitSecAgg

    async def AwaitSecAgg(self, request: edge_pb2.AwaitSecAggRequest, context: Any) -> Message:
        """Long poll for the member's next secure-aggregation message."""
        return await self._unary("AwaitSecAgg", request, context, self._await_secagg)

    async def _await_secagg(self, request: edge_pb2.AwaitSecAggRequest, call: _Call) -> Message:
        device = await self._authenticate(request, "AwaitSecAgg")
        after = stage_from_proto(request.after_stage, field="after_stage")
        wait_s = min(request.wait_ms or DEFAULT_LONG_POLL_MS, MAX_LONG_POLL_MS) / 1000
        deadline = self.clock.monotonic() + wait_s
        while True:
            reply = await self._thread(self.service.poll_secagg, device, request.cohort_id, after)
            if reply is not None:
                return _server_message(request.cohort_id, reply)
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return edge_pb2.SecAggServerMessage(cohort_id=request.cohort_id, pending=True)
            await self.clock.sleep_async(min(self.poll_interval_s, remaining))

    # ------------------------------------------------------------------ UploadMasked

    async def UploadMasked(
        self, request_iterator: AsyncIterator[edge_pb2.UploadChunk | Malformed], context: Any
    ) -> Message:
        """Receive a header and the masked input; store it durably, then acknowledge."""
        call = _Call("UploadMasked")
        return await self._answer(call, self._upload(request_iterator, call), context)

    async def _upload(
        self, request_iterator: AsyncIterator[edge_pb2.UploadChunk | Malformed], call: _Call
    ) -> Message:
        stream = LimitedStream(request_iterator, limits=self.upload_limits, clock=self.clock)
        first = _decoded(await stream.next(), call, "message 1 of the upload")
        if first is None:
            raise InvalidArgument("empty upload: the first message must be the UploadHeader")
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of an upload must be the UploadHeader")
        header = first.header
        device = await self._authenticate(header, "UploadMasked")
        total = header.total_bytes
        if total > MAX_UPLOAD_BYTES:
            raise ResourceExhausted(
                f"total_bytes: {total} exceeds the upload limit of {MAX_UPLOAD_BYTES} bytes"
            )
        expected = await self._thread(self.service.expected_upload_bytes, device, header.cohort_id)
        if total != expected:
            raise InvalidArgument(
                f"total_bytes: header announces {total} bytes, but this member's masked "
                f"input is exactly {expected} bytes"
            )
        payload = bytearray()
        while True:
            message = await stream.next()
            chunk = _decoded(message, call, f"message {stream.data_chunks + 1} of the upload")
            if chunk is None:
                break
            if chunk.WhichOneof("part") != "data":
                raise InvalidArgument("only the first message of an upload may be a header")
            if not chunk.data:
                raise InvalidArgument(
                    f"upload: chunk {stream.data_chunks} is empty; every data chunk must "
                    "carry bytes"
                )
            if len(payload) + len(chunk.data) > total:
                raise ResourceExhausted(f"upload exceeds the {total} bytes announced in its header")
            payload += chunk.data
        if len(payload) < total:
            raise InvalidArgument(
                f"upload ended after {len(payload)} of the {total} bytes announced"
            )
        result = await self._thread(
            self.service.upload_masked,
            device,
            task_id=header.task_id,
            cohort_id=header.cohort_id,
            payload=bytes(payload),
            sha256=header.sha256,
        )
        return edge_pb2.UploadAck(
            accepted=result.accepted,
            duplicate=result.duplicate,
            durable_bytes=result.durable_bytes,
        )

    # ------------------------------------------------------------------ Heartbeat

    async def Heartbeat(self, request: edge_pb2.HeartbeatRequest, context: Any) -> Message:
        """Tell a training member whether to go on."""
        return await self._unary("Heartbeat", request, context, self._heartbeat)

    async def _heartbeat(self, request: edge_pb2.HeartbeatRequest, call: _Call) -> Message:
        auth, body = self._signed(request)
        reply: HeartbeatReply = await self._thread(
            self.service.heartbeat_signed, auth, task_id=request.task_id, body_sha256=body
        )
        action = (
            edge_pb2.HeartbeatResponse.ACTION_ABANDON
            if reply.abandon
            else edge_pb2.HeartbeatResponse.ACTION_CONTINUE
        )
        return edge_pb2.HeartbeatResponse(action=action, current_version=reply.current_version)


# --------------------------------------------------------------------------- mapping


def _decoded(
    message: edge_pb2.UploadChunk | Malformed | None, call: _Call, where: str
) -> edge_pb2.UploadChunk | None:
    """Count a streamed message's bytes; refuse it if it did not decode."""
    if isinstance(message, Malformed):
        call.bytes_in += message.size
        raise message.refusal(where)
    if message is not None:
        call.bytes_in += message.ByteSize()
    return message


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # a test double, or a call already torn down
        return "unknown peer"


def add_edge_service(servicer: EdgeServicer, server: Any) -> None:
    """Register ``servicer`` on a ``grpc.aio`` server with lenient request decoding.

    Replaces the generated ``add_EdgeServiceServicer_to_server``: each method of
    ``estuary.v1.EdgeService`` (read from the proto descriptor, so none is missed) gets a
    deserializer that returns :class:`Malformed` instead of raising, and a handler that
    refuses a Malformed request through the servicer (INVALID_ARGUMENT, one log line,
    counted in the RPC metrics). UploadMasked, a client stream, checks every message.
    """
    service = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        decode = _lenient(message_factory.GetMessageClass(method.input_type))
        encode = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                behaviour, request_deserializer=decode, response_serializer=encode
            )
        elif method.server_streaming and not method.client_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(servicer, method.name, behaviour),
                request_deserializer=decode,
                response_serializer=encode,
            )
        elif not method.client_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(servicer, method.name, behaviour),
                request_deserializer=decode,
                response_serializer=encode,
            )
        else:  # pragma: no cover - the proto has no bidirectional method
            raise NotImplementedError(f"{method.name}: bidirectional streams are not served")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _guard_unary(
    servicer: EdgeServicer, name: str, behaviour: Callable[[Any, Any], Awaitable[Message]]
) -> Callable[[Any, Any], Awaitable[Message]]:
    async def guarded(request: Message | Malformed, context: Any) -> Message:
        if isinstance(request, Malformed):
            await servicer.refuse_malformed(name, request, context)
        return await behaviour(request, context)

    return guarded


def _guard_stream(
    servicer: EdgeServicer, name: str, behaviour: Callable[[Any, Any], AsyncIterator[Message]]
) -> Callable[[Any, Any], AsyncIterator[Message]]:
    async def guarded(request: Message | Malformed, context: Any) -> AsyncIterator[Message]:
        if isinstance(request, Malformed):
            await servicer.refuse_malformed(name, request, context)
            return
        async for response in behaviour(request, context):
            yield response

    return guarded


def _next_or_none(chunks: Iterator[bytes]) -> bytes | None:
    # StopIteration cannot cross asyncio.to_thread's future: turn it into None.
    return next(chunks, None)


def _task(offer: TaskOffer) -> edge_pb2.Task:
    return edge_pb2.Task(
        task_id=offer.task_id,
        cohort_id=offer.cohort_id,
        version=offer.version,
        artifact=common_pb2.BlobRef(sha256=offer.artifact_sha256, size_bytes=offer.artifact_size),
        rank=offer.rank,
        local_steps=offer.local_steps,
        learning_rate=offer.learning_rate,
        grad_clip_norm=offer.grad_clip_norm,
        batch_size=offer.batch_size,
        seq_len=offer.seq_len,
        deadline_ms=offer.deadline_ms,
        member_index=offer.member_index,
        secagg=(
            None
            if offer.session is None
            else session_to_proto(offer.session, identity_keys=offer.identity_keys)
        ),
        columns=offer.columns,
        warmup_steps=offer.warmup_steps,
        trained_task_id=offer.trained_task_id,
    )


def _server_message(cohort_id: str, reply: SecAggReply) -> edge_pb2.SecAggServerMessage:
    return edge_pb2.SecAggServerMessage(
        cohort_id=cohort_id,
        stage=stage_to_proto(reply.stage),  # type: ignore[arg-type]
        payload=reply.payload,
        weight=reply.weight,
        abort_reason=reply.abort_reason,
    )
