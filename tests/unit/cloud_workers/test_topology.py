"""Topology: validation and the layer → stage map."""

from __future__ import annotations

import pytest

from cloud_workers.topology import Topology


def test_layers_are_split_evenly_in_order() -> None:
    topo = Topology(world_size=2, stages=2, num_layers=8, rank=1)
    assert topo.layers_per_stage == 4
    assert list(topo.layers_of(0)) == [0, 1, 2, 3]
    assert list(topo.my_layers) == [4, 5, 6, 7]
    assert topo.stage_map() == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    assert (topo.is_first, topo.is_last, topo.last_rank) == (False, True, 1)


def test_single_stage_holds_everything() -> None:
    topo = Topology(world_size=1, stages=1, num_layers=4)
    assert topo.is_first and topo.is_last and not topo.is_distributed
    assert list(topo.my_layers) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "parameter", "fragment"),
    [
        ({"world_size": 2, "stages": 3, "num_layers": 6}, "stages", "world_size is 2"),
        ({"world_size": 3, "stages": 3, "num_layers": 4}, "stages", "does not divide"),
        ({"world_size": 8, "stages": 8, "num_layers": 4}, "stages", "at least one layer"),
        ({"world_size": 2, "stages": 2, "num_layers": 4, "rank": 2}, "rank", "0..1"),
        ({"world_size": 0, "stages": 0, "num_layers": 4}, "world_size", ">= 1"),
        (
            {"world_size": 2, "stages": 2, "num_layers": 4, "rank": 1, "local_rank": 2},
            "local_rank",
            "0..rank",
        ),
    ],
)
def test_invalid_layouts_are_refused_naming_the_parameter(
    kwargs: dict, parameter: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=parameter) as info:
        Topology(**kwargs)
    assert fragment in str(info.value)


def test_from_env_reads_torchrun_variables() -> None:
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    topo = Topology.from_env(env, stages=2, num_layers=4)
    assert (topo.rank, topo.device_index, list(topo.my_layers)) == (1, 1, [2, 3])
    assert Topology.from_env({}, stages=1, num_layers=4).world_size == 1
    with pytest.raises(ValueError, match="environ"):
        Topology.from_env({"WORLD_SIZE": "two"}, stages=2, num_layers=4)


def test_layers_of_rejects_unknown_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        Topology(world_size=2, stages=2, num_layers=4).layers_of(2)
