"""Wire encoding: every message round-trips; malformed bytes are refused, never evaluated."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg.errors import MalformedMessage
from secure_agg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    KeyEntry,
    MaskedInput,
    Message,
    ShareKeys,
    ShareRelay,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    split_blocks,
)

S = bytes(range(32))
SAMPLES: list[Message] = [
    AdvertiseKeys(
        cohort=b"c1", sender=7, c_pk=os.urandom(32), s_pk=os.urandom(32), signature=os.urandom(64)
    ),
    KeyBroadcast(
        cohort=b"c1",
        entries=(KeyEntry(1, b"a" * 32, b"b" * 32), KeyEntry(2, b"c" * 32, b"d" * 32, b"s" * 64)),
    ),
    ShareKeys(
        session=S,
        sender=3,
        commitment=b"k" * 32,
        recipients=(1, 2),
        ciphertexts=b"x" * 88 + b"y" * 88,
    ),
    ShareRelay(session=S, recipient=3, senders=(), ciphertexts=b""),
    MaskedInput(session=S, sender=3, tensors=(("a", b"\x01\x02"), ("bé", b""))),
    ConsistencyRequest(session=S, alive=(1, 2, 3), dropped=(4,)),
    ConsistencySignature(session=S, sender=2, signature=b"z" * 64),
    UnmaskRequest(session=S, alive=(1, 2), dropped=(), signatures=((1, b"q" * 64),)),
    UnmaskResponse(
        session=S,
        sender=1,
        seed_owners=(1, 2),
        seed_shares=b"1" * 36 + b"2" * 36,
        key_owners=(),
        key_shares=b"",
    ),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    assert decode(message.encode()) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_truncated_or_extended_bytes_are_refused(message: Message) -> None:
    data = message.encode()
    with pytest.raises(MalformedMessage):
        decode(data[:-1])
    with pytest.raises(MalformedMessage):
        decode(data + b"\x00")


def test_block_count_must_match_the_id_list() -> None:
    with pytest.raises(ValueError, match="blocks"):
        ShareRelay(session=S, recipient=1, senders=(1, 2), ciphertexts=b"x" * 88).encode()
    assert split_blocks(b"ab" * 3, 2) == [b"ab", b"ab", b"ab"]
    with pytest.raises(ValueError):
        split_blocks(b"abc", 2)


@pytest.mark.parametrize(
    "data", [b"", b"SA", b"XX\x01\x01", b"SA\x02\x01", b"SA\x01\x63", b"\x80\x04\x95"]
)
def test_bad_headers_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(data)


@settings(max_examples=50, deadline=None)
@given(
    sender=st.integers(0, 2**32 - 1),
    ids=st.lists(st.integers(0, 2**32 - 1), max_size=20),
    blob=st.binary(min_size=0, max_size=50),
)
def test_round_trip_property(sender: int, ids: list[int], blob: bytes) -> None:
    block = (blob * 88)[:88].ljust(88, b"\0")
    relay = ShareRelay(
        session=S, recipient=sender, senders=tuple(ids), ciphertexts=block * len(ids)
    )
    masked = MaskedInput(session=S, sender=sender, tensors=(("t", blob),))
    assert decode(relay.encode()) == relay
    assert decode(masked.encode()) == masked


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(b"SA\x01" + data)
