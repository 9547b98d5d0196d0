"""Active-adversary secure aggregation over the EdgeService, against a lying coordinator.

Five members run the real :class:`~edge_client.exchange.SecAggExchange` (a real EdgeRpc over
an offline stub) with tasks that carry the members' identity keys, as the coordinator's
default cohorts do. The stub runs a real active-mode ``secure_agg.Server`` up to the end of
the upload stage; from the consistency check on it is a scripted malicious server that
shows some members a survivor set in which the victim (member 4) dropped out, to obtain its
mask key from them while the others reveal its self-mask seed — which together would unmask
its individual update. The members that were lied to and cannot see t signatures on what
they were shown abort instead of answering, and the server never collects t shares of both
of the victim's secrets.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from offline_rpc import offline_rpc
from recording_clock import RecordingClock

from edge_client.errors import TaskAbandoned
from edge_client.exchange import SecAggExchange, clipped_update, mask
from estuary.auth import raw_public_key
from estuary.proto.session import identities_from_proto, session_to_proto
from estuary.proto.stages import stage_to_proto
from estuary.proto.v1 import edge_pb2
from secure_agg import FixedPoint, Server, SessionConfig, Stage
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)

S = edge_pb2.SecAggStage
N, T = 5, 3
VICTIM = 4
TENSORS = (("a", 6), ("b", 2))
Lie = Literal["honest", "consistency", "consistency, padded", "unmask"]


@dataclass
class LyingCoordinator:
    """An honest ``secure_agg.Server`` until the uploads are in, then a scripted liar.

    ``lied`` are shown the victim as dropped: in the consistency request (``consistency``),
    also with the others' signatures added to their unmask request (``consistency,
    padded``), or only in the unmask request, after an honest consistency check
    (``unmask``). ``honest`` lies to no one.
    """

    lie: Lie
    lied: frozenset[int]
    identities: list[Ed25519PrivateKey] = field(init=False)
    params: edge_pb2.SecAggParams = field(init=False)
    server: Server = field(init=False)
    mail: dict[int, list[tuple[int, bytes, float]]] = field(init=False)
    honest: ConsistencyRequest | None = None
    signatures: dict[int, tuple[bool, bytes]] = field(default_factory=dict)
    """Member → (whether it signed the lie, its consistency signature)."""
    responses: dict[int, UnmaskResponse] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.identities = [Ed25519PrivateKey.generate() for _ in range(N)]
        config = SessionConfig(
            cohort=b"c1",
            cohort_size=N,
            threshold=T,
            tensors=TENSORS,
            fixed_point=FixedPoint.for_cohort(N, bits=32, clip=4.0),
            active=True,
        )
        keys = [raw_public_key(k) for k in self.identities]
        self.params = session_to_proto(config, identity_keys=keys)
        peers = identities_from_proto(self.params)
        self.server = Server(config, members=range(N), peer_identities=peers)
        self.mail = {i: [] for i in range(N)}

    def task(self, member: int) -> edge_pb2.Task:
        return edge_pb2.Task(
            task_id=f"t{member}", cohort_id="c1", member_index=member, secagg=self.params
        )

    # --- what members send ----------------------------------------------------------------

    def receive(self, sender: int, payload: bytes) -> int:
        message = decode(payload)
        if isinstance(message, ConsistencySignature):
            self.signatures[sender] = (
                self._lied_to(sender, Stage.CONSISTENCY_CHECK),
                message.signature,
            )
            if len(self.signatures) == N:
                self._send_unmask_requests()
            return S.SECAGG_STAGE_CONSISTENCY_CHECK
        if isinstance(message, UnmaskResponse):
            self.responses[sender] = message
            self._post(sender, S.SECAGG_STAGE_DONE, b"")
            return S.SECAGG_STAGE_UNMASKING
        self.server.handle(sender, payload)  # honest up to the uploads
        for item in self.server.drain():
            stage = stage_to_proto(self.server.stage)
            if isinstance(item.message, ConsistencyRequest):
                self.honest = item.message
                shown = (
                    self._lie_about(item.message)
                    if self._lied_to(item.recipient, Stage.CONSISTENCY_CHECK)
                    else item.message
                )
                self._post(item.recipient, stage, shown.encode())
            else:
                self._post(item.recipient, stage, item.encode())
        return stage_to_proto(self.server.stage)

    # --- the lies -------------------------------------------------------------------------

    def _lied_to(self, member: int, stage: Stage) -> bool:
        if self.lie == "honest" or member not in self.lied:
            return False
        return (self.lie == "unmask") == (stage is Stage.UNMASKING)

    def _lie_about(self, request: Any) -> Any:
        alive = tuple(c for c in request.alive if c != VICTIM)
        return dataclasses.replace(request, alive=alive, dropped=(*request.dropped, VICTIM))

    def _send_unmask_requests(self) -> None:
        assert self.honest is not None
        honest = UnmaskRequest(
            session=self.honest.session,
            alive=self.honest.alive,
            dropped=self.honest.dropped,
            signatures=tuple(
                (c, s) for c, (lied, s) in sorted(self.signatures.items()) if not lied
            ),
        )
        on_lie = tuple((c, s) for c, (lied, s) in sorted(self.signatures.items()) if lied)
        for member in range(N):
            request = honest
            if self._lied_to(member, Stage.UNMASKING):  # an honest check, then the lie
                request = self._lie_about(honest)
            elif self._lied_to(member, Stage.CONSISTENCY_CHECK):
                # The best a liar has: the lie's own signatures, or every signature it holds.
                padded = self.lie == "consistency, padded"
                extra = tuple((c, s) for c, s in honest.signatures if c != VICTIM) if padded else ()
                request = dataclasses.replace(
                    self._lie_about(honest), signatures=tuple(sorted(on_lie + extra))
                )
            self._post(member, S.SECAGG_STAGE_UNMASKING, request.encode())

    def _post(self, member: int, stage: int, payload: bytes) -> None:
        weight = 1.0 if stage == S.SECAGG_STAGE_MASKED_INPUT else 0.0
        self.mail[member].append((stage, payload, weight))

    # --- what the lie could reveal ----------------------------------------------------------

    def revealers(self, owner: int) -> tuple[set[int], set[int]]:
        """Members that sent a share of ``owner``'s self-mask seed, and of its mask key."""
        seeds = {i for i, r in self.responses.items() if owner in r.seed_owners}
        keys = {i for i, r in self.responses.items() if owner in r.key_owners}
        return seeds, keys


