"""Exceptions of the secure aggregation protocol.

A client that raises any :class:`ProtocolViolation` has moved to the aborted stage and reveals
nothing further. A server that raises one has dropped the offending client and carries on while
at least t survivors remain; otherwise it raises :class:`CohortAborted`.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure aggregation error."""


class OverflowRefused(SecAggError, ValueError):
    """The configuration's worst-case sum could wrap around the modulus 2^b."""


class ProtocolViolation(SecAggError):
    """A peer sent something the protocol forbids; the message is refused."""

    def __init__(self, message: str, *, client: int | None = None) -> None:
        super().__init__(message)
        self.client = client
        """Id of the offending client when the server refused one of its messages."""


class MalformedMessage(ProtocolViolation):
    """Bytes that do not decode to a well-formed message."""


class UnexpectedMessage(ProtocolViolation):
    """A message of a kind the current stage does not accept."""


class ReplayedMessage(UnexpectedMessage):
    """A message for a stage that has already been handled."""


class SessionMismatch(ProtocolViolation):
    """A message bound to a different cohort or session id."""


class InvalidKeyBroadcast(ProtocolViolation):
    """A key list missing or altering our key, with duplicates or the wrong count."""


class InvalidPublicKey(InvalidKeyBroadcast):
    """A public key that is malformed or a low-order X25519 point."""


class InvalidSignature(ProtocolViolation):
    """A signature that is missing or does not verify (active-adversary mode)."""


class DecryptionFailed(ProtocolViolation):
    """A share ciphertext that fails authentication: swapped, forwarded or altered."""


class InsufficientParticipants(ProtocolViolation):
    """Fewer than t participants where at least t are required."""


class InconsistentUnmaskRequest(ProtocolViolation):
    """An unmask request that could reveal an individual input."""


class InvalidMaskedInput(ProtocolViolation):
    """A masked upload of the wrong shape or with an element outside Z_(2^b)."""


class DuplicateMessage(ProtocolViolation):
    """A second message from one client in one stage."""


class UnknownClient(ProtocolViolation):
    """A message from a client that is not (or no longer) in the cohort."""


class LateMessage(ProtocolViolation):
    """A message for a stage that the server has already closed."""


class InvalidShare(ProtocolViolation):
    """An unmasking share with a bad index, owner or value."""


class CohortAborted(SecAggError):
    """The cohort cannot finish (fewer than t survivors); nothing is revealed."""


class ClientAborted(SecAggError):
    """A client that already aborted was asked to do more."""
