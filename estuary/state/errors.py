"""Errors raised by the state store and the blob store.

Every store failure a caller is expected to handle is a :class:`StoreError`.
Programming errors (a negative count, an empty key) raise ``ValueError``
instead, so that they are never mistaken for a transient outage and retried.
"""

from __future__ import annotations

__all__ = [
    "FencingError",
    "InvalidStoreURL",
    "LeaseLost",
    "StoreError",
    "StoreUnavailable",
    "VersionConflict",
]


class StoreError(Exception):
    """Base class of every error the state store raises on purpose."""


class StoreUnavailable(StoreError):
    """The backing service is down, unreachable or too slow to answer.

    This is the one documented error for an outage. It is raised only after the
    store's bounded, logged retry has given up, so a caller seeing it should
    fail the current request (or back off for much longer than the store did)
    rather than retry in a tight loop.

    Parameters
    ----------
    message
        What failed and why.
    outcome_unknown
        True when the failure happened after a write had been sent: the write
        may or may not have been applied, and the caller must read back before
        assuming either.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class VersionConflict(StoreError):
    """A versioned write found a different version than the caller expected.

    Parameters
    ----------
    key
        The record's key.
    expected
        The version the caller expected (0 means "must not exist").
    actual
        The version the store holds (0 means "does not exist").
    """

    def __init__(self, key: str, *, expected: int, actual: int) -> None:
        super().__init__(
            f"version conflict on key {key!r}: expected version {expected}, actual {actual}"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


class FencingError(StoreError):
    """A fenced write carried a lease that is no longer the newest or has expired.

    Parameters
    ----------
    key
        The key the write targeted.
    lease_name
        The name of the lease the write was fenced by.
    token
        The fencing token the write carried.
    reason
        Why it was refused (superseded by a newer token, or expired).
    """

    def __init__(self, key: str, *, lease_name: str, token: int, reason: str) -> None:
        super().__init__(
            f"fenced write to {key!r} refused: lease {lease_name!r} token {token} {reason}"
        )
        self.key = key
        self.lease_name = lease_name
        self.token = token
        self.reason = reason


class LeaseLost(StoreError):
    """A lease could not be renewed: it expired or someone else holds it now.

    Parameters
    ----------
    lease_name
        The lease's name.
    token
        The token of the lease the caller tried to renew.
    """

    def __init__(self, lease_name: str, *, token: int) -> None:
        super().__init__(f"lease {lease_name!r} with token {token} is lost (expired or taken)")
        self.lease_name = lease_name
        self.token = token


class InvalidStoreURL(StoreError, ValueError):
    """A store URL or one of its options is malformed; the message names what is wrong."""
