"""How the edge agent's parts tell the run loop to stop, drop a task, or unwind.

:class:`AgentError` and its subclass :class:`TLSFailure` are public (the CLI maps them
to exit codes). The other two are the agent's own control flow, raised by its parts
(calls, downloads, the secure-aggregation exchange, training) and caught by the run loop
in :mod:`edge_client.agent`.
"""

from __future__ import annotations

import asyncio

__all__ = ["AgentError", "AgentStopping", "TLSFailure", "TaskAbandoned"]


class AgentError(Exception):
    """The agent cannot go on: not enrolled, revoked, refused, or misconfigured."""


class TLSFailure(AgentError):
    """The TLS connection to the coordinator cannot work as configured; retrying is futile.

    A certificate that does not verify, a plaintext agent facing a TLS coordinator (or the
    reverse), a hostname the certificate does not name, a client certificate the
    coordinator refuses: each fails the same way on every attempt until someone changes
    a configuration, so the agent stops and says which.

    Attributes
    ----------
    cause
        Short name of the failure, e.g. ``CERTIFICATE_VERIFY_FAILED``,
        ``PLAINTEXT_TO_TLS_SERVER``, ``CLIENT_CERTIFICATE_REFUSED``.
    """

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class TaskAbandoned(Exception):
    """Drop the current task for the reason given and ask for work again."""


class AgentStopping(asyncio.CancelledError):
    """The stop event was set while waiting to retry; unwinds like a cancel."""
