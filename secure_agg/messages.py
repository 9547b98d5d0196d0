"""Protocol messages as plain dataclasses with a stable, versioned binary encoding.

Every message starts with ``b"SA"``, the protocol version and a type byte; integers are
little-endian, client ids uint32, variable-length fields length-prefixed. Share ciphertexts and
shares are fixed-size blocks kept concatenated in one ``bytes`` (one per id, in id-list order):
a server routes n^2 of them per round, and per-block Python objects would dominate its time.
``decode`` checks every length and refuses trailing bytes; it never evaluates anything it reads
(no pickle).

Direction: AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySignature and UnmaskResponse go
from a client to the server; KeyBroadcast, ShareRelay, ConsistencyRequest and UnmaskRequest
from the server to a client.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from secure_agg.constants import (
    PROTOCOL_VERSION,
    SESSION_ID_BYTES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    WIRE_MAGIC,
)
from secure_agg.errors import MalformedMessage

_HEADER = struct.Struct("<2sBB")


class MessageType(enum.IntEnum):
    """Type byte of each message."""

    ADVERTISE_KEYS = 1
    KEY_BROADCAST = 2
    SHARE_KEYS = 3
    SHARE_RELAY = 4
    MASKED_INPUT = 5
    CONSISTENCY_REQUEST = 6
    CONSISTENCY_SIGNATURE = 7
    UNMASK_REQUEST = 8
    UNMASK_RESPONSE = 9


class _Writer:
    def __init__(self, kind: MessageType) -> None:
        self.parts: list[bytes] = [_HEADER.pack(WIRE_MAGIC, PROTOCOL_VERSION, kind)]

    def u8(self, value: int) -> None:
        self.parts.append(struct.pack("<B", value))

    def u32(self, value: int) -> None:
        self.parts.append(struct.pack("<I", value))

    def u64(self, value: int) -> None:
        self.parts.append(struct.pack("<Q", value))

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def short(self, data: bytes) -> None:
        if len(data) > 255:
            raise ValueError("field longer than 255 bytes")
        self.u8(len(data))
        self.parts.append(data)

    def ids(self, values: tuple[int, ...]) -> None:
        self.u32(len(values))
        self.parts.append(struct.pack(f"<{len(values)}I", *values))

    def block(self, data: bytes, *, count: int, width: int) -> None:
        if len(data) != count * width:
            raise ValueError(f"expected {count} blocks of {width} bytes, got {len(data)} bytes")
        self.parts.append(data)

    def done(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise MalformedMessage("message truncated")
        out = self.data[self.offset : end]
        self.offset = end
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def short(self) -> bytes:
        return self.take(self.u8())

    def ids(self) -> tuple[int, ...]:
        count = self.u32()
        raw = self.take(4 * count)
        return tuple(struct.unpack(f"<{count}I", raw))

    def block(self, *, count: int, width: int) -> bytes:
        return self.take(count * width)

    def end(self) -> None:
        if self.offset != len(self.data):
            raise MalformedMessage("trailing bytes after message")


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client → server: the client's two X25519 public keys (and signature)."""

    cohort: bytes
    sender: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.ADVERTISE_KEYS)
        w.short(self.cohort)
        w.u32(self.sender)
        w.short(self.c_pk)
        w.short(self.s_pk)
        w.short(self.signature)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> AdvertiseKeys:
        return cls(
            cohort=r.short(), sender=r.u32(), c_pk=r.short(), s_pk=r.short(), signature=r.short()
        )


