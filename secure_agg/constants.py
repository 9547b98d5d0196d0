"""Sizes, labels and field parameters of the secure aggregation protocol, in one place.

Every derived key carries a distinct label so that a key computed for one purpose can never be
mistaken for a key of another purpose, and the protocol version so that a future change of any
rule cannot silently interoperate with this one.
"""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final[int] = 2
"""Wire and key-derivation version; bumped on any incompatible change. It opens every encoded
message (a peer of another version is refused with ``MalformedMessage``) and is hashed into the
session id through the parameters.

- 1: one AES-CTR mask stream per (seed, tensor), counter block hashed from name and length.
- 2: one AES-CTR mask stream per seed; tensors are slices of it in name order
  (:class:`secure_agg.crypto.MaskLayout`)."""

WIRE_MAGIC: Final[bytes] = b"SA"
"""Two bytes that open every encoded message, so that a stray payload fails fast."""

X25519_KEY_BYTES: Final[int] = 32
"""Size of an X25519 public or private key (RFC 7748)."""

X25519_FIELD_PRIME: Final[int] = 2**255 - 19
"""p of Curve25519. A canonical public key encodes u < p with the top bit clear; anything else is
an alias of another key (RFC 7748 reduces it mod p), which would let one client advertise another's
key under different bytes."""

ED25519_SIGNATURE_BYTES: Final[int] = 64
"""Size of an Ed25519 signature (RFC 8032)."""

VERIFIED_SIGNATURES_CAPACITY: Final[int] = 4096
"""Default size of a :class:`~secure_agg.crypto.VerifiedSignatures` memo. An entry is 128 bytes of
key (about 250 with the dictionary's overhead), so a full memo is about 1 MB; a signature is
checked by every member within one stage, so 4096 holds every advertisement and consistency
signature of ~100 cohorts of 20 in flight at once, and a miss only costs a verification."""

SEED_BYTES: Final[int] = 32
"""Self-mask seed size: the full 256-bit AES key, never folded to fewer bits."""

SESSION_ID_BYTES: Final[int] = 32
"""SHA-256 output; the session id is a hash of the cohort's public keys and parameters."""

COMMITMENT_BYTES: Final[int] = 32
"""SHA-256 commitment to a self-mask seed, checked after reconstruction."""

AES_KEY_BYTES: Final[int] = 32
"""AES-256 for both the share channel (GCM) and the mask generator (CTR)."""

GCM_TAG_BYTES: Final[int] = 16
"""Full-length GCM tag; truncated tags weaken forgery resistance."""

GCM_NONCE: Final[bytes] = bytes(12)
"""Fixed all-zero GCM nonce. Safe because every channel key is derived per (session, sender,
recipient) and encrypts exactly one message: the pair's share bundle."""

CTR_BLOCK_BYTES: Final[int] = 16
"""AES block size; ``update_into`` needs this much slack minus one in its output buffer."""

MIN_COHORT_SIZE: Final[int] = 3
"""Fewest clients a session may invite. With one client the "sum" is its input; with two, the sum
and either input give the other, so one colluding client (or one that later sees the aggregate)
unmasks its peer, and t > n / 2 would leave no room for a single dropout."""

MAX_COHORT_ID_BYTES: Final[int] = 64
"""Upper bound on the coordinator's cohort id: enough for a UUID or a hash, small on the wire."""

MAX_TENSOR_NAME_BYTES: Final[int] = 255
"""Tensor names are length-prefixed with one byte on the wire."""

MAX_BITS: Final[int] = 32
"""Largest modulus exponent b. Masks and sums are kept in uint32; 2^b divides 2^32, so sums
wrap correctly in uint32 and are reduced mod 2^b once at the end."""

MIN_BITS: Final[int] = 2
"""Smallest modulus exponent: one sign bit and one magnitude bit."""

MASK_CHUNK_ELEMENTS: Final[int] = 32_768
"""Mask streams are generated and summed in chunks of 128 KiB of uint32 so that the keystream
buffer and the accumulator slice stay in the L2 cache while hundreds of streams are added."""

MASK_STREAM_GROUP: Final[int] = 256
"""At most this many cipher contexts are open at once while summing masks, to bound memory when
a server removes tens of thousands of pairwise masks."""

FIELD_PRIME: Final[int] = 2**31 - 1
"""Mersenne prime of the Shamir field. Products of two elements fit in 62 bits, so numpy
uint64 arithmetic never overflows before the reduction."""

SECRET_CHUNK_BITS: Final[int] = 30
"""A 256-bit secret is cut into 30-bit chunks, each strictly below the prime."""

SECRET_CHUNKS: Final[int] = 9
"""ceil(256 / 30) field elements per shared 32-byte secret."""

SHARE_BYTES: Final[int] = 4 * SECRET_CHUNKS
"""One share of one secret on the wire: nine little-endian uint32 field elements."""

SHARE_BUNDLE_BYTES: Final[int] = 2 * SHARE_BYTES
"""Plaintext of a share ciphertext: the share of the self-mask seed, then of the mask key."""

SHARE_CIPHERTEXT_BYTES: Final[int] = SHARE_BUNDLE_BYTES + GCM_TAG_BYTES
"""What one client sends to one neighbour through the server in ShareKeys."""

# Key derivation and hashing labels. Each is distinct so derived keys are domain separated.
LABEL_SESSION: Final[bytes] = b"estuary/secagg/v1/session-id"
LABEL_PARAMS: Final[bytes] = b"estuary/secagg/v1/params"
LABEL_CHANNEL_KEY: Final[bytes] = b"estuary/secagg/v1/channel-key"
LABEL_MASK_SEED: Final[bytes] = b"estuary/secagg/v1/pairwise-mask-seed"
LABEL_MASK_STREAM: Final[bytes] = b"estuary/secagg/v2/mask-stream"
LABEL_COMMITMENT: Final[bytes] = b"estuary/secagg/v1/seed-commitment"
LABEL_GRAPH: Final[bytes] = b"estuary/secagg/v1/graph"
LABEL_SIG_ADVERTISE: Final[bytes] = b"estuary/secagg/v1/sig/advertise"
LABEL_SIG_CONSISTENCY: Final[bytes] = b"estuary/secagg/v1/sig/consistency"
LABEL_LOW_ORDER_PROBE: Final[bytes] = b"estuary/secagg/v1/low-order-probe"
"""Hashed into the fixed private scalar the server multiplies advertised keys by: a point of small
order gives the all-zero result for every clamped scalar, so any fixed scalar detects it, and a
fixed one keeps the server deterministic (its state is replayed from a log)."""
