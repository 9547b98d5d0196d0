"""What the edge agent shows its observer: callbacks (:class:`AgentHooks`) and counters.

The simulator, metrics and tests watch an agent through these; the agent's parts
(calls, exchange, run loop) report into them and never depend on who listens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from estuary.proto.v1 import edge_pb2

__all__ = ["AgentHooks", "AgentStats"]


@dataclass
class AgentHooks:
    """Optional callbacks, for the simulator, metrics and tests.

    Attributes
    ----------
    on_task
        Called with every task received (the training task, then the cohort task),
        before any work on it.
    before_upload
        Called with the ΔB that enters secure aggregation (name → float32 array of the
        tensor's shape, padded to ``r_max`` and already L2-clipped to the cohort's
        ``clip``, so ``weight`` × this is exactly what the unmasked sum holds up to
        fixed-point rounding) and the staleness weight, just before masking.
    drop
        Return True to simulate the device vanishing at ``phase``: ``"training"`` (the
        training task, artifact loaded), ``"keys"`` or ``"upload"`` (the cohort task):
        the agent sends nothing more for that task and drops its update.
    on_event
        Called with an event name (``paced``, ``task_trained``, ``task_done``,
        ``task_abandoned``, ``retry``) and details.
    """

    on_task: Callable[[edge_pb2.Task], None] | None = None
    before_upload: (
        Callable[[edge_pb2.Task, dict[str, npt.NDArray[np.float32]], float], None] | None
    ) = None
    drop: Callable[[edge_pb2.Task, str], bool] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def emit(self, event: str, **details: Any) -> None:
        """Call :attr:`on_event` with ``event`` and ``details``, if it is set."""
        if self.on_event is not None:
            self.on_event(event, details)


@dataclass
class AgentStats:
    """Counters of one agent's session (since it was constructed).

    Attributes
    ----------
    tasks_done, tasks_abandoned
        Tasks that reached DONE, and tasks dropped (abort, refusal, vanish, restart, a
        trained update the coordinator no longer holds).
    paced
        GetTask answers that were a Pace.
    bytes_up, bytes_down
        Serialised request and response bytes, every attempt counted.
    """

    tasks_done: int = 0
    tasks_abandoned: int = 0
    paced: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
