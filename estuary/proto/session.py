"""Secure-aggregation session parameters on the wire: ``SessionConfig`` ↔ ``SecAggParams``.

The coordinator writes a cohort's parameters into every member's Task and each member
rebuilds the identical :class:`secure_agg.SessionConfig` from them; both sides convert
through here, so a field added to one direction cannot be forgotten in the other. The
clip travels as a float32 and is bound into the session id, so the coordinator must build
its own config from the float32 value too (see ``FixedPoint.clip``).
"""

from __future__ import annotations

from estuary.proto.v1 import edge_pb2
from secure_agg import FixedPoint, SessionConfig

__all__ = ["session_from_proto", "session_to_proto"]


def session_to_proto(session: SessionConfig) -> edge_pb2.SecAggParams:
    """Return the wire form of ``session``.

    Raises
    ------
    ValueError
        If the session is in active-adversary mode, which the wire protocol does not
        carry yet (peers' identity keys are not in the Task).
    """
    if session.active:
        raise ValueError("session.active: active-adversary sessions are not on the wire")
    fp = session.fixed_point
    if fp.per_tensor:
        raise ValueError("session.fixed_point.per_tensor: per-tensor clipping is not on the wire")
    return edge_pb2.SecAggParams(
        cohort=session.cohort,
        cohort_size=session.cohort_size,
        threshold=session.threshold,
        bits=fp.bits,
        frac_bits=fp.frac_bits,
        clip=fp.clip,
        neighbours=session.neighbours or 0,
        tensors=[edge_pb2.TensorSpec(name=n, length=m) for n, m in session.tensors],
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
        active=False,
    )
