from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from estuary.model import CheckpointError, load_model
from estuary.model.loading import check_safetensors
from estuary.model.presets import build_preset


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_preset("tiny", seed=3).save_pretrained(str(out), safe_serialization=True)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_model_round_trips_logits(saved_tiny: Path) -> None:
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    expected = build_preset("tiny", seed=3)(input_ids=ids).logits

    loaded = load_model(saved_tiny)

    assert not loaded.training
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_missing_config_names_config_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path)


def test_directory_without_weights_names_weight_file(saved_tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "noweights"
    target.mkdir()
    (target / "config.json").write_text((saved_tiny / "config.json").read_text())

    with pytest.raises(CheckpointError, match=r"model\.safetensors.*no weights"):
        load_model(target)


def test_pickle_only_directory_is_refused(saved_tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "bin"
    target.mkdir()
    (target / "config.json").write_text((saved_tiny / "config.json").read_text())
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")

    with pytest.raises(CheckpointError, match=r"pickle"):
        load_model(target)


def test_truncated_checkpoint_names_the_file(saved_tiny: Path, tmp_path: Path) -> None:
    target = _copy(saved_tiny, tmp_path / "trunc")
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(target)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01\x02", b"\xff" * 64, (12).to_bytes(8, "little") + b"not json!!!!"],
    ids=["empty", "short", "huge-header", "bad-json"],
)
def test_corrupt_checkpoint_names_the_file(
    saved_tiny: Path, tmp_path: Path, content: bytes
) -> None:
    target = _copy(saved_tiny, tmp_path / "corrupt")
    (target / "model.safetensors").write_bytes(content)

    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(target)


def test_offsets_beyond_data_are_detected(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)

    with pytest.raises(CheckpointError, match=r"x\.safetensors.*'w'"):
        check_safetensors(path)
