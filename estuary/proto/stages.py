"""Secure-aggregation stages on the wire: ``secure_agg.Stage`` ↔ proto ``SecAggStage``.

``SecAggStage`` reserves 0 for "unspecified", so a stage ``s`` from ADVERTISE_KEYS to
UNMASKING travels as ``s + 1``; COMPLETED travels as DONE and ABORTED as ABORTED. The
coordinator and the edge agent both convert through here.
"""

from __future__ import annotations

from estuary.proto.v1 import edge_pb2
from secure_agg import Stage

_S = edge_pb2.SecAggStage

#: secure_agg stage → proto SecAggStage number.
TO_PROTO: dict[Stage, int] = {
    Stage.ADVERTISE_KEYS: _S.SECAGG_STAGE_ADVERTISE_KEYS,
    Stage.SHARE_KEYS: _S.SECAGG_STAGE_SHARE_KEYS,
    Stage.MASKED_INPUT: _S.SECAGG_STAGE_MASKED_INPUT,
    Stage.CONSISTENCY_CHECK: _S.SECAGG_STAGE_CONSISTENCY_CHECK,
    Stage.UNMASKING: _S.SECAGG_STAGE_UNMASKING,
    Stage.COMPLETED: _S.SECAGG_STAGE_DONE,
    Stage.ABORTED: _S.SECAGG_STAGE_ABORTED,
}

_FROM_PROTO: dict[int, Stage] = {number: stage for stage, number in TO_PROTO.items()}


def stage_to_proto(stage: Stage) -> int:
    """Return the proto ``SecAggStage`` number of a :class:`secure_agg.Stage`."""
    return TO_PROTO[stage]


def stage_from_proto(value: int) -> Stage:
    """Return the :class:`secure_agg.Stage` of a proto ``SecAggStage`` number.

    Raises
    ------
    ValueError
        If ``value`` is UNSPECIFIED (0) or no stage at all.
    """
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"{value} is not a secure-aggregation stage (1..7)") from None


def stage_name(value: int) -> str:
    """Return the proto name of a stage number, or ``stage N`` for an unknown one."""
    try:
        return str(_S.Name(value))
    except ValueError:
        return f"stage {value}"
