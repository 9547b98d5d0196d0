"""Signed, retried calls from the edge agent to the coordinator's EdgeService.

Every request but Enroll is signed through :func:`estuary.auth.sign_message` with a fresh
nonce and the clock's timestamp on every attempt, because the coordinator refuses a
nonce it has seen. Transport failures (:data:`TRANSIENT_CODES`) are retried with
exponential backoff and full jitter, waited on the injected clock, except TLS mistakes
(an untrusted certificate, plaintext against TLS, a refused client certificate): those
fail the same way on every attempt, so :meth:`EdgeRpc.retry_pause` stops the agent with
:class:`~edge_client.errors.TLSFailure` naming the cause (see :mod:`edge_client.tls`).
Any other status is a refusal: UNAUTHENTICATED of a signed request stops the agent with
:class:`~edge_client.errors.AgentError`, another refusal inside a task abandons the
task, and outside a task the status itself reaches the caller (Enroll, unsigned, gets
its UNAUTHENTICATED that way: a refused token is not a device the coordinator forgot).

Waits (backoff, and the Pace waits of the run loop) end early when the agent's stop
event is set, so a stopping agent never sleeps out a long retry-after.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from edge_client.errors import AgentError, AgentStopping, TaskAbandoned
from edge_client.hooks import AgentHooks, AgentStats
from edge_client.tls import ChannelTLS, diagnose
from estuary.auth import sign_message
from estuary.clock import Clock
from estuary.proto.v1 import edge_pb2_grpc
from estuary.transport import channel_options

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "BACKOFF_BASE_S",
    "RPC_TIMEOUT_S",
    "TRANSIENT_CODES",
    "EdgeRpc",
]

logger = logging.getLogger(__name__)

_Response = TypeVar("_Response", bound=ProtoMessage)

#: First retry delay in seconds; doubles per failed attempt up to ``max_backoff_s``, with
#: full jitter (uniform in [0, delay]) so a fleet that lost the coordinator at the same
#: moment does not come back in lockstep.
BACKOFF_BASE_S = 0.5
#: Deadline of a unary call, seconds: generous for a phone on a slow link, yet short
#: enough that a black-holed request is retried well inside a cohort's deadline.
RPC_TIMEOUT_S = 30.0
#: Attempts after which the backoff ceiling stops doubling: 0.5 s × 2**30 is far beyond
#: any ``max_backoff_s``, and the cap keeps the float finite however long an outage lasts.
_MAX_DOUBLINGS = 30

#: Status codes of a failed transport rather than a refusal: the same request is tried
#: again after a backoff.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class EdgeRpc:
    """The agent's channel to one coordinator: signing, retries and the waits between them.

    Parameters
    ----------
    target
        host:port of the coordinator.
    credentials
        TLS material of the channel; ``None`` connects without TLS (loopback and
        simulation only).
    identity
        Returns the device's identity key (raising
        :class:`~edge_client.errors.AgentError` when the device is not enrolled); called
        for every signature.
    clock
        Source of signing timestamps and of every wait.
    rng
        Draws the backoff jitter.
    max_backoff_s
        Longest wait between retries of a failed call, seconds (> 0).
    stats
        Counters that receive the serialised bytes of every attempt.
    hooks
        Receives a ``retry`` event per retried failure.
    stub
        A ready EdgeService stub (tests); ``None`` opens a channel to ``target`` on first
        use.

    Attributes
    ----------
    stop
        The run loop's stop event while it runs, else ``None``; waits end when it is set.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: ChannelTLS | None,
        identity: Callable[[], Ed25519PrivateKey],
        clock: Clock,
        rng: random.Random,
        max_backoff_s: float,
        stats: AgentStats,
        hooks: AgentHooks,
        stub: Any | None = None,
    ) -> None:
        if not target:
            raise ValueError("target: must be host:port of the coordinator")
        if not (max_backoff_s > 0 and math.isfinite(max_backoff_s)):
            raise ValueError(f"max_backoff_s: must be a positive number, got {max_backoff_s}")
        self.target = target
        self.credentials = credentials
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.stats = stats
        self.hooks = hooks
        self.stop: asyncio.Event | None = None
        self._identity = identity
        self._rng = rng
        self._channel: Any = None
        self._stub: Any = stub

    def stub(self) -> Any:
        """Return the EdgeService stub, opening the channel on first use."""
        if self._stub is None:
            options = channel_options()
            if self.credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self.credentials.credentials(), options=options
                )
            # The generated stub module is untyped; its methods are used as Any.
            self._stub = edge_pb2_grpc.EdgeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def use_credentials(self, credentials: ChannelTLS | None) -> None:
        """Switch to ``credentials`` (a new client certificate): the next call reconnects."""
        await self.close()
        self.credentials = credentials

    async def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        if self._channel is not None:
            await self._channel.close()
            self._stub = None
        self._channel = None

    def now_ms(self) -> int:
        """Return the clock's Unix time in milliseconds (timestamps, task deadlines)."""
        return self.clock.time_ms()

    def sign(self, method: str, request: ProtoMessage) -> None:
        """Set ``request.auth`` to a fresh signature for ``method`` (new nonce, now)."""
        sign_message(
            request, private_key=self._identity(), method=method, timestamp_ms=self.now_ms()
        )

    # ------------------------------------------------------------------ waiting

    def backoff(self, attempt: int) -> float:
        """Return the wait before retry ``attempt`` (0-based): full jitter under the ceiling.

        The ceiling is ``min(max_backoff_s, BACKOFF_BASE_S × 2**attempt)``.
        """
        ceiling = min(self.max_backoff_s, BACKOFF_BASE_S * 2.0 ** min(attempt, _MAX_DOUBLINGS))
        return self._rng.uniform(0.0, ceiling)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the clock, waking early if the stop event is set."""
        stop = self.stop
        if stop is None:
            await self.clock.sleep_async(seconds)
            return
        if stop.is_set():
            return
        sleeper = asyncio.ensure_future(self.clock.sleep_async(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def wait_to_retry(self, seconds: float) -> None:
        """Wait ``seconds`` before a retry; raise :class:`AgentStopping` if told to stop.

        Without the raise a refused connection fails at once and, the stop event being
        set, the wait returns at once: the retry loop would spin without yielding.
        """
        await self.sleep(seconds)
        if self.stop is not None and self.stop.is_set():
            raise AgentStopping

    async def retry_pause(self, method: str, exc: grpc.aio.AioRpcError, attempt: int) -> None:
        """Report the transient failure of ``method`` and wait out its backoff.

        Raises
        ------
        TLSFailure
            If the failure is a TLS mistake rather than an outage: retrying cannot help.
        AgentStopping
            If the stop event is set while waiting.
        """
        failure = await diagnose(exc, target=self.target, tls=self.credentials)
        if failure is not None:
            raise failure from None
        delay = self.backoff(attempt)
        logger.warning(
            "%s failed (%s: %s); retrying in %.2f s (attempt %d)",
            method,
            exc.code().name,
            exc.details(),
            delay,
            attempt + 1,
        )
        self.hooks.emit("retry", method=method, code=exc.code().name, delay_s=delay)
        await self.wait_to_retry(delay)

    # ------------------------------------------------------------------ classifying

    @staticmethod
    def is_transient(exc: grpc.aio.AioRpcError) -> bool:
        """Return whether ``exc`` is a transport failure worth retrying."""
        return exc.code() in TRANSIENT_CODES

    @staticmethod
    def refused(
        method: str, exc: grpc.aio.AioRpcError, *, in_task: bool, signed: bool = True
    ) -> Exception:
        """Return the exception for a non-transient refusal of ``method``.

        UNAUTHENTICATED of a ``signed`` request gives :class:`AgentError` (not enrolled,
        or revoked); another code, or an unsigned request (Enroll: its refusal is about
        the token, which the caller reports), gives :class:`TaskAbandoned` inside a task
        and ``exc`` itself outside one.
        """
        code = exc.code()
        if code is grpc.StatusCode.UNAUTHENTICATED and signed:
            return AgentError(f"device not enrolled or revoked: {method}: {exc.details()}")
        if in_task:
            return TaskAbandoned(f"{method} refused ({code.name}): {exc.details()}")
        error: Exception = exc
        return error

    # ------------------------------------------------------------------ calling

    async def call(
        self,
        method: str,
        request: ProtoMessage,
        *,
        response_type: type[_Response],
        timeout: float = RPC_TIMEOUT_S,
        sign: bool = True,
        in_task: bool = True,
    ) -> _Response:
        """Call unary ``method``, retrying transient failures with a fresh signature.

        Parameters
        ----------
        method
            EdgeService method name; also the name the signature is bound to.
        request
            The request message; its ``auth`` is (re)set per attempt when ``sign``.
        response_type
            The expected response message type.
        timeout
            Deadline of one attempt, seconds.
        sign
            False only for Enroll, the one unsigned request.
        in_task
            Whether a refusal abandons a task (see :meth:`refused`).

        Raises
        ------
        TLSFailure
            On a TLS mistake (see :meth:`retry_pause`).
        AgentError
            On UNAUTHENTICATED, or if the device is not enrolled, when ``sign`` is set.
        TaskAbandoned
            On another refusal when ``in_task``.
        grpc.aio.AioRpcError
            On another refusal when not ``in_task``.
        AgentStopping
            If the stop event is set while waiting to retry.
        """
        rpc = getattr(self.stub(), method)
        attempt = 0
        while True:
            if sign:
                self.sign(method, request)
            self.stats.bytes_up += request.ByteSize()
            try:
                response = await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if self.is_transient(exc):
                    await self.retry_pause(method, exc, attempt)
                    attempt += 1
                    continue
                raise self.refused(method, exc, in_task=in_task, signed=sign) from None
            if not isinstance(response, response_type):  # pragma: no cover - stub contract
                raise AgentError(f"{method}: unexpected response {type(response).__name__}")
            self.stats.bytes_down += response.ByteSize()
            return response
