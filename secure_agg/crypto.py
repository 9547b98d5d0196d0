"""Thin named wrappers over ``cryptography`` for every primitive the protocol uses.

- X25519 + HKDF-SHA256: pairwise channel keys and pairwise mask seeds, both bound to the
  session id.
- AES-256-GCM: share bundles in transit, with session id, stage, sender and recipient as the
  associated data, so a ciphertext swapped or forwarded to someone else fails authentication.
- AES-256-CTR keyed with the full 32-byte seed: the mask generator, one stream per tensor (the
  initial counter block hashes the tensor name and length), written into preallocated buffers.
- Ed25519: identity signatures for the active-adversary mode; keys come from the caller.

``verify_*`` functions raise; none of them returns a boolean that a caller could ignore.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_agg.constants import (
    AES_KEY_BYTES,
    CTR_BLOCK_BYTES,
    ED25519_SIGNATURE_BYTES,
    GCM_NONCE,
    LABEL_CHANNEL_KEY,
    LABEL_COMMITMENT,
    LABEL_LOW_ORDER_PROBE,
    LABEL_MASK_NONCE,
    LABEL_MASK_SEED,
    LABEL_SESSION,
    LABEL_SIG_ADVERTISE,
    LABEL_SIG_CONSISTENCY,
    MASK_CHUNK_ELEMENTS,
    MASK_STREAM_GROUP,
    X25519_FIELD_PRIME,
    X25519_KEY_BYTES,
)
from secure_agg.errors import DecryptionFailed, InvalidPublicKey, InvalidSignature

UInt32Array = npt.NDArray[np.uint32]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _lp(data: bytes) -> bytes:
    """Length-prefix ``data`` so that concatenations are unambiguous."""
    return _U32.pack(len(data)) + data


# --- keys -------------------------------------------------------------------------------------


def generate_x25519() -> tuple[X25519PrivateKey, bytes]:
    """Generate an X25519 key pair from the OS CSPRNG, with the raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def load_x25519_public(data: bytes) -> X25519PublicKey:
    """Parse a raw X25519 public key.

    Raises
    ------
    InvalidPublicKey
        If ``data`` is not 32 bytes. Low-order points are caught by :func:`agree`.
    """
    if len(data) != X25519_KEY_BYTES:
        raise InvalidPublicKey(f"X25519 public key must be {X25519_KEY_BYTES} bytes")
    try:
        return X25519PublicKey.from_public_bytes(data)
    except ValueError as exc:
        raise InvalidPublicKey("malformed X25519 public key") from exc


_probe: X25519PrivateKey | None = None


def check_x25519_public(data: bytes) -> X25519PublicKey:
    """Parse a peer's advertised X25519 public key, refusing every key no honest client makes.

    Refused: a length other than 32 bytes; a non-canonical encoding (top bit set, or u ≥ p),
    which RFC 7748 silently maps onto another key; and a point of small order, whose shared
    secret with anyone is all zeros and known to everyone. The server checks each advertisement
    with this, so the one client that sends such a key is dropped before its key reaches the
    others (each of which would refuse the broadcast and abort); the clients check again.

    Raises
    ------
    InvalidPublicKey
        Naming which of the three rules the key breaks.
    """
    global _probe
    public = load_x25519_public(data)
    if data[-1] & 0x80 or int.from_bytes(data, "little") >= X25519_FIELD_PRIME:
        raise InvalidPublicKey("non-canonical X25519 public key encoding")
    if _probe is None:  # a fixed scalar: the check is deterministic, so replays agree
        _probe = X25519PrivateKey.from_private_bytes(hashlib.sha256(LABEL_LOW_ORDER_PROBE).digest())
    agree(_probe, public)
    return public


