"""The edge agent: asks the coordinator for work and runs tasks, as ``edge.proto`` describes.

One task, in order (the contract is the top comment of ``estuary/proto/v1/edge.proto``):
GetTask (Pace → wait and ask again) → fetch the artifact manifest and the blobs it names
that are not cached (resumable, SHA-256 verified) → AdvertiseKeys / ShareKeys →
train locally (Heartbeat meanwhile) → share relay and staleness weight → masked upload
→ unmasking → DONE. Any ABORTED, a refused request or a Heartbeat ABANDON drops the task
and the agent asks for work again.

Transport failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried with
exponential backoff and full jitter; UNAUTHENTICATED stops the agent with
:class:`AgentError`. Every request but Enroll carries a fresh ``DeviceAuth`` (new nonce,
new timestamp) per attempt, because the coordinator refuses a nonce it has seen.

Secure-aggregation keys live only in memory: a device killed mid-task cannot resume it.
On restart ``progress.json`` still names the task; the agent records it as abandoned and
asks for work (the coordinator treats that GetTask as the abandonment).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message as ProtoMessage

from edge_client.state import ArtifactCorrupt, EdgeState, Progress, StateError
from estuary import __version__
from estuary.artifacts import ADAPTER_FILE, EdgeArtifactManifest, ManifestError
from estuary.auth import device_id_for, raw_public_key, sign_request
from estuary.log import log_context
from estuary.proto.session import session_from_proto
from estuary.proto.stages import stage_name
from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from estuary.transport import DEFAULT_CHUNK_BYTES, MAX_LONG_POLL_MS, channel_options
from secure_agg import Client, ProtocolViolation, SecAggError, SessionConfig
from secure_agg.numerics import clip_update

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from torch import nn

    from estuary.adapters.lora import GlobalAdapter

__all__ = [
    "AgentError",
    "AgentHooks",
    "AgentStats",
    "EdgeAgent",
    "Outcome",
]

logger = logging.getLogger(__name__)

Outcome = Literal["paced", "done", "abandoned"]
_Response = TypeVar("_Response", bound=ProtoMessage)


#: First retry delay in seconds; doubles per failed attempt up to ``max_backoff_s``, with
#: full jitter (uniform in [0, delay]) so a fleet that lost the coordinator at the same
#: moment does not come back in lockstep.
BACKOFF_BASE_S = 0.5
#: Random stretch of a Pace's retry-after: up to +20 %, so devices told the same
#: retry-after spread out instead of arriving together.
PACE_JITTER = 0.2
#: Deadline of a unary call, seconds: generous for a phone on a slow link, yet short
#: enough that a black-holed request is retried well inside a cohort's deadline.
RPC_TIMEOUT_S = 30.0
#: Extra time a long poll is given beyond the server's own bound, so the server answers
#: "pending" before the client's deadline fires.
LONG_POLL_MARGIN_S = 10.0
#: Seconds between Heartbeats while training: a few, so the coordinator notices a device
#: that vanished long before the upload deadline, at negligible traffic.
HEARTBEAT_S = 5.0
#: Deadline of a whole upload stream: masked inputs are a few MB at most.
UPLOAD_TIMEOUT_S = 300.0
#: Times a blob is downloaded again after failing its hash check before the task is
#: abandoned: one retry covers a torn .part after a crash; more means the server is bad.
MAX_HASH_FAILURES = 2
#: How long after the upload deadline the agent keeps polling before giving up on a
#: cohort the coordinator never closes (unmasking happens after the deadline).
POST_DEADLINE_GRACE_S = 600.0

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


_S = edge_pb2.SecAggStage


class AgentError(Exception):
    """The agent cannot go on: not enrolled, revoked, refused, or misconfigured."""


class _Abandon(Exception):
    """Internal: drop the current task for ``reason`` and ask for work again."""


class _Stopped(asyncio.CancelledError):
    """Internal: the stop event was set while waiting to retry; unwinds like a cancel."""


class _Vanish(Exception):
    """Internal: a ``drop`` hook simulated the device disappearing."""


@dataclass
class AgentHooks:
    """Optional callbacks, for the simulator, metrics and tests.

    Attributes
    ----------
    on_task
        Called with every task received, before any work on it.
    before_upload
        Called with the ΔB that enters secure aggregation (name → float32 array of the
        tensor's shape, padded to ``r_max`` and already L2-clipped to the cohort's
        ``clip``, so ``weight`` × this is exactly what the unmasked sum holds up to
        fixed-point rounding) and the staleness weight, just before masking.
    drop
        Return True to simulate the device vanishing at ``phase`` (``"keys"``,
        ``"training"``, ``"upload"``): the agent sends nothing more for that task.
    on_event
        Called with an event name (``paced``, ``task_done``, ``task_abandoned``,
        ``retry``) and details.
    """

    on_task: Callable[[edge_pb2.Task], None] | None = None
    before_upload: (
        Callable[[edge_pb2.Task, dict[str, npt.NDArray[np.float32]], float], None] | None
    ) = None
    drop: Callable[[edge_pb2.Task, str], bool] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None


@dataclass
class AgentStats:
    """Counters of one agent's session (since it was constructed).

    Attributes
    ----------
    tasks_done, tasks_abandoned
        Tasks that reached DONE, and tasks dropped (abort, refusal, vanish, restart).
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


