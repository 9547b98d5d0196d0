"""The wire numbering of secure-aggregation stages, shared by coordinator and agent."""

from __future__ import annotations

import pytest

from estuary.proto.stages import stage_from_proto, stage_name, stage_to_proto
from estuary.proto.v1 import edge_pb2
from secure_agg import Stage


def test_every_stage_round_trips_and_keeps_protocol_order() -> None:
    numbers = [stage_to_proto(s) for s in Stage]
    assert [stage_from_proto(n) for n in numbers] == list(Stage)
    assert numbers == sorted(numbers)  # "a later stage" means the same on both sides
    assert stage_to_proto(Stage.ADVERTISE_KEYS) == edge_pb2.SECAGG_STAGE_ADVERTISE_KEYS
    assert stage_to_proto(Stage.COMPLETED) == edge_pb2.SECAGG_STAGE_DONE
    assert stage_to_proto(Stage.ABORTED) == edge_pb2.SECAGG_STAGE_ABORTED


@pytest.mark.parametrize("value", [edge_pb2.SECAGG_STAGE_UNSPECIFIED, 8, -1])
def test_unspecified_or_unknown_numbers_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="not a secure-aggregation stage"):
        stage_from_proto(value)


def test_stage_names() -> None:
    assert stage_name(edge_pb2.SECAGG_STAGE_UNMASKING) == "SECAGG_STAGE_UNMASKING"
    assert stage_name(42) == "stage 42"
