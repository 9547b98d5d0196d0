"""Device request authentication, shared by the edge (signs) and the coordinator (verifies).

A device holds an Ed25519 identity key it generated itself; the coordinator stores only
the public key, recorded at enrolment. Every later request carries a ``DeviceAuth``
(``estuary/proto/v1/common.proto``) whose signature covers, with a domain-separation
label, the RPC method, the device id, a millisecond timestamp, a random nonce and the
SHA-256 of the request serialised with ``auth`` cleared. So a signature is bound to one
method and one request body, and cannot be replayed: the coordinator refuses
timestamps outside a window and nonces it has already seen within it.

Both ends of that rule live here, once: :func:`sign_message` is how a device (the edge
agent, the test clients) signs a request message, and :func:`request_body_sha256` with
:func:`signed_auth_from` is what a verifier reads back before :func:`verify_request`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import Message

from estuary.proto.v1 import common_pb2

#: Domain-separation label: a signature made for this purpose can never be mistaken
#: for a signature over some other Estuary message (e.g. a secure-aggregation key).
AUTH_LABEL = b"estuary/v1/device-auth\x00"

#: Random bytes per request: 128 bits make an accidental repeat impossible in practice.
NONCE_BYTES = 16

#: Accepted distance between the device's timestamp and the coordinator's clock:
#: 5 minutes tolerates phone clocks that drift or are set by hand, while bounding
#: how long nonces must be remembered for replay protection.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

#: Parsed public keys kept for :func:`verify_request`: loading a raw Ed25519 key (point
#: decompression) costs about half as much as verifying with it, and a verifier sees the
#: same few thousand devices again and again. 65 536 keys are ~10 MB.
VERIFIER_CACHE_SIZE = 65_536


class AuthError(Exception):
    """A request's authentication is missing, malformed, stale, replayed or forged."""


@dataclass(frozen=True)
class SignedAuth:
    """The fields of a ``DeviceAuth`` message."""

    device_id: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes

    def to_proto(self) -> common_pb2.DeviceAuth:
        """Return these fields as the wire message."""
        return common_pb2.DeviceAuth(
            device_id=self.device_id,
            timestamp_ms=self.timestamp_ms,
            nonce=self.nonce,
            signature=self.signature,
        )


_Request = TypeVar("_Request", bound=Message)


def device_id_for(public_key: bytes) -> str:
    """Return the device id derived from a raw Ed25519 public key (32 hex characters).

    Deriving the id from the key means a device cannot claim another device's id,
    and one key cannot be enrolled twice under different ids.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public_key: must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(b"estuary/v1/device-id\x00" + public_key).hexdigest()[:32]


def raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    """Return the raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def auth_message(
    method: str, *, device_id: str, timestamp_ms: int, nonce: bytes, body_sha256: bytes
) -> bytes:
    """Return the exact bytes that are signed (length-prefixed, so fields cannot shift)."""
    if len(body_sha256) != 32:
        raise ValueError(f"body_sha256: must be 32 bytes, got {len(body_sha256)}")
    parts = [method.encode("utf-8"), device_id.encode("utf-8"), nonce, body_sha256]
    framed = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return AUTH_LABEL + struct.pack(">q", timestamp_ms) + framed


def sign_request(
    private_key: Ed25519PrivateKey, method: str, body_sha256: bytes, *, timestamp_ms: int
) -> SignedAuth:
    """Return the authentication fields for one request of this device."""
    device_id = device_id_for(raw_public_key(private_key))
    nonce = os.urandom(NONCE_BYTES)
    message = auth_message(
        method,
        device_id=device_id,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        body_sha256=body_sha256,
    )
    return SignedAuth(device_id, timestamp_ms, nonce, private_key.sign(message))


