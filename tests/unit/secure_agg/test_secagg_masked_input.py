"""Stage MaskedInputCollection: what the server refuses, and that the cohort carries on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from secagg_harness import Harness

from secure_agg import Stage
from secure_agg.errors import (
    DuplicateMessage,
    InvalidMaskedInput,
    LateMessage,
    UnexpectedMessage,
    UnknownClient,
)
from secure_agg.messages import MaskedInput, Message, UnmaskRequest, UnmaskResponse


def _masked(h: Harness) -> dict[int, MaskedInput]:
    relays = h.step(h.step_advertise())
    out = {}
    for i, relay in relays.items():
        h.clients[i].handle(relay.encode())
        out[i] = h.clients[i].submit(h.updates[i], rng=np.random.default_rng(i))
    return out


def _finish(h: Harness, requests: dict[int, Message]) -> None:
    h.step(requests)
    assert h.server.result is not None


def _send_all(h: Harness, masked: dict[int, MaskedInput], skip: tuple[int, ...] = ()) -> None:
    for i, message in masked.items():
        if i not in skip:
            h.server.handle(i, message.encode())


def test_wrong_length_drops_the_client_and_the_sum_stays_exact(
    harness: Callable[..., Harness],
) -> None:
    # Prepare
    h = harness(n=5, t=3, m=6)
    masked = _masked(h)
    name, data = masked[2].tensors[0]
    short = dataclasses.replace(masked[2], tensors=((name, data[:-2]),))
    # Execute
    with pytest.raises(InvalidMaskedInput):
        h.server.handle(2, short.encode())
    _send_all(h, masked, skip=(2,))
    requests = h.server.drain()
    # Assert
    request = requests[0].message
    assert isinstance(request, UnmaskRequest) and request.dropped == (2,)
    _finish(h, {o.recipient: o.message for o in requests})
    assert h.server.result is not None
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum([0, 1, 3, 4])


def test_element_outside_the_ring_is_refused(harness: Callable[..., Harness]) -> None:
    # Prepare: b = 20 travels in 3 bytes, so an element >= 2^20 is representable on the wire.
    h = harness(n=4, t=3, m=5, bits=20)
    masked = _masked(h)
    name, data = masked[1].tensors[0]
    bad = bytearray(data)
    bad[2] = 0xFF  # top byte of element 0: value >= 2^20
    # Execute / Assert
    with pytest.raises(InvalidMaskedInput, match="2\\^20"):
        h.server.handle(1, dataclasses.replace(masked[1], tensors=((name, bytes(bad)),)).encode())


def test_duplicate_upload_drops_the_client_and_removes_its_input(
    harness: Callable[..., Harness],
) -> None:
    h = harness(n=5, t=3, m=6)
    masked = _masked(h)
    h.server.handle(3, masked[3].encode())
    with pytest.raises(DuplicateMessage):
        h.server.handle(3, masked[3].encode())
    _send_all(h, masked, skip=(3,))
    _finish(h, {o.recipient: o.message for o in h.server.drain()})
    assert h.server.result is not None
    assert h.server.result.survivors == (0, 1, 2, 4)
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum([0, 1, 2, 4])


def test_upload_from_outside_the_cohort_is_refused(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3)
    masked = _masked(h)
    with pytest.raises(UnknownClient):
        h.server.handle(9, dataclasses.replace(masked[0], sender=9).encode())


def test_masked_input_during_share_keys_is_unexpected(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3)
    h.step_advertise()
    fake = MaskedInput(session=h.server.session, sender=1, tensors=(("update", b""),))
    with pytest.raises(UnexpectedMessage):
        h.server.handle(1, fake.encode())


def test_late_masked_input_is_rejected_and_its_seed_never_requested(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: client 4 is late; the deadline closes the stage without it.
    h = harness(n=5, t=3, m=6)
    masked = _masked(h)
    _send_all(h, masked, skip=(4,))
    h.server.deadline()
    requests = {o.recipient: o.message for o in h.server.drain()}
    # Execute
    with pytest.raises(LateMessage):
        h.server.handle(4, masked[4].encode())
    _finish(h, requests)
    # Assert: 4 is listed as dropped, no survivor revealed a share of 4's self-mask seed, and
    # the sum is exact over the others.
    assert all(r.dropped == (4,) for r in requests.values())  # type: ignore[union-attr]
    responses = [m for _, m in h.sent if isinstance(m, UnmaskResponse)]
    assert responses and all(4 not in r.seed_owners for r in responses)
    assert all(4 in r.key_owners for r in responses)
    assert h.server.result is not None
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum([0, 1, 2, 3])
    assert h.server.stage is Stage.COMPLETED
