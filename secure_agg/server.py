"""The server state machine, advanced by events: a message received, or a deadline passed.

The transport (the coordinator) calls :meth:`Server.handle` for every client message and
:meth:`Server.deadline` when the current stage's deadline passes, then sends whatever
:meth:`Server.drain` returns (or :meth:`Server.drain_encoded`, as wire bytes). A misbehaving
client is dropped and the call raises the specific :class:`~secure_agg.errors.ProtocolViolation`;
the cohort carries on while at least t clients remain, and raises
:class:`~secure_agg.errors.CohortAborted` (revealing nothing) otherwise.

Security notes
--------------
- Self-mask seeds are requested only for U3 (clients whose masked input was accepted before the
  stage closed) and mask keys only for U2 minus U3. A masked input arriving after the close is
  refused, so a late client never has both secrets requested.
- Reconstruction uses exactly t shares; each reconstructed secret is checked against its
  owner's commitment (seed) or advertised public key (mask key) before use.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg import crypto, shamir
from secure_agg.config import SessionConfig
from secure_agg.constants import (
    COMMITMENT_BYTES,
    FIELD_PRIME,
    MIN_COHORT_SIZE,
    SECRET_CHUNKS,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
)
from secure_agg.errors import (
    CohortAborted,
    DuplicateMessage,
    InvalidKeyBroadcast,
    InvalidMaskedInput,
    InvalidPublicKey,
    InvalidShare,
    LateMessage,
    MalformedMessage,
    ProtocolViolation,
    SessionMismatch,
    UnexpectedMessage,
    UnknownClient,
)
from secure_agg.graph import harary_neighbours
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
)
from secure_agg.numerics import from_ring, reduce_ring, unpack
from secure_agg.stages import Stage

logger = logging.getLogger(__name__)

_CLIENT_STAGE: dict[type, Stage] = {
    AdvertiseKeys: Stage.ADVERTISE_KEYS,
    ShareKeys: Stage.SHARE_KEYS,
    MaskedInput: Stage.MASKED_INPUT,
    ConsistencySignature: Stage.CONSISTENCY_CHECK,
    UnmaskResponse: Stage.UNMASKING,
}
"""The stage in which each client → server message is accepted."""


@dataclass(frozen=True)
class Outgoing:
    """A message the transport must deliver to one client."""

    recipient: int
    message: Message

    def encode(self) -> bytes:
        """Encode the message for the wire."""
        return self.message.encode()


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of a completed session.

    Attributes
    ----------
    session
        The session id.
    survivors
        U3: the clients whose masked inputs are in the sum.
    integer_sum
        Per tensor, Σ q_i over the survivors as signed integers (exact).
    float_sum
        Per tensor, integer_sum / 2^f: Σ w_i x_i up to rounding.
    weight_sum
        Σ w_i over the survivors, from the weights the server assigned (1.0 where none was).
    """

    session: bytes
    survivors: tuple[int, ...]
    integer_sum: dict[str, npt.NDArray[np.int64]]
    float_sum: dict[str, npt.NDArray[np.float64]]
    weight_sum: float


