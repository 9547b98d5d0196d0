"""Thin named wrappers over ``cryptography`` for every primitive the protocol uses.

- X25519 + HKDF-SHA256: pairwise channel keys and pairwise mask seeds, both bound to the
  session id.
- AES-256-GCM: share bundles in transit, with session id, stage, sender and recipient as the
  associated data, so a ciphertext swapped or forwarded to someone else fails authentication.
- AES-256-CTR keyed with the full 32-byte seed: the mask generator, ONE stream per seed covering
  every tensor of the update laid end to end in name order (:class:`MaskLayout`; the initial
  counter block hashes the layout), written into preallocated buffers.
- Ed25519: identity signatures for the active-adversary mode; keys come from the caller. Parties
  that share a process may share a memo of the signatures that verified
  (:class:`VerifiedSignatures`).

``verify_*`` functions raise; none of them returns a boolean that a caller could ignore.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
    LABEL_MASK_SEED,
    LABEL_MASK_STREAM,
    LABEL_SESSION,
    LABEL_SIG_ADVERTISE,
    LABEL_SIG_CONSISTENCY,
    MASK_CHUNK_ELEMENTS,
    MASK_STREAM_GROUP,
    VERIFIED_SIGNATURES_CAPACITY,
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


def check_x25519_encoding(data: bytes) -> None:
    """Refuse an X25519 public key of the wrong length or with a non-canonical encoding.

    A non-canonical encoding (top bit set, or u ≥ p) is silently mapped by RFC 7748 onto another
    key, so it would let one client advertise another's key under different bytes. Small order
    is not checked here: :func:`agree` refuses it for every key it is used with, and
    :func:`check_x25519_public` for a key that is not.

    Raises
    ------
    InvalidPublicKey
        If the length or the encoding is wrong.
    """
    if len(data) != X25519_KEY_BYTES:
        raise InvalidPublicKey(f"X25519 public key must be {X25519_KEY_BYTES} bytes")
    if data[-1] & 0x80 or int.from_bytes(data, "little") >= X25519_FIELD_PRIME:
        raise InvalidPublicKey("non-canonical X25519 public key encoding")


def check_x25519_public(data: bytes) -> X25519PublicKey:
    """Parse a peer's advertised X25519 public key, refusing every key no honest client makes.

    Refused: a length other than 32 bytes; a non-canonical encoding (top bit set, or u ≥ p),
    which RFC 7748 silently maps onto another key; and a point of small order, whose shared
    secret with anyone is all zeros and known to everyone. The server checks each advertisement
    with this, so the one client that sends such a key is dropped before its key reaches the
    others (each of which would refuse the broadcast and abort); the clients check again (the
    keys they agree with through :func:`agree`, which refuses small order, the others here).

    Raises
    ------
    InvalidPublicKey
        Naming which of the three rules the key breaks.
    """
    global _probe
    check_x25519_encoding(data)
    public = load_x25519_public(data)
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


@dataclass(frozen=True)
class MaskLayout:
    """Where each tensor's mask lies in the one keystream a seed generates.

    Every seed expands into ONE AES-256-CTR stream (key = the seed) of ``total`` uint32 values.
    The tensors are laid end to end in ascending name order (the order of
    :attr:`SessionConfig.tensors <secure_agg.config.SessionConfig.tensors>`), so the mask of the
    tensor at ``offsets[i]`` is ``stream[offsets[i] : offsets[i] + tensors[i][1]]``: masks of
    different tensors are disjoint slices of the stream, so no keystream value masks two
    elements. One cipher context per seed, instead of one per (tensor, seed), is what makes
    masking cheap for adapters of many small tensors: opening a context (key schedule plus the
    Python wrapper, several microseconds) costs more than the keystream of a small tensor.

    Attributes
    ----------
    tensors
        (name, length) of every tensor, ascending by name.
    offsets
        Element offset of each tensor's slice, in the order of ``tensors``.
    total
        Σ lengths: the stream length in uint32 elements.
    nonce
        Initial AES-CTR counter block: SHA-256 over the mask-stream label and the
        length-prefixed layout, cut to one block. Seeds are unique per session (pairwise seeds
        are bound to the session id, self-mask seeds are fresh), so any fixed block is safe;
        hashing the layout makes two parties with different layouts disagree on every element
        instead of silently sharing a prefix.
    """

    tensors: tuple[tuple[str, int], ...]
    offsets: tuple[int, ...]
    total: int
    nonce: bytes

    def split(self, flat: UInt32Array) -> dict[str, UInt32Array]:
        """Name → view of ``flat`` (``total`` elements) holding that tensor's slice."""
        if flat.shape != (self.total,):
            raise ValueError(f"expected a flat array of {self.total} elements, got {flat.shape}")
        return {
            name: flat[start : start + length]
            for (name, length), start in zip(self.tensors, self.offsets, strict=True)
        }


