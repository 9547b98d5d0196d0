"""Secure-aggregation session parameters on the wire: ``SessionConfig`` ↔ ``SecAggParams``.

The coordinator writes a cohort's parameters into every member's Task and each member
rebuilds the identical :class:`secure_agg.SessionConfig` from them; both sides convert
through here, so a field added to one direction cannot be forgotten in the other. The
clip travels as a float32 and is bound into the session id, so the coordinator must build
its own config from the float32 value too (see ``FixedPoint.clip``).

Active-adversary sessions also carry the members' enrolled Ed25519 identity keys
(``identity_keys``, member i's at index i): the keys every member checks the others'
signed key advertisements and consistency signatures against. They come from the
coordinator's enrolment records, so they protect against a server that deviates from the
protocol (shows different survivor sets to different members, forwards altered keys), not
against one that forges the enrolment records themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from estuary.proto.v1 import edge_pb2
from secure_agg import FixedPoint, SessionConfig

__all__ = ["IDENTITY_KEY_BYTES", "identities_from_proto", "session_from_proto", "session_to_proto"]

#: Raw Ed25519 public key size (RFC 8032).
IDENTITY_KEY_BYTES = 32


def _check_identity_keys(keys: Sequence[bytes], *, active: bool, cohort_size: int) -> None:
    if not active:
        if keys:
            raise ValueError("identity_keys: given for a session that is not active-adversary")
        return
    if len(keys) != cohort_size:
        raise ValueError(
            f"identity_keys: an active-adversary session needs one key per member, "
            f"got {len(keys)} for cohort_size {cohort_size}"
        )
    for index, key in enumerate(keys):
        if len(key) != IDENTITY_KEY_BYTES:
            raise ValueError(
                f"identity_keys[{index}]: must be {IDENTITY_KEY_BYTES} bytes, got {len(key)}"
            )
    if len(set(keys)) != len(keys):
        raise ValueError("identity_keys: two members have the same identity key")


def session_to_proto(
    session: SessionConfig, *, identity_keys: Sequence[bytes] = ()
) -> edge_pb2.SecAggParams:
    """Return the wire form of ``session``.

    Parameters
    ----------
    session
        The cohort's parameters.
    identity_keys
        Active mode: each member's raw Ed25519 identity public key, by member index.
        Must be empty otherwise.

    Raises
    ------
    ValueError
        If ``identity_keys`` does not fit the mode (one 32-byte key per member, all
        distinct, in active mode; none in passive mode), or per-tensor clipping is asked
        for (not on the wire).
    """
    fp = session.fixed_point
    if fp.per_tensor:
        raise ValueError("session.fixed_point.per_tensor: per-tensor clipping is not on the wire")
    keys = [bytes(k) for k in identity_keys]
    _check_identity_keys(keys, active=session.active, cohort_size=session.cohort_size)
    return edge_pb2.SecAggParams(
        cohort=session.cohort,
        cohort_size=session.cohort_size,
        threshold=session.threshold,
        bits=fp.bits,
        frac_bits=fp.frac_bits,
        clip=fp.clip,
        neighbours=session.neighbours or 0,
        tensors=[edge_pb2.TensorSpec(name=n, length=m) for n, m in session.tensors],
        active=session.active,
        identity_keys=keys,
    )


def session_from_proto(params: edge_pb2.SecAggParams) -> SessionConfig:
    """Return the :class:`SessionConfig` that ``params`` describe.

    Raises
    ------
    ValueError
        If the parameters are inconsistent (``secure_agg`` names the field).
    secure_agg.SecAggError
        If the fixed-point encoding cannot hold the cohort's sum.
    """
    return SessionConfig(
        cohort=bytes(params.cohort),
        cohort_size=int(params.cohort_size),
        threshold=int(params.threshold),
        tensors=tuple((t.name, int(t.length)) for t in params.tensors),
        fixed_point=FixedPoint(
            bits=int(params.bits), frac_bits=int(params.frac_bits), clip=float(params.clip)
        ),
        neighbours=int(params.neighbours) or None,
        active=bool(params.active),
    )


def identities_from_proto(params: edge_pb2.SecAggParams) -> dict[int, Ed25519PublicKey] | None:
    """Return the members' identity keys by member index, or None for a passive session.

    Raises
    ------
    ValueError
        If the keys do not fit the mode (see :func:`session_to_proto`) or one is not a
        valid Ed25519 public key; the message names the index.
    """
    keys = [bytes(k) for k in params.identity_keys]
    _check_identity_keys(keys, active=params.active, cohort_size=int(params.cohort_size))
    if not params.active:
        return None
    out: dict[int, Ed25519PublicKey] = {}
    for index, key in enumerate(keys):
        try:
            out[index] = Ed25519PublicKey.from_public_bytes(key)
        except ValueError as exc:
            raise ValueError(f"identity_keys[{index}]: not an Ed25519 public key: {exc}") from None
    return out
