"""A task's local training as the agent runs it: the model, the data, the run, heartbeats.

The torch loop itself is :func:`edge_client.train.train_adapter`; this module gets it
what it needs and watches it. :class:`TaskTrainer` loads the compressed base of a
task's artifact (kept in memory across tasks while the artifact's base files stay the
same) and the adapter of the task's version, resolves the device's private data once,
and runs training in a worker thread while sending a Heartbeat every ``heartbeat_s`` of
the injected clock, so the coordinator can tell a device still training from one that
vanished, and can ask it to abandon.

torch is imported only when a model is loaded or trained, so the agent can be imported
(and enrolled) without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.download import ArtifactDownloader
from edge_client.errors import AgentError, TaskAbandoned
from edge_client.rpc import EdgeRpc
from edge_client.state import EdgeState
from estuary.artifacts import ADAPTER_FILE
from estuary.clock import Clock
from estuary.data.windows import derive_seed, window_seed
from estuary.proto.v1 import edge_pb2

if TYPE_CHECKING:
    from torch import nn

    from edge_client.train import TrainResult
    from estuary.adapters.lora import GlobalAdapter

__all__ = ["HEARTBEAT_S", "TaskTrainer", "task_seed"]

logger = logging.getLogger(__name__)

#: Seconds between Heartbeats while training: a few, so the coordinator notices a device
#: that vanished long before the upload deadline, at negligible traffic.
HEARTBEAT_S = 5.0


def task_seed(seed: int | None, task: edge_pb2.Task, purpose: str) -> int:
    """Return a 32-bit seed for ``purpose`` in ``task``, derived from the agent's ``seed``.

    With ``seed`` ``None`` the task id alone decides, so two unseeded devices given the
    same task still draw the same windows.
    """
    material = f"{seed if seed is not None else ''}/{purpose}/{task.task_id}"
    return derive_seed(material)


@dataclass
class _Model:
    key: str
    base: nn.Module


class TaskTrainer:
    """Prepares the model of a task and trains it, heartbeating meanwhile.

    Parameters
    ----------
    state
        The device's state directory.
    downloads
        Fetches the task's artifact.
    rpc
        The channel to the coordinator (Heartbeats).
    data
        Private training data: bytes, a file (memory-mapped), a folder of text files or a
        ``.jsonl`` file; ``None`` when the device cannot train.
    threads
        torch threads for training, ≥ 1.
    seed
        The agent's seed: a seeded agent draws its training windows by version
        (:func:`estuary.data.windows.window_seed`), an unseeded one by task id
        (:func:`task_seed`).
    clock
        Times the Heartbeats.
    heartbeat_s
        Seconds between Heartbeats while training (> 0).
    """

    def __init__(
        self,
        state: EdgeState,
        *,
        downloads: ArtifactDownloader,
        rpc: EdgeRpc,
        data: bytes | Path | None,
        threads: int,
        seed: int | None,
        clock: Clock,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        if not (heartbeat_s > 0 and math.isfinite(heartbeat_s)):
            raise ValueError(f"heartbeat_s: must be a positive number, got {heartbeat_s}")
        self._state = state
        self._downloads = downloads
        self._rpc = rpc
        self.data = data
        self.threads = threads
        self.seed = seed
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self._model: _Model | None = None
        self._resolved: bytes | Path | None = None
        self._running: asyncio.Future[Any] | None = None
        self._tasks_on: dict[int, int] = {}

    def _window_seed(self, task: edge_pb2.Task) -> int:
        """Return the training windows' seed: by version if seeded, else by task id."""
        if self.seed is None:
            return task_seed(None, task, "train")
        version = int(task.version)
        nth = self._tasks_on.get(version, 0)
        self._tasks_on[version] = nth + 1
        return window_seed(self.seed, version, nth)

    async def wait_idle(self) -> None:
        """Wait for a training run still in progress (of an abandoned task) to finish."""
        if self._running is not None and not self._running.done():
            await asyncio.wait({self._running})

    async def prepare_model(self, task: edge_pb2.Task) -> tuple[nn.Module, GlobalAdapter]:
        """Fetch what the task's artifact needs; return the base (cached) and the adapter.

        Also installs the artifact's ONNX export for serving, and prunes cached blobs
        that neither needs. Heartbeats meanwhile, as while training: the coordinator
        drops a training task whose device stays silent for ``cohort.silence_s``, and a
        download can take longer.

        Raises
        ------
        TaskAbandoned
            If the artifact cannot be fetched, or its base or adapter cannot be loaded,
            or the coordinator answers a Heartbeat with ABANDON.
        """
        future = asyncio.ensure_future(self._prepare_model(task))
        try:
            await self._heartbeat_until(task, future)
        finally:
            future.cancel()  # a no-op once done; stops the download if abandoned
        return future.result()

    async def _prepare_model(self, task: edge_pb2.Task) -> tuple[nn.Module, GlobalAdapter]:
        from estuary.adapters.lora import GlobalAdapter
        from estuary.compress import load_compressed

        manifest, directory = await self._downloads.fetch_training_files(task.artifact)
        key = hashlib.sha256(json.dumps(manifest.base_files, sort_keys=True).encode()).hexdigest()
        try:
            model = self._model
            if model is None or model.key != key:
                self._model = None  # release the old base before loading the new one
                base = await asyncio.to_thread(load_compressed, directory)
                model = self._model = _Model(key=key, base=base)
                logger.info("loaded the compressed base from %s", directory)
            adapter = await asyncio.to_thread(GlobalAdapter.load, directory / ADAPTER_FILE)
        except ValueError as exc:  # CheckpointError is a ValueError
            raise TaskAbandoned(f"artifact unusable: {exc}") from None
        served = await self._downloads.install_served(manifest)
        self._state.prune_artifacts(
            {task.artifact.sha256, *manifest.files.values(), *served.values()}
        )
        return model.base, adapter

    async def resolve_data(self) -> bytes | Path:
        """Return the training data, loading a folder or ``.jsonl`` file once.

        Raises
        ------
        AgentError
            If there is no data, or it does not exist or cannot be read.
        """
        if self._resolved is None:
            data = self.data
            if data is None:  # pragma: no cover - the agent refuses to run first
                raise AgentError("no training data")
            if isinstance(data, Path) and (
                data.is_dir() or data.suffix.lower() in (".jsonl", ".ndjson")
            ):
                from estuary.data.user import load_user_data

                try:
                    data = await asyncio.to_thread(load_user_data, data)
                except (OSError, ValueError) as exc:
                    raise AgentError(f"training data unusable: {exc}") from exc
            elif isinstance(data, Path) and not data.is_file():
                raise AgentError(f"{data}: training data does not exist")
            self._resolved = data
        return self._resolved

    async def train(
        self, task: edge_pb2.Task, base: nn.Module, adapter: GlobalAdapter
    ) -> TrainResult:
        """Train ``adapter`` on ``base`` as ``task`` says; Heartbeat until it finishes.

        The run goes on in its thread if the task is abandoned meanwhile; the next run
        (or :meth:`wait_idle`) waits for it, because adapters attached twice to the
        shared base would collide.

        Raises
        ------
        TaskAbandoned
            If the coordinator answers a Heartbeat with ABANDON, or training refuses
            the task's parameters.
        """
        from edge_client.train import train_adapter

        data = await self.resolve_data()
        await self.wait_idle()
        future = asyncio.ensure_future(
            asyncio.to_thread(
                train_adapter,
                base,
                adapter,
                data,
                rank=int(task.rank),
                steps=int(task.local_steps),
                lr=float(task.learning_rate),
                grad_clip_norm=float(task.grad_clip_norm),
                batch_size=int(task.batch_size),
                seq_len=int(task.seq_len),
                threads=self.threads,
                seed=self._window_seed(task),
                columns=list(task.columns) or None,
                warmup_steps=int(task.warmup_steps),
            )
        )
        self._running = future
        await self._heartbeat_until(task, future)
        try:
            result: TrainResult = future.result()
        except ValueError as exc:
            raise TaskAbandoned(f"training refused the task's parameters: {exc}") from None
        return result

    async def _heartbeat_until(self, task: edge_pb2.Task, future: asyncio.Future[Any]) -> None:
        """Send a Heartbeat every ``heartbeat_s`` until ``future`` is done.

        Raises
        ------
        TaskAbandoned
            If the coordinator answers one with ABANDON.
        """
        while not await self._finished_within(future, self.heartbeat_s):
            beat = edge_pb2.HeartbeatRequest(task_id=task.task_id, steps_done=0)
            answer = await self._rpc.call(
                "Heartbeat", beat, response_type=edge_pb2.HeartbeatResponse
            )
            if answer.action == edge_pb2.HeartbeatResponse.ACTION_ABANDON:
                raise TaskAbandoned("the coordinator asked to abandon the task (Heartbeat)")

    async def _finished_within(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Wait up to ``seconds`` of the clock for ``future``; return whether it is done.

        On a virtual clock the wait is over at once, so the loop heartbeats as fast as
        the coordinator answers while the (real) training thread runs.
        """
        if future.done():
            return True
        sleeper = asyncio.ensure_future(self.clock.sleep_async(seconds))
        try:
            await asyncio.wait({future, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        return future.done()