@dataclass(frozen=True)
class KeyEntry:
    """One client's advertised keys inside a :class:`KeyBroadcast`."""

    client: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class KeyBroadcast:
    """Round 0 → 1, server → client: the advertised keys of U1."""

    cohort: bytes
    entries: tuple[KeyEntry, ...]

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.KEY_BROADCAST)
        w.short(self.cohort)
        w.u32(len(self.entries))
        for e in self.entries:
            w.u32(e.client)
            w.short(e.c_pk)
            w.short(e.s_pk)
            w.short(e.signature)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> KeyBroadcast:
        cohort = r.short()
        count = r.u32()
        entries = []
        for _ in range(count):
            entries.append(
                KeyEntry(client=r.u32(), c_pk=r.short(), s_pk=r.short(), signature=r.short())
            )
        return cls(cohort=cohort, entries=tuple(entries))


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client → server: one share ciphertext per neighbour, and a seed commitment."""

    session: bytes
    sender: int
    commitment: bytes
    recipients: tuple[int, ...]
    ciphertexts: bytes
    """One SHARE_CIPHERTEXT_BYTES block per recipient, concatenated in recipient-list order."""

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.SHARE_KEYS)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.u32(self.sender)
        w.short(self.commitment)
        w.ids(self.recipients)
        w.block(self.ciphertexts, count=len(self.recipients), width=SHARE_CIPHERTEXT_BYTES)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> ShareKeys:
        session = r.take(SESSION_ID_BYTES)
        sender = r.u32()
        commitment = r.short()
        recipients = r.ids()
        return cls(
            session=session,
            sender=sender,
            commitment=commitment,
            recipients=recipients,
            ciphertexts=r.block(count=len(recipients), width=SHARE_CIPHERTEXT_BYTES),
        )


@dataclass(frozen=True)
class ShareRelay:
    """Round 1 → 2, server → client: the ciphertexts addressed to ``recipient``, by sender."""

    session: bytes
    recipient: int
    senders: tuple[int, ...]
    ciphertexts: bytes
    """One SHARE_CIPHERTEXT_BYTES block per sender, concatenated in sender-list order."""

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.SHARE_RELAY)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.u32(self.recipient)
        w.ids(self.senders)
        w.block(self.ciphertexts, count=len(self.senders), width=SHARE_CIPHERTEXT_BYTES)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> ShareRelay:
        session = r.take(SESSION_ID_BYTES)
        recipient = r.u32()
        senders = r.ids()
        ciphertexts = r.block(count=len(senders), width=SHARE_CIPHERTEXT_BYTES)
        return cls(session=session, recipient=recipient, senders=senders, ciphertexts=ciphertexts)


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client → server: every tensor packed to ceil(b/8) bytes per element."""

    session: bytes
    sender: int
    tensors: tuple[tuple[str, bytes], ...]

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.MASKED_INPUT)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.u32(self.sender)
        w.u32(len(self.tensors))
        for name, data in self.tensors:
            w.short(name.encode("utf-8"))
            w.u64(len(data))
            w.raw(data)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> MaskedInput:
        session = r.take(SESSION_ID_BYTES)
        sender = r.u32()
        count = r.u32()
        tensors = []
        for _ in range(count):
            try:
                name = r.short().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedMessage("tensor name is not UTF-8") from exc
            tensors.append((name, r.take(r.u64())))
        return cls(session=session, sender=sender, tensors=tuple(tensors))


@dataclass(frozen=True)
class ConsistencyRequest:
    """Round 3 (active mode), server → client: the survivor set U3 and U2 minus U3 to sign."""

    session: bytes
    alive: tuple[int, ...]
    dropped: tuple[int, ...]

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.CONSISTENCY_REQUEST)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.ids(self.alive)
        w.ids(self.dropped)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> ConsistencyRequest:
        return cls(session=r.take(SESSION_ID_BYTES), alive=r.ids(), dropped=r.ids())