def agree(private: X25519PrivateKey, peer: X25519PublicKey | bytes) -> bytes:
    """Raw X25519 shared secret.

    Raises
    ------
    InvalidPublicKey
        If the peer key is a low-order point (the shared secret would be all zeros and known to
        anyone). OpenSSL refuses these; the explicit zero check keeps the guarantee if it stops.
    """
    public = load_x25519_public(peer) if isinstance(peer, bytes) else peer
    try:
        shared = private.exchange(public)
    except ValueError as exc:
        raise InvalidPublicKey("low-order X25519 point") from exc
    if not any(shared):
        raise InvalidPublicKey("low-order X25519 point")
    return shared


def _hkdf(shared: bytes, *, session: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=AES_KEY_BYTES, salt=session, info=info).derive(
        shared
    )


def channel_key(shared: bytes, *, session: bytes, sender: int, recipient: int) -> bytes:
    """AES-256-GCM key for the one share bundle ``sender`` encrypts to ``recipient``.

    Direction is part of the derivation, so each key encrypts exactly one message and the fixed
    nonce is never reused.
    """
    info = LABEL_CHANNEL_KEY + _U32.pack(sender) + _U32.pack(recipient)
    return _hkdf(shared, session=session, info=info)


def pairwise_seed(shared: bytes, *, session: bytes, a: int, b: int) -> bytes:
    """32-byte pairwise mask seed shared by clients ``a`` and ``b`` (order-independent)."""
    low, high = min(a, b), max(a, b)
    info = LABEL_MASK_SEED + _U32.pack(low) + _U32.pack(high)
    return _hkdf(shared, session=session, info=info)


def session_id(cohort: bytes, params: bytes, keys: Iterable[tuple[int, bytes, bytes]]) -> bytes:
    """SHA-256 over the cohort id, the public parameters and the length-prefixed key list.

    Keys are hashed in client-id order, so every party derives the same id from the same set.
    """
    digest = hashlib.sha256(LABEL_SESSION)
    digest.update(_lp(cohort))
    digest.update(_lp(params))
    for client, c_pk, s_pk in sorted(keys):
        digest.update(_U32.pack(client) + _lp(c_pk) + _lp(s_pk))
    return digest.digest()


def seed_commitment(seed: bytes, *, session: bytes, owner: int) -> bytes:
    """Hash commitment to a self-mask seed; hiding because the seed is 256 uniform bits."""
    return hashlib.sha256(LABEL_COMMITMENT + session + _U32.pack(owner) + seed).digest()


def verify_seed_commitment(seed: bytes, commitment: bytes, *, session: bytes, owner: int) -> None:
    """Raise ``ValueError`` unless ``seed`` opens ``commitment``."""
    if not hmac.compare_digest(seed_commitment(seed, session=session, owner=owner), commitment):
        raise ValueError(f"reconstructed self-mask seed of client {owner} does not match")


# --- share channel ----------------------------------------------------------------------------


def share_aad(*, session: bytes, stage: int, sender: int, recipient: int) -> bytes:
    """Associated data of a share ciphertext."""
    return session + bytes([stage]) + _U32.pack(sender) + _U32.pack(recipient)


def encrypt_share(
    key: bytes, plaintext: bytes, *, session: bytes, stage: int, sender: int, recipient: int
) -> bytes:
    """AES-256-GCM encryption of one share bundle (ciphertext ‖ tag)."""
    aad = share_aad(session=session, stage=stage, sender=sender, recipient=recipient)
    return AESGCM(key).encrypt(GCM_NONCE, plaintext, aad)


def decrypt_share(
    key: bytes, ciphertext: bytes, *, session: bytes, stage: int, sender: int, recipient: int
) -> bytes:
    """Decrypt and authenticate one share bundle.

    Raises
    ------
    DecryptionFailed
        If the tag fails: altered, swapped between senders, or meant for another recipient.
    """
    aad = share_aad(session=session, stage=stage, sender=sender, recipient=recipient)
    try:
        return AESGCM(key).decrypt(GCM_NONCE, ciphertext, aad)
    except InvalidTag as exc:
        raise DecryptionFailed(
            f"share ciphertext from client {sender} fails authentication", client=sender
        ) from exc


