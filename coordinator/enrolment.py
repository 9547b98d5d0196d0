"""Device enrolment, revocation and per-request authentication, backed by the store.

An operator issues one-time enrolment tokens (``issue_token``); only the token's
SHA-256 is stored, so a store dump does not leak usable tokens. A device enrols once
with a token and its own Ed25519 public key; consuming the token is a compare-and-set
that marks its record used (by which device, when), so of two devices racing with one
token exactly one succeeds, a second use is refused as "already used" rather than as
an unknown token, and the winner re-sending its Enroll (its answer was lost) is
answered again instead of refused. Token records, used or not, are deleted once they
expire: their expiry times are kept in a sorted set that every ``issue_token`` and
``enroll`` sweeps, so the store does not grow with the fleet's history. Every later
request is authenticated with :mod:`estuary.auth`; nonces are remembered per device
in a sorted set (score = timestamp) for the clock-skew window, which is what makes
a captured request useless to replay.

With a device CA (:class:`~estuary.pki.DeviceCA`) enrolment also answers a CSR
(:meth:`DeviceRegistry.enroll_with_csr`): the CSR and its proof by the identity key
(:func:`estuary.pki.verify_csr_proof`) are checked *before* the token is consumed, so a
CSR made for another identity is refused without burning the token; the certificate is
issued after. :meth:`DeviceRegistry.renew_certificate` issues a new one to an
authenticated, non-revoked device. Revocation is the device record's ``revoked`` flag;
:meth:`DeviceRegistry.authenticate` caches device records briefly but reads the revocation
epoch (bumped by every :meth:`DeviceRegistry.revoke`) with every request's nonce, so a
revocation takes effect on the next request on every replica, whatever certificate the
device still holds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from estuary.auth import (
    MAX_CLOCK_SKEW_MS,
    AuthError,
    SignedAuth,
    device_id_for,
    verify_request,
)
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.pki import DeviceCA, PKIError, verify_csr_proof
from estuary.state.base import Record, Store
from estuary.state.errors import VersionConflict
from estuary.state.keys import NONCE_PREFIX, device_key

log = logging.getLogger(__name__)

TOKEN_PREFIX = "enrol-token/"
#: Record whose version counts revocations (its value is empty). Every request of a device
#: whose record a replica has cached reads it in the same round trip as the request's
#: nonce; a changed version makes the replica read the device record again, so a
#: revocation takes effect on the next request on every replica (not under ``device/``:
#: it is no device).
REVOCATION_EPOCH_KEY = "device-revocations"
#: Seconds a replica trusts a cached device record without reading it again: 30 s bounds
#: how long a change made without :meth:`DeviceRegistry.revoke` (an operator editing the
#: store by hand, an older replica) goes unnoticed, and costs one read per device per 30 s.
DEVICE_CACHE_TTL_S = 30.0
#: Device records cached per replica, at most: ~200 bytes each, so 100 000 are ~20 MB.
DEVICE_CACHE_SIZE = 100_000
#: Sorted set of token record keys scored by expiry (Unix seconds): the retention index.
TOKEN_EXPIRY_SET = "enrol-token-expiry"

#: Token length in bytes of randomness (URL-safe base64 in the token string): 256 bits,
#: far beyond guessing even with no rate limit on Enroll.
TOKEN_BYTES = 32


class EnrolmentError(Exception):
    """Enrolment refused: unknown/used/expired token, bad key, or unknown class."""


class TokenAlreadyUsed(EnrolmentError):
    """The token was valid but another enrolment has consumed it."""


class Unauthenticated(Exception):
    """A request is not from an enrolled, non-revoked device with a valid signature."""


@dataclass(frozen=True)
class Device:
    """An enrolled device as recorded in the store."""

    device_id: str
    device_class: str
    public_key: bytes
    enrolled_at: float
    revoked: bool


def _token_key(token: str) -> str:
    return TOKEN_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


class DeviceRegistry:
    """Enrolment and authentication of devices.

    Parameters
    ----------
    store
        The state store shared by all coordinator replicas.
    device_classes
        Names of the configured device classes.
    clock
        Token expiry, enrolment time and the request-timestamp window are read from its
        :meth:`~estuary.clock.Clock.time` (Unix seconds, comparable across replicas).
    device_ca
        Signs device CSRs at enrolment and renewal; ``None``: no device certificates.
    """

    def __init__(
        self,
        store: Store,
        *,
        device_classes: Collection[str],
        clock: Clock = SYSTEM_CLOCK,
        device_ca: DeviceCA | None = None,
    ) -> None:
        if not device_classes:
            raise ValueError("device_classes: at least one class is needed")
        self._store = store
        self._classes = frozenset(device_classes)
        self._clock = clock
        # device id -> (record, revocation epoch read before it, clock.monotonic() then)
        self._cache: OrderedDict[str, tuple[Device, int, float]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.device_ca = device_ca

    def issue_token(self, *, device_class: str | None = None, ttl_s: float = 86_400.0) -> str:
        """Create a one-time enrolment token and return it (shown once, stored hashed).

        Parameters
        ----------
        device_class
            Restrict the token to this class; ``None`` allows any configured class.
        ttl_s
            Seconds the token stays valid; > 0.
        """
        if device_class is not None and device_class not in self._classes:
            raise ValueError(f"device_class: unknown class {device_class!r}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        self._forget_expired_tokens()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires_at = self._clock.time() + ttl_s
        key = _token_key(token)
        record = {"device_class": device_class, "expires_at": expires_at}
        # Index first: a crash between the two writes leaves an index entry whose sweep
        # deletes nothing, never a token record that no sweep would find.
        self._store.zadd(TOKEN_EXPIRY_SET, {key: expires_at})
        if not self._store.insert_if_absent(key, json.dumps(record).encode()):
            raise RuntimeError("token collision")  # 256 random bits: never in practice
        return token

    def _forget_expired_tokens(self) -> None:
        """Delete the records of tokens past their expiry, used or not (retention)."""
        expired = self._store.zrange_by_score(
            TOKEN_EXPIRY_SET, min_score=float("-inf"), max_score=self._clock.time()
        )
        for key, _ in expired:
            self._store.delete(key)
        if expired:
            self._store.zrem(TOKEN_EXPIRY_SET, *(key for key, _ in expired))

    def enroll(self, token: str, *, public_key: bytes, device_class: str) -> Device:
        """Consume ``token`` and record the device; return it.

        A re-sent enrolment (same token, same key, the device's record intact and not
        revoked) returns the device again: the first answer may have been lost.

        Raises
        ------
        TokenAlreadyUsed
            The token was consumed by another enrolment (the message names the device
            and when).
        EnrolmentError
            Unknown or expired token; token for another class; unknown class; malformed
            key; key already enrolled. The token is consumed only on success.
        """
        if device_class not in self._classes:
            raise EnrolmentError(
                f"unknown device class {device_class!r}; configured: {sorted(self._classes)}"
            )
        try:
            device_id = device_id_for(public_key)
        except ValueError as exc:
            raise EnrolmentError(f"identity public key: {exc}") from None
        self._forget_expired_tokens()
        key = _token_key(token)
        record = self._store.get(key)
        if record is None:
            raise EnrolmentError(
                "enrolment token unknown or expired (mistyped, issued by another "
                "federation, or past its validity); ask for a new one"
            )
        meta = json.loads(record.value)
        if meta.get("used_by") is not None:
            return self._used(meta, device_id=device_id, public_key=public_key)
        if meta["expires_at"] < self._clock.time():
            raise EnrolmentError("enrolment token expired")
        if meta["device_class"] not in (None, device_class):
            raise EnrolmentError(f"enrolment token is for device class {meta['device_class']!r}")
        if self._store.get(device_key(device_id)) is not None:
            raise EnrolmentError("this identity key is already enrolled")
        now = self._clock.time()
        used = {**meta, "used_by": device_id, "used_at": now}
        try:
            self._store.compare_and_set(
                key, json.dumps(used).encode(), expected_version=record.version
            )
        except VersionConflict:
            # Another enrolment got there first (or the record expired and was swept).
            current = self._store.get(key)
            if current is None:
                raise EnrolmentError("enrolment token unknown or expired") from None
            return self._used(json.loads(current.value), device_id=device_id, public_key=public_key)
        device = {
            "device_class": device_class,
            "public_key": public_key.hex(),
            "enrolled_at": now,
            "revoked": False,
            "last_seen": now,
        }
        if not self._store.insert_if_absent(device_key(device_id), json.dumps(device).encode()):
            raise EnrolmentError("this identity key is already enrolled")
        log.info("enrolled device %s in class %s", device_id, device_class)
        return Device(device_id, device_class, public_key, now, False)

    def enroll_with_csr(
        self,
        token: str,
        *,
        public_key: bytes,
        device_class: str,
        csr: bytes,
        csr_proof: bytes,
    ) -> tuple[Device, bytes]:
        """Enrol as :meth:`enroll` and certify the device's TLS key; return (device, PEM).

        Without a device CA a CSR is not answered (the certificate returned is empty: an
        agent over TLS asks for one whether or not the coordinator issues them); with one it
        is required (every later request needs a client certificate). The CSR and the
        identity key's proof over it and the token are checked before the token is
        consumed.

        Raises
        ------
        EnrolmentError
            As :meth:`enroll`; or the CSR is missing, malformed, names another device,
            or its proof was not made by ``public_key`` for this token.
        """
        ca = self.device_ca
        if ca is None:
            return self.enroll(token, public_key=public_key, device_class=device_class), b""
        try:
            device_id = device_id_for(public_key)
        except ValueError as exc:
            raise EnrolmentError(f"identity public key: {exc}") from None
        if not csr:
            raise EnrolmentError(
                "tls_csr: missing; this coordinator requires a client certificate, so "
                "enrolment must carry a CSR for a key generated on the device"
            )
        try:
            verify_csr_proof(public_key, csr, token=token, proof=csr_proof)
            ca.check_csr(csr, device_id=device_id)
        except PKIError as exc:
            raise EnrolmentError(str(exc)) from None
        device = self.enroll(token, public_key=public_key, device_class=device_class)
        return device, self._certify(ca, device.device_id, csr)

    def renew_certificate(self, device: Device, csr: bytes) -> bytes:
        """Issue a new client certificate to authenticated ``device``; return it as PEM.

        Raises
        ------
        EnrolmentError
            No device CA, a revoked device, or an unacceptable CSR.
        """
        ca = self.device_ca
        if ca is None:
            raise EnrolmentError(
                "this coordinator issues no device certificates (tls.device_ca_cert_file "
                "is not set)"
            )
        current = self.get(device.device_id)
        if current is None or current.revoked:
            raise Unauthenticated("device revoked")
        try:
            return self._certify(ca, device.device_id, csr)
        except PKIError as exc:
            raise EnrolmentError(str(exc)) from None

    def _certify(self, ca: DeviceCA, device_id: str, csr: bytes) -> bytes:
        cert = ca.issue(csr, device_id=device_id, now=self._clock.time())
        log.info(
            "issued certificate %x to device %s, valid until %s",
            cert.serial_number,
            device_id,
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return cert.public_bytes(Encoding.PEM)

    def _used(self, meta: dict[str, Any], *, device_id: str, public_key: bytes) -> Device:
        """Answer an enrolment whose token is already used: a re-send, or a refusal."""
        if meta["used_by"] == device_id:
            device = self.get(device_id)
            if device is not None and not device.revoked and device.public_key == public_key:
                log.info("enrolment of device %s re-sent; answered again", device_id)
                return device
        when = datetime.datetime.fromtimestamp(float(meta["used_at"]), datetime.timezone.utc)
        raise TokenAlreadyUsed(
            f"enrolment token already used: device {meta['used_by']} enrolled with it at "
            f"{when.isoformat(timespec='seconds')}; a token enrols one device, ask for a "
            "new one"
        )

    def get(self, device_id: str) -> Device | None:
        """Return the device record, or ``None`` if unknown (read from the store)."""
        return _device(device_id, self._store.get(device_key(device_id)))

    # ------------------------------------------------------------------ device cache

    def _cached(self, device_id: str) -> tuple[Device, int] | None:
        """Return the cached record of ``device_id`` and its epoch, unless absent or too old."""
        with self._cache_lock:
            entry = self._cache.get(device_id)
            if entry is None:
                return None
            device, epoch, loaded = entry
            if self._clock.monotonic() - loaded > DEVICE_CACHE_TTL_S:
                del self._cache[device_id]
                return None
            self._cache.move_to_end(device_id)
            return device, epoch

    def _load(self, device_id: str) -> Device | None:
        """Read ``device_id``'s record and the revocation epoch (one round trip); cache it.

        The epoch is read first: a revocation writes the record before it bumps the
        epoch, so a record read after an epoch is at least as new as that epoch says.
        """
        epoch, record = self._store.get_many([REVOCATION_EPOCH_KEY, device_key(device_id)])
        device = _device(device_id, record)
        with self._cache_lock:
            if device is None:
                self._cache.pop(device_id, None)
            else:
                self._cache[device_id] = (device, _epoch(epoch), self._clock.monotonic())
                self._cache.move_to_end(device_id)
                while len(self._cache) > DEVICE_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return device

    def revoke(self, device_id: str) -> bool:
        """Revoke a device; return ``False`` if it is unknown. Retries on concurrent writes."""

        def revoked(current: bytes | None) -> bytes | None:
            if current is None:
                return None
            return json.dumps({**json.loads(current), "revoked": True}).encode()

        if self._store.update(device_key(device_id), revoked) is None:
            return False
        # After the record: a replica that reads the new epoch then reads the revoked record.
        self._store.put(REVOCATION_EPOCH_KEY, b"")
        with self._cache_lock:
            self._cache.pop(device_id, None)
        log.info("revoked device %s", device_id)
        return True

    def authenticate(self, auth: SignedAuth, *, method: str, body_sha256: bytes) -> Device:
        """Return the device a request comes from, or raise :class:`Unauthenticated`.

        :meth:`authenticate_reading` without records to read.
        """
        return self.authenticate_reading(auth, method=method, body_sha256=body_sha256)[0]

    def authenticate_reading(
        self,
        auth: SignedAuth,
        *,
        method: str,
        body_sha256: bytes,
        read: Callable[[Device], Sequence[str]] | None = None,
    ) -> tuple[Device, list[Record | None]]:
        """Return the device a request comes from and the records ``read(device)`` names.

        The records are read in the same store round trip as the nonce is remembered, after
        it, and only once the signature checked out: a request needs no further trip to
        the store when they are what it reads (GetTask's paced path, Heartbeat). They are
        read as :meth:`~estuary.state.base.Store.get_many` reads them.

        Checks, in order: enrolled, not revoked, signature over this method and body,
        timestamp within the skew window, nonce not seen before within it.

        One store round trip for a device whose record this replica has cached (for up to
        :data:`DEVICE_CACHE_TTL_S`): the nonce is remembered, stale nonces are forgotten
        and the revocation epoch is read together, after the signature checked out against
        the cached key. If the epoch moved (some device was revoked since the record was
        cached) the record is read again before the request is accepted, so revocation
        takes effect on the next request. Two round trips otherwise (record, then nonce).
        """
        device_id = auth.device_id
        cached = self._cached(device_id) if device_id else None
        device = cached[0] if cached is not None else self._load(device_id) if device_id else None
        if device is None:
            raise Unauthenticated("unknown device")
        if device.revoked:
            raise Unauthenticated("device revoked")
        now_ms = self._clock.time_ms()
        try:
            verify_request(
                auth,
                public_key=device.public_key,
                method=method,
                body_sha256=body_sha256,
                now_ms=now_ms,
            )
        except AuthError as exc:
            raise Unauthenticated(str(exc)) from None
        keys = list(read(device)) if read is not None else []
        # Forget nonces older than the window: a request that old is refused by its
        # timestamp anyway, so the set stays bounded by the device's request rate.
        added, records = self._store.zadd_pruned(
            NONCE_PREFIX + device_id,
            {auth.nonce.hex(): float(auth.timestamp_ms)},
            prune_max_score=float(now_ms - 2 * MAX_CLOCK_SKEW_MS),
            read=[REVOCATION_EPOCH_KEY, *keys] if cached is not None else keys,
        )
        if cached is not None:
            epoch, records = records[0], records[1:]
        if cached is not None and _epoch(epoch) != cached[1]:
            device = self._load(device_id)
            if device is None:
                raise Unauthenticated("unknown device")
            if device.revoked:
                raise Unauthenticated("device revoked")
        if added == 0:
            raise Unauthenticated("replayed request (nonce already used)")
        return device, records


def _device(device_id: str, record: Record | None) -> Device | None:
    """Parse a ``device/<id>`` record; None for none."""
    if record is None:
        return None
    obj = json.loads(record.value)
    return Device(
        device_id,
        str(obj["device_class"]),
        bytes.fromhex(obj["public_key"]),
        float(obj["enrolled_at"]),
        bool(obj["revoked"]),
    )


def _epoch(record: Record | None) -> int:
    """Return the revocation epoch of a :data:`REVOCATION_EPOCH_KEY` read (0: none yet)."""
    return 0 if record is None else record.version