@dataclass(frozen=True)
class ConsistencySignature:
    """Round 3 (active mode), client → server: signature on (session, alive, dropped)."""

    session: bytes
    sender: int
    signature: bytes

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.CONSISTENCY_SIGNATURE)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.u32(self.sender)
        w.short(self.signature)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> ConsistencySignature:
        return cls(session=r.take(SESSION_ID_BYTES), sender=r.u32(), signature=r.short())


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4, server → client: who survived, who dropped, and (active mode) the signatures."""

    session: bytes
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.UNMASK_REQUEST)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.ids(self.alive)
        w.ids(self.dropped)
        w.u32(len(self.signatures))
        for client, signature in self.signatures:
            w.u32(client)
            w.short(signature)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> UnmaskRequest:
        session = r.take(SESSION_ID_BYTES)
        alive = r.ids()
        dropped = r.ids()
        count = r.u32()
        signatures = tuple((r.u32(), r.short()) for _ in range(count))
        return cls(session=session, alive=alive, dropped=dropped, signatures=signatures)


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 4, client → server: self-mask seed shares of survivors, key shares of dropouts."""

    session: bytes
    sender: int
    seed_owners: tuple[int, ...]
    seed_shares: bytes
    """One SHARE_BYTES block per seed owner, concatenated in owner-list order."""
    key_owners: tuple[int, ...]
    key_shares: bytes
    """One SHARE_BYTES block per key owner, concatenated in owner-list order."""

    def encode(self) -> bytes:
        """Binary encoding."""
        w = _Writer(MessageType.UNMASK_RESPONSE)
        w.raw(_fixed(self.session, SESSION_ID_BYTES))
        w.u32(self.sender)
        for owners, shares in (
            (self.seed_owners, self.seed_shares),
            (self.key_owners, self.key_shares),
        ):
            w.ids(owners)
            w.block(shares, count=len(owners), width=SHARE_BYTES)
        return w.done()

    @classmethod
    def _read(cls, r: _Reader) -> UnmaskResponse:
        session = r.take(SESSION_ID_BYTES)
        sender = r.u32()
        seed_owners = r.ids()
        seed_shares = r.block(count=len(seed_owners), width=SHARE_BYTES)
        key_owners = r.ids()
        key_shares = r.block(count=len(key_owners), width=SHARE_BYTES)
        return cls(
            session=session,
            sender=sender,
            seed_owners=seed_owners,
            seed_shares=seed_shares,
            key_owners=key_owners,
            key_shares=key_shares,
        )


Message = (
    AdvertiseKeys
    | KeyBroadcast
    | ShareKeys
    | ShareRelay
    | MaskedInput
    | ConsistencyRequest
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
)

_DECODERS: dict[int, type[Message]] = {
    MessageType.ADVERTISE_KEYS: AdvertiseKeys,
    MessageType.KEY_BROADCAST: KeyBroadcast,
    MessageType.SHARE_KEYS: ShareKeys,
    MessageType.SHARE_RELAY: ShareRelay,
    MessageType.MASKED_INPUT: MaskedInput,
    MessageType.CONSISTENCY_REQUEST: ConsistencyRequest,
    MessageType.CONSISTENCY_SIGNATURE: ConsistencySignature,
    MessageType.UNMASK_REQUEST: UnmaskRequest,
    MessageType.UNMASK_RESPONSE: UnmaskResponse,
}


def decode(data: bytes) -> Message:
    """Decode one message.

    Raises
    ------
    MalformedMessage
        On a wrong magic, version or type, a truncated field or trailing bytes.
    """
    if len(data) < _HEADER.size:
        raise MalformedMessage("message shorter than its header")
    magic, version, kind = _HEADER.unpack_from(data)
    if magic != WIRE_MAGIC:
        raise MalformedMessage("not a secure aggregation message")
    if version != PROTOCOL_VERSION:
        raise MalformedMessage(
            f"secure aggregation protocol version {version}, this build speaks only "
            f"{PROTOCOL_VERSION}: client and coordinator must run the same protocol version"
        )
    cls = _DECODERS.get(kind)
    if cls is None:
        raise MalformedMessage(f"unknown message type {kind}")
    reader = _Reader(bytes(data), _HEADER.size)
    message = cls._read(reader)
    reader.end()
    return message


def split_blocks(data: bytes, width: int) -> list[bytes]:
    """Cut a concatenation of fixed-size blocks (ciphertexts or shares) into its blocks."""
    if width <= 0 or len(data) % width:
        raise ValueError(f"{len(data)} bytes is not a whole number of {width}-byte blocks")
    return [data[i : i + width] for i in range(0, len(data), width)]


def _fixed(data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise ValueError(f"field must be {size} bytes, got {len(data)}")
    return data


__all__ = [
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeyBroadcast",
    "KeyEntry",
    "MaskedInput",
    "Message",
    "MessageType",
    "ShareKeys",
    "ShareRelay",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "split_blocks",
]
