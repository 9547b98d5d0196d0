"""Stage ConsistencyCheck (active mode): signatures bind every client to one survivor set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from secagg_harness import Harness

from secure_agg import Stage, crypto
from secure_agg.errors import InconsistentUnmaskRequest, InvalidSignature
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    UnmaskRequest,
    UnmaskResponse,
)


def _to_unmask(h: Harness, skip_masked: tuple[int, ...] = ()) -> dict[int, UnmaskRequest]:
    consistency = h.step(h.step(h.step_advertise()), skip=skip_masked)
    assert all(isinstance(r, ConsistencyRequest) for r in consistency.values())
    requests = h.step(consistency)
    assert all(isinstance(r, UnmaskRequest) for r in requests.values())
    return requests  # type: ignore[return-value]


def test_active_mode_completes(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    h.step(_to_unmask(h, skip_masked=(2,)))
    assert h.server.result is not None and h.server.result.survivors == (0, 1, 3, 4)


def test_too_few_signatures(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    request = _to_unmask(h)[0]
    with pytest.raises(InvalidSignature):
        h.clients[0].handle(dataclasses.replace(request, signatures=request.signatures[:3]))
    assert h.clients[0].stage is Stage.ABORTED
    assert not [m for i, m in h.sent if i == 0 and isinstance(m, UnmaskResponse)]


def test_forged_signature(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    request = _to_unmask(h)[0]
    client, signature = request.signatures[1]
    forged = (client, bytes([signature[0] ^ 1]) + signature[1:])
    bad = dataclasses.replace(
        request, signatures=(request.signatures[0], forged, *request.signatures[2:])
    )
    with pytest.raises(InvalidSignature):
        h.clients[0].handle(bad)
    assert h.clients[0].stage is Stage.ABORTED


def test_sets_differ_from_the_signed_ones(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    request = _to_unmask(h, skip_masked=(4,))[0]
    moved = dataclasses.replace(request, alive=(*request.alive, 4), dropped=())
    with pytest.raises(InconsistentUnmaskRequest):
        h.clients[0].handle(moved)


def test_server_drops_a_bad_consistency_signature(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    consistency = h.step(h.step(h.step_advertise()))
    replies = {i: h.clients[i].handle(r.encode()) for i, r in consistency.items()}
    bad = replies[3]
    assert isinstance(bad, ConsistencySignature)
    with pytest.raises(InvalidSignature):
        h.server.handle(3, dataclasses.replace(bad, signature=b"\x00" * 64).encode())
    for i in (0, 1, 2, 4):
        h.server.handle(i, replies[i].encode())  # type: ignore[union-attr]
    requests = {o.recipient: o.message for o in h.server.drain()}
    assert sorted(requests) == [0, 1, 2, 4]


class _CountingMemo(crypto.VerifiedSignatures):
    """A memo that counts its lookups and hits."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.hits = 0

    def seen(self, key: bytes) -> bool:
        hit = super().seen(key)
        self.lookups += 1
        self.hits += hit
        return hit


def test_a_shared_memo_verifies_each_signature_once_and_still_refuses_a_forgery(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: five clients of one process share a memo of verified signatures.
    memo = _CountingMemo()
    h = harness(n=5, t=4, active=True, verified=memo)
    requests = _to_unmask(h)
    # Each client checked the 5 advertisements: 25 lookups, 5 verifications.
    assert (memo.lookups, memo.hits, len(memo)) == (25, 20, 5)
    # Execute: clients 1..4 accept the genuine unmask request, client 0 gets a forgery of a
    # signature the memo already holds the genuine version of.
    for i in (1, 2, 3, 4):
        h.clients[i].handle(requests[i])
    assert (memo.lookups, memo.hits, len(memo)) == (45, 35, 10)
    client, signature = requests[0].signatures[1]
    forged = (client, bytes([signature[0] ^ 1]) + signature[1:])
    bad = dataclasses.replace(
        requests[0], signatures=(requests[0].signatures[0], forged, *requests[0].signatures[2:])
    )
    # Assert: refused and not remembered.
    with pytest.raises(InvalidSignature):
        h.clients[0].handle(bad)
    assert h.clients[0].stage is Stage.ABORTED
    assert len(memo) == 10
