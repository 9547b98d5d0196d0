"""The edge agent: asks the coordinator for work and runs tasks, as ``edge.proto`` describes.

One task, in order (the contract is the top comment of ``estuary/proto/v1/edge.proto``):
GetTask (Pace → wait and ask again) → AdvertiseKeys / ShareKeys, while the artifact
manifest and the blobs it names that are not cached are fetched (resumable, SHA-256
verified) and loaded → train locally (Heartbeat meanwhile) → share relay and staleness
weight → masked upload → unmasking → DONE. Any ABORTED, a refused request or a
Heartbeat ABANDON drops the task and the agent asks for work again.

:class:`EdgeAgent` is the composition and the run loop; each part lives in its module:

- :mod:`edge_client.rpc`: signed calls, retries with backoff, refusal classification;
- :mod:`edge_client.enrolment`: enrolment and the identity key requests are signed with;
- :mod:`edge_client.download`: artifact download and installation;
- :mod:`edge_client.training`: model preparation, training data, the training run;
- :mod:`edge_client.exchange`: the secure-aggregation messages and the masked upload.

Transport failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried with
exponential backoff and full jitter; UNAUTHENTICATED stops the agent with
:class:`AgentError`. Every request but Enroll carries a fresh ``DeviceAuth`` (new nonce,
new timestamp) per attempt, because the coordinator refuses a nonce it has seen. Every
wait (backoff, Pace, Heartbeat interval) and every timestamp reads the injected
:class:`~estuary.clock.Clock`.

Secure-aggregation keys live only in memory: a device killed mid-task cannot resume it.
On restart ``progress.json`` still names the task; the agent records it as abandoned and
asks for work (the coordinator treats that GetTask as the abandonment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np

from edge_client.certificate import DeviceCertificate, renew_if_due
from edge_client.download import ArtifactDownloader
from edge_client.enrolment import Identity, enroll
from edge_client.errors import AgentError, TaskAbandoned
from edge_client.exchange import SecAggExchange, clipped_update, mask
from edge_client.hooks import AgentHooks, AgentStats
from edge_client.rpc import EdgeRpc
from edge_client.state import EdgeState, Progress
from edge_client.tls import ChannelTLS
from edge_client.training import HEARTBEAT_S, TaskTrainer, task_seed
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.log import log_context
from estuary.proto.v1 import edge_pb2

__all__ = [
    "AgentError",
    "AgentHooks",
    "AgentStats",
    "EdgeAgent",
    "Outcome",
]

logger = logging.getLogger(__name__)

Outcome = Literal["paced", "done", "abandoned"]

#: Random stretch of a Pace's retry-after: up to +20 %, so devices told the same
#: retry-after spread out instead of arriving together.
PACE_JITTER = 0.2
#: Backoff attempt whose delay is waited after a GetTask refused outright (neither
#: transient nor an auth failure): a ceiling of 0.5 s × 2**4 = 8 s, long enough not to
#: hammer a coordinator that refuses, short enough to notice when it stops refusing.
_REFUSED_GET_TASK_ATTEMPT = 4


async def _first_failure(*futures: asyncio.Future[Any]) -> None:
    """Wait until all of ``futures`` are done or one fails; raise that failure.

    The others are cancelled (and awaited) when one fails, so a task abandoned for its
    download does not go on exchanging keys, and the other way round.
    """
    pending = set(futures)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                future.result()  # raises the first failure
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            with contextlib.suppress(BaseException):
                await future


class _Vanish(Exception):
    """A ``drop`` hook simulated the device disappearing."""


class EdgeAgent:
    """One device's agent.

    Parameters
    ----------
    state
        The device's state directory.
    target
        host:port of the coordinator.
    credentials
        TLS material of the channel (:class:`~edge_client.tls.ChannelTLS`); ``None``
        connects without TLS (loopback and simulation only).
    data
        Private training data: bytes, a file (memory-mapped), a folder of text files or a
        ``.jsonl`` file. ``None``: this device cannot train and :meth:`run` refuses.
    threads
        torch threads for training, ≥ 1.
    max_backoff_s
        Longest wait between retries of a failed call, seconds (> 0).
    hooks
        Optional callbacks (:class:`AgentHooks`).
    seed
        Seeds backoff jitter, local window sampling and stochastic rounding; ``None``
        uses fresh entropy for jitter and rounding and the task id alone for sampling.
    clock
        Every wait (backoff, Pace, Heartbeat interval) and every timestamp (auth,
        deadlines); a :class:`~estuary.clock.VirtualClock` makes the waits instant.
    heartbeat_s
        Seconds between Heartbeats while training (> 0), on ``clock``.
    """

    def __init__(
        self,
        state: EdgeState,
        target: str,
        *,
        credentials: ChannelTLS | None,
        data: bytes | Path | None,
        threads: int = 2,
        max_backoff_s: float = 300.0,
        hooks: AgentHooks | None = None,
        seed: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if not target:
            raise ValueError("target: must be host:port of the coordinator")
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        if not (max_backoff_s > 0 and math.isfinite(max_backoff_s)):
            raise ValueError(f"max_backoff_s: must be a positive number, got {max_backoff_s}")
        if not (heartbeat_s > 0 and math.isfinite(heartbeat_s)):
            raise ValueError(f"heartbeat_s: must be a positive number, got {heartbeat_s}")
        self.state = state
        self.target = target
        self.credentials = credentials
        self.data = data
        self.threads = threads
        self.max_backoff_s = max_backoff_s
        self.hooks = hooks or AgentHooks()
        self.seed = seed
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.stats = AgentStats()
        # One random stream for backoff and Pace jitter, in the order they are drawn.
        self._rng = random.Random(seed)
        self._identity = Identity(state)
        # A certificate issued at enrolment (by CSR) is this device's mTLS client certificate.
        self._certificate = DeviceCertificate(state)
        self._rpc = EdgeRpc(
            target,
            credentials=self._certificate.channel(credentials),
            identity=self._identity.key,
            clock=clock,
            rng=self._rng,
            max_backoff_s=max_backoff_s,
            stats=self.stats,
            hooks=self.hooks,
        )
        self._trainer = TaskTrainer(
            state,
            downloads=ArtifactDownloader(state, self._rpc),
            rpc=self._rpc,
            data=data,
            threads=threads,
            seed=seed,
            clock=clock,
            heartbeat_s=heartbeat_s,
        )
        self._progress = state.load_progress()
        self._base_up = self._progress.bytes_up
        self._base_down = self._progress.bytes_down
        self._recovered = False
        self._held_version = 0

    # ------------------------------------------------------------------ counters

    @property
    def bytes_up(self) -> int:
        """Serialised request bytes sent in this session."""
        return self.stats.bytes_up

    @property
    def bytes_down(self) -> int:
        """Serialised response bytes received in this session."""
        return self.stats.bytes_down

    @property
    def tasks_done(self) -> int:
        """Tasks completed in this session."""
        return self.stats.tasks_done

    @property
    def tasks_abandoned(self) -> int:
        """Tasks abandoned in this session (including one found unfinished at start)."""
        return self.stats.tasks_abandoned

    @property
    def progress(self) -> Progress:
        """The durable progress record (lifetime counters, task under way)."""
        return self._progress

    async def close(self) -> None:
        """Close the channel and wait for a training run still in progress to finish."""
        await self._trainer.wait_idle()
        await self._rpc.close()

    # ------------------------------------------------------------------ progress

    def _save_progress(self) -> None:
        self._progress.bytes_up = self._base_up + self.stats.bytes_up
        self._progress.bytes_down = self._base_down + self.stats.bytes_down
        self.state.save_progress(self._progress)

    def _set_phase(self, phase: str) -> None:
        self._progress.phase = phase
        self._save_progress()

    def _recover(self) -> None:
        """Count a task left unfinished by a previous run as abandoned (once per agent)."""
        if self._recovered:
            return
        self._recovered = True
        if self._progress.task_id is not None:
            logger.warning(
                "task %s (cohort %s) was under way (phase %s) when the agent last stopped; "
                "abandoned: its secure-aggregation keys lived only in memory",
                self._progress.task_id,
                self._progress.cohort_id,
                self._progress.phase,
            )
            self.hooks.emit(
                "task_abandoned",
                task_id=self._progress.task_id,
                reason="agent restarted mid-task",
            )
            self._finish_task(done=False)

    def _finish_task(self, *, done: bool) -> None:
        if done:
            self._progress.tasks_done += 1
            self.stats.tasks_done += 1
        else:
            self._progress.tasks_abandoned += 1
            self.stats.tasks_abandoned += 1
        self._progress.task_id = None
        self._progress.cohort_id = None
        self._progress.version = None
        self._progress.phase = None
        self._save_progress()

    # ------------------------------------------------------------------ enrolment

    async def enroll(self, token: str, device_class: str) -> dict[str, Any]:
        """Enrol this device with a one-time ``token`` as ``device_class``.

        Generates the identity key on first use (an existing key is kept), sends only its
        public half, and writes ``enrolment.json``.

        Returns
        -------
        dict
            The enrolment record (device_id, device_class, rank, r_max, coordinator,
            enrolled_at).

        Raises
        ------
        AgentError
            If the device is already enrolled, or the coordinator refuses the token or
            the class (the message carries the coordinator's reason).
        """
        return await enroll(self._rpc, self.state, token=token, device_class=device_class)

    # ------------------------------------------------------------------ main loop

    def _require_ready(self) -> None:
        if self.data is None:
            raise AgentError(
                "this device has no training data (data_dir is not set), so it cannot take tasks"
            )
        self._identity.key()

    async def run(
        self, *, stop: asyncio.Event | None = None, max_tasks: int | None = None
    ) -> AgentStats:
        """Ask for work and run tasks until ``stop`` is set or ``max_tasks`` have ended.

        Parameters
        ----------
        stop
            Set it to stop; a task under way is abandoned (and recorded so).
        max_tasks
            Stop after this many tasks ended (done or abandoned). ``None``: no limit.

        Raises
        ------
        AgentError
            If the device has no data or is not enrolled, or the coordinator stops
            recognising it (UNAUTHENTICATED).
        """
        if max_tasks is not None and max_tasks < 0:
            raise ValueError(f"max_tasks: must be >= 0, got {max_tasks}")
        self._require_ready()
        self._rpc.stop = stop
        ended = 0
        try:
            while stop is None or not stop.is_set():
                if max_tasks is not None and ended >= max_tasks:
                    break
                await renew_if_due(self._rpc, self._certificate, device_id=self._identity.device_id)
                job = asyncio.ensure_future(self.run_once())
                if stop is not None:
                    stopper = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait(
                        {job, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    stopper.cancel()
                    if job not in done:
                        job.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await job
                        break
                try:
                    outcome = await job
                except asyncio.CancelledError:
                    if stop is not None and stop.is_set():
                        break
                    raise
                if outcome != "paced":
                    ended += 1
        finally:
            self._rpc.stop = None
            self._save_progress()  # the byte counters of the last Paces
        return self.stats

    async def run_once(self) -> Outcome:
        """Ask for work once; run the task if one comes, or honour the Pace.

        Returns
        -------
        str
            ``"paced"`` (after waiting the retry-after), ``"done"`` or ``"abandoned"``.

        Raises
        ------
        AgentError
            As :meth:`run`.
        """
        self._require_ready()
        self._recover()
        request = edge_pb2.GetTaskRequest(
            held_version=self._held_version, held_artifacts=self.state.cached_artifacts()
        )
        try:
            response = await self._rpc.call(
                "GetTask", request, response_type=edge_pb2.GetTaskResponse, in_task=False
            )
        except grpc.aio.AioRpcError as exc:
            # Not transient and not an auth failure: the coordinator refused the request
            # itself. Wait as after a failure and ask again.
            delay = self._rpc.backoff(_REFUSED_GET_TASK_ATTEMPT)
            logger.warning(
                "GetTask refused (%s: %s); asking again in %.1f s",
                exc.code().name,
                exc.details(),
                delay,
            )
            await self._rpc.sleep(delay)
            return "paced"
        if response.WhichOneof("outcome") != "task":
            pace = response.pace
            delay = pace.retry_after_ms / 1000.0 * (1.0 + self._rng.uniform(0.0, PACE_JITTER))
            self.stats.paced += 1
            self.hooks.emit("paced", retry_after_ms=pace.retry_after_ms, reason=pace.reason)
            logger.debug("paced for %.2f s (%s)", delay, pace.reason or "no reason")
            await self._rpc.sleep(delay)
            return "paced"
        return await self._run_task(response.task)

    async def _run_task(self, task: edge_pb2.Task) -> Outcome:
        self._progress.task_id = task.task_id
        self._progress.cohort_id = task.cohort_id
        self._progress.version = int(task.version)
        self._set_phase("artifact")
        if self.hooks.on_task is not None:
            self.hooks.on_task(task)
        with log_context(cohort=task.cohort_id, version=int(task.version)):
            logger.info(
                "task %s: member %d of cohort %s, version %d, rank %d, %d steps",
                task.task_id,
                task.member_index,
                task.cohort_id,
                task.version,
                task.rank,
                task.local_steps,
            )
            try:
                details = await self._task_steps(task)
            except TaskAbandoned as exc:
                logger.warning("task %s abandoned: %s", task.task_id, exc)
                self._finish_task(done=False)
                self.hooks.emit("task_abandoned", task_id=task.task_id, reason=str(exc))
                return "abandoned"
            except _Vanish as exc:
                logger.info("task %s: device vanished at %s (simulated)", task.task_id, exc)
                self._finish_task(done=False)
                self.hooks.emit("task_abandoned", task_id=task.task_id, reason=f"vanished: {exc}")
                return "abandoned"
            except asyncio.CancelledError:
                logger.warning("task %s abandoned: the agent is stopping", task.task_id)
                self._finish_task(done=False)
                raise
            self._finish_task(done=True)
            logger.info("task %s done", task.task_id)
            self.hooks.emit("task_done", task_id=task.task_id, **details)
            return "done"

    def _maybe_vanish(self, task: edge_pb2.Task, phase: str) -> None:
        if self.hooks.drop is not None and self.hooks.drop(task, phase):
            raise _Vanish(phase)

    async def _task_steps(self, task: edge_pb2.Task) -> dict[str, Any]:
        exchange = SecAggExchange(self._rpc, task, identity=self._identity.key())

        # Keys first: AdvertiseKeys, then the key broadcast and our encrypted shares,
        # while the artifact downloads and loads. The key stages have a deadline counted
        # from the cohort's seal (seconds) and the first download of a base can take
        # longer than that on a slow link or a busy device; waiting for it first made
        # whole cohorts abort with no keys advertised. The upload deadline covers both.
        self._set_phase("keys")
        preparing = asyncio.ensure_future(self._trainer.prepare_model(task))
        try:
            self._maybe_vanish(task, "keys")
            await _first_failure(asyncio.ensure_future(exchange.exchange_keys()), preparing)
            base, adapter = await preparing
        finally:
            if not preparing.done():
                preparing.cancel()
                with contextlib.suppress(asyncio.CancelledError, TaskAbandoned):
                    await preparing
        self._held_version = int(task.version)

        # Local training, heartbeating meanwhile.
        self._set_phase("training")
        self._maybe_vanish(task, "training")
        result = await self._trainer.train(task, base, adapter)

        # Share relay and the staleness weight, then mask and upload.
        weight = await exchange.await_relay()
        update = clipped_update(exchange.config, result.delta_b)
        if self.hooks.before_upload is not None:
            shapes = {name: result.delta_b[name].shape for name in update}
            plain = {n: v.reshape(shapes[n]).astype(np.float32) for n, v in update.items()}
            self.hooks.before_upload(task, plain, weight)
        rng = (
            None
            if self.seed is None
            else np.random.default_rng(task_seed(self.seed, task, "round"))
        )
        masked = mask(exchange.client, update, weight=weight, rng=rng)
        self._set_phase("upload")
        self._maybe_vanish(task, "upload")
        await exchange.upload(masked)

        # Unmasking: our shares of the survivors' seeds and the dropped clients' keys.
        self._set_phase("unmasking")
        await exchange.unmask()
        metrics = result.metrics
        return {
            "cohort_id": task.cohort_id,
            "version": int(task.version),
            "weight": weight,
            "loss_first": metrics.loss_first,
            "loss_last": metrics.loss_last,
            "train_seconds": metrics.seconds,
        }
