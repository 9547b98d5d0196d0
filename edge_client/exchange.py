"""The device's side of a cohort's secure aggregation, carried over the EdgeService.

The protocol itself is :class:`secure_agg.Client`, a pure state machine; this module
moves its messages. Client messages go up with SendSecAgg; the server's messages come
down by long-polling AwaitSecAgg for the first stage later than the one the device has
seen; the masked input goes up as an UploadMasked stream. In order:

1. :meth:`SecAggExchange.exchange_keys`: AdvertiseKeys, then the key broadcast is
   answered with our encrypted shares (ShareKeys). The update is already trained: the
   cohort task comes only after the training task is done.
2. :meth:`SecAggExchange.await_relay`: the shares relayed to us and our staleness weight.
3. :func:`clipped_update` and :func:`mask`: ΔB flattened and clipped per the session,
   then scaled, encoded and masked; :meth:`SecAggExchange.upload` sends it.
4. :meth:`SecAggExchange.unmask`: in active-adversary mode first our signature on the
   survivor set the coordinator announces (ConsistencyCheck); then our shares of the
   survivors' seeds and the dropped members' keys, then the cohort's DONE.

Active-adversary mode (the task's ``secagg.active``, the coordinator's default) signs
our keys and the survivor set with the device's identity key, and checks the other
members' signatures against the identity keys the task lists. A coordinator that shows
different survivor sets to different members cannot collect t signatures on both, so
every member it lied to refuses the unmask request instead of revealing a share.

Anything the coordinator sends that the client refuses, an ABORTED cohort, or a cohort
still open long after its deadline abandons the task
(:class:`~edge_client.errors.TaskAbandoned`); the client's keys live only in memory.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_client.errors import TaskAbandoned
from edge_client.rpc import EdgeRpc
from estuary.auth import raw_public_key
from estuary.proto.session import identities_from_proto, session_from_proto
from estuary.proto.stages import stage_name
from estuary.proto.v1 import edge_pb2
from estuary.transport import DEFAULT_CHUNK_BYTES, MAX_LONG_POLL_MS
from secure_agg import Client, ProtocolViolation, SecAggError, SessionConfig
from secure_agg.numerics import clip_update

__all__ = [
    "LONG_POLL_MARGIN_S",
    "POST_DEADLINE_GRACE_S",
    "UPLOAD_TIMEOUT_S",
    "SecAggExchange",
    "clipped_update",
    "mask",
    "peer_identities",
    "session_config",
]

logger = logging.getLogger(__name__)

_S = edge_pb2.SecAggStage

#: Extra time a long poll is given beyond the server's own bound, so the server answers
#: "pending" before the client's deadline fires.
LONG_POLL_MARGIN_S = 10.0
#: Deadline of a whole upload stream: masked inputs are a few MB at most.
UPLOAD_TIMEOUT_S = 300.0
#: How long after the upload deadline the agent keeps polling before giving up on a
#: cohort the coordinator never closes (unmasking happens after the deadline).
POST_DEADLINE_GRACE_S = 600.0


def session_config(task: edge_pb2.Task) -> SessionConfig:
    """Return the secure-aggregation session of ``task``.

    Raises
    ------
    TaskAbandoned
        If the task's parameters do not make a valid session.
    """
    try:
        return session_from_proto(task.secagg)
    except (ValueError, SecAggError) as exc:
        raise TaskAbandoned(f"unusable secure-aggregation parameters: {exc}") from None


def peer_identities(
    task: edge_pb2.Task, identity: Ed25519PrivateKey
) -> dict[int, Ed25519PublicKey] | None:
    """Return the members' identity keys of an active-adversary task (None if passive).

    Raises
    ------
    TaskAbandoned
        If the keys are malformed, or the key the task lists for this member is not the
        device's own (its signatures would be refused by every other member).
    """
    try:
        peers = identities_from_proto(task.secagg)
    except ValueError as exc:
        raise TaskAbandoned(f"unusable secure-aggregation parameters: {exc}") from None
    if peers is None:
        return None
    index = int(task.member_index)
    own = peers.get(index)
    if own is None or own.public_bytes_raw() != raw_public_key(identity):
        raise TaskAbandoned(f"secagg.identity_keys[{index}] is not this device's identity key")
    return peers


def clipped_update(
    config: SessionConfig, delta_b: dict[str, npt.NDArray[np.float32]]
) -> dict[str, npt.NDArray[np.float64]]:
    """Flatten ΔB row-major per the session's tensors and clip it as masking will.

    Raises
    ------
    TaskAbandoned
        If the session and the adapter disagree on the tensors or their sizes, or the
        update is not real and finite (training diverged to NaN, say).
    """
    flat: dict[str, npt.NDArray[np.float32]] = {}
    for name, length in config.tensors:
        value = delta_b.get(name)
        if value is None:
            raise TaskAbandoned(f"the session names tensor {name!r}, which the adapter lacks")
        if value.size != length:
            raise TaskAbandoned(
                f"tensor {name!r} has {value.size} elements, the session expects {length}"
            )
        flat[name] = np.ascontiguousarray(value).reshape(-1)  # (out * r_max,) row-major
    extra = sorted(set(delta_b) - set(flat))
    if extra:
        raise TaskAbandoned(f"the session omits adapter tensors {extra}")
    fp = config.fixed_point
    try:
        return clip_update(flat, clip=fp.clip, per_tensor=fp.per_tensor)
    except ValueError as exc:
        raise TaskAbandoned(f"cannot mask the update: {exc}") from None


def mask(
    client: Client,
    update: dict[str, npt.NDArray[np.float64]],
    *,
    weight: float,
    rng: np.random.Generator | None,
) -> bytes:
    """Return the encoded masked input of ``update`` scaled by ``weight``.

    Parameters
    ----------
    client
        The member's client, past the share relay.
    update
        The clipped, flattened update (:func:`clipped_update`).
    weight
        The staleness weight the coordinator assigned.
    rng
        Stochastic rounding; ``None`` uses fresh entropy.

    Raises
    ------
    TaskAbandoned
        If the client refuses to mask (wrong stage, values out of range).
    """
    try:
        return client.submit(update, weight=weight, rng=rng).encode()
    except (SecAggError, ValueError) as exc:
        raise TaskAbandoned(f"cannot mask the update: {exc}") from None


def _handle(client: Client, payload: bytes) -> Any:
    try:
        return client.handle(payload)
    except (ProtocolViolation, SecAggError) as exc:
        raise TaskAbandoned(f"refused a secure-aggregation message: {exc}") from None


def _expect(message: edge_pb2.SecAggServerMessage, stage: int) -> None:
    if message.stage != stage:
        raise TaskAbandoned(
            f"expected {stage_name(stage)}, the coordinator sent {stage_name(message.stage)}"
        )


class SecAggExchange:
    """Carries one member's secure-aggregation messages for a task.

    Parameters
    ----------
    rpc
        The channel to the coordinator; its clock reads the task's deadline.
    task
        The task: cohort id, member index, session parameters and deadline.
    identity
        The device's identity key: it signs our keys and the survivor set in
        active-adversary mode (unused otherwise).

    Raises
    ------
    TaskAbandoned
        If the task's secure-aggregation parameters are unusable.
    """

    def __init__(self, rpc: EdgeRpc, task: edge_pb2.Task, *, identity: Ed25519PrivateKey) -> None:
        self._rpc = rpc
        self.task = task
        self.config = session_config(task)
        peers = peer_identities(task, identity)
        try:
            self.client = Client(
                int(task.member_index),
                config=self.config,
                identity=identity if peers is not None else None,
                peer_identities=peers,
            )
        except ValueError as exc:  # a member index outside uint32
            raise TaskAbandoned(f"unusable secure-aggregation parameters: {exc}") from None

    async def exchange_keys(self) -> None:
        """AdvertiseKeys, then answer the key broadcast with our shares (ShareKeys)."""
        await self._send(_S.SECAGG_STAGE_ADVERTISE_KEYS, self.client.advertise().encode())
        broadcast = await self._await_stage(after=_S.SECAGG_STAGE_ADVERTISE_KEYS)
        _expect(broadcast, _S.SECAGG_STAGE_SHARE_KEYS)
        share_keys = _handle(self.client, broadcast.payload)
        if share_keys is None:
            raise TaskAbandoned("the key broadcast produced no ShareKeys reply")
        await self._send(_S.SECAGG_STAGE_SHARE_KEYS, share_keys.encode())

    async def await_relay(self) -> float:
        """Take the shares relayed to us; return the staleness weight that came with them."""
        relay = await self._await_stage(after=_S.SECAGG_STAGE_SHARE_KEYS)
        _expect(relay, _S.SECAGG_STAGE_MASKED_INPUT)
        weight = float(relay.weight)
        _handle(self.client, relay.payload)
        return weight

    async def unmask(self) -> None:
        """Answer the unmasking request, then wait for the cohort's DONE.

        In active-adversary mode the consistency request comes first: we sign the survivor
        set, and answer an unmask request only for that set with t valid signatures on it.
        """
        after = _S.SECAGG_STAGE_MASKED_INPUT
        if self.config.active:
            check = await self._await_stage(after=after)
            _expect(check, _S.SECAGG_STAGE_CONSISTENCY_CHECK)
            signature = _handle(self.client, check.payload)
            if signature is None:
                raise TaskAbandoned("the consistency request produced no signature")
            await self._send(_S.SECAGG_STAGE_CONSISTENCY_CHECK, signature.encode())
            after = _S.SECAGG_STAGE_CONSISTENCY_CHECK
        request = await self._await_stage(after=after)
        _expect(request, _S.SECAGG_STAGE_UNMASKING)
        response = _handle(self.client, request.payload)
        if response is None:
            raise TaskAbandoned("the unmask request produced no reply")
        await self._send(_S.SECAGG_STAGE_UNMASKING, response.encode())
        final = await self._await_stage(after=_S.SECAGG_STAGE_UNMASKING)
        _expect(final, _S.SECAGG_STAGE_DONE)

    async def upload(self, payload: bytes) -> None:
        """Stream the masked input ``payload`` (header first, then chunks), retrying.

        Raises
        ------
        TaskAbandoned
            If the task's deadline has passed, or the coordinator refuses the upload.
        """
        task = self.task
        rpc = self._rpc
        digest = hashlib.sha256(payload).hexdigest()
        if task.deadline_ms and rpc.now_ms() > task.deadline_ms:
            raise TaskAbandoned("the upload deadline has passed")
        stub = rpc.stub()
        attempt = 0
        while True:
            header = edge_pb2.UploadHeader(
                task_id=task.task_id,
                cohort_id=task.cohort_id,
                total_bytes=len(payload),
                sha256=digest,
            )
            rpc.sign("UploadMasked", header)
            chunks = [edge_pb2.UploadChunk(header=header)]
            chunks.extend(
                edge_pb2.UploadChunk(data=payload[i : i + DEFAULT_CHUNK_BYTES])
                for i in range(0, len(payload), DEFAULT_CHUNK_BYTES)
            )
            rpc.stats.bytes_up += sum(c.ByteSize() for c in chunks)
            try:
                ack = await stub.UploadMasked(iter(chunks), timeout=UPLOAD_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if rpc.is_transient(exc):
                    await rpc.retry_pause("UploadMasked", exc, attempt)
                    attempt += 1
                    continue
                raise rpc.refused("UploadMasked", exc, in_task=True) from None
            rpc.stats.bytes_down += ack.ByteSize()
            if not ack.accepted:
                raise TaskAbandoned("the coordinator did not accept the masked upload")
            logger.debug(
                "uploaded %d masked bytes%s", len(payload), " (duplicate)" if ack.duplicate else ""
            )
            return

    async def _send(self, stage: int, payload: bytes) -> None:
        request = edge_pb2.SecAggClientMessage(
            cohort_id=self.task.cohort_id,
            stage=stage,  # type: ignore[arg-type]
            payload=payload,
        )
        ack = await self._rpc.call("SendSecAgg", request, response_type=edge_pb2.SecAggAck)
        if ack.stage == _S.SECAGG_STAGE_ABORTED:
            raise TaskAbandoned(f"the cohort aborted ({stage_name(stage)} acknowledged as ABORTED)")

    async def _await_stage(self, *, after: int) -> edge_pb2.SecAggServerMessage:
        """Long-poll for the first server message of a stage later than ``after``."""
        task = self.task
        give_up_ms = (
            task.deadline_ms + int(POST_DEADLINE_GRACE_S * 1000) if task.deadline_ms else None
        )
        while True:
            request = edge_pb2.AwaitSecAggRequest(
                cohort_id=task.cohort_id,
                after_stage=after,  # type: ignore[arg-type]
                wait_ms=MAX_LONG_POLL_MS,
            )
            response = await self._rpc.call(
                "AwaitSecAgg",
                request,
                response_type=edge_pb2.SecAggServerMessage,
                timeout=MAX_LONG_POLL_MS / 1000 + LONG_POLL_MARGIN_S,
            )
            if response.stage == _S.SECAGG_STAGE_ABORTED or response.abort_reason:
                raise TaskAbandoned(
                    f"the cohort aborted: {response.abort_reason or 'no reason given'}"
                )
            if not response.pending:
                if response.stage <= after:
                    raise TaskAbandoned(
                        f"asked for a stage after {stage_name(after)}, got "
                        f"{stage_name(response.stage)}"
                    )
                return response
            if give_up_ms is not None and self._rpc.now_ms() > give_up_ms:
                raise TaskAbandoned(
                    f"still waiting after {stage_name(after)} "
                    f"{POST_DEADLINE_GRACE_S:.0f} s past the task's deadline"
                )
