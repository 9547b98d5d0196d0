"""Stage ShareKeys and the share relay: swapped, forwarded, replayed and foreign messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from secagg_harness import Harness

from secure_agg import ClientAborted, Stage
from secure_agg.constants import SHARE_CIPHERTEXT_BYTES
from secure_agg.errors import (
    DecryptionFailed,
    MalformedMessage,
    ReplayedMessage,
    SessionMismatch,
    UnexpectedMessage,
)
from secure_agg.messages import ShareKeys, ShareRelay, split_blocks


def _to_relays(h: Harness) -> dict[int, ShareRelay]:
    broadcasts = h.step_advertise()
    relays = h.step(broadcasts)
    assert all(isinstance(r, ShareRelay) for r in relays.values())
    return relays  # type: ignore[return-value]


def _refused(h: Harness, relay: ShareRelay, error: type[Exception]) -> None:
    client = h.clients[0]
    with pytest.raises(error):
        client.handle(relay.encode())
    assert client.stage is Stage.ABORTED
    with pytest.raises(ClientAborted):
        client.submit(h.updates[0])


def test_swapped_ciphertexts(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    relay = _to_relays(h)[0]
    texts = split_blocks(relay.ciphertexts, SHARE_CIPHERTEXT_BYTES)
    texts[0], texts[1] = texts[1], texts[0]
    _refused(h, dataclasses.replace(relay, ciphertexts=b"".join(texts)), DecryptionFailed)


def test_ciphertexts_forwarded_to_the_wrong_recipient(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    relay_for_1 = _to_relays(h)[1]
    keep = [i for i, s in enumerate(relay_for_1.senders) if s != 0]
    forwarded = ShareRelay(
        session=relay_for_1.session,
        recipient=0,
        senders=tuple(relay_for_1.senders[i] for i in keep),
        ciphertexts=b"".join(
            split_blocks(relay_for_1.ciphertexts, SHARE_CIPHERTEXT_BYTES)[i] for i in keep
        ),
    )
    _refused(h, forwarded, DecryptionFailed)


def test_relay_for_another_session(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    relay = _to_relays(h)[0]
    _refused(h, dataclasses.replace(relay, session=b"\x07" * 32), SessionMismatch)


def test_replayed_relay(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    relay = _to_relays(h)[0]
    h.clients[0].handle(relay.encode())
    _refused(h, relay, ReplayedMessage)


def test_replayed_key_broadcast(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3)
    broadcasts = h.step_advertise()
    h.clients[0].handle(broadcasts[0].encode())
    with pytest.raises(ReplayedMessage):
        h.clients[0].handle(broadcasts[0].encode())
    assert h.clients[0].stage is Stage.ABORTED


def test_unmask_request_before_masked_input_is_unexpected(harness: Callable[..., Harness]) -> None:
    from secure_agg.messages import UnmaskRequest

    h = harness(n=4, t=3)
    relay = _to_relays(h)[0]
    h.clients[0].handle(relay.encode())
    with pytest.raises(UnexpectedMessage):
        h.clients[0].handle(UnmaskRequest(session=relay.session, alive=(0, 1, 2), dropped=()))
    assert h.clients[0].stage is Stage.ABORTED


def test_server_drops_a_client_that_skips_a_neighbour(harness: Callable[..., Harness]) -> None:
    # Prepare
    h = harness(n=5, t=3)
    broadcasts = h.step_advertise()
    replies = {i: h.clients[i].handle(b.encode()) for i, b in broadcasts.items()}
    bad = replies[4]
    assert isinstance(bad, ShareKeys)
    short = dataclasses.replace(
        bad, recipients=bad.recipients[1:], ciphertexts=bad.ciphertexts[SHARE_CIPHERTEXT_BYTES:]
    )
    # Execute
    with pytest.raises(MalformedMessage):
        h.server.handle(4, short.encode())
    for i in range(4):
        h.server.handle(i, replies[i].encode())  # type: ignore[union-attr]
    # Assert: the stage closed without 4, and nobody receives 4's shares.
    relays = {o.recipient: o.message for o in h.server.drain()}
    assert sorted(relays) == [0, 1, 2, 3]
    assert all(4 not in r.senders for r in relays.values())  # type: ignore[union-attr]


def test_server_refuses_another_session_id(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3)
    broadcasts = h.step_advertise()
    reply = h.clients[0].handle(broadcasts[0].encode())
    assert isinstance(reply, ShareKeys)
    with pytest.raises(SessionMismatch):
        h.server.handle(0, dataclasses.replace(reply, session=b"\x01" * 32).encode())