class Server:
    """Server side of one secure aggregation session.

    Parameters
    ----------
    config
        The session parameters, identical for every party.
    members
        Ids invited to the cohort; an advertisement from anyone else is refused. None accepts
        the first ``cohort_size`` distinct ids.
    peer_identities
        Enrolled Ed25519 identity keys; when given (active mode) the server also verifies
        signatures and drops clients whose signatures fail.
    """

    def __init__(
        self,
        config: SessionConfig,
        *,
        members: Collection[int] | None = None,
        peer_identities: Mapping[int, Ed25519PublicKey] | None = None,
    ) -> None:
        if members is not None and len(set(members)) > config.cohort_size:
            raise ValueError(f"members lists more than cohort_size={config.cohort_size} ids")
        if members is not None and len(set(members)) < MIN_COHORT_SIZE:
            raise ValueError(
                f"members lists {len(set(members))} ids; a session needs at least "
                f"{MIN_COHORT_SIZE} (fewer reveal their inputs)"
            )
        if peer_identities is not None and not config.active:
            raise ValueError("peer_identities given but config.active is False")
        self.config = config
        self._members = frozenset(members) if members is not None else None
        self._identities = dict(peer_identities or {})
        self.stage = Stage.ADVERTISE_KEYS
        self._outbox: list[Outgoing] = []
        self._weights: dict[int, float] = {}
        self._excluded: set[int] = set()
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._key_owner: dict[bytes, int] = {}
        """Every public key of an accepted advertisement → its client."""
        self._session = b""
        self._graph: dict[int, frozenset[int]] = {}
        self._closed: dict[int, frozenset[int]] = {}
        """graph[u] | {u}: the holders of u's shares."""
        self._x_of: dict[int, int] = {}
        self._expected: set[int] = set()
        self._share_keys: dict[int, ShareKeys] = {}
        self._u2: tuple[int, ...] = ()
        self._masked: dict[int, MaskedInput] = {}
        self._flat_sum = np.zeros(config.layout.total, dtype=np.uint32)
        """Σ of the accepted masked inputs, every tensor end to end as the mask layout says."""
        self._sums: dict[str, npt.NDArray[np.uint32]] = config.layout.split(self._flat_sum)
        """Per-tensor views of ``_flat_sum``."""
        self._u3: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        """U2 minus U3, ascending: the clients whose mask keys are reconstructed."""
        self._consistency_payload = b""
        self._signatures: dict[int, bytes] = {}
        self._responses: dict[int, tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]] = {}
        self._positions: dict[tuple[int, int], dict[int, int]] = {}
        self.result: AggregationResult | None = None
        """Set once the session completes."""

    # --- events -------------------------------------------------------------------------------

    @property
    def session(self) -> bytes:
        """Session id (empty until AdvertiseKeys has closed)."""
        return self._session

    def assign_weight(self, client: int, weight: float) -> None:
        """Record the staleness weight the coordinator gave ``client`` (for Σ w_i)."""
        if not 0.0 <= weight <= self.config.fixed_point.weight_bound:
            raise ValueError(
                f"weight must be in [0, {self.config.fixed_point.weight_bound}], got {weight}"
            )
        self._weights[client] = weight

    def weight_of(self, client: int) -> float | None:
        """Return the weight assigned to ``client``, or ``None`` if none was assigned yet."""
        return self._weights.get(client)

    def advertised(self, client: int) -> bool:
        """Return whether ``client``'s AdvertiseKeys message was accepted."""
        return client in self._adverts

    def has_masked_input(self, client: int) -> bool:
        """Return whether ``client``'s masked input was accepted (also after its stage closed)."""
        return client in self._masked or client in self._u3

    def waiting_for(self) -> frozenset[int]:
        """Return the clients the current stage still expects a message from.

        Empty in AdvertiseKeys (every invited member may still join) and once finished.
        """
        return frozenset(self._expected) - frozenset(self._received())

    def drain(self) -> list[Outgoing]:
        """Messages produced since the last call, for the transport to deliver."""
        out, self._outbox = self._outbox, []
        return out

    def drain_encoded(self) -> list[tuple[int, bytes]]:
        """Like :meth:`drain`, as (recipient, wire bytes); a broadcast is encoded only once."""
        cache: dict[int, bytes] = {}  # id(message) -> bytes; the messages outlive the loop
        encoded = []
        for item in self.drain():
            data = cache.get(id(item.message))
            if data is None:
                data = cache[id(item.message)] = item.encode()
            encoded.append((item.recipient, data))
        return encoded

    def handle(self, sender: int, message: bytes | Message) -> None:
        """Process one message from authenticated client ``sender``.

        Raises
        ------
        ProtocolViolation
            The message is refused; unless it was merely late, ``sender`` is dropped.
        CohortAborted
            Fewer than t clients remain; the session is over and nothing is revealed.
        """
        if self.stage is Stage.ABORTED:
            raise CohortAborted("the cohort has aborted")
        try:
            decoded = decode(message) if isinstance(message, bytes | bytearray) else message
            self._dispatch(sender, decoded)
        except LateMessage:
            raise
        except ProtocolViolation as exc:
            exc.client = sender
            logger.warning("dropping client %d: %s", sender, type(exc).__name__)
            self._drop(sender)
            # The others may all have answered already: they need not wait for a deadline.
            self._maybe_close()
            raise
        self._maybe_close()

    def deadline(self) -> None:
        """Close the current stage, whose deadline passed, with whoever has answered.

        Raises
        ------
        CohortAborted
            If fewer than t clients answered.
        """
        if self.stage in (Stage.COMPLETED, Stage.ABORTED):
            return
        self._close_stage()

    # --- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, sender: int, message: Message) -> None:
        stage = _CLIENT_STAGE.get(type(message))
        if stage is None:
            raise UnexpectedMessage(f"{type(message).__name__} is not a client message")
        claimed = getattr(message, "sender", sender)
        if claimed != sender:
            raise UnknownClient(f"client {sender} sent a message claiming to be {claimed}")
        if self.stage is Stage.COMPLETED or stage < self.stage:
            raise LateMessage(f"{type(message).__name__} after its stage closed", client=sender)
        if stage > self.stage:
            raise UnexpectedMessage(f"{type(message).__name__} during {self.stage.name}")
        if isinstance(message, AdvertiseKeys):
            self._on_advertise(sender, message)
            return
        self._check_member(sender)
        if getattr(message, "session", b"") != self._session:
            raise SessionMismatch(f"client {sender} used another session id")
        if isinstance(message, ShareKeys):
            self._on_share_keys(sender, message)
        elif isinstance(message, MaskedInput):
            self._on_masked_input(sender, message)
        elif isinstance(message, ConsistencySignature):
            self._on_signature(sender, message)
        else:
            assert isinstance(message, UnmaskResponse)
            self._on_unmask_response(sender, message)

    def _check_member(self, sender: int) -> None:
        if sender in self._received():
            raise DuplicateMessage(f"second {self.stage.name} message from client {sender}")
        if sender not in self._expected:
            raise UnknownClient(f"client {sender} is not expected in {self.stage.name}")

    def _on_advertise(self, sender: int, message: AdvertiseKeys) -> None:
        if sender in self._adverts:
            raise DuplicateMessage(f"second advertisement from client {sender}")
        if sender in self._excluded or (self._members is not None and sender not in self._members):
            raise UnknownClient(f"client {sender} is not in the cohort")
        if len(self._adverts) >= self.config.cohort_size:
            raise UnknownClient(f"cohort already has {self.config.cohort_size} clients")
        if message.cohort != self.config.cohort:
            raise SessionMismatch(f"client {sender} advertised for another cohort")
        # Every client refuses a broadcast with a bad or repeated key, so one such key would
        # abort the whole cohort: refuse it here, where only its sender is dropped. Keys are
        # fresh per session, so a repeat of an accepted key is the later sender's copy.
        for slot, key in (("c_pk", message.c_pk), ("s_pk", message.s_pk)):
            try:
                crypto.check_x25519_public(key)
            except InvalidPublicKey as exc:
                raise InvalidPublicKey(f"{slot} of client {sender}: {exc}") from None
        if message.c_pk == message.s_pk:
            raise InvalidKeyBroadcast(f"client {sender} advertised c_pk == s_pk")
        for key in (message.c_pk, message.s_pk):
            owner = self._key_owner.get(key)
            if owner is not None:
                raise InvalidKeyBroadcast(
                    f"client {sender} advertised a public key of client {owner}"
                )
        if self.config.active and self._identities:
            public = self._identities.get(sender)
            if public is None:
                raise UnknownClient(f"client {sender} has no enrolled identity")
            payload = crypto.advertise_payload(message.cohort, sender, message.c_pk, message.s_pk)
            crypto.verify_signature(public, message.signature, payload, client=sender)
        self._adverts[sender] = message
        self._key_owner[message.c_pk] = self._key_owner[message.s_pk] = sender

    def _on_share_keys(self, sender: int, message: ShareKeys) -> None:
        if len(message.commitment) != COMMITMENT_BYTES:
            raise MalformedMessage(f"commitment of client {sender} has the wrong size")
        recipients = message.recipients
        if len(set(recipients)) != len(recipients) or set(recipients) != self._graph[sender]:
            raise MalformedMessage(f"client {sender} did not share with exactly its neighbours")
        if len(message.ciphertexts) != len(recipients) * SHARE_CIPHERTEXT_BYTES:
            raise MalformedMessage(f"share ciphertext of client {sender} has the wrong size")
        self._share_keys[sender] = message

    def _on_masked_input(self, sender: int, message: MaskedInput) -> None:
        fp = self.config.fixed_point
        expected = dict(self.config.tensors)
        names = [name for name, _ in message.tensors]
        if len(set(names)) != len(names) or set(names) != set(expected):
            raise InvalidMaskedInput(f"client {sender} sent tensors {sorted(names)}")
        arrays: dict[str, npt.NDArray[np.uint32]] = {}
        for name, data in message.tensors:
            try:
                values = unpack(data, bits=fp.bits, length=expected[name])
            except ValueError as exc:
                raise InvalidMaskedInput(f"tensor {name!r} of client {sender}: {exc}") from exc
            # Only a b that is not a multiple of 8 leaves spare bits on the wire to check.
            if fp.bits % 8 and values.size and int(values.max()) >= fp.modulus:
                raise InvalidMaskedInput(
                    f"tensor {name!r} of client {sender} has an element >= 2^{fp.bits}"
                )
            arrays[name] = values
        for name, values in arrays.items():
            np.add(self._sums[name], values, out=self._sums[name])
        self._masked[sender] = message

    def _on_signature(self, sender: int, message: ConsistencySignature) -> None:
        public = self._identities.get(sender)
        if public is not None:
            payload = self._consistency_payload
            crypto.verify_signature(public, message.signature, payload, client=sender)
        self._signatures[sender] = message.signature

    def _on_unmask_response(self, sender: int, message: UnmaskResponse) -> None:
        if message.seed_owners != tuple(self._owner_positions(sender, 0)):
            raise InvalidShare(f"client {sender} answered for the wrong self-mask owners")
        if message.key_owners != tuple(self._owner_positions(sender, 1)):
            raise InvalidShare(f"client {sender} answered for the wrong mask-key owners")
        parsed = []
        for owners, shares in (
            (message.seed_owners, message.seed_shares),
            (message.key_owners, message.key_shares),
        ):
            if len(shares) != len(owners) * SHARE_BYTES:
                raise InvalidShare(f"shares of client {sender} have the wrong size")
            raw = np.frombuffer(shares, dtype="<u4").astype(np.uint64)
            if raw.size and int(raw.max()) >= FIELD_PRIME:
                raise InvalidShare(f"share of client {sender} is not a field element")
            parsed.append(raw.reshape(len(owners), SECRET_CHUNKS))  # (owners, 9)
        self._responses[sender] = (parsed[0], parsed[1])

    # --- stage transitions --------------------------------------------------------------------

    def _received(self) -> Collection[int]:
        if self.stage is Stage.ADVERTISE_KEYS:
            return self._adverts
        if self.stage is Stage.SHARE_KEYS:
            return self._share_keys
        if self.stage is Stage.MASKED_INPUT:
            return self._masked
        if self.stage is Stage.CONSISTENCY_CHECK:
            return self._signatures
        if self.stage is Stage.UNMASKING:
            return self._responses
        return ()

    def _drop(self, client: int) -> None:
        self._excluded.add(client)
        self._expected.discard(client)
        if self.stage is Stage.ADVERTISE_KEYS:
            advert = self._adverts.pop(client, None)
            if advert is not None:
                for key in (advert.c_pk, advert.s_pk):
                    self._key_owner.pop(key, None)
        elif self.stage is Stage.SHARE_KEYS:
            self._share_keys.pop(client, None)
        elif self.stage is Stage.MASKED_INPUT:
            removed = self._masked.pop(client, None)
            if removed is not None:
                bits = self.config.fixed_point.bits
                for name, data in removed.tensors:
                    values = unpack(data, bits=bits, length=self._sums[name].size)
                    np.subtract(self._sums[name], values, out=self._sums[name])
        elif self.stage is Stage.CONSISTENCY_CHECK:
            self._signatures.pop(client, None)
        elif self.stage is Stage.UNMASKING:
            self._responses.pop(client, None)
        if self.stage is not Stage.ADVERTISE_KEYS and len(self._expected) < self.config.threshold:
            self._abort(f"{len(self._expected)} clients left in {self.stage.name}")

    def _maybe_close(self) -> None:
        if self.stage is Stage.ADVERTISE_KEYS:
            # Invited members that were dropped (a refused advertisement) are not waited for:
            # the others go on as soon as all of them have advertised.
            awaited = (
                len(self._members - self._excluded)
                if self._members is not None
                else self.config.cohort_size
            )
            if len(self._adverts) >= awaited:
                self._close_stage()
        elif (
            self.stage not in (Stage.COMPLETED, Stage.ABORTED)
            and self._expected
            # Received ⊆ expected always holds (anything else is refused), so sizes suffice.
            and len(self._received()) >= len(self._expected)
        ):
            self._close_stage()

    def _close_stage(self) -> None:
        received = sorted(self._received())
        t = self.config.threshold
        if len(received) < t:
            self._abort(f"{len(received)} clients answered {self.stage.name}, threshold {t}")
        logger.info("closing %s with %d clients", self.stage.name, len(received))
        if self.stage is Stage.ADVERTISE_KEYS:
            self._close_advertise(received)
        elif self.stage is Stage.SHARE_KEYS:
            self._close_share_keys(received)
        elif self.stage is Stage.MASKED_INPUT:
            self._close_masked_input(received)
        elif self.stage is Stage.CONSISTENCY_CHECK:
            self._send_unmask(received, tuple((c, self._signatures[c]) for c in received))
        elif self.stage is Stage.UNMASKING:
            self._close_unmasking(received)

    def _close_advertise(self, u1: list[int]) -> None:
        cfg = self.config
        self._keys = {c: (self._adverts[c].c_pk, self._adverts[c].s_pk) for c in u1}
        self._session = crypto.session_id(
            cfg.cohort, cfg.params, ((c, k[0], k[1]) for c, k in self._keys.items())
        )
        self._graph = harary_neighbours(u1, k=cfg.neighbours, session=self._session)
        self._closed = {u: near | {u} for u, near in self._graph.items()}
        self._x_of = {c: i + 1 for i, c in enumerate(u1)}
        broadcast = KeyBroadcast(
            cohort=cfg.cohort,
            entries=tuple(
                KeyEntry(
                    client=c,
                    c_pk=self._adverts[c].c_pk,
                    s_pk=self._adverts[c].s_pk,
                    signature=self._adverts[c].signature,
                )
                for c in u1
            ),
        )
        self._outbox.extend(Outgoing(c, broadcast) for c in u1)
        self._expected = set(u1)
        self.stage = Stage.SHARE_KEYS

    def _close_share_keys(self, received: list[int]) -> None:
        members = set(received)
        t = self.config.threshold
        if self.config.neighbours is not None:
            # SecAgg+: a client whose closed neighbourhood kept fewer than t share holders could
            # never be unmasked, and would refuse the relay. Peel such clients off (removing one
            # can starve a neighbour) before anyone masks against them. Complete graph: no-op.
            starved = True
            while starved:
                starved = False
                for u in sorted(members):
                    if len(self._closed[u] & members) < t:
                        members.discard(u)
                        starved = True
            if len(members) < t:
                self._abort(f"{len(members)} clients keep t share holders, threshold {t}")
            for u in set(received) - members:
                logger.info("client %d has fewer than t share holders; left out", u)
        u2 = sorted(members)
        self._u2 = tuple(u2)
        # n^2 ciphertexts are routed here, so the routing is done on arrays, not per block:
        # gather every (sender, recipient, ciphertext) edge, keep recipients in U2, group by
        # recipient, and cut one contiguous block range per recipient.
        width = SHARE_CIPHERTEXT_BYTES
        recipients_of = [np.asarray(self._share_keys[s].recipients, dtype=np.int64) for s in u2]
        edge_to = np.concatenate(recipients_of)  # (E,)
        edge_from = np.repeat(np.asarray(u2, dtype=np.int64), [r.size for r in recipients_of])
        blocks = np.frombuffer(
            b"".join(self._share_keys[s].ciphertexts for s in u2), dtype=np.uint8
        ).reshape(-1, width)  # (E, width)
        u2_array = np.asarray(u2, dtype=np.int64)
        keep = np.isin(edge_to, u2_array)
        if not keep.all():
            edge_to, edge_from, blocks = edge_to[keep], edge_from[keep], blocks[keep]
        # Senders were concatenated in ascending order, so a stable sort by recipient keeps
        # each recipient's senders ascending.
        order = np.argsort(edge_to, kind="stable")
        edge_to, edge_from, blocks = edge_to[order], edge_from[order], blocks[order]
        starts = np.searchsorted(edge_to, u2_array, side="left")
        stops = np.searchsorted(edge_to, u2_array, side="right")
        for recipient, lo, hi in zip(u2, starts.tolist(), stops.tolist(), strict=True):
            relay = ShareRelay(
                session=self._session,
                recipient=recipient,
                senders=tuple(edge_from[lo:hi].tolist()),
                ciphertexts=blocks[lo:hi].tobytes(),
            )
            self._outbox.append(Outgoing(recipient, relay))
        self._expected = set(u2)
        self.stage = Stage.MASKED_INPUT

    def _close_masked_input(self, u3: list[int]) -> None:
        self._u3 = tuple(u3)
        self._dropped = dropped = tuple(sorted(set(self._u2) - set(u3)))
        if self.config.neighbours is not None:
            # SecAgg+: every survivor's seed and every needed mask key must have t holders among
            # the survivors, or unmasking cannot finish: abort now, before any share is asked.
            alive = set(u3)
            t = self.config.threshold
            for u in u3:
                if len(self._closed[u] & alive) < t:
                    self._abort(f"client {u} has fewer than {t} surviving share holders")
            for d in dropped:
                holders = self._graph[d] & alive
                if holders and len(holders) < t:
                    self._abort(f"dropped client {d} has fewer than {t} surviving share holders")
        if self.config.active:
            self._consistency_payload = crypto.consistency_payload(self._session, self._u3, dropped)
            request = ConsistencyRequest(session=self._session, alive=self._u3, dropped=dropped)
            self._outbox.extend(Outgoing(c, request) for c in u3)
            self._expected = set(u3)
            self.stage = Stage.CONSISTENCY_CHECK
        else:
            self._send_unmask(u3, ())

    def _send_unmask(
        self, recipients: list[int], signatures: tuple[tuple[int, bytes], ...]
    ) -> None:
        request = UnmaskRequest(
            session=self._session, alive=self._u3, dropped=self._dropped, signatures=signatures
        )
        self._outbox.extend(Outgoing(c, request) for c in recipients)
        self._expected = set(recipients)
        self.stage = Stage.UNMASKING

    def _close_unmasking(self, responders: list[int]) -> None:
        alive = list(self._u3)
        dropped = list(self._dropped)
        seeds = self._reconstruct(alive, responders, which=0)
        keys = self._reconstruct(dropped, responders, which=1)
        private: dict[int, X25519PrivateKey] = {}
        for owner, raw in keys.items():
            private[owner] = X25519PrivateKey.from_private_bytes(raw)  # checked in _reconstruct
        # Seeds to subtract: every survivor's self mask, and each pairwise mask a survivor added
        # against a client that dropped after sharing keys (survivor v added sign(v, d)·PRG).
        masks: list[tuple[bytes, int]] = [(seeds[u], -1) for u in alive]
        alive_set = set(alive)
        for d in dropped:
            for v in sorted(self._graph[d] & alive_set):
                shared = crypto.agree(private[d], self._keys[v][1])
                seed = crypto.pairwise_seed(shared, session=self._session, a=d, b=v)
                masks.append((seed, -1 if v < d else 1))
        bits = self.config.fixed_point.bits
        scale = 2.0**-self.config.fixed_point.frac_bits
        integer: dict[str, npt.NDArray[np.int64]] = {}
        floats: dict[str, npt.NDArray[np.float64]] = {}
        crypto.add_masks(self._flat_sum, masks, layout=self.config.layout)
        for name, total in self._sums.items():
            integer[name] = from_ring(reduce_ring(total, bits=bits), bits=bits)
            floats[name] = integer[name].astype(np.float64) * scale
        self.result = AggregationResult(
            session=self._session,
            survivors=self._u3,
            integer_sum=integer,
            float_sum=floats,
            weight_sum=float(sum(self._weights.get(c, 1.0) for c in self._u3)),
        )
        self._expected = set()
        self.stage = Stage.COMPLETED
        logger.info(
            "session complete: %d survivors, %d dropped after sharing keys",
            len(alive),
            len(dropped),
        )

    def _reconstruct(
        self, owners: list[int], responders: list[int], *, which: int
    ) -> dict[int, bytes]:
        """Rebuild one secret (0: self-mask seed, 1: mask key) of each owner from t shares."""
        t = self.config.threshold
        groups: dict[tuple[int, ...], list[int]] = {}
        candidates: dict[int, list[int]] = {}
        for owner in owners:
            closed = self._closed[owner]
            holders = [r for r in responders if r in closed]
            if len(holders) < t:
                self._abort(f"{len(holders)} shares of client {owner}'s secret, threshold {t}")
            candidates[owner] = holders
            groups.setdefault(tuple(holders[:t]), []).append(owner)
        rebuilt: dict[int, bytes | None] = {}
        for first, batch in groups.items():
            for owner, secret in zip(batch, self._interpolate(batch, first, which), strict=True):
                rebuilt[owner] = secret
        out: dict[int, bytes] = {}
        for owner in owners:
            secret = rebuilt[owner]
            if not self._secret_ok(owner, secret, which):
                # Retry once with the last t holders: enough to get past one corrupted share
                # without turning a failing cohort into a combinatorial search.
                if len(candidates[owner]) > t:
                    secret = self._interpolate([owner], tuple(candidates[owner][-t:]), which)[0]
                if not self._secret_ok(owner, secret, which):
                    kind = "self-mask seed" if which == 0 else "mask key"
                    self._abort(f"{kind} of client {owner} does not match what it advertised")
            assert secret is not None  # _secret_ok is False for None
            out[owner] = secret
        return out

    def _secret_ok(self, owner: int, secret: bytes | None, which: int) -> bool:
        """Check a rebuilt seed against its commitment, a rebuilt key against its public key."""
        if secret is None:
            return False
        if which == 1:
            public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
            return public == self._keys[owner][1]
        try:
            crypto.verify_seed_commitment(
                secret, self._share_keys[owner].commitment, session=self._session, owner=owner
            )
        except ValueError:
            return False
        return True

    def _interpolate(
        self, owners: list[int], holders: tuple[int, ...], which: int
    ) -> list[bytes | None]:
        """Interpolate each owner's secret; None where the result is not a 256-bit value."""
        rows = []
        for holder in holders:
            position = self._owner_positions(holder, which)
            table = self._responses[holder][which]  # (owners of holder, 9)
            rows.append(table[[position[u] for u in owners]])  # (len(owners), 9)
        stacked = np.stack(rows)  # (t, len(owners), 9)
        values = shamir.reconstruct(stacked, xs=[self._x_of[h] for h in holders])
        out: list[bytes | None] = []
        for chunks in values.tolist():
            try:
                out.append(shamir.field_to_secret(chunks))
            except ValueError:
                out.append(None)
        return out

    def _owner_positions(self, holder: int, which: int) -> dict[int, int]:
        """Row of each owner in ``holder``'s response table (owners in ascending order)."""
        cached = self._positions.get((holder, which))
        if cached is None:
            closed = self._closed[holder]
            pool = self._u3 if which == 0 else self._dropped
            cached = {u: i for i, u in enumerate(u for u in pool if u in closed)}
            self._positions[(holder, which)] = cached
        return cached

    def _abort(self, reason: str) -> NoReturn:
        self.stage = Stage.ABORTED
        self._outbox = []
        self._sums = {}
        self._flat_sum = np.zeros(0, dtype=np.uint32)
        logger.warning("cohort aborted: %s", reason)
        raise CohortAborted(reason)


__all__ = ["AggregationResult", "Outgoing", "Server"]
