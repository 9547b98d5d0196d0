"""Assemble a worker group from its settings and serve: one process per pipeline stage.

Rank 0 runs the job loop (:class:`~cloud_workers.group.WorkerGroup`). In a group of more
than one stage, ``evaluate`` runs pipelined across all ranks: rank 0 broadcasts a small
JSON command naming the adapter, every rank merges it into its copy of the base, keeps
its stage and runs its part of the schedule. The other job kinds run on rank 0 alone,
which holds the full-precision base (see the report on what is not sharded yet).

Followers block in a broadcast between jobs; rank 0 sends a keep-alive command whenever
a read finds no job, so an idle group never runs into the process-group timeout, while
a dead peer still fails the group within it.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloud_workers.executor import ModelJobExecutor
from cloud_workers.group import GroupStats, WorkerGroup
from cloud_workers.parallelize import (
    PipelineRunner,
    broadcast_bytes,
    init_distributed,
    num_layers_of,
    pipeline_bits_per_byte,
    split_model,
)
from cloud_workers.topology import Topology
from estuary.model.loading import load_base

if TYPE_CHECKING:
    import torch
    from torch import nn

    from estuary.config.models import WorkerSettings
    from estuary.proto.v1 import jobs_pb2
    from estuary.state.base import Store
    from estuary.state.blobs import BlobStore

__all__ = ["cloud_eval_windows", "open_state", "serve"]

logger = logging.getLogger(__name__)

#: Bytes per evaluation window: the length the presets are pretrained on.
EVAL_SEQ_LEN = 128
#: Windows per standard-library client in the cloud evaluation set: 8 clients × 16 × 128
#: bytes ≈ 16 KiB, enough for a bits/byte estimate stable to ~0.01 yet seconds to run.
EVAL_WINDOWS_PER_CLIENT = 16


def cloud_eval_windows(
    *, seq_len: int = EVAL_SEQ_LEN, per_client: int = EVAL_WINDOWS_PER_CLIENT
) -> torch.Tensor:
    """Return the cloud evaluation set: held-out windows of every stdlib client.

    The held-out parts are never trained on by any client, so the union measures the
    federated model on every client's distribution.
    """
    import torch

    from estuary.data import eval_windows, stdlib_clients

    return torch.cat(
        [eval_windows(c.heldout, seq_len=seq_len, max_windows=per_client) for c in stdlib_clients()]
    )


def open_state(settings: WorkerSettings) -> tuple[Store, BlobStore]:
    """Open the state store and blob store the settings name."""
    from estuary.state.blobs import BlobStore
    from estuary.state.configured import open_state_store

    return open_state_store(settings.state), BlobStore(settings.state.blob_dir)


@dataclass
class _Pipeline:
    """What every rank of a multi-stage group needs to run pipelined evaluations."""

    topology: Topology
    device: torch.device
    micro_batches: int
    base: nn.Module
    blobs: BlobStore

    def batch_size(self, windows: int) -> int:
        # One window per micro-batch row at least; a multiple of micro_batches.
        rows = max(1, -(-min(windows, 4 * self.micro_batches) // self.micro_batches))
        return rows * self.micro_batches

    def evaluate(self, model: nn.Module, windows: torch.Tensor | None, count: int) -> float:
        stage = split_model(model, self.topology).to(self.device)
        runner = PipelineRunner(
            stage, topology=self.topology, device=self.device, micro_batches=self.micro_batches
        )
        return pipeline_bits_per_byte(runner, windows, batch_size=self.batch_size(count))

    def merged(self, adapter_sha256: str) -> nn.Module:
        from estuary.adapters import get_adapter, merge_into_base

        model = copy.deepcopy(self.base)
        merge_into_base(model, get_adapter(self.blobs, adapter_sha256))
        return model

    def send(self, op: str, **fields: Any) -> None:
        """Broadcast a command from rank 0 (JSON bytes, never a pickle)."""
        broadcast_bytes(json.dumps({"op": op, **fields}).encode(), src=0, device=self.device)

    def receive(self) -> dict[str, Any]:
        """Wait for rank 0's next command."""
        message: dict[str, Any] = json.loads(broadcast_bytes(None, src=0, device=self.device))
        return message


def _follow(pipeline: _Pipeline) -> None:
    """Loop of ranks > 0: run the commands rank 0 broadcasts until it says stop."""
    while True:
        message = pipeline.receive()
        op = message["op"]
        if op == "stop":
            return
        if op == "evaluate":
            model = pipeline.merged(message["adapter_sha256"])
            pipeline.evaluate(model, None, int(message["windows"]))
        elif op != "idle":
            raise RuntimeError(f"rank {pipeline.topology.rank}: unknown command {op!r}")


def serve(
    settings: WorkerSettings,
    *,
    environ: Mapping[str, str],
    stop: threading.Event | None = None,
    idle_exit_s: float | None = None,
    init_method: str = "env://",
) -> GroupStats | None:
    """Run this process's part of the worker group until stopped.

    Parameters
    ----------
    settings
        The group's settings.
    environ
        Process environment (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).
    stop
        Set to stop rank 0's loop (and with it every follower).
    idle_exit_s
        Stop after this many seconds without a job (tests and batch runs); ``None``:
        serve until stopped.
    init_method
        Rendezvous URL of the process group.

    Returns
    -------
    GroupStats | None
        Rank 0's job counters; ``None`` on other ranks.

    Raises
    ------
    ValueError
        If the topology does not fit the model or the world size.
    estuary.model.loading.CheckpointError
        If the base model cannot be loaded.
    """
    base = load_base(settings.model)
    topology = Topology.from_env(environ, stages=settings.stages, num_layers=num_layers_of(base))
    store, blobs = open_state(settings)
    pipeline: _Pipeline | None = None
    if topology.is_distributed:
        device = init_distributed(
            topology,
            backend=settings.backend,
            timeout_s=settings.process_group_timeout_s,
            init_method=init_method,
        )
        pipeline = _Pipeline(topology, device, settings.micro_batches, base, blobs)
    try:
        if not topology.is_first:
            assert pipeline is not None
            _follow(pipeline)
            return None
        windows = cloud_eval_windows()
        evaluate_fn = None
        if pipeline is not None:
            pipe = pipeline

            def evaluate_fn(job: jobs_pb2.Job, model: nn.Module, w: torch.Tensor) -> float:
                digest = executor.adapter_digest(job)
                pipe.send("evaluate", adapter_sha256=digest, windows=int(w.shape[0]))
                return pipe.evaluate(model, w, int(w.shape[0]))

        executor = ModelJobExecutor(
            store, blobs=blobs, base=base, eval_windows=windows, evaluate_fn=evaluate_fn
        )
        group = WorkerGroup(
            store,
            executor=executor,
            name=settings.group,
            heartbeat_s=settings.heartbeat_s,
            reclaim_idle_s=settings.reclaim_idle_s,
            stages=settings.stages,
            on_idle=(lambda: pipe.send("idle")) if pipeline is not None else None,
        )
        try:
            return group.run(stop or threading.Event(), idle_exit_s=idle_exit_s)
        finally:
            if pipeline is not None:
                pipeline.send("stop")
    finally:
        store.close()
        if pipeline is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
