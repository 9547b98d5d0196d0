"""Real training of device updates, out of the simulator's process.

Only time is simulated: every device update is :func:`edge_client.train.train_adapter` on
the compressed base, the task's version of the adapter and the device's own data slice,
at the device's rank. The virtual-clock core submits a :class:`TrainRequest` when a device
starts training and collects the :class:`TrainOutcome` when its virtual training time is
up, so many trainings run in parallel while the core stays single-threaded.

Backends (all give the same bits for the same request: one torch thread, seeded sampling):

- :class:`InlineTrainer`: in this process (tests, ``--workers 0``);
- :class:`PoolTrainer`: a local process pool (the default);
- :class:`RayTrainer`: tasks on a Ray cluster (``--ray ADDRESS``; ``local`` starts one).

Devices map onto the data's clients round-robin (device i trains on client i mod P); the
devices of one client split its training bytes into contiguous slices of their own
(:func:`data_slice`), each at least :data:`MIN_SLICE_WINDOWS` windows long.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from estuary.adapters.lora import GlobalAdapter

log = logging.getLogger(__name__)

__all__ = [
    "LOCAL_RAY_SYSTEM_CONFIG",
    "InlineTrainer",
    "PoolTrainer",
    "RayTrainer",
    "TrainContext",
    "TrainOutcome",
    "TrainRequest",
    "Trainer",
    "data_slice",
    "make_trainer",
]

#: Smallest slice of a client's bytes one device trains on, in windows of seq_len + 1:
#: below this a device would see the same few windows every step.
MIN_SLICE_WINDOWS = 8


@dataclass(frozen=True)
class TrainContext:
    """What every training worker holds: the compressed base and the clients' bytes."""

    edge_base: Any  # torch nn.Module (kept untyped: pickled to workers)
    client_bytes: tuple[bytes, ...]


@dataclass(frozen=True)
class TrainRequest:
    """One device update to train."""

    client: int
    start: int
    length: int
    rank: int
    steps: int
    lr: float
    grad_clip_norm: float
    batch_size: int
    seq_len: int
    seed: int
    adapter: GlobalAdapter
    columns: tuple[int, ...] | None = None  # columns of B trained; None: the first `rank`
    warmup_steps: int = 0  # linear lr warm-up steps (training.warmup_steps)


@dataclass(frozen=True)
class TrainOutcome:
    """ΔB per tensor ((out, r_max) float32, zero beyond the rank) and the last loss."""

    delta_b: dict[str, npt.NDArray[np.float32]]
    loss_last: float