class MemberStub:
    """The EdgeService as one member sees it."""

    def __init__(self, coordinator: LyingCoordinator, member: int) -> None:
        self.coordinator = coordinator
        self.member = member

    async def SendSecAgg(self, request: Any, timeout: float) -> Any:
        stage = self.coordinator.receive(self.member, bytes(request.payload))
        return edge_pb2.SecAggAck(stage=stage)  # type: ignore[arg-type]

    async def AwaitSecAgg(self, request: Any, timeout: float) -> Any:
        for stage, payload, weight in self.coordinator.mail[self.member]:
            if stage > request.after_stage:
                return edge_pb2.SecAggServerMessage(
                    cohort_id=request.cohort_id, stage=stage, payload=payload, weight=weight
                )
        await asyncio.sleep(0)  # let the other members run
        return edge_pb2.SecAggServerMessage(cohort_id=request.cohort_id, pending=True)

    async def UploadMasked(self, chunks: Any, timeout: float) -> Any:
        stream = list(chunks)
        data = b"".join(c.data for c in stream[1:])
        self.coordinator.receive(self.member, data)
        return edge_pb2.UploadAck(accepted=True, durable_bytes=len(data))


async def _member(coordinator: LyingCoordinator, member: int) -> str:
    clock = RecordingClock()
    key = coordinator.identities[member]
    rpc = offline_rpc(clock, MemberStub(coordinator, member), identity=lambda: key)
    exchange = SecAggExchange(rpc, coordinator.task(member), identity=key)
    await exchange.exchange_keys()
    weight = await exchange.await_relay()
    rng = np.random.default_rng(member)
    delta = {name: rng.normal(0, 0.1, length).astype(np.float32) for name, length in TENSORS}
    await exchange.upload(
        mask(exchange.client, clipped_update(exchange.config, delta), weight=weight, rng=rng)
    )
    try:
        await exchange.unmask()
    except TaskAbandoned as exc:
        return f"abandoned: {exc}"
    return "done"


