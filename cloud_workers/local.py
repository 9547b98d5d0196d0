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

if TYPE_CHECKING:
    import torch
    from torch import nn

    from estuary.state.base import Store
    from estuary.state.blobs import BlobStore

__all__ = ["LOCAL_WORKER_HEARTBEAT_S", "LOCAL_WORKER_RECLAIM_IDLE_S", "local_worker"]

#: The local worker's heartbeat and reclaim timeouts: those of a worker group's defaults
#: (:class:`~estuary.config.models.WorkerSettings`), so a local worker and a separate
#: group treat each other alike when both serve one store.
LOCAL_WORKER_HEARTBEAT_S = 5.0
LOCAL_WORKER_RECLAIM_IDLE_S = 120.0


def local_worker(
    store: Store,
    *,
    blobs: BlobStore,
    base: nn.Module,
    name: str,
    eval_windows: torch.Tensor | None = None,
    onnx: bool = True,
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
    )