def verify_request(
    auth: SignedAuth,
    *,
    public_key: bytes,
    method: str,
    body_sha256: bytes,
    now_ms: int,
) -> None:
    """Check ``auth`` for ``method`` and the request body; raise if anything is off.

    Replay protection (remembering nonces) is the caller's: this checks only the
    signature, the key-to-id binding, the nonce size and the timestamp window.

    Raises
    ------
    AuthError
        With the reason: wrong key for the id, bad sizes, stale timestamp, bad signature.
    """
    if device_id_for(public_key) != auth.device_id:
        raise AuthError("device id does not match the enrolled public key")
    if len(auth.nonce) != NONCE_BYTES:
        raise AuthError(f"nonce must be {NONCE_BYTES} bytes, got {len(auth.nonce)}")
    if len(auth.signature) != SIGNATURE_BYTES:
        raise AuthError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(auth.signature)}")
    skew = abs(now_ms - auth.timestamp_ms)
    if skew > MAX_CLOCK_SKEW_MS:
        raise AuthError(
            f"timestamp is {skew / 1000:.0f}s away from the server clock "
            f"(limit {MAX_CLOCK_SKEW_MS // 1000}s)"
        )
    message = auth_message(
        method,
        device_id=auth.device_id,
        timestamp_ms=auth.timestamp_ms,
        nonce=auth.nonce,
        body_sha256=body_sha256,
    )
    try:
        _verifier(public_key).verify(auth.signature, message)
    except InvalidSignature:
        raise AuthError("signature does not verify") from None


@functools.lru_cache(maxsize=VERIFIER_CACHE_SIZE)
def _verifier(public_key: bytes) -> Ed25519PublicKey:
    """Return the parsed key (cached: keys are immutable, the cache is bounded)."""
    return Ed25519PublicKey.from_public_bytes(public_key)


def request_body_sha256(request: Message) -> bytes:
    """Return the SHA-256 of ``request`` serialised with its ``auth`` field cleared.

    This is the body a device signs and a verifier checks; ``request`` itself is left as
    it is (the hash is taken over a copy).

    Raises
    ------
    ValueError
        If ``request`` has no ``auth`` field (it is not a signed request type).
    """
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("auth")
    return hashlib.sha256(body.SerializeToString()).digest()


def sign_message(
    request: _Request, *, private_key: Ed25519PrivateKey, method: str, timestamp_ms: int
) -> _Request:
    """Set ``request.auth`` to a fresh signature for ``method``; return ``request``.

    Any ``auth`` already there is replaced, with a new nonce: a retried request must be
    signed again, because the coordinator refuses a nonce it has seen.

    Parameters
    ----------
    request
        A request message with a ``DeviceAuth auth`` field (every EdgeService request
        but Enroll); modified in place.
    private_key
        The device's identity key.
    method
        The RPC method name the signature is bound to (``"GetTask"``, ...).
    timestamp_ms
        The device's wall clock, Unix-epoch milliseconds.

    Raises
    ------
    ValueError
        If ``request`` has no ``auth`` field.
    """
    # Cleared first so the hash, taken over a copy, matches the message as sent minus auth.
    signable: Any = request  # generated message types are untyped; every signed one has auth
    signable.ClearField("auth")
    signed = sign_request(
        private_key, method, request_body_sha256(request), timestamp_ms=timestamp_ms
    )
    signable.auth.CopyFrom(signed.to_proto())
    return request


def signed_auth_from(request: Message) -> SignedAuth:
    """Return the :class:`SignedAuth` a request carries, or refuse naming what is missing.

    Raises
    ------
    AuthError
        If ``auth`` is absent or one of its fields is empty (the message names them).
    """
    carrier: Any = request  # generated message types are untyped
    if not carrier.HasField("auth"):
        raise AuthError("auth: missing; every request but Enroll must be signed")
    auth: common_pb2.DeviceAuth = carrier.auth
    missing = [
        name
        for name, present in (
            ("device_id", bool(auth.device_id)),
            ("timestamp_ms", auth.timestamp_ms != 0),
            ("nonce", bool(auth.nonce)),
            ("signature", bool(auth.signature)),
        )
        if not present
    ]
    if missing:
        raise AuthError(f"auth: missing {', '.join(missing)}")
    return SignedAuth(
        device_id=auth.device_id,
        timestamp_ms=auth.timestamp_ms,
        nonce=bytes(auth.nonce),
        signature=bytes(auth.signature),
    )
