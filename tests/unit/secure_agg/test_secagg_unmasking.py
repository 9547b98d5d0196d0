"""Stage Unmasking: the client never reveals both secrets of a peer; bad shares are dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from secagg_harness import Harness

from secure_agg import ClientAborted, CohortAborted, Stage
from secure_agg.constants import SHARE_BYTES
from secure_agg.errors import (
    InconsistentUnmaskRequest,
    InsufficientParticipants,
    InvalidShare,
    ProtocolViolation,
)
from secure_agg.messages import UnmaskRequest, UnmaskResponse, split_blocks


def _to_unmask(h: Harness, skip_masked: tuple[int, ...] = ()) -> dict[int, UnmaskRequest]:
    requests = h.step(h.step(h.step_advertise()), skip=skip_masked)
    assert all(isinstance(r, UnmaskRequest) for r in requests.values())
    return requests  # type: ignore[return-value]


def _refused(h: Harness, request: UnmaskRequest, error: type[ProtocolViolation]) -> None:
    """Client 0 refuses, aborts, and no unmasking share ever leaves it."""
    client = h.clients[0]
    with pytest.raises(error):
        client.handle(request.encode())
    assert client.stage is Stage.ABORTED
    with pytest.raises(ClientAborted):
        client.handle(request.encode())
    assert not [m for i, m in h.sent if i == 0 and isinstance(m, UnmaskResponse)]


def test_peer_both_alive_and_dropped(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    request = _to_unmask(h, skip_masked=(4,))[0]
    bad = dataclasses.replace(request, alive=(*request.alive, 4))
    _refused(h, bad, InconsistentUnmaskRequest)


def test_peer_listed_twice(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    request = _to_unmask(h, skip_masked=(4,))[0]
    _refused(h, dataclasses.replace(request, dropped=(4, 4)), InconsistentUnmaskRequest)


def test_client_itself_listed_as_dropped(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    request = _to_unmask(h)[0]
    bad = dataclasses.replace(request, alive=request.alive[1:], dropped=(0,))
    _refused(h, bad, InconsistentUnmaskRequest)


def test_peer_left_out_of_both_sets(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    request = _to_unmask(h)[0]
    _refused(h, dataclasses.replace(request, alive=request.alive[:-1]), InconsistentUnmaskRequest)


def test_fewer_alive_than_the_threshold(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    request = _to_unmask(h)[0]
    bad = dataclasses.replace(request, alive=(0, 1), dropped=(2, 3, 4))
    _refused(h, bad, InsufficientParticipants)


def test_sets_changed_between_requests(harness: Callable[..., Harness]) -> None:
    # Prepare: client 4 dropped; client 0 answers the honest request.
    h = harness(n=5, t=3)
    request = _to_unmask(h, skip_masked=(4,))[0]
    first = h.clients[0].handle(request.encode())
    assert isinstance(first, UnmaskResponse) and first.key_owners == (4,)
    # Execute / Assert: an identical repeat gets the identical answer ...
    assert h.clients[0].handle(request.encode()) == first
    # ... and a request now calling 4 alive (to get its self-mask seed share too) is refused.
    changed = dataclasses.replace(request, alive=(*request.alive, 4), dropped=())
    with pytest.raises(InconsistentUnmaskRequest):
        h.clients[0].handle(changed.encode())
    assert h.clients[0].stage is Stage.ABORTED


def _responses(h: Harness, requests: dict[int, UnmaskRequest]) -> dict[int, UnmaskResponse]:
    out = {}
    for i, request in requests.items():
        reply = h.clients[i].handle(request.encode())
        assert isinstance(reply, UnmaskResponse)
        out[i] = reply
    return out


def test_server_drops_a_response_for_the_wrong_owners(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    responses = _responses(h, _to_unmask(h, skip_masked=(4,)))
    bad = responses[1]
    swapped = dataclasses.replace(
        bad,
        seed_owners=bad.key_owners,
        seed_shares=bad.key_shares,
        key_owners=bad.seed_owners,
        key_shares=bad.seed_shares,
    )
    with pytest.raises(InvalidShare):
        h.server.handle(1, swapped.encode())
    for i in (0, 2, 3):
        h.server.handle(i, responses[i].encode())
    h.server.deadline()
    assert h.server.result is not None
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum([0, 1, 2, 3])


def test_server_refuses_a_share_outside_the_field(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    responses = _responses(h, _to_unmask(h))
    bad = responses[2]
    shares = b"\xff" * 36 + bad.seed_shares[36:]
    with pytest.raises(InvalidShare):
        h.server.handle(2, dataclasses.replace(bad, seed_shares=shares).encode())


def test_a_corrupted_share_is_outvoted_when_more_than_t_answer(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: client 0 sends a wrong (but in-field) share of client 3's self-mask seed.
    h = harness(n=5, t=3)
    responses = _responses(h, _to_unmask(h))
    bad = responses[0]
    index = bad.seed_owners.index(3)
    shares = split_blocks(bad.seed_shares, SHARE_BYTES)
    shares[index] = (1).to_bytes(4, "little") * 9
    responses[0] = dataclasses.replace(bad, seed_shares=b"".join(shares))
    # Execute
    for i, response in responses.items():
        h.server.handle(i, response.encode())
    # Assert: the commitment check rejects the first t-subset, the retry rebuilds the seed.
    assert h.server.result is not None
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum(list(range(5)))


def test_a_corrupted_share_with_exactly_t_answers_aborts(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    responses = _responses(h, _to_unmask(h))
    bad = responses[0]
    shares = split_blocks(bad.seed_shares, SHARE_BYTES)
    shares[1] = (1).to_bytes(4, "little") * 9
    responses[0] = dataclasses.replace(bad, seed_shares=b"".join(shares))
    for i in (0, 1, 2):
        h.server.handle(i, responses[i].encode())
    with pytest.raises(CohortAborted):
        h.server.deadline()
    assert h.server.result is None and h.server.stage is Stage.ABORTED
