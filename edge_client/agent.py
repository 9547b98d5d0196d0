"""The edge agent: asks the coordinator for work and runs tasks, as ``edge.proto`` describes.

A task's life is train first, then aggregate securely with a cohort of devices that have
also finished (the contract is the top comment of ``estuary/proto/v1/edge.proto``):

1. GetTask (Pace → wait and ask again) gives a *training task*: no cohort, no
   secure-aggregation parameters.
2. The artifact manifest and the blobs it names that are not cached are fetched
   (resumable, SHA-256 verified) and loaded; the device trains locally, with a Heartbeat
   every ``heartbeat_s`` meanwhile, and keeps the update ΔB in memory.
3. GetTask with ``trained_task_id`` (held open up to 20 s while the cohort of finished
   devices forms; Pace when the wait is over, asking again with it) gives the *cohort
   task*: cohort, member index, secure-aggregation
   parameters, and the training task whose update it aggregates. FAILED_PRECONDITION
   instead means the coordinator no longer holds that training task: the update is
   dropped.
4. The update is clipped to the cohort's ``clip``; AdvertiseKeys / ShareKeys; the share
   relay and staleness weight; the masked upload; unmasking; DONE.

Any ABORTED, a refused request, a Heartbeat ABANDON or a cohort task that does not match
the update held drops the task (and the update) and the agent asks for work again. A
training task of another id offered while an update is held means the coordinator has
forgotten the held one: it is dropped and the new task trained.

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

The trained update and the secure-aggregation keys live only in memory: a device killed
after training, or mid-aggregation, cannot resume. On restart ``progress.json`` still
names the task; the agent records it as abandoned and asks for work with no
``trained_task_id`` (the coordinator then offers the training task again if it still
counts). :meth:`EdgeAgent.run` likewise drops an update still held when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import numpy as np

from edge_client.certificate import DeviceCertificate, renew_if_due
from edge_client.download import ArtifactDownloader
from edge_client.enrolment import Identity, enroll
from edge_client.errors import AgentError, TaskAbandoned
from edge_client.exchange import LONG_POLL_MARGIN_S, SecAggExchange, clipped_update, mask
from edge_client.hooks import AgentHooks, AgentStats
from edge_client.rpc import RPC_TIMEOUT_S, EdgeRpc
from edge_client.state import EdgeState, Progress
from edge_client.tls import ChannelTLS
from edge_client.training import HEARTBEAT_S, TaskTrainer, task_seed
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.log import log_context
from estuary.proto.v1 import edge_pb2
from estuary.transport import MAX_LONG_POLL_MS

if TYPE_CHECKING:
    from edge_client.train import TrainResult

__all__ = [
    "AgentError",
    "AgentHooks",
    "AgentStats",
    "EdgeAgent",
    "Outcome",
]

logger = logging.getLogger(__name__)

Outcome = Literal["paced", "trained", "done", "abandoned"]
"""What one :meth:`EdgeAgent.run_once` came to: a Pace honoured (or a refusal waited
out), a training task trained (its update now held), a cohort task DONE, or a task
dropped."""

_T = TypeVar("_T")

#: Random stretch of a Pace's retry-after: up to +20 %, so devices told the same
#: retry-after spread out instead of arriving together.
PACE_JITTER = 0.2
#: Backoff attempt whose delay is waited after a GetTask refused outright (neither
#: transient nor an auth failure): a ceiling of 0.5 s × 2**4 = 8 s, long enough not to
#: hammer a coordinator that refuses, short enough to notice when it stops refusing.
_REFUSED_GET_TASK_ATTEMPT = 4


class _Vanish(Exception):
    """A ``drop`` hook simulated the device disappearing."""


@dataclass(frozen=True)
class _Trained:
    """A trained update held in memory until its cohort task comes.

    Attributes
    ----------
    task
        The training task it came from (its id is the GetTask's ``trained_task_id``).
    result
        ΔB (unclipped: the cohort task's ``secagg.clip`` applies) and the metrics.
    """

    task: edge_pb2.Task
    result: TrainResult


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
        # The update of a finished training task, until its cohort task ends (in memory
        # only: see the module docstring).
        self._trained: _Trained | None = None

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

    def _begin(self, task: edge_pb2.Task, *, phase: str) -> None:
        """Record ``task`` (training or cohort) as the one under way, at ``phase``."""
        self._progress.task_id = task.task_id
        self._progress.cohort_id = task.cohort_id or None
        self._progress.version = int(task.version)
        self._set_phase(phase)

    @property
    def trained_task_id(self) -> str | None:
        """Id of the training task whose update is held, waiting for its cohort task."""
        return None if self._trained is None else self._trained.task.task_id

    def _recover(self) -> None:
        """Count a task left unfinished by a previous run as abandoned (once per agent)."""
        if self._recovered:
            return
        self._recovered = True
        if self._progress.task_id is not None:
            logger.warning(
                "task %s (cohort %s) was under way (phase %s) when the agent last stopped; "
                "abandoned: its trained update and secure-aggregation keys lived only in "
                "memory",
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
        """Count the task under way done or abandoned; forget it and any update held."""
        if done:
            self._progress.tasks_done += 1
            self.stats.tasks_done += 1
        else:
            self._progress.tasks_abandoned += 1
            self.stats.tasks_abandoned += 1
        self._trained = None
        self._progress.task_id = None
        self._progress.cohort_id = None
        self._progress.version = None
        self._progress.phase = None
        self._save_progress()

    def _abandon(self, task_id: str, reason: str) -> None:
        """Drop task ``task_id`` (and the update held, if any) for ``reason``."""
        logger.warning("task %s abandoned: %s", task_id, reason)
        self._finish_task(done=False)
        self.hooks.emit("task_abandoned", task_id=task_id, reason=reason)

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

    def _ended(self) -> int:
        """Tasks ended (done or abandoned) in this session."""
        return self.stats.tasks_done + self.stats.tasks_abandoned

    async def run(
        self, *, stop: asyncio.Event | None = None, max_tasks: int | None = None
    ) -> AgentStats:
        """Ask for work and run tasks until ``stop`` is set or ``max_tasks`` have ended.

        Parameters
        ----------
        stop
            Set it to stop; a task under way, or an update waiting for its cohort, is
            abandoned (and recorded so).
        max_tasks
            Stop after this many tasks ended (done or abandoned; a task trained but not
            yet aggregated has not ended). ``None``: no limit.

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
        start = self._ended()
        try:
            while stop is None or not stop.is_set():
                if max_tasks is not None and self._ended() - start >= max_tasks:
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
                    await job
                except asyncio.CancelledError:
                    if stop is not None and stop.is_set():
                        break
                    raise
        finally:
            self._rpc.stop = None
            if self._trained is not None:
                # Nothing will ask for its cohort now, and a restart would lose it anyway.
                self._abandon(self._trained.task.task_id, "the agent is stopping")
            self._save_progress()  # the byte counters of the last Paces
        return self.stats

    async def run_once(self) -> Outcome:
        """Ask for work once (naming the update held, if any) and act on the answer.

        Returns
        -------
        str
            ``"paced"`` (after waiting the retry-after, or a backoff after a refusal),
            ``"trained"`` (a training task's update is now held), ``"done"`` or
            ``"abandoned"``.

        Raises
        ------
        AgentError
            As :meth:`run`.
        """
        self._require_ready()
        self._recover()
        trained = self._trained
        reporting = self.trained_task_id or ""
        request = edge_pb2.GetTaskRequest(
            held_version=self._held_version,
            held_artifacts=self.state.cached_artifacts(),
            trained_task_id=reporting,
            # Holding an update: the coordinator may hold the call until its cohort is
            # sealed (one call instead of a poll every retry-after while it forms).
            wait_ms=MAX_LONG_POLL_MS if reporting else 0,
        )
        try:
            response = await self._rpc.call(
                "GetTask",
                request,
                response_type=edge_pb2.GetTaskResponse,
                in_task=False,
                timeout=(
                    MAX_LONG_POLL_MS / 1000 + LONG_POLL_MARGIN_S if reporting else RPC_TIMEOUT_S
                ),
            )
        except grpc.aio.AioRpcError as exc:
            return await self._get_task_refused(exc, trained)
        if response.WhichOneof("outcome") != "task":
            await self._pace(response.pace)
            return "paced"
        if response.task.cohort_id:
            return await self._run_cohort_task(response.task)
        return await self._run_training_task(response.task)

    async def _get_task_refused(
        self, exc: grpc.aio.AioRpcError, trained: _Trained | None
    ) -> Outcome:
        """Act on a GetTask refused outright (neither transient nor an auth failure)."""
        if trained is not None and exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
            # The coordinator no longer holds the training task (deadline passed, device
            # silent, version too stale): the update can join no cohort. Ask again at
            # once, without it.
            self._abandon(
                trained.task.task_id,
                f"the coordinator no longer holds this training task: {exc.details()}",
            )
            return "abandoned"
        await self._back_off(f"GetTask refused ({exc.code().name}: {exc.details()})")
        return "paced"

    async def _back_off(self, why: str) -> None:
        """Wait as after a failed call, so a coordinator that refuses is not hammered."""
        delay = self._rpc.backoff(_REFUSED_GET_TASK_ATTEMPT)
        logger.warning("%s; asking again in %.1f s", why, delay)
        await self._rpc.sleep(delay)

    async def _pace(self, pace: edge_pb2.Pace) -> None:
        """Wait the Pace's retry-after, stretched by up to :data:`PACE_JITTER`."""
        delay = pace.retry_after_ms / 1000.0 * (1.0 + self._rng.uniform(0.0, PACE_JITTER))
        self.stats.paced += 1
        self.hooks.emit("paced", retry_after_ms=pace.retry_after_ms, reason=pace.reason)
        logger.debug("paced for %.2f s (%s)", delay, pace.reason or "no reason")
        await self._rpc.sleep(delay)

    def _maybe_vanish(self, task: edge_pb2.Task, phase: str) -> None:
        if self.hooks.drop is not None and self.hooks.drop(task, phase):
            raise _Vanish(phase)

    async def _guarded(self, task_id: str, steps: Awaitable[_T]) -> _T | None:
        """Await a task's ``steps``; on a drop, record the task abandoned and return None.

        A stop (cancellation) also records it abandoned, then propagates.
        """
        try:
            return await steps
        except TaskAbandoned as exc:
            self._abandon(task_id, str(exc))
        except _Vanish as exc:
            logger.info("task %s: device vanished at %s (simulated)", task_id, exc)
            self._finish_task(done=False)
            self.hooks.emit("task_abandoned", task_id=task_id, reason=f"vanished: {exc}")
        except asyncio.CancelledError:
            logger.warning("task %s abandoned: the agent is stopping", task_id)
            self._finish_task(done=False)
            raise
        return None

    # ------------------------------------------------------------------ training task

    async def _run_training_task(self, task: edge_pb2.Task) -> Outcome:
        """Train ``task`` and hold its update; replace an update the coordinator forgot."""
        held = self._trained
        if held is not None and held.task.task_id == task.task_id:
            # Not expected while GetTask names the update: keep it rather than train the
            # same task twice, and come back with it after a backoff.
            await self._back_off(
                f"training task {task.task_id} offered again while its update is held"
            )
            return "paced"
        if held is not None:
            self._abandon(
                held.task.task_id,
                f"the coordinator offered training task {task.task_id} instead: "
                "it no longer holds this one",
            )
        self._begin(task, phase="artifact")
        if self.hooks.on_task is not None:
            self.hooks.on_task(task)
        with log_context(version=int(task.version)):
            logger.info(
                "training task %s: version %d, rank %d, %d steps",
                task.task_id,
                task.version,
                task.rank,
                task.local_steps,
            )
            result = await self._guarded(task.task_id, self._train(task))
            if result is None:
                return "abandoned"
            self._trained = _Trained(task=task, result=result)
            self._set_phase("trained")
            metrics = result.metrics
            logger.info("task %s trained; asking for its cohort", task.task_id)
            self.hooks.emit(
                "task_trained",
                task_id=task.task_id,
                version=int(task.version),
                loss_first=metrics.loss_first,
                loss_last=metrics.loss_last,
                train_seconds=metrics.seconds,
            )
            return "trained"

    async def _train(self, task: edge_pb2.Task) -> TrainResult:
        """Fetch and load the task's artifact, then train (heartbeating meanwhile)."""
        base, adapter = await self._trainer.prepare_model(task)
        self._held_version = int(task.version)
        self._set_phase("training")
        self._maybe_vanish(task, "training")
        return await self._trainer.train(task, base, adapter)

    # ------------------------------------------------------------------ cohort task

    def _mismatch(self, task: edge_pb2.Task) -> str | None:
        """Say why cohort task ``task`` cannot aggregate the update held; None if it can."""
        held = self._trained
        if held is None:
            return f"it aggregates training task {task.trained_task_id!r}, but no update is held"
        if task.trained_task_id != held.task.task_id:
            return (
                f"it aggregates training task {task.trained_task_id!r}, but the update held "
                f"is of {held.task.task_id!r}"
            )
        if task.version != held.task.version:
            return (
                f"its version is {task.version}, but the update held trained on version "
                f"{held.task.version}"
            )
        return None

    async def _run_cohort_task(self, task: edge_pb2.Task) -> Outcome:
        """Aggregate the update held in cohort task ``task``; it ends either way."""
        problem = self._mismatch(task)
        held = self._trained
        if problem is not None or held is None:
            # A protocol error: joining would sum the wrong update, or none.
            dropped = task.task_id if held is None else held.task.task_id
            self._abandon(dropped, f"cohort task {task.task_id} refused: {problem}")
            return "abandoned"
        self._begin(task, phase="keys")
        if self.hooks.on_task is not None:
            self.hooks.on_task(task)
        with log_context(cohort=task.cohort_id, version=int(task.version)):
            logger.info(
                "cohort task %s: member %d of cohort %s, update of task %s, version %d",
                task.task_id,
                task.member_index,
                task.cohort_id,
                task.trained_task_id,
                task.version,
            )
            details = await self._guarded(task.task_id, self._aggregate(task, held.result))
            if details is None:
                return "abandoned"
            self._finish_task(done=True)
            logger.info("task %s done", task.task_id)
            self.hooks.emit("task_done", task_id=task.task_id, **details)
            return "done"

    async def _aggregate(self, task: edge_pb2.Task, result: TrainResult) -> dict[str, Any]:
        """Keys, relay and weight, masked upload, unmasking; return the task's details."""
        exchange = SecAggExchange(self._rpc, task, identity=self._identity.key())
        # Clipped before any key goes out: an update the session cannot carry (tensors
        # that disagree, values not finite) drops the task before it joins the cohort.
        update = clipped_update(exchange.config, result.delta_b)
        self._maybe_vanish(task, "keys")
        await exchange.exchange_keys()

        # Share relay and the staleness weight, then mask and upload.
        weight = await exchange.await_relay()
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
            "trained_task_id": task.trained_task_id,
            "version": int(task.version),
            "weight": weight,
            "loss_first": metrics.loss_first,
            "loss_last": metrics.loss_last,
            "train_seconds": metrics.seconds,
        }