# --- mask generator ---------------------------------------------------------------------------


def mask_nonce(name: str, length: int) -> bytes:
    """Derive the initial AES-CTR counter block for tensor ``name`` of ``length`` elements."""
    encoded = name.encode("utf-8")
    return hashlib.sha256(LABEL_MASK_NONCE + _lp(encoded) + _U64.pack(length)).digest()[
        :CTR_BLOCK_BYTES
    ]


def mask_stream(seed: bytes, *, name: str, length: int) -> UInt32Array:
    """Generate the full mask of one tensor: ``length`` uniform uint32 values."""
    out = np.zeros(length, dtype=np.uint32)
    add_masks(out, [(seed, 1)], name=name)
    return out


def add_masks(acc: UInt32Array, seeds: Sequence[tuple[bytes, int]], *, name: str) -> None:
    """Add Σ sign · PRG(seed) to ``acc`` in place, wrapping mod 2^32.

    Parameters
    ----------
    acc
        Contiguous uint32 accumulator; its length is the tensor length and selects the stream.
    seeds
        (seed, sign) pairs with sign +1 or -1.
    name
        Tensor name; with the length it selects the stream, so tensors never share masks.

    Notes
    -----
    Streams are produced chunk by chunk with ``update_into`` into one preallocated buffer and
    added while the chunk is hot in cache; at most ``MASK_STREAM_GROUP`` cipher contexts are open.
    """
    length = int(acc.shape[0])
    if length == 0 or not seeds:
        return
    nonce = mask_nonce(name, length)
    chunk = min(length, MASK_CHUNK_ELEMENTS)
    zeros = bytes(4 * chunk)
    buffer = bytearray(4 * chunk + CTR_BLOCK_BYTES - 1)
    keystream = np.frombuffer(buffer, dtype="<u4", count=chunk)
    for group_start in range(0, len(seeds), MASK_STREAM_GROUP):
        group = seeds[group_start : group_start + MASK_STREAM_GROUP]
        ciphers = [(Cipher(algorithms.AES(s), modes.CTR(nonce)).encryptor(), g) for s, g in group]
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            size = stop - start
            view = acc[start:stop]
            plain = zeros if size == chunk else bytes(4 * size)
            for encryptor, sign in ciphers:
                encryptor.update_into(plain, buffer)
                if sign > 0:
                    np.add(view, keystream[:size], out=view)
                else:
                    np.subtract(view, keystream[:size], out=view)


# --- identity signatures ----------------------------------------------------------------------


def advertise_payload(cohort: bytes, client: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """Build what a client signs in AdvertiseKeys: its two public keys bound to cohort and id."""
    return LABEL_SIG_ADVERTISE + _lp(cohort) + _U32.pack(client) + c_pk + s_pk


def consistency_payload(session: bytes, alive: Sequence[int], dropped: Sequence[int]) -> bytes:
    """Build what a client signs in ConsistencyCheck: the session and the survivor/dropout sets."""
    body = b"".join(_U32.pack(c) for c in sorted(alive))
    gone = b"".join(_U32.pack(c) for c in sorted(dropped))
    return LABEL_SIG_CONSISTENCY + session + _lp(body) + _lp(gone)


def sign(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    """Ed25519 signature of ``payload``."""
    return identity.sign(payload)


def verify_signature(
    public: Ed25519PublicKey, signature: bytes, payload: bytes, *, client: int
) -> None:
    """Raise :class:`InvalidSignature` unless ``signature`` is client's signature on payload."""
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise InvalidSignature(f"missing or truncated signature of client {client}", client=client)
    try:
        public.verify(signature, payload)
    except _CryptoInvalidSignature as exc:
        raise InvalidSignature(f"bad signature of client {client}", client=client) from exc
