"""Mutual TLS: which device the peer's certificate names, and that it signed the request.

The TLS handshake proves that the peer holds the key of a certificate issued by the CA in
``tls.client_ca_file`` and valid now. It does not say that the device that *signs* a
request (:mod:`estuary.auth`, checked by :class:`~coordinator.enrolment.DeviceRegistry`)
is the device whose certificate the connection was made with; without that check a
device could open a connection with its own certificate and send requests signed by a
stolen identity key of another. :func:`check` closes that gap: when device certificates
are in force (``tls.device_ca_cert_file`` set), the peer certificate must name exactly
the device id of the request's ``auth`` (:func:`estuary.pki.device_id_of`), on every
request.

gRPC hands the peer certificate only to the handler (``context.auth_context()``), while
authentication happens deeper, in code that sees the request but not the context.
:class:`PeerInterceptor` reads the certificate when a call starts and keeps it in a
context variable for the duration of that call's task; every gRPC call runs in its own
asyncio task, so one call never sees another's peer. A call that did not pass through
the interceptor has no recorded peer, which :func:`check` treats as "no certificate":
the rule fails closed.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from coordinator.enrolment import Unauthenticated
from estuary.pki import PKIError, device_id_of

__all__ = ["EDGE_SERVICE_PREFIX", "Peer", "PeerInterceptor", "check", "current", "peer_of"]

#: Method prefix of the calls whose peer is recorded (the health service needs none).
EDGE_SERVICE_PREFIX = "/estuary.v1.EdgeService/"


@dataclass(frozen=True)
class Peer:
    """What the TLS layer says about a call's peer.

    Attributes
    ----------
    device_id
        The device its client certificate names; ``None`` without a usable certificate.
    problem
        Why there is no device id (no certificate; one that names no device).
    """

    device_id: str | None
    problem: str = ""


_NO_PEER = Peer(None, "no client certificate (connect with the certificate issued at enrolment)")
_PEER: contextvars.ContextVar[Peer] = contextvars.ContextVar("estuary_peer", default=_NO_PEER)


def peer_of(auth_context: dict[str, list[bytes]]) -> Peer:
    """Return the :class:`Peer` described by a gRPC ``auth_context()``."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return _NO_PEER
    return _peer_of_pem(bytes(pems[0]))


#: Peer certificates parsed, remembered by their PEM bytes: a device's every request
#: comes with the same certificate, and parsing one costs more than the rest of a
#: paced request. 4096 is more connections than one replica keeps open per second.
@functools.lru_cache(maxsize=4096)
def _peer_of_pem(pem: bytes) -> Peer:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return Peer(device_id_of(cert))
    except (ValueError, PKIError) as exc:
        return Peer(None, f"client certificate names no device: {exc}")


def current() -> Peer:
    """Return the peer of the call running in this task (see :class:`PeerInterceptor`)."""
    return _PEER.get()


def check(device_id: str, *, required: bool) -> None:
    """Refuse a request signed by ``device_id`` unless the peer certificate names it.

    Parameters
    ----------
    device_id
        The device id the request's ``auth`` claims (its signature is verified
        separately, against that device's enrolled key).
    required
        Whether device certificates are in force; ``False`` accepts any peer.

    Raises
    ------
    Unauthenticated
        No certificate, one naming no device, or one naming another device.
    """
    if not required:
        return
    peer = current()
    if peer.device_id is None:
        raise Unauthenticated(peer.problem)
    if peer.device_id != device_id:
        raise Unauthenticated(
            f"client certificate is device {peer.device_id}'s, but the request is signed "
            f"by device {device_id}"
        )


def _record(context: Any) -> None:
    try:
        peer = peer_of(context.auth_context())
    except Exception:  # a call torn down, or a context without TLS data
        peer = _NO_PEER
    _PEER.set(peer)


def _wrap_unary(inner: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
    async def wrapped(request: Any, context: Any) -> Any:
        _record(context)
        return await inner(request, context)

    return wrapped


def _wrap_stream_out(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            _record(context)
            async for item in inner(request, context):
                yield item

        return generator
    return _wrap_unary(inner)


class PeerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Records each EdgeService call's peer certificate for :func:`check`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Return the call's handler, wrapped to record its peer for EdgeService calls."""
        handler = await continuation(handler_call_details)
        method = str(getattr(handler_call_details, "method", ""))
        if handler is None or not method.startswith(EDGE_SERVICE_PREFIX):
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_out(handler.unary_stream), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary), **kwargs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream_out(handler.stream_stream), **kwargs
            )
        return handler
