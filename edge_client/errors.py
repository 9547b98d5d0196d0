"""How the edge agent's parts tell the run loop to stop, drop a task, or unwind.

:class:`AgentError` is public (the CLI maps it to an exit code). The other two are the
agent's own control flow, raised by its parts (calls, downloads, the secure-aggregation
exchange, training) and caught by the run loop in :mod:`edge_client.agent`.
"""

from __future__ import annotations

import asyncio

__all__ = ["AgentError", "AgentStopping", "TaskAbandoned"]


class AgentError(Exception):
    """The agent cannot go on: not enrolled, revoked, refused, or misconfigured."""


class TaskAbandoned(Exception):
    """Drop the current task for the reason given and ask for work again."""


class AgentStopping(asyncio.CancelledError):
    """The stop event was set while waiting to retry; unwinds like a cancel."""