def data_slice(
    index: int, *, devices: int, client_sizes: Sequence[int], seq_len: int
) -> tuple[int, int, int]:
    """Return ``(client, start, length)`` of device ``index``'s training bytes."""
    clients = len(client_sizes)
    client = index % clients
    share = (devices - client + clients - 1) // clients  # devices on this client
    k = index // clients
    size = client_sizes[client]
    length = max(size // max(share, 1), MIN_SLICE_WINDOWS * (seq_len + 1))
    length = min(length, size)
    start = (k * size // max(share, 1)) % size
    return client, start, length


def _slice(data: bytes, start: int, length: int) -> bytes:
    end = start + length
    return data[start:end] if end <= len(data) else data[start:] + data[: end - len(data)]


def run_request(context: TrainContext, request: TrainRequest) -> TrainOutcome:
    """Train one request on ``context`` (what every backend runs)."""
    from edge_client.train import train_adapter

    data = _slice(context.client_bytes[request.client], request.start, request.length)
    result = train_adapter(
        context.edge_base,
        request.adapter,
        data,
        rank=request.rank,
        steps=request.steps,
        lr=request.lr,
        grad_clip_norm=request.grad_clip_norm,
        batch_size=request.batch_size,
        seq_len=request.seq_len,
        threads=1,  # one thread: results are bit-identical across backends and machines
        seed=request.seed,
        columns=request.columns,
        warmup_steps=request.warmup_steps,
    )
    return TrainOutcome(delta_b=result.delta_b, loss_last=result.metrics.loss_last)


class Trainer(Protocol):
    """Runs training requests somewhere; results are awaited by handle."""

    def submit(self, request: TrainRequest) -> Any:
        """Start training; return a handle for :meth:`result`."""

    def result(self, handle: Any) -> TrainOutcome:
        """Wait for and return a submitted request's outcome."""

    def close(self) -> None:
        """Release workers."""


class InlineTrainer:
    """Trains in this process when the result is asked for."""

    def __init__(self, context: TrainContext) -> None:
        self.context = context

    def submit(self, request: TrainRequest) -> Any:
        """Start training ``request``; return its handle."""
        return request

    def result(self, handle: Any) -> TrainOutcome:
        """Wait for and return the outcome of ``handle``."""
        return run_request(self.context, handle)

    def close(self) -> None:
        """Release the workers."""
        pass


_WORKER_CONTEXT: TrainContext | None = None


def _init_worker(context: TrainContext) -> None:
    global _WORKER_CONTEXT
    import torch

    torch.set_num_threads(1)
    _WORKER_CONTEXT = context


def _pool_run(request: TrainRequest) -> TrainOutcome:
    assert _WORKER_CONTEXT is not None, "worker not initialised"
    return run_request(_WORKER_CONTEXT, request)


class PoolTrainer:
    """A local process pool (spawned workers, one torch thread each)."""

    def __init__(self, context: TrainContext, *, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(context,),
        )

    def submit(self, request: TrainRequest) -> Future[TrainOutcome]:
        """Start training ``request``; return its handle."""
        return self._pool.submit(_pool_run, request)

    def result(self, handle: Future[TrainOutcome]) -> TrainOutcome:
        """Wait for and return the outcome of ``handle``."""
        return handle.result()

    def close(self) -> None:
        """Release the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)


#: Ray's system settings for a private local instance. Ray starts its workers at nice 15
#: (``worker_niceness``) so that a cluster's own daemons stay responsive; here the workers
#: do all of the run's work while the driver waits on them, and at nice 15 any other busy
#: process on the machine starves them: under four busy loops on 2 cores each got about
#: 4 % of a core and a 30 s run took over 14 minutes. Normal priority, as the local pool.
LOCAL_RAY_SYSTEM_CONFIG: dict[str, object] = {"worker_niceness": 0}


class RayTrainer:
    """Training tasks on a Ray cluster; the context goes to the object store once.

    Parameters
    ----------
    context
        What every task needs.
    address
        A Ray cluster address (``ray://host:port`` or ``host:port``), or ``"local"`` to
        start a private instance on loopback with ``workers`` CPUs, its workers at normal
        priority (:data:`LOCAL_RAY_SYSTEM_CONFIG`).
    workers
        CPUs of a local instance (ignored with a cluster address).
    """

    def __init__(self, context: TrainContext, *, address: str, workers: int = 2) -> None:
        import ray

        if not address:
            raise ValueError("address: must name a Ray cluster or 'local'")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                    _system_config=LOCAL_RAY_SYSTEM_CONFIG,
                )
            else:
                ray.init(address=address, log_to_driver=False)
            self._started = True
        self._context = ray.put(context)
        self._remote = ray.remote(num_cpus=1)(_ray_run)

    def submit(self, request: TrainRequest) -> Any:
        """Start training ``request``; return its handle."""
        return self._remote.remote(self._context, request)

    def result(self, handle: Any) -> TrainOutcome:
        """Wait for and return the outcome of ``handle``.

        No deadline, as the local pool's: the first results wait for Ray's workers to
        start, which on a loaded machine took past any fixed limit (over 300 s under four
        busy loops on 2 cores); a worker or node that dies makes Ray raise by itself.
        """
        outcome: TrainOutcome = self._ray.get(handle)
        return outcome

    def close(self) -> None:
        """Release the workers."""
        if self._started:
            self._ray.shutdown()


def _ray_run(context: TrainContext, request: TrainRequest) -> TrainOutcome:
    import torch

    torch.set_num_threads(1)
    return run_request(context, request)


def make_trainer(context: TrainContext, *, workers: int, ray_address: str | None) -> Trainer:
    """Return the backend the options ask for (Ray, a pool, or inline with 0 workers)."""
    if ray_address:
        return RayTrainer(context, address=ray_address, workers=max(workers, 1))
    if workers == 0:
        return InlineTrainer(context)
    return PoolTrainer(context, workers=workers)
