"""FlowerSettings from Flower's run config, and what a node trains with (node_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra (flwr) is not installed")

from simulation.flower.client_app import node_setup
from simulation.flower.settings import FlowerSettings


def test_run_config_round_trips_and_defaults_hold() -> None:
    settings = FlowerSettings(
        num_server_rounds=5,
        base=Path("/models/base"),
        scheme="nf4",
        ranks=(2, 8),
        learning_rate=0.02,
        rank_lr_power=0.5,
        out_dir=Path("out"),
        stdlib_packages=("json", "email"),
    )
    assert FlowerSettings.from_run_config(settings.to_run_config()) == settings
    assert FlowerSettings.from_run_config({}) == FlowerSettings()
    assert FlowerSettings.from_run_config({"base": ""}).base is None
    # An integer is a valid float value (TOML writes 1 for 1.0).
    assert FlowerSettings.from_run_config({"server-lr": 1}).server_lr == 1.0


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"num-server-round": 3}, "unknown keys"),
        ({"num-server-rounds": "3"}, "num-server-rounds: expected an integer"),
        ({"num-server-rounds": True}, "num-server-rounds: expected an integer"),
        ({"num-server-rounds": 0}, "num-server-rounds: must be positive"),
        ({"learning-rate": "fast"}, "learning-rate: expected a number"),
        ({"learning-rate": -1.0}, "learning-rate: must be a positive number"),
        ({"rank-lr-power": 3.0}, "rank-lr-power: must be in"),
        ({"rank-lr-power": -0.5}, "rank-lr-power: must be in"),
        ({"ranks": "4,x"}, "ranks: expected comma-separated integers"),
        ({"ranks": "4,32", "r-max": 16}, r"ranks: \[32\] outside 1..r-max=16"),
        ({"scheme": "int4"}, "scheme: must be one of"),
        ({"write-model": "sometimes"}, "write-model: must be one of"),
        ({"column-rule": "diagonal"}, "column-rule: must be one of"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"fraction-evaluate": 1.5}, "fraction-evaluate"),
        ({"out-dir": ""}, "out-dir: must name a directory"),
        ({"max-train-bytes": -1}, "max-train-bytes"),
    ],
)
def test_bad_run_config_is_refused_naming_the_key(config: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        FlowerSettings.from_run_config(config)  # type: ignore[arg-type]


def test_simulated_partitions_get_a_package_and_a_rank_round_robin() -> None:
    settings = FlowerSettings(ranks=(2, 4, 8), r_max=8, stdlib_packages=("json", "email", "http"))
    nodes = [node_setup(settings, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert [n.name for n in nodes] == ["json", "email", "http"]
    assert [n.rank for n in nodes] == [2, 4, 8]
    assert all(len(n.data.train) == settings.max_train_bytes for n in nodes)
    assert all(n.data.heldout for n in nodes)
    # The node's own rank wins over the round-robin.
    assert node_setup(settings, {"partition-id": 0, "rank": 8}).rank == 8


def test_a_node_with_its_own_data(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_bytes(b"hello federated world\n" * 20)
    settings = FlowerSettings(ranks=(4,), r_max=8)
    node = node_setup(settings, {"data-path": str(tmp_path / "train"), "rank": 2})
    assert node.rank == 2 and node.data.train == b"hello federated world\n" * 20
    assert node.data.heldout == b""


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "needs 'data-path'"),
        ({"partition-id": 3}, "partition-id: 3 but stdlib-packages names 2"),
        ({"partition-id": 0, "rank": 9}, r"rank: 9 outside 1..r-max=8"),
        ({"partition-id": 0, "rank": "4"}, "rank must be an integer"),
    ],
)
def test_a_node_config_that_cannot_work_is_refused(
    node_config: dict[str, object], message: str
) -> None:
    settings = FlowerSettings(ranks=(4,), r_max=8, stdlib_packages=("json", "email"))
    with pytest.raises(ValueError, match=message):
        node_setup(settings, node_config)


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        node_setup(FlowerSettings(), {"data-path": str(tmp_path / "nowhere")})


def test_a_node_trains_as_the_coordinator_hands_out_by_default() -> None:
    # The app's training rules are the product's defaults (training.*), so a Flower
    # federation and an Estuary one train alike unless told otherwise.
    from estuary.config.models import TrainingSettings

    settings, training = FlowerSettings(), TrainingSettings()
    assert settings.rank_lr_power == training.rank_lr_power
    assert settings.column_rule == training.column_rule
    assert settings.warmup_steps == training.warmup_steps