def _run(coordinator: LyingCoordinator) -> list[str]:
    async def everyone() -> list[str]:
        return list(await asyncio.gather(*(_member(coordinator, i) for i in range(N))))

    return asyncio.run(everyone())


def test_an_honest_coordinator_completes_in_active_mode() -> None:
    coordinator = LyingCoordinator("honest", frozenset())
    outcomes = _run(coordinator)
    assert outcomes == ["done"] * N
    assert all(not lied for lied, _ in coordinator.signatures.values())
    seeds, keys = coordinator.revealers(VICTIM)
    assert seeds == set(range(N)) and keys == set()


@pytest.mark.parametrize(
    ("lie", "words"),
    [
        ("consistency", "2 consistency signatures, threshold 3"),
        ("consistency, padded", "bad signature of client"),
        ("unmask", "survivor sets changed since the consistency check"),
    ],
)
def test_members_shown_another_survivor_set_abort_without_revealing(lie: Lie, words: str) -> None:
    # Prepare: members 0 and 1 are told the victim (4) dropped; 2, 3, 4 see the truth.
    coordinator = LyingCoordinator(lie, frozenset({0, 1}))

    # Execute
    outcomes = _run(coordinator)

    # Assert: the members lied to refuse the unmask request and send nothing; the others,
    # with t signatures on what they signed, answer with seed shares only.
    for member in (0, 1):
        assert outcomes[member].startswith("abandoned: refused a secure-aggregation message")
        assert words in outcomes[member]
        assert member not in coordinator.responses
    assert outcomes[2:] == ["done"] * 3
    seeds, keys = coordinator.revealers(VICTIM)
    assert seeds == {2, 3, 4} and keys == set()
    assert all(not r.key_owners for r in coordinator.responses.values())


def test_a_lie_to_a_majority_still_never_reveals_both_secrets_of_the_victim() -> None:
    # Members 0, 1, 2 (t of them) are told the victim dropped and sign it; 3 and 4 are not.
    coordinator = LyingCoordinator("consistency", frozenset({0, 1, 2}))

    outcomes = _run(coordinator)

    # The majority saw t valid signatures on the set it signed and gives the victim's key
    # shares; the minority saw only 2 signatures on the truth and gives nothing, so the
    # victim's self-mask seed stays hidden and its update masked.
    assert outcomes[:3] == ["done"] * 3
    for member in (3, 4):
        assert "2 consistency signatures, threshold 3" in outcomes[member]
    seeds, keys = coordinator.revealers(VICTIM)
    assert keys == {0, 1, 2} and seeds == set()
    assert len(seeds) < T or len(keys) < T


def test_the_task_must_list_this_devices_own_identity_key() -> None:
    coordinator = LyingCoordinator("honest", frozenset())
    impostor = Ed25519PrivateKey.generate()
    rpc = offline_rpc(RecordingClock(), MemberStub(coordinator, 0), identity=lambda: impostor)
    with pytest.raises(TaskAbandoned, match=r"identity_keys\[0\] is not this device's"):
        SecAggExchange(rpc, coordinator.task(0), identity=impostor)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.identity_keys.pop(), "one key per member, got 4 for cohort_size 5"),
        (lambda p: p.identity_keys.__setitem__(3, b"\x01" * 31), r"identity_keys\[3\]: must be 32"),
        (lambda p: p.identity_keys.__setitem__(3, p.identity_keys[2]), "same identity key"),
        (lambda p: setattr(p, "active", False), "not active-adversary"),
    ],
)
def test_malformed_identity_keys_abandon_the_task(change: Any, words: str) -> None:
    coordinator = LyingCoordinator("honest", frozenset())
    task = coordinator.task(0)
    change(task.secagg)
    rpc = offline_rpc(
        RecordingClock(), MemberStub(coordinator, 0), identity=lambda: coordinator.identities[0]
    )
    with pytest.raises(TaskAbandoned, match=words):
        SecAggExchange(rpc, task, identity=coordinator.identities[0])