def mask_layout(tensors: Iterable[tuple[str, int]]) -> MaskLayout:
    """Lay ``tensors`` ((name, length) pairs, any order) out in one mask stream.

    Raises
    ------
    ValueError
        If there is no tensor, a name repeats, or a length is below 1.
    """
    ordered = tuple(sorted((str(name), int(length)) for name, length in tensors))
    if not ordered:
        raise ValueError("tensors must name at least one tensor")
    names = [name for name, _ in ordered]
    if len(set(names)) != len(names):
        raise ValueError("tensors has duplicate names")
    digest = hashlib.sha256(LABEL_MASK_STREAM + _U32.pack(len(ordered)))
    offsets = []
    total = 0
    for name, length in ordered:
        if length < 1:
            raise ValueError(f"tensors: length of {name!r} must be >= 1, got {length}")
        digest.update(_lp(name.encode("utf-8")) + _U64.pack(length))
        offsets.append(total)
        total += length
    return MaskLayout(
        tensors=ordered,
        offsets=tuple(offsets),
        total=total,
        nonce=digest.digest()[:CTR_BLOCK_BYTES],
    )


def mask_stream(seed: bytes, *, layout: MaskLayout) -> UInt32Array:
    """Generate the whole mask of one seed: ``layout.total`` uniform uint32 values."""
    out = np.zeros(layout.total, dtype=np.uint32)
    add_masks(out, [(seed, 1)], layout=layout)
    return out


def add_masks(acc: UInt32Array, seeds: Sequence[tuple[bytes, int]], *, layout: MaskLayout) -> None:
    """Add Σ sign · PRG(seed) to ``acc`` in place, wrapping mod 2^32.

    Parameters
    ----------
    acc
        Contiguous uint32 accumulator of ``layout.total`` elements: every tensor, laid out as
        ``layout`` says (:meth:`MaskLayout.split` gives the per-tensor views).
    seeds
        (seed, sign) pairs with sign +1 or -1.
    layout
        The session's tensor layout; selects the counter block.

    Notes
    -----
    Streams are produced chunk by chunk with ``update_into`` into one preallocated buffer and
    added while the chunk is hot in cache; at most ``MASK_STREAM_GROUP`` cipher contexts are open.
    """
    if acc.shape != (layout.total,) or acc.dtype != np.uint32:
        raise ValueError(
            f"acc must be a uint32 array of {layout.total} elements, got {acc.dtype} {acc.shape}"
        )
    if not acc.flags.c_contiguous:
        raise ValueError("acc must be contiguous")
    if not seeds:
        return
    length = layout.total
    nonce = layout.nonce
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


class VerifiedSignatures:
    """A bounded memo of Ed25519 signatures that verified, shared by parties in one process.

    Every member of a cohort checks the same signatures: each advertisement in the key
    broadcast, each consistency signature in the unmask request. A device checks them once
    each; a simulator that runs a whole cohort in one process would check each n times. Handing
    every client of that process one memo makes each distinct signature cost one verification.

    Verification is a deterministic function of (public key, signature, payload), so a hit
    answers exactly what verifying again would. Only successes are stored, keyed on the raw
    public key, the signature and the SHA-256 of the payload (collision resistance makes the
    digest as binding as the payload and keeps entries small); a failure is verified again
    every time and raises every time. Thread-safe.

    Parameters
    ----------
    capacity
        Entries kept; the least recently used goes first.
    """

    def __init__(self, capacity: int = VERIFIED_SIGNATURES_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(public: Ed25519PublicKey, signature: bytes, payload: bytes) -> bytes:
        """Return the memo key of one (public key, signature, payload) triple."""
        return public.public_bytes_raw() + signature + hashlib.sha256(payload).digest()

    def seen(self, key: bytes) -> bool:
        """Return whether the triple of ``key`` verified before (and mark it recently used)."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, key: bytes) -> None:
        """Record a triple that verified."""
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


def verify_signature(
    public: Ed25519PublicKey,
    signature: bytes,
    payload: bytes,
    *,
    client: int,
    verified: VerifiedSignatures | None = None,
) -> None:
    """Raise :class:`InvalidSignature` unless ``signature`` is client's signature on payload.

    ``verified``, when given, is consulted first and records a success (see
    :class:`VerifiedSignatures`); None verifies every time.
    """
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise InvalidSignature(f"missing or truncated signature of client {client}", client=client)
    key = b""
    if verified is not None:
        key = VerifiedSignatures.key(public, signature, payload)
        if verified.seen(key):
            return
    try:
        public.verify(signature, payload)
    except _CryptoInvalidSignature as exc:
        raise InvalidSignature(f"bad signature of client {client}", client=client) from exc
    if verified is not None:
        verified.add(key)
