"""The worker group a coordinator runs in its own process when ``workers = "local"``.

Registered under the ``estuary.local_worker`` entry-point group
(:data:`estuary.jobs.LOCAL_WORKER_ENTRY_POINTS`), so the coordinator finds it without
importing this package; the simulation passes it in directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import WorkerGroup
from cloud_workers.worker import cloud_eval_windows
from estuary.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    import torch
    from torch import nn

    from estuary.state.base import Store
    from estuary.state.blobs import BlobStore

__all__ = ["LOCAL_WORKER_HEARTBEAT_S", "LOCAL_WORKER_RECLAIM_IDLE_S", "local_worker"]

#: The local worker's heartbeat period, in seconds: one small store write per second per
#: replica, which is what keeps its short job lease below alive while a job runs.
LOCAL_WORKER_HEARTBEAT_S = 1.0
#: The local worker's job lease (its ``reclaim_idle_s``, advertised in its heartbeat), in
#: seconds. A coordinator replica can die at any moment and its build is what devices
#: wait for, so a live replica (or the restarted one) takes the job over 5 s after the
#: last heartbeat instead of a separate group's 120 s. 5 s is five heartbeats: a live
#: replica loses its job only if four heartbeats in a row fail to reach the store, and
#: then the job merely runs twice (its outcome is recorded once).
LOCAL_WORKER_RECLAIM_IDLE_S = 5.0


def local_worker(
    store: Store,
    *,
    blobs: BlobStore,
    base: nn.Module,
    name: str,
    eval_windows: torch.Tensor | None = None,
    onnx: bool = True,
    clock: Clock = SYSTEM_CLOCK,
) -> WorkerGroup:
    """Return a worker group over ``store`` that executes jobs with ``base``.

    Parameters
    ----------
    store, blobs
        The coordinator's state and blob stores.
    base
        The full-precision base model the coordinator already holds.
    name
        Consumer name of the group (``local-<node id>``).
    eval_windows
        Held-out windows for evaluations; ``None``: :func:`cloud_eval_windows`.
    onnx
        Whether edge artifacts carry the int8 ONNX export.
    clock
        Heartbeats, leases and outcome stamps (tests pass a virtual clock and drive the
        group with :meth:`~cloud_workers.group.WorkerGroup.step`).
    """
    executor = ModelJobExecutor(
        store,
        blobs=blobs,
        base=base,
        eval_windows=cloud_eval_windows() if eval_windows is None else eval_windows,
        onnx=onnx,
    )
    return WorkerGroup(
        store,
        executor=executor,
        name=name,
        heartbeat_s=LOCAL_WORKER_HEARTBEAT_S,
        reclaim_idle_s=LOCAL_WORKER_RECLAIM_IDLE_S,
        clock=clock,
    )
