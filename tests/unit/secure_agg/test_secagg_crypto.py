"""Crypto wrappers: known-answer vectors, binding of keys to session and direction, refusals."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_agg import crypto
from secure_agg.constants import LABEL_CHANNEL_KEY, LABEL_MASK_SEED, LABEL_MASK_STREAM
from secure_agg.errors import DecryptionFailed, InvalidPublicKey, InvalidSignature

KEY = bytes(range(32))
SHARED = bytes(range(100, 132))
SESSION = bytes(32)


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 with one output block, written from the RFC with hmac only."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_mask_generator_known_answer() -> None:
    # Prepare: the stream is AES-256-CTR(key = seed) from the layout's counter block.
    layout = crypto.mask_layout([("layer.0.B", 8)])
    # Execute
    stream = crypto.mask_stream(KEY, layout=layout)
    # Assert: frozen vector, and an independent computation with AES-ECB on counter blocks.
    assert layout.nonce.hex() == "91f09113ccb3c029aeccb4c0a47ca03d"
    assert stream.tolist() == [
        633312858,
        1248864691,
        3751080093,
        4100631315,
        2103625969,
        324174937,
        2801242659,
        1594637116,
    ]
    name = b"layer.0.B"
    layout_hash = LABEL_MASK_STREAM + struct.pack("<I", 1)
    layout_hash += struct.pack("<I", len(name)) + name + struct.pack("<Q", 8)
    assert layout.nonce == hashlib.sha256(layout_hash).digest()[:16]
    counter = int.from_bytes(layout.nonce, "big")
    blocks = b"".join(((counter + i) % 2**128).to_bytes(16, "big") for i in range(2))
    ecb = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor().update(blocks)
    assert stream.tolist() == list(struct.unpack("<8I", ecb))


def test_key_derivation_known_answer() -> None:
    seed = crypto.pairwise_seed(SHARED, session=SESSION, a=7, b=3)
    key = crypto.channel_key(SHARED, session=SESSION, sender=7, recipient=3)
    assert seed.hex() == "e5f67d239cc45e389d43396f80fc914da74fed3662b148c269e81ba51e81c9cf"
    assert key.hex() == "24a9100cc768571df2c0cb6dc200d81d0fa58d2b109d8245e97b6677865a82e3"
    assert seed == _hkdf_sha256(SHARED, SESSION, LABEL_MASK_SEED + struct.pack("<II", 3, 7))
    assert key == _hkdf_sha256(SHARED, SESSION, LABEL_CHANNEL_KEY + struct.pack("<II", 7, 3))


def test_pairwise_seed_is_symmetric_and_bound_to_the_session() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ab = crypto.agree(a, b.public_key().public_bytes_raw())
    ba = crypto.agree(b, a.public_key().public_bytes_raw())
    assert crypto.pairwise_seed(ab, session=SESSION, a=1, b=2) == crypto.pairwise_seed(
        ba, session=SESSION, a=2, b=1
    )
    other = crypto.pairwise_seed(ab, session=b"\x01" * 32, a=1, b=2)
    assert other != crypto.pairwise_seed(ab, session=SESSION, a=1, b=2)
    # Direction matters for channel keys: each key encrypts one message only.
    assert crypto.channel_key(ab, session=SESSION, sender=1, recipient=2) != crypto.channel_key(
        ab, session=SESSION, sender=2, recipient=1
    )


def test_chunked_accumulation_equals_whole_streams() -> None:
    # Prepare: longer than one chunk, mixed signs.
    layout = crypto.mask_layout([("t", 70_001)])
    seeds = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    expected = np.zeros(layout.total, dtype=np.uint64)
    for seed, sign in seeds:
        whole = np.frombuffer(
            Cipher(algorithms.AES(seed), modes.CTR(layout.nonce))
            .encryptor()
            .update(bytes(4 * layout.total)),
            dtype="<u4",
        ).astype(np.uint64)
        expected = (expected + (whole if sign > 0 else 2**32 - whole)) % 2**32
    acc = np.zeros(layout.total, dtype=np.uint32)
    # Execute
    crypto.add_masks(acc, seeds, layout=layout)
    # Assert
    assert np.array_equal(acc.astype(np.uint64), expected)


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),  # the identity (order 1 / 4 in the twist)
        (1).to_bytes(32, "little"),  # order 4
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # 8
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # 8
    ],
)
def test_low_order_points_are_refused(point: bytes) -> None:
    with pytest.raises(InvalidPublicKey):
        crypto.agree(X25519PrivateKey.generate(), point)


def test_malformed_public_key_is_refused() -> None:
    with pytest.raises(InvalidPublicKey):
        crypto.load_x25519_public(b"\x01" * 31)


def test_share_ciphertext_is_bound_to_session_stage_sender_and_recipient() -> None:
    key = os.urandom(32)
    ct = crypto.encrypt_share(key, b"x" * 72, session=SESSION, stage=1, sender=4, recipient=9)
    assert (
        crypto.decrypt_share(key, ct, session=SESSION, stage=1, sender=4, recipient=9) == b"x" * 72
    )
    for change in ({"sender": 5}, {"recipient": 8}, {"stage": 2}, {"session": b"\x02" * 32}):
        args = {"session": SESSION, "stage": 1, "sender": 4, "recipient": 9} | change
        with pytest.raises(DecryptionFailed):
            crypto.decrypt_share(key, ct, **args)  # type: ignore[arg-type]


def test_session_id_is_order_free_and_binds_every_key() -> None:
    keys = [(i, os.urandom(32), os.urandom(32)) for i in range(5)]
    sid = crypto.session_id(b"cohort", b"params", keys)
    assert sid == crypto.session_id(b"cohort", b"params", list(reversed(keys)))
    altered = [*keys[:4], (4, keys[4][1], os.urandom(32))]
    assert crypto.session_id(b"cohort", b"params", altered) != sid
    assert crypto.session_id(b"cohort", b"other", keys) != sid
    assert crypto.session_id(b"cohort2", b"params", keys) != sid


def test_signature_memo_remembers_only_what_verified_and_binds_every_byte() -> None:
    # Prepare
    identity, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    public = identity.public_key()
    signature = identity.sign(b"payload")
    memo = crypto.VerifiedSignatures()
    # Execute: a good signature is remembered ...
    crypto.verify_signature(public, signature, b"payload", client=1, verified=memo)
    assert len(memo) == 1
    assert memo.seen(crypto.VerifiedSignatures.key(public, signature, b"payload"))
    # ... and changing any of key, signature or payload still fails, and is not remembered.
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    for args in (
        (other.public_key(), signature, b"payload"),
        (public, forged, b"payload"),
        (public, signature, b"payloae"),
    ):
        with pytest.raises(InvalidSignature):
            crypto.verify_signature(*args, client=1, verified=memo)
        with pytest.raises(InvalidSignature):  # a failure is never cached either
            crypto.verify_signature(*args, client=1, verified=memo)
    assert len(memo) == 1


def test_signature_memo_drops_the_least_recently_used() -> None:
    memo = crypto.VerifiedSignatures(capacity=2)
    memo.add(b"a")
    memo.add(b"b")
    assert memo.seen(b"a")  # "b" is now the least recently used
    memo.add(b"c")
    assert (memo.seen(b"a"), memo.seen(b"b"), memo.seen(b"c")) == (True, False, True)
    with pytest.raises(ValueError, match="capacity"):
        crypto.VerifiedSignatures(capacity=0)
