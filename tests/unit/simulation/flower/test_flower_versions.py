"""VersionWriter: adapter, PEFT export and merged model, published whole, only upwards."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra (flwr) is not installed")

from estuary.adapters import AdapterConfig, GlobalAdapter, merge_into_base
from estuary.model.loading import load_model
from estuary.model.presets import build_preset
from simulation.flower.versions import VersionWriter, version_dir


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_preset("tiny", seed=0)


def trained(base: torch.nn.Module, seed: int) -> GlobalAdapter:
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4))
    rng = np.random.default_rng(seed)
    return adapter.with_b({n: rng.normal(0, 0.05, b.shape) for n, b in adapter.b.items()})


def test_final_version_has_adapter_peft_and_a_served_model(
    base: torch.nn.Module, tmp_path: Path
) -> None:
    writer = VersionWriter(tmp_path, base=base, write_model="final", final_version=2)
    first = writer.write(1, trained(base, 1), updates=3, weight_sum=6.0, ranks={2: 1, 4: 2})
    adapter = trained(base, 2)
    last = writer.write(2, adapter, updates=4, weight_sum=8.0, ranks={4: 4})

    assert first.model_dir is None and not (first.path / "model").exists()
    assert last.model_dir == version_dir(tmp_path, 2) / "model"
    info = json.loads((last.path / "version.json").read_text())
    assert info["version"] == 2 and info["ranks"] == {"4": 4} and info["r_max"] == 4
    assert info["adapter_sha256"] == last.adapter_sha256
    peft = json.loads((last.path / "peft" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 4
    loaded = GlobalAdapter.load(last.path / "adapter.safetensors")
    assert all(np.array_equal(loaded.b[n], adapter.b[n]) for n in adapter.b)
    # The served model is the base with B·A merged in.
    expected = copy.deepcopy(base)
    merge_into_base(expected, adapter)
    served = load_model(last.model_dir)
    ids = torch.arange(32).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, expected(ids).logits)
        assert not torch.allclose(served(ids).logits, base(ids).logits)
    assert (tmp_path / "LATEST").read_text().strip() == "2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_versions_only_go_up(base: torch.nn.Module, tmp_path: Path) -> None:
    writer = VersionWriter(tmp_path, base=None, write_model="never", final_version=3)
    writer.write(2, trained(base, 1), updates=1, weight_sum=1.0, ranks={4: 1})
    for version in (1, 2):
        with pytest.raises(ValueError, match="not newer than version 2"):
            writer.write(version, trained(base, 1), updates=1, weight_sum=1.0, ranks={4: 1})
    # A second writer on the same folder sees what the first wrote.
    again = VersionWriter(tmp_path, base=None, write_model="never", final_version=3)
    with pytest.raises(ValueError, match="not newer"):
        again.write(2, trained(base, 1), updates=1, weight_sum=1.0, ranks={4: 1})


def test_a_merged_model_needs_the_base(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the full-precision base"):
        VersionWriter(tmp_path, base=None, write_model="every", final_version=1)