@dataclass
class _Model:
    key: str
    base: nn.Module


class EdgeAgent:
    """One device's agent.

    Parameters
    ----------
    state
        The device's state directory.
    target
        host:port of the coordinator.
    credentials
        TLS credentials of the channel; ``None`` connects without TLS (loopback and
        simulation only).
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
        Wall clock in Unix seconds (auth timestamps, deadlines).
    heartbeat_s
        Seconds between Heartbeats while training (> 0).
    """

    def __init__(
        self,
        state: EdgeState,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        data: bytes | Path | None,
        threads: int = 2,
        max_backoff_s: float = 300.0,
        hooks: AgentHooks | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
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
        self._rng = random.Random(seed)
        self._channel: Any = None
        self._stub: Any = None
        self._key: Ed25519PrivateKey | None = None
        self._device_id = ""
        self._progress = state.load_progress()
        self._base_up = self._progress.bytes_up
        self._base_down = self._progress.bytes_down
        self._recovered = False
        self._held_version = 0
        self._model: _Model | None = None
        self._training_data: bytes | Path | None = None
        self._training: asyncio.Future[Any] | None = None
        self._stop: asyncio.Event | None = None

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

    # ------------------------------------------------------------------ plumbing

    def _get_stub(self) -> Any:
        if self._stub is None:
            options = channel_options()
            if self.credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self.credentials, options=options
                )
            # The generated stub module is untyped; its methods are used as Any.
            self._stub = edge_pb2_grpc.EdgeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def close(self) -> None:
        """Close the channel and wait for a training run still in progress to finish."""
        if self._training is not None and not self._training.done():
            await asyncio.wait({self._training})
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None

    def _emit(self, event: str, **details: Any) -> None:
        if self.hooks.on_event is not None:
            self.hooks.on_event(event, details)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _identity(self) -> Ed25519PrivateKey:
        if self._key is None:
            enrolment = self.state.load_enrolment()
            if enrolment is None:
                raise AgentError(
                    f"device not enrolled ({self.state.enrolment_path} is missing); "
                    "run `estuary edge enroll` first"
                )
            try:
                key = self.state.identity_key()
            except StateError as exc:
                raise AgentError(str(exc)) from exc
            device_id = device_id_for(raw_public_key(key))
            if device_id != enrolment.device_id:
                raise AgentError(
                    f"{self.state.identity_path} belongs to device {device_id}, but "
                    f"{self.state.enrolment_path} names {enrolment.device_id}"
                )
            self._key = key
            self._device_id = device_id
        return self._key

    def _sign(self, method: str, message: Any) -> None:
        """Set ``message.auth`` to a fresh signature over ``message`` with auth cleared."""
        key = self._identity()
        message.ClearField("auth")
        body = hashlib.sha256(message.SerializeToString()).digest()
        signed = sign_request(key, method, body, timestamp_ms=self._now_ms())
        message.auth.CopyFrom(
            common_pb2.DeviceAuth(
                device_id=signed.device_id,
                timestamp_ms=signed.timestamp_ms,
                nonce=signed.nonce,
                signature=signed.signature,
            )
        )

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, BACKOFF_BASE_S * 2.0 ** min(attempt, 30))
        return self._rng.uniform(0.0, ceiling)

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, waking early if the stop event is set."""
        if self._stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _retry_pause(self, method: str, exc: grpc.aio.AioRpcError, attempt: int) -> None:
        delay = self._backoff(attempt)
        logger.warning(
            "%s failed (%s: %s); retrying in %.2f s (attempt %d)",
            method,
            exc.code().name,
            exc.details(),
            delay,
            attempt + 1,
        )
        self._emit("retry", method=method, code=exc.code().name, delay_s=delay)
        await self._sleep(delay)
        if self._stop is not None and self._stop.is_set():
            # Without this a refused connection fails at once and, the stop event being
            # set, the sleep returns at once: the loop would spin without yielding.
            raise _Stopped

    def _refused(self, method: str, exc: grpc.aio.AioRpcError, *, in_task: bool) -> Exception:
        """Return the exception for a non-transient refusal of ``method``."""
        code = exc.code()
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return AgentError(f"device not enrolled or revoked: {method}: {exc.details()}")
        if in_task:
            return _Abandon(f"{method} refused ({code.name}): {exc.details()}")
        error: Exception = exc
        return error

    async def _call(
        self,
        method: str,
        request: ProtoMessage,
        *,
        response_type: type[_Response],
        timeout: float = RPC_TIMEOUT_S,
        sign: bool = True,
        in_task: bool = True,
    ) -> _Response:
        """Call unary ``method``, retrying transient failures with a fresh signature."""
        rpc = getattr(self._get_stub(), method)
        attempt = 0
        while True:
            if sign:
                self._sign(method, request)
            self.stats.bytes_up += request.ByteSize()
            try:
                response = await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT:
                    await self._retry_pause(method, exc, attempt)
                    attempt += 1
                    continue
                raise self._refused(method, exc, in_task=in_task) from None
            if not isinstance(response, response_type):  # pragma: no cover - stub contract
                raise AgentError(f"{method}: unexpected response {type(response).__name__}")
            self.stats.bytes_down += response.ByteSize()
            return response

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
            self._emit(
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
        if not token:
            raise ValueError("token: must be non-empty")
        if not device_class:
            raise ValueError("device_class: must be non-empty")
        existing = self.state.load_enrolment()
        if existing is not None:
            raise AgentError(
                f"already enrolled as device {existing.device_id} (class "
                f"{existing.device_class}) with {existing.coordinator}; to enrol again, "
                f"remove {self.state.enrolment_path} and {self.state.identity_path}"
            )
        key = self.state.identity_key(create=True)
        public = raw_public_key(key)
        request = edge_pb2.EnrollRequest(
            token=token,
            identity_public_key=public,
            device_class=device_class,
            client_version=__version__,
        )
        try:
            response = await self._call(
                "Enroll",
                request,
                response_type=edge_pb2.EnrollResponse,
                sign=False,
                in_task=False,
            )
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"enrolment refused ({exc.code().name}): {exc.details()}") from None
        except AgentError as exc:
            raise AgentError(f"enrolment refused: {exc}") from None
        expected = device_id_for(public)
        if response.device_id != expected:
            raise AgentError(
                f"coordinator assigned device id {response.device_id!r}, but this key's id "
                f"is {expected!r}; refusing the enrolment"
            )
        enrolment = EdgeState.new_enrolment(
            device_id=response.device_id,
            device_class=response.device_class.name or device_class,
            rank=int(response.device_class.rank),
            r_max=int(response.r_max),
            coordinator=self.target,
        )
        self.state.save_enrolment(enrolment)
        logger.info(
            "enrolled as device %s (class %s, rank %d, r_max %d)",
            enrolment.device_id,
            enrolment.device_class,
            enrolment.rank,
            enrolment.r_max,
        )
        return dataclasses.asdict(enrolment)

    # ------------------------------------------------------------------ main loop

    def _require_ready(self) -> None:
        if self.data is None:
            raise AgentError(
                "this device has no training data (data_dir is not set), so it cannot take tasks"
            )
        self._identity()

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
        self._stop = stop
        ended = 0
        try:
            while stop is None or not stop.is_set():
                if max_tasks is not None and ended >= max_tasks:
                    break
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
            self._stop = None
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
            response = await self._call(
                "GetTask", request, response_type=edge_pb2.GetTaskResponse, in_task=False
            )
        except grpc.aio.AioRpcError as exc:
            # Not transient and not an auth failure: the coordinator refused the request
            # itself. Wait as after a failure and ask again.
            delay = self._backoff(4)
            logger.warning(
                "GetTask refused (%s: %s); asking again in %.1f s",
                exc.code().name,
                exc.details(),
                delay,
            )
            await self._sleep(delay)
            return "paced"
        if response.WhichOneof("outcome") != "task":
            pace = response.pace
            delay = pace.retry_after_ms / 1000.0 * (1.0 + self._rng.uniform(0.0, PACE_JITTER))
            self.stats.paced += 1
            self._emit("paced", retry_after_ms=pace.retry_after_ms, reason=pace.reason)
            logger.debug("paced for %.2f s (%s)", delay, pace.reason or "no reason")
            await self._sleep(delay)
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
            except _Abandon as exc:
                logger.warning("task %s abandoned: %s", task.task_id, exc)
                self._finish_task(done=False)
                self._emit("task_abandoned", task_id=task.task_id, reason=str(exc))
                return "abandoned"
            except _Vanish as exc:
                logger.info("task %s: device vanished at %s (simulated)", task.task_id, exc)
                self._finish_task(done=False)
                self._emit("task_abandoned", task_id=task.task_id, reason=f"vanished: {exc}")
                return "abandoned"
            except asyncio.CancelledError:
                logger.warning("task %s abandoned: the agent is stopping", task.task_id)
                self._finish_task(done=False)
                raise
            self._finish_task(done=True)
            logger.info("task %s done", task.task_id)
            self._emit("task_done", task_id=task.task_id, **details)
            return "done"

    def _maybe_vanish(self, task: edge_pb2.Task, phase: str) -> None:
        if self.hooks.drop is not None and self.hooks.drop(task, phase):
            raise _Vanish(phase)

    async def _task_steps(self, task: edge_pb2.Task) -> dict[str, Any]:
        base, adapter = await self._prepare_model(task)
        self._held_version = int(task.version)
        config = self._session_config(task)
        client = Client(int(task.member_index), config=config)

        # Keys first: AdvertiseKeys, then the key broadcast and our encrypted shares.
        self._set_phase("keys")
        self._maybe_vanish(task, "keys")
        await self._send(task, _S.SECAGG_STAGE_ADVERTISE_KEYS, client.advertise().encode())
        broadcast = await self._await_stage(task, after=_S.SECAGG_STAGE_ADVERTISE_KEYS)
        self._expect(broadcast, _S.SECAGG_STAGE_SHARE_KEYS)
        share_keys = self._handle(client, broadcast.payload)
        if share_keys is None:
            raise _Abandon("the key broadcast produced no ShareKeys reply")
        await self._send(task, _S.SECAGG_STAGE_SHARE_KEYS, share_keys.encode())

        # Local training, heartbeating meanwhile.
        self._set_phase("training")
        self._maybe_vanish(task, "training")
        result = await self._train(task, base, adapter)

        # Share relay and the staleness weight, then mask and upload.
        relay = await self._await_stage(task, after=_S.SECAGG_STAGE_SHARE_KEYS)
        self._expect(relay, _S.SECAGG_STAGE_MASKED_INPUT)
        weight = float(relay.weight)
        self._handle(client, relay.payload)
        update = self._update(task, config, result.delta_b)
        if self.hooks.before_upload is not None:
            shapes = {name: result.delta_b[name].shape for name in update}
            plain = {n: v.reshape(shapes[n]).astype(np.float32) for n, v in update.items()}
            self.hooks.before_upload(task, plain, weight)
        rng = None if self.seed is None else np.random.default_rng(self._task_seed(task, "round"))
        try:
            masked = client.submit(update, weight=weight, rng=rng).encode()
        except (SecAggError, ValueError) as exc:
            raise _Abandon(f"cannot mask the update: {exc}") from None
        self._set_phase("upload")
        self._maybe_vanish(task, "upload")
        await self._upload(task, masked)

        # Unmasking: our shares of the survivors' seeds and the dropped clients' keys.
        self._set_phase("unmasking")
        request = await self._await_stage(task, after=_S.SECAGG_STAGE_MASKED_INPUT)
        self._expect(request, _S.SECAGG_STAGE_UNMASKING)
        response = self._handle(client, request.payload)
        if response is None:
            raise _Abandon("the unmask request produced no reply")
        await self._send(task, _S.SECAGG_STAGE_UNMASKING, response.encode())
        final = await self._await_stage(task, after=_S.SECAGG_STAGE_UNMASKING)
        self._expect(final, _S.SECAGG_STAGE_DONE)
        metrics = result.metrics
        return {
            "cohort_id": task.cohort_id,
            "version": int(task.version),
            "weight": weight,
            "loss_first": metrics.loss_first,
            "loss_last": metrics.loss_last,
            "train_seconds": metrics.seconds,
        }

    # ------------------------------------------------------------------ secure aggregation

    @staticmethod
    def _session_config(task: edge_pb2.Task) -> SessionConfig:
        try:
            return session_from_proto(task.secagg)
        except (ValueError, SecAggError) as exc:
            raise _Abandon(f"unusable secure-aggregation parameters: {exc}") from None

    @staticmethod
    def _handle(client: Client, payload: bytes) -> Any:
        try:
            return client.handle(payload)
        except (ProtocolViolation, SecAggError) as exc:
            raise _Abandon(f"refused a secure-aggregation message: {exc}") from None

    @staticmethod
    def _expect(message: edge_pb2.SecAggServerMessage, stage: int) -> None:
        if message.stage != stage:
            raise _Abandon(
                f"expected {stage_name(stage)}, the coordinator sent {stage_name(message.stage)}"
            )

    @staticmethod
    def _update(
        task: edge_pb2.Task, config: SessionConfig, delta_b: dict[str, npt.NDArray[np.float32]]
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Flatten ΔB row-major per the session's tensors and clip it as masking will."""
        flat: dict[str, npt.NDArray[np.float32]] = {}
        for name, length in config.tensors:
            value = delta_b.get(name)
            if value is None:
                raise _Abandon(f"the session names tensor {name!r}, which the adapter lacks")
            if value.size != length:
                raise _Abandon(
                    f"tensor {name!r} has {value.size} elements, the session expects {length}"
                )
            flat[name] = np.ascontiguousarray(value).reshape(-1)  # (out * r_max,) row-major
        extra = sorted(set(delta_b) - set(flat))
        if extra:
            raise _Abandon(f"the session omits adapter tensors {extra}")
        fp = config.fixed_point
        return clip_update(flat, clip=fp.clip, per_tensor=fp.per_tensor)

    async def _send(self, task: edge_pb2.Task, stage: int, payload: bytes) -> None:
        request = edge_pb2.SecAggClientMessage(
            cohort_id=task.cohort_id,
            stage=stage,  # type: ignore[arg-type]
            payload=payload,
        )
        ack = await self._call("SendSecAgg", request, response_type=edge_pb2.SecAggAck)
        if ack.stage == _S.SECAGG_STAGE_ABORTED:
            raise _Abandon(f"the cohort aborted ({stage_name(stage)} acknowledged as ABORTED)")

    async def _await_stage(
        self, task: edge_pb2.Task, *, after: int
    ) -> edge_pb2.SecAggServerMessage:
        """Long-poll for the first server message of a stage later than ``after``."""
        give_up_ms = (
            task.deadline_ms + int(POST_DEADLINE_GRACE_S * 1000) if task.deadline_ms else None
        )
        while True:
            request = edge_pb2.AwaitSecAggRequest(
                cohort_id=task.cohort_id,
                after_stage=after,  # type: ignore[arg-type]
                wait_ms=MAX_LONG_POLL_MS,
            )
            response = await self._call(
                "AwaitSecAgg",
                request,
                response_type=edge_pb2.SecAggServerMessage,
                timeout=MAX_LONG_POLL_MS / 1000 + LONG_POLL_MARGIN_S,
            )
            if response.stage == _S.SECAGG_STAGE_ABORTED or response.abort_reason:
                raise _Abandon(f"the cohort aborted: {response.abort_reason or 'no reason given'}")
            if not response.pending:
                if response.stage <= after:
                    raise _Abandon(
                        f"asked for a stage after {stage_name(after)}, got "
                        f"{stage_name(response.stage)}"
                    )
                return response
            if give_up_ms is not None and self._now_ms() > give_up_ms:
                raise _Abandon(
                    f"still waiting after {stage_name(after)} "
                    f"{POST_DEADLINE_GRACE_S:.0f} s past the task's deadline"
                )

    async def _upload(self, task: edge_pb2.Task, payload: bytes) -> None:
        digest = hashlib.sha256(payload).hexdigest()
        if task.deadline_ms and self._now_ms() > task.deadline_ms:
            raise _Abandon("the upload deadline has passed")
        stub = self._get_stub()
        attempt = 0
        while True:
            header = edge_pb2.UploadHeader(
                task_id=task.task_id,
                cohort_id=task.cohort_id,
                total_bytes=len(payload),
                sha256=digest,
            )
            self._sign("UploadMasked", header)
            chunks = [edge_pb2.UploadChunk(header=header)]
            chunks.extend(
                edge_pb2.UploadChunk(data=payload[i : i + DEFAULT_CHUNK_BYTES])
                for i in range(0, len(payload), DEFAULT_CHUNK_BYTES)
            )
            self.stats.bytes_up += sum(c.ByteSize() for c in chunks)
            try:
                ack = await stub.UploadMasked(iter(chunks), timeout=UPLOAD_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT:
                    await self._retry_pause("UploadMasked", exc, attempt)
                    attempt += 1
                    continue
                raise self._refused("UploadMasked", exc, in_task=True) from None
            self.stats.bytes_down += ack.ByteSize()
            if not ack.accepted:
                raise _Abandon("the coordinator did not accept the masked upload")
            logger.debug(
                "uploaded %d masked bytes%s", len(payload), " (duplicate)" if ack.duplicate else ""
            )
            return

    # ------------------------------------------------------------------ training

    def _task_seed(self, task: edge_pb2.Task, purpose: str) -> int:
        material = f"{self.seed if self.seed is not None else ''}/{purpose}/{task.task_id}"
        return int.from_bytes(hashlib.sha256(material.encode()).digest()[:4], "big")

    async def _resolve_data(self) -> bytes | Path:
        if self._training_data is None:
            data = self.data
            if data is None:  # pragma: no cover - _require_ready refuses first
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
            self._training_data = data
        return self._training_data

    async def _train(self, task: edge_pb2.Task, base: nn.Module, adapter: GlobalAdapter) -> Any:
        from edge_client.train import train_adapter

        data = await self._resolve_data()
        if self._training is not None and not self._training.done():
            # An abandoned task's training still runs on the shared base; adapters
            # attached twice would collide.
            await asyncio.wait({self._training})
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
                seed=self._task_seed(task, "train"),
            )
        )
        self._training = future
        while True:
            done, _ = await asyncio.wait({future}, timeout=self.heartbeat_s)
            if done:
                break
            beat = edge_pb2.HeartbeatRequest(task_id=task.task_id, steps_done=0)
            answer = await self._call("Heartbeat", beat, response_type=edge_pb2.HeartbeatResponse)
            if answer.action == edge_pb2.HeartbeatResponse.ACTION_ABANDON:
                raise _Abandon("the coordinator asked to abandon the task (Heartbeat)")
        try:
            return future.result()
        except ValueError as exc:
            raise _Abandon(f"training refused the task's parameters: {exc}") from None

    # ------------------------------------------------------------------ artifacts

    async def _prepare_model(self, task: edge_pb2.Task) -> tuple[nn.Module, GlobalAdapter]:
        """Fetch what the task's artifact needs; return the base (cached) and the adapter."""
        from estuary.adapters.lora import GlobalAdapter
        from estuary.compress import load_compressed

        ref = task.artifact
        if not ref.sha256:
            raise _Abandon("the task names no artifact")
        await self._fetch(ref.sha256, int(ref.size_bytes))
        try:
            manifest = EdgeArtifactManifest.from_json(self.state.read_artifact(ref.sha256))
        except ManifestError as exc:
            raise _Abandon(f"artifact {ref.sha256}: {exc}") from None
        files = dict(manifest.files)
        for digest in sorted(set(files.values())):
            await self._fetch(digest, None)
        try:
            directory = self.state.materialise(ref.sha256, files)
        except StateError as exc:
            raise _Abandon(str(exc)) from None
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
            raise _Abandon(f"artifact unusable: {exc}") from None
        served = await self._install_served(manifest)
        self.state.prune_artifacts({ref.sha256, *files.values(), *served.values()})
        return model.base, adapter

    async def _install_served(self, manifest: EdgeArtifactManifest) -> dict[str, str]:
        """Fetch the artifact's int8 ONNX export into ``served/`` (for edge infer)."""
        onnx = dict(manifest.onnx)
        if not onnx:
            return {}
        for digest in sorted(set(onnx.values())):
            await self._fetch(digest, None)
        try:
            where = self.state.install_served(onnx)
        except StateError as exc:
            raise _Abandon(str(exc)) from None
        logger.debug("serving model of version %s installed in %s", manifest.version, where)
        return onnx

    async def _fetch(self, digest: str, size: int | None) -> None:
        """Download blob ``digest`` into the cache unless it is there (resumable, verified)."""
        try:
            if self.state.has_artifact(digest):
                return
        except ValueError as exc:
            raise _Abandon(f"bad artifact digest: {exc}") from None
        stub = self._get_stub()
        failures = 0
        attempt = 0
        while True:
            offset = self.state.partial_size(digest)
            if size is not None and offset > size:
                self.state.discard_partial(digest)
                offset = 0
            request = edge_pb2.FetchArtifactRequest(sha256=digest, offset=offset)
            self._sign("FetchArtifact", request)
            self.stats.bytes_up += request.ByteSize()
            total: int | None = None
            try:
                async for chunk in stub.FetchArtifact(request):
                    self.stats.bytes_down += chunk.ByteSize()
                    total = int(chunk.total_bytes)
                    try:
                        offset = self.state.append_partial(
                            digest, offset=int(chunk.offset), data=chunk.data
                        )
                    except StateError as exc:
                        raise _Abandon(f"artifact {digest}: {exc}") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT:
                    await self._retry_pause("FetchArtifact", exc, attempt)
                    attempt += 1
                    continue
                raise self._refused("FetchArtifact", exc, in_task=True) from None
            if total is None:  # no chunk at all: an empty blob, or the resume point was the end
                total = offset
                self.state.append_partial(digest, offset=offset, data=b"")
            if offset < total:
                logger.warning("artifact %s: stream ended at %d of %d bytes", digest, offset, total)
                await self._sleep(self._backoff(attempt))
                if self._stop is not None and self._stop.is_set():
                    raise _Stopped
                attempt += 1
                continue
            try:
                self.state.commit_artifact(digest)
            except ArtifactCorrupt as exc:
                failures += 1
                logger.warning("%s", exc)
                if failures >= MAX_HASH_FAILURES:
                    raise _Abandon(
                        f"artifact {digest} failed its hash check {failures} times"
                    ) from None
                continue
            logger.debug("fetched artifact %s (%d bytes)", digest, total)
            return
