"""The client state machine: one handler per stage, and an aborted state that reveals nothing.

Security notes
--------------
- The client answers at most one unmask request. A repeat with identical sets gets the identical
  answer (it carries no new information); any other request aborts. So a server can never
  obtain both the self-mask seed share and the mask-key share of one peer from this client.
- Every check of a server message happens before anything derived from a secret leaves.
- On any violation the client drops its secrets and moves to ABORTED; every later call raises
  :class:`~secure_agg.errors.ClientAborted`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg import crypto, shamir
from secure_agg.config import SessionConfig
from secure_agg.constants import (
    FIELD_PRIME,
    SEED_BYTES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
)
from secure_agg.errors import (
    ClientAborted,
    InconsistentUnmaskRequest,
    InsufficientParticipants,
    InvalidKeyBroadcast,
    InvalidSignature,
    MalformedMessage,
    ProtocolViolation,
    ReplayedMessage,
    SessionMismatch,
    UnexpectedMessage,
)
from secure_agg.graph import harary_neighbours
from secure_agg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    Message,
    ShareKeys,
    ShareRelay,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    split_blocks,
)
from secure_agg.numerics import pack, quantize, reduce_ring, to_ring
from secure_agg.stages import Stage

logger = logging.getLogger(__name__)

Update = npt.NDArray[np.floating] | Mapping[str, npt.NDArray[np.floating]]

_STAGE_OF: dict[type, Stage] = {
    KeyBroadcast: Stage.SHARE_KEYS,
    ShareRelay: Stage.MASKED_INPUT,
    ConsistencyRequest: Stage.CONSISTENCY_CHECK,
    UnmaskRequest: Stage.UNMASKING,
}
"""The stage in which each server → client message is accepted."""

SINGLE_TENSOR = "update"
"""Name of the tensor when an update is a plain array instead of a name → array mapping."""


def as_tensors(update: Update) -> dict[str, npt.NDArray[np.floating]]:
    """Name → array view of an update: a plain array becomes the tensor :data:`SINGLE_TENSOR`."""
    if isinstance(update, Mapping):
        return {str(k): np.asarray(v) for k, v in update.items()}
    return {SINGLE_TENSOR: np.asarray(update)}


class Client:
    """One client of one secure aggregation session.

    Parameters
    ----------
    client_id
        This client's id in the cohort (uint32).
    config
        The session parameters, identical for every party.
    identity
        Ed25519 identity key (active mode only), supplied by the caller's enrolment.
    peer_identities
        Enrolled identity public keys of the cohort, by client id (active mode only).
    verified
        A memo of signatures that verified, shared with the other clients of this process (a
        simulator running whole cohorts), so a signature every member checks is verified once.
        None, as on a device: every signature is verified.
    """

    def __init__(
        self,
        client_id: int,
        *,
        config: SessionConfig,
        identity: Ed25519PrivateKey | None = None,
        peer_identities: Mapping[int, Ed25519PublicKey] | None = None,
        verified: crypto.VerifiedSignatures | None = None,
    ) -> None:
        if not 0 <= client_id < 2**32:
            raise ValueError(f"client_id must be a uint32, got {client_id}")
        if config.active and (identity is None or peer_identities is None):
            raise ValueError("identity and peer_identities are required when config.active")
        if not config.active and (identity is not None or peer_identities is not None):
            raise ValueError("identity/peer_identities given but config.active is False")
        self.client_id = client_id
        self.config = config
        self._identity = identity
        self._peers = dict(peer_identities or {})
        self._verified = verified
        self.stage = Stage.ADVERTISE_KEYS
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._c_pk = b""
        self._s_pk = b""
        self._session = b""
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._closed: frozenset[int] = frozenset()
        """Neighbours plus this client: the holders of its shares."""
        self._channel: dict[int, bytes] = {}
        self._mask_shared: dict[int, bytes] = {}
        self._seed: bytes | None = None
        self._seed_shares: dict[int, bytes] = {}
        self._key_shares: dict[int, bytes] = {}
        self._shared_with: frozenset[int] | None = None
        self._consistency: tuple[frozenset[int], frozenset[int]] | None = None
        self._answered: tuple[UnmaskRequest, UnmaskResponse] | None = None

    @property
    def session(self) -> bytes:
        """Session id (empty until the key broadcast has been accepted)."""
        return self._session

    # --- public API ---------------------------------------------------------------------------

    def advertise(self) -> AdvertiseKeys:
        """Stage AdvertiseKeys: generate the two X25519 key pairs and announce them."""
        self._require(Stage.ADVERTISE_KEYS)
        self._c_sk, self._c_pk = crypto.generate_x25519()
        self._s_sk, self._s_pk = crypto.generate_x25519()
        signature = b""
        if self._identity is not None:
            payload = crypto.advertise_payload(
                self.config.cohort, self.client_id, self._c_pk, self._s_pk
            )
            signature = crypto.sign(self._identity, payload)
        self.stage = Stage.SHARE_KEYS
        logger.debug("client %d advertised keys", self.client_id)
        return AdvertiseKeys(
            cohort=self.config.cohort,
            sender=self.client_id,
            c_pk=self._c_pk,
            s_pk=self._s_pk,
            signature=signature,
        )

    def handle(self, message: bytes | Message) -> Message | None:
        """Process one server message and return the reply, if the stage has one.

        Raises
        ------
        ProtocolViolation
            On any refused message; the client is then aborted and has revealed nothing more.
        ClientAborted
            If the client had already aborted.
        """
        if self.stage is Stage.ABORTED:
            raise ClientAborted(f"client {self.client_id} has aborted")
        try:
            decoded = decode(message) if isinstance(message, bytes | bytearray) else message
            return self._dispatch(decoded)
        except ProtocolViolation as exc:
            self._abort(exc)
            raise

    def submit(
        self, update: Update, *, weight: float = 1.0, rng: np.random.Generator | None = None
    ) -> MaskedInput:
        """Stage MaskedInputCollection: clip, weight, quantise and mask the local update.

        Parameters
        ----------
        update
            One float array (tensor ``"update"``) or a name → array mapping matching the
            configured tensors (any order).
        weight
            Staleness weight w in [0, weight_bound], applied before quantisation.
        rng
            Generator for the stochastic-rounding noise (not secret); fresh entropy if None.
        """
        self._require(Stage.MASKED_INPUT)
        if self._shared_with is None:
            raise UnexpectedMessage("submit() before the share relay arrived")
        tensors = self._normalise(update)
        quantised = quantize(
            tensors,
            fixed_point=self.config.fixed_point,
            weight=weight,
            rng=rng if rng is not None else np.random.default_rng(),
        )
        assert self._seed is not None
        seeds: list[tuple[bytes, int]] = [(self._seed, 1)]
        for peer in sorted(self._shared_with - {self.client_id}):
            seed = crypto.pairwise_seed(
                self._mask_shared[peer], session=self._session, a=self.client_id, b=peer
            )
            seeds.append((seed, 1 if self.client_id < peer else -1))
        bits = self.config.fixed_point.bits
        layout = self.config.layout
        ring = np.empty(layout.total, dtype=np.uint32)  # every tensor, end to end in name order
        views = layout.split(ring)
        for name, view in views.items():
            view[:] = to_ring(quantised[name].reshape(-1), bits=bits)
        crypto.add_masks(ring, seeds, layout=layout)  # one mask stream per seed
        packed = [
            (name, pack(reduce_ring(view, bits=bits), bits=bits)) for name, view in views.items()
        ]
        self.stage = Stage.CONSISTENCY_CHECK if self.config.active else Stage.UNMASKING
        logger.debug("client %d sent its masked input", self.client_id)
        return MaskedInput(session=self._session, sender=self.client_id, tensors=tuple(packed))

    # --- stage handlers -----------------------------------------------------------------------

    def _dispatch(self, message: Message) -> Message | None:
        if isinstance(message, UnmaskRequest) and self.stage is Stage.COMPLETED:
            return self._repeat_unmask(message)
        expected = _STAGE_OF.get(type(message))
        if expected is None:
            raise UnexpectedMessage(f"{type(message).__name__} is not a server message")
        if expected is Stage.CONSISTENCY_CHECK and not self.config.active:
            raise UnexpectedMessage("consistency request outside active mode")
        if expected < self.stage or (
            isinstance(message, ShareRelay) and self._shared_with is not None
        ):
            raise ReplayedMessage(f"{type(message).__name__} replayed in stage {self.stage.name}")
        if expected != self.stage:
            raise UnexpectedMessage(f"{type(message).__name__} in stage {self.stage.name}")
        if isinstance(message, KeyBroadcast):
            return self._on_key_broadcast(message)
        if isinstance(message, ShareRelay):
            self._on_share_relay(message)
            return None
        if isinstance(message, ConsistencyRequest):
            return self._on_consistency_request(message)
        assert isinstance(message, UnmaskRequest)
        return self._on_unmask_request(message)

    def _on_key_broadcast(self, message: KeyBroadcast) -> ShareKeys:
        cfg = self.config
        if message.cohort != cfg.cohort:
            raise SessionMismatch("key broadcast for another cohort")
        count = len(message.entries)
        if count > cfg.cohort_size:
            raise InvalidKeyBroadcast(f"{count} keys for a cohort of {cfg.cohort_size}")
        if count < cfg.threshold:
            raise InsufficientParticipants(f"{count} keys, threshold {cfg.threshold}")
        keys: dict[int, tuple[bytes, bytes]] = {}
        seen: set[bytes] = set()
        for entry in message.entries:
            if entry.client in keys:
                raise InvalidKeyBroadcast(f"client {entry.client} listed twice")
            for key in (entry.c_pk, entry.s_pk):
                crypto.check_x25519_encoding(key)  # small order: see below
                if key in seen:
                    raise InvalidKeyBroadcast("the same public key appears twice")
                seen.add(key)
            if cfg.active:
                public = self._peers.get(entry.client)
                if public is None:
                    raise InvalidKeyBroadcast(f"client {entry.client} has no enrolled identity")
                payload = crypto.advertise_payload(cfg.cohort, entry.client, entry.c_pk, entry.s_pk)
                crypto.verify_signature(
                    public,
                    entry.signature,
                    payload,
                    client=entry.client,
                    verified=self._verified,
                )
            keys[entry.client] = (entry.c_pk, entry.s_pk)
        if keys.get(self.client_id) != (self._c_pk, self._s_pk):
            raise InvalidKeyBroadcast("our own keys are missing or altered")
        session = crypto.session_id(
            cfg.cohort, cfg.params, ((c, k[0], k[1]) for c, k in keys.items())
        )
        neighbours = harary_neighbours(list(keys), k=cfg.neighbours, session=session)
        mine = neighbours[self.client_id]
        # Small-order keys are refused for non-neighbours too (nothing honest sends one); the
        # neighbours' keys are refused by the agreements below, which see the all-zero secret,
        # so probing them as well would only double the X25519 work.
        for peer in sorted(keys.keys() - mine - {self.client_id}):
            crypto.check_x25519_public(keys[peer][0])
            crypto.check_x25519_public(keys[peer][1])
        assert self._c_sk is not None and self._s_sk is not None
        channel = {v: crypto.agree(self._c_sk, keys[v][0]) for v in sorted(mine)}
        # Computed (and low-order s-keys refused) now, before anything is sent.
        mask_shared = {v: crypto.agree(self._s_sk, keys[v][1]) for v in sorted(mine)}
        order = sorted(keys)
        x_of = {c: i + 1 for i, c in enumerate(order)}
        closed = mine | {self.client_id}
        holders = sorted(closed)
        seed = os.urandom(SEED_BYTES)
        s_sk_raw = self._s_sk.private_bytes_raw()
        shares = shamir.split([seed, s_sk_raw], xs=[x_of[h] for h in holders],
                              threshold=cfg.threshold)  # fmt: skip  # (H, 2, 9)
        wire = shares.astype("<u4")  # field elements < 2^31 fit in uint32
        recipients: list[int] = []
        ciphertexts: list[bytes] = []  # one SHARE_CIPHERTEXT_BYTES block per recipient
        for h, holder in enumerate(holders):
            bundle = wire[h].tobytes()  # seed share (36 B) then key share (36 B)
            if holder == self.client_id:
                self._seed_shares[holder] = bundle[:SHARE_BYTES]
                self._key_shares[holder] = bundle[SHARE_BYTES:]
                continue
            key = crypto.channel_key(
                channel[holder], session=session, sender=self.client_id, recipient=holder
            )
            recipients.append(holder)
            ciphertexts.append(
                crypto.encrypt_share(
                    key,
                    bundle,
                    session=session,
                    stage=Stage.SHARE_KEYS,
                    sender=self.client_id,
                    recipient=holder,
                )
            )
        self._keys = keys
        self._session = session
        self._neighbours = mine
        self._closed = closed
        self._channel = channel
        self._mask_shared = mask_shared
        self._seed = seed
        self.stage = Stage.MASKED_INPUT
        logger.debug("client %d shared keys with %d neighbours", self.client_id, len(mine))
        return ShareKeys(
            session=session,
            sender=self.client_id,
            commitment=crypto.seed_commitment(seed, session=session, owner=self.client_id),
            recipients=tuple(recipients),
            ciphertexts=b"".join(ciphertexts),
        )

    def _on_share_relay(self, message: ShareRelay) -> None:
        self._check_session(message.session)
        if message.recipient != self.client_id:
            raise SessionMismatch(f"share relay addressed to client {message.recipient}")
        senders = message.senders
        if len(set(senders)) != len(senders):
            raise InvalidKeyBroadcast("a sender appears twice in the share relay")
        if self.client_id in senders or not set(senders) <= self._neighbours:
            raise InvalidKeyBroadcast("share relay from a client that is not a neighbour")
        if len(senders) + 1 < self.config.threshold:
            raise InsufficientParticipants(
                f"{len(senders) + 1} share holders, threshold {self.config.threshold}"
            )
        seed_shares: dict[int, bytes] = {}
        key_shares: dict[int, bytes] = {}
        if len(message.ciphertexts) != len(senders) * SHARE_CIPHERTEXT_BYTES:
            raise MalformedMessage("share relay holds the wrong number of ciphertext bytes")
        blocks = split_blocks(message.ciphertexts, SHARE_CIPHERTEXT_BYTES)
        for sender, ciphertext in zip(senders, blocks, strict=True):
            key = crypto.channel_key(
                self._channel[sender],
                session=self._session,
                sender=sender,
                recipient=self.client_id,
            )
            bundle = crypto.decrypt_share(
                key,
                ciphertext,
                session=self._session,
                stage=Stage.SHARE_KEYS,
                sender=sender,
                recipient=self.client_id,
            )
            # A SHARE_CIPHERTEXT_BYTES block decrypts to exactly SHARE_BUNDLE_BYTES.
            values = np.frombuffer(bundle, dtype="<u4")
            if int(values.max()) >= FIELD_PRIME:
                raise MalformedMessage(f"share from client {sender} is not a field element")
            seed_shares[sender] = bundle[:SHARE_BYTES]
            key_shares[sender] = bundle[SHARE_BYTES:]
        self._seed_shares.update(seed_shares)
        self._key_shares.update(key_shares)
        self._shared_with = frozenset(senders) | {self.client_id}
        logger.debug("client %d received %d share bundles", self.client_id, len(senders))

    def _check_sets(
        self, alive: tuple[int, ...], dropped: tuple[int, ...]
    ) -> tuple[frozenset[int], frozenset[int]]:
        alive_set, dropped_set = frozenset(alive), frozenset(dropped)
        if len(alive_set) != len(alive) or len(dropped_set) != len(dropped):
            raise InconsistentUnmaskRequest("a client is listed twice")
        if alive_set & dropped_set:
            raise InconsistentUnmaskRequest("a client is listed as both alive and dropped")
        if self.client_id in dropped_set:
            raise InconsistentUnmaskRequest("this client is listed as dropped")
        if self.client_id not in alive_set:
            raise InconsistentUnmaskRequest("this client is not listed as alive")
        if not (alive_set | dropped_set) <= self._keys.keys():
            raise InconsistentUnmaskRequest("a listed client never advertised keys")
        assert self._shared_with is not None
        closed = self._closed
        local = (alive_set | dropped_set) & closed
        if local != self._shared_with:
            raise InconsistentUnmaskRequest(
                "alive and dropped sets do not cover exactly the neighbours that shared keys"
            )
        if len(alive_set & closed) < self.config.threshold:
            raise InsufficientParticipants(
                f"{len(alive_set & closed)} alive share holders, threshold {self.config.threshold}"
            )
        return alive_set, dropped_set

    def _on_consistency_request(self, message: ConsistencyRequest) -> ConsistencySignature:
        self._check_session(message.session)
        sets = self._check_sets(message.alive, message.dropped)
        self._consistency = sets
        assert self._identity is not None
        payload = crypto.consistency_payload(self._session, message.alive, message.dropped)
        self.stage = Stage.UNMASKING
        return ConsistencySignature(
            session=self._session,
            sender=self.client_id,
            signature=crypto.sign(self._identity, payload),
        )

    def _on_unmask_request(self, message: UnmaskRequest) -> UnmaskResponse:
        self._check_session(message.session)
        alive, dropped = self._check_sets(message.alive, message.dropped)
        if self.config.active:
            if self._consistency != (alive, dropped):
                raise InconsistentUnmaskRequest("survivor sets changed since the consistency check")
            self._check_consistency_signatures(message, alive)
        elif message.signatures:
            raise UnexpectedMessage("signatures in an unmask request outside active mode")
        closed = self._closed
        seed_owners = tuple(sorted(alive & closed))
        key_owners = tuple(sorted(dropped & closed))
        response = UnmaskResponse(
            session=self._session,
            sender=self.client_id,
            seed_owners=seed_owners,
            seed_shares=b"".join(self._seed_shares[o] for o in seed_owners),
            key_owners=key_owners,
            key_shares=b"".join(self._key_shares[o] for o in key_owners),
        )
        self._answered = (message, response)
        self._forget_secrets()
        self.stage = Stage.COMPLETED
        logger.debug(
            "client %d answered the unmask request (%d seed, %d key shares)",
            self.client_id,
            len(seed_owners),
            len(key_owners),
        )
        return response

    def _check_consistency_signatures(self, message: UnmaskRequest, alive: frozenset[int]) -> None:
        payload = crypto.consistency_payload(self._session, message.alive, message.dropped)
        signers: set[int] = set()
        for client, signature in message.signatures:
            if client in signers or client not in alive:
                raise InvalidSignature(f"consistency signature of client {client} is not expected")
            public = self._peers.get(client)
            if public is None:
                raise InvalidSignature(f"client {client} has no enrolled identity")
            crypto.verify_signature(
                public, signature, payload, client=client, verified=self._verified
            )
            signers.add(client)
        if len(signers) < self.config.threshold:
            raise InvalidSignature(
                f"{len(signers)} consistency signatures, threshold {self.config.threshold}"
            )

    def _repeat_unmask(self, message: UnmaskRequest) -> UnmaskResponse:
        assert self._answered is not None
        previous, response = self._answered
        if message != previous:
            raise InconsistentUnmaskRequest("a second unmask request with different contents")
        return response

    # --- helpers ------------------------------------------------------------------------------

    def _normalise(self, update: Update) -> dict[str, npt.NDArray[np.floating]]:
        tensors = as_tensors(update)
        expected = dict(self.config.tensors)
        if set(tensors) != set(expected):
            raise ValueError(f"update tensors {sorted(tensors)} != configured {sorted(expected)}")
        for name, arr in tensors.items():
            if arr.size != expected[name]:
                raise ValueError(
                    f"tensor {name!r} has {arr.size} elements, expected {expected[name]}"
                )
        return tensors

    def _require(self, stage: Stage) -> None:
        if self.stage is Stage.ABORTED:
            raise ClientAborted(f"client {self.client_id} has aborted")
        if self.stage != stage:
            raise UnexpectedMessage(f"expected stage {stage.name}, client is in {self.stage.name}")

    def _check_session(self, session: bytes) -> None:
        # Only called once the session id (SESSION_ID_BYTES) is set, so equality checks the size.
        if session != self._session:
            raise SessionMismatch("message bound to a different session id")

    def _forget_secrets(self) -> None:
        self._c_sk = None
        self._s_sk = None
        self._seed = None
        self._seed_shares = {}
        self._key_shares = {}
        self._channel = {}
        self._mask_shared = {}

    def _abort(self, exc: ProtocolViolation) -> None:
        self._forget_secrets()
        self.stage = Stage.ABORTED
        logger.warning("client %d aborted: %s", self.client_id, type(exc).__name__)


__all__ = ["SINGLE_TENSOR", "Client", "Update", "as_tensors"]
