"""Errors of the federation service, one class per way a request can be refused.

The service knows nothing of gRPC; the servicer maps each class to one status code
(:data:`coordinator.grpc_service.STATUS_OF`). Every message says what was wrong in
words a device operator can act on.
"""

from __future__ import annotations

from coordinator.enrolment import EnrolmentError, Unauthenticated


class ServiceError(Exception):
    """A request refused by the federation service."""


class InvalidArgument(ServiceError):
    """Malformed content: bad digest, undecodable message, wrong sizes or fields."""


class FailedPrecondition(ServiceError):
    """Well-formed, but not now: wrong cohort, version or stage; not a member."""


class ResourceExhausted(ServiceError):
    """Too big or too many: an oversized upload, or the device's rate limit."""


class NotFound(ServiceError):
    """A named blob or task does not exist."""


class MalformedRequest(InvalidArgument):
    """Bytes that are no valid encoding of the request message (refused before any work)."""


class DeadlineExceeded(ServiceError):
    """A server-side time limit passed: an upload stream idle or open for too long."""


class Unavailable(ServiceError):
    """Not now, retry later: the state store is known silent, or the handlers are saturated."""


__all__ = [
    "DeadlineExceeded",
    "EnrolmentError",
    "FailedPrecondition",
    "InvalidArgument",
    "MalformedRequest",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
]
