"""Stage AdvertiseKeys and the key broadcast: every refusal, on the client and on the server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from secagg_harness import Harness

from secure_agg import ClientAborted, Stage, crypto
from secure_agg.errors import (
    DuplicateMessage,
    InsufficientParticipants,
    InvalidKeyBroadcast,
    InvalidPublicKey,
    InvalidSignature,
    ProtocolViolation,
    SessionMismatch,
    UnknownClient,
)
from secure_agg.graph import harary_neighbours
from secure_agg.messages import AdvertiseKeys, KeyBroadcast, KeyEntry

_LOW_ORDER_8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
"""A point of order 8 on Curve25519 (canonical encoding, so only the small-order check fails)."""


def _fresh_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def _tamper(broadcast: KeyBroadcast, client: int, **changes: bytes) -> KeyBroadcast:
    entries = tuple(
        dataclasses.replace(e, **changes) if e.client == client else e for e in broadcast.entries
    )
    return dataclasses.replace(broadcast, entries=entries)


def _refused(h: Harness, bad: KeyBroadcast, error: type[ProtocolViolation]) -> None:
    """Deliver ``bad`` to client 0: it must raise ``error``, abort and answer nothing more."""
    client = h.clients[0]
    with pytest.raises(error):
        client.handle(bad.encode())
    assert client.stage is Stage.ABORTED
    assert client.session == b""
    with pytest.raises(ClientAborted):
        client.handle(bad.encode())


def test_honest_broadcast_yields_share_keys(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3)
    broadcast = h.step_advertise()[0]
    reply = h.clients[0].handle(broadcast.encode())
    assert reply is not None and len(reply.recipients) == 3  # type: ignore[union-attr]
    assert h.clients[0].stage is Stage.MASKED_INPUT


def test_own_key_missing(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, dataclasses.replace(b, entries=b.entries[1:]), InvalidKeyBroadcast)


def test_own_key_altered(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 0, c_pk=_fresh_key()), InvalidKeyBroadcast)


def test_peer_listed_twice(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    twice = dataclasses.replace(b, entries=(*b.entries[:4], b.entries[1]))
    _refused(h, twice, InvalidKeyBroadcast)


def test_duplicate_public_keys(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 2, s_pk=b.entries[1].s_pk), InvalidKeyBroadcast)


@pytest.mark.parametrize("slot", ["c_pk", "s_pk"])
@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little"), _LOW_ORDER_8])
def test_low_order_point(harness: Callable[..., Harness], point: bytes, slot: str) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 1, **{slot: point}), InvalidPublicKey)


def _count_probes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    probed: list[bytes] = []
    real = crypto.check_x25519_public

    def counting(data: bytes) -> X25519PublicKey:
        probed.append(data)
        return real(data)

    monkeypatch.setattr(crypto, "check_x25519_public", counting)
    return probed


def test_a_client_probes_no_key_it_agrees_with(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Complete graph: every peer is a neighbour, so the agreements refuse small order and an
    # extra X25519 probe per key would double the client's X25519 work.
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    probed = _count_probes(monkeypatch)
    assert h.clients[0].handle(b.encode()) is not None
    assert probed == []


@pytest.mark.parametrize("slot", ["c_pk", "s_pk"])
def test_secagg_plus_client_refuses_a_low_order_key_of_a_non_neighbour(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch, slot: str
) -> None:
    # Prepare: n = 9, k = 2; pick a peer that is not client 0's neighbour once its key is bad
    # (the graph hashes every key, the bad one included).
    h = harness(n=9, t=2, neighbours=2)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    cfg = h.config
    for peer in range(1, 9):
        bad = _tamper(b, peer, **{slot: _LOW_ORDER_8})
        keys = [(e.client, e.c_pk, e.s_pk) for e in bad.entries]
        session = crypto.session_id(cfg.cohort, cfg.params, keys)
        if peer not in harary_neighbours(list(range(9)), k=2, session=session)[0]:
            break
    else:
        pytest.fail("every peer was a neighbour of client 0")
    # An honest broadcast: only the six non-neighbours' keys are probed, two each.
    honest = Harness(n=9, t=2, neighbours=2)
    broadcast = honest.step_advertise()[0]
    probed = _count_probes(monkeypatch)
    assert honest.clients[0].handle(broadcast.encode()) is not None
    assert len(probed) == 2 * (9 - 1 - 2)
    # Execute / Assert: the bad non-neighbour key is refused before anything is sent.
    _refused(h, bad, InvalidPublicKey)


def test_more_keys_than_the_cohort(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    extra = KeyEntry(client=99, c_pk=_fresh_key(), s_pk=_fresh_key())
    _refused(h, dataclasses.replace(b, entries=(*b.entries, extra)), InvalidKeyBroadcast)


def test_fewer_keys_than_the_threshold(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, dataclasses.replace(b, entries=b.entries[:2]), InsufficientParticipants)


def test_other_cohort(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, dataclasses.replace(b, cohort=b"another-cohort"), SessionMismatch)


def test_active_mode_missing_signature(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 3, signature=b""), InvalidSignature)


def test_active_mode_signature_of_someone_else(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4, active=True)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 3, signature=b.entries[2].signature), InvalidSignature)


def test_server_refuses_strangers_duplicates_and_impostors(harness: Callable[..., Harness]) -> None:
    # Prepare
    h = harness(n=5, t=3)
    adverts = [c.advertise() for c in h.clients]
    h.server.handle(0, adverts[0].encode())
    # Execute / Assert: a non-member, a second advertisement, a sender claiming another id.
    with pytest.raises(UnknownClient):
        h.server.handle(77, dataclasses.replace(adverts[1], sender=77).encode())
    with pytest.raises(DuplicateMessage):
        h.server.handle(0, adverts[0].encode())
    with pytest.raises(UnknownClient):
        h.server.handle(2, adverts[1].encode())
    # Clients 0 and 2 are dropped; 1, 3, 4 are enough to go on (t = 3), and once all three
    # have advertised nobody else is awaited: the stage closes without its deadline.
    for i in (1, 3, 4):
        h.server.handle(i, adverts[i].encode())
    recipients = sorted(o.recipient for o in h.server.drain())
    assert recipients == [1, 3, 4]
    assert h.server.stage is Stage.SHARE_KEYS


def test_server_refuses_bad_advert_signature(harness: Callable[..., Harness]) -> None:
    h = harness(n=4, t=3, active=True)
    advert = h.clients[0].advertise()
    with pytest.raises(InvalidSignature):
        h.server.handle(0, dataclasses.replace(advert, signature=b"\x00" * 64).encode())


# --- one hostile advertisement must cost only its sender --------------------------------------

_P = 2**255 - 19
_LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
"""A point of order 8 on Curve25519 (canonical encoding)."""


def _alias(key: bytes) -> bytes:
    """The same X25519 point under a non-canonical encoding (top bit set)."""
    return key[:-1] + bytes([key[-1] | 0x80])


_HOSTILE: dict[str, Callable[[AdvertiseKeys, list[AdvertiseKeys]], AdvertiseKeys]] = {
    "low-order c_pk": lambda own, _: dataclasses.replace(own, c_pk=_LOW_ORDER),
    "low-order s_pk": lambda own, _: dataclasses.replace(own, s_pk=bytes(32)),
    "u = p - 1 (order 2)": lambda own, _: dataclasses.replace(
        own, c_pk=(_P - 1).to_bytes(32, "little")
    ),
    "non-canonical alias": lambda own, _: dataclasses.replace(own, s_pk=_alias(own.s_pk)),
    "c_pk == s_pk": lambda own, _: dataclasses.replace(own, s_pk=own.c_pk),
    "another member's keys": lambda own, honest: dataclasses.replace(
        own, c_pk=honest[1].c_pk, s_pk=honest[1].s_pk
    ),
    "another member's s_pk as c_pk": lambda own, honest: dataclasses.replace(
        own, c_pk=honest[2].s_pk
    ),
}


@pytest.mark.parametrize("attack", sorted(_HOSTILE))
def test_server_drops_only_a_hostile_advertiser(
    harness: Callable[..., Harness], attack: str
) -> None:
    # Prepare: client 4 is hostile; 0..3 are honest and advertise first.
    h = harness(n=5, t=3)
    honest = [h.clients[i].advertise() for i in range(4)]
    hostile = _HOSTILE[attack](h.clients[4].advertise(), honest)
    for i in (0, 1, 2):
        h.server.handle(i, honest[i].encode())
    # Execute: the hostile advertisement is refused and its sender dropped ...
    with pytest.raises((InvalidPublicKey, InvalidKeyBroadcast)) as info:
        h.server.handle(4, hostile.encode())
    assert info.value.client == 4
    assert h.server.stage is Stage.ADVERTISE_KEYS and not h.server.advertised(4)
    # ... and once the last honest member has advertised the stage closes, no deadline needed.
    h.server.handle(3, honest[3].encode())
    assert h.server.stage is Stage.SHARE_KEYS
    broadcasts = {o.recipient: o.message for o in h.server.drain()}
    # Assert: the broadcast leaves the offender out, no honest member refuses it, and the
    # session completes with the honest members' exact sum.
    assert sorted(broadcasts) == [0, 1, 2, 3]
    assert all(isinstance(b, KeyBroadcast) for b in broadcasts.values())
    assert {e.client for e in broadcasts[0].entries} == {0, 1, 2, 3}  # type: ignore[union-attr]
    inbox = h.step(broadcasts)
    assert all(h.clients[i].stage is Stage.MASKED_INPUT for i in range(4))
    while h.server.stage not in (Stage.COMPLETED, Stage.ABORTED):
        inbox = h.step(inbox)
    assert h.server.result is not None
    assert h.server.result.integer_sum["update"].tolist() == h.expected_sum([0, 1, 2, 3])


def test_offender_as_the_last_awaited_member_closes_the_stage(
    harness: Callable[..., Harness],
) -> None:
    h = harness(n=4, t=3)
    adverts = [c.advertise() for c in h.clients]
    for i in (0, 1, 2):
        h.server.handle(i, adverts[i].encode())
    with pytest.raises(InvalidKeyBroadcast):
        h.server.handle(3, dataclasses.replace(adverts[3], s_pk=adverts[3].c_pk).encode())
    assert h.server.stage is Stage.SHARE_KEYS
    assert sorted(o.recipient for o in h.server.drain()) == [0, 1, 2]


def test_client_refuses_a_non_canonical_key_in_the_broadcast(
    harness: Callable[..., Harness],
) -> None:
    # The alias is the same point as client 1's real key, so a key agreement would succeed:
    # only the encoding check catches it.
    h = harness(n=5, t=3)
    b = h.step_advertise()[0]
    assert isinstance(b, KeyBroadcast)
    _refused(h, _tamper(b, 1, c_pk=_alias(b.entries[1].c_pk)), InvalidPublicKey)
