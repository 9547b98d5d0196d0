from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from estuary.adapters import AdapterConfig, GlobalAdapter, attach_adapters, export_peft
from estuary.model import load_model
from estuary.model.presets import build_preset


def test_exported_adapter_loads_in_peft_with_identical_logits(tmp_path: Path) -> None:
    from peft import PeftModel

    base_dir = tmp_path / "base"
    build_preset("tiny", seed=11).save_pretrained(str(base_dir), safe_serialization=True)
    ours = load_model(base_dir)
    adapter = GlobalAdapter.for_model(ours, AdapterConfig(r_max=8, seed=3))
    rng = np.random.default_rng(0)
    adapter = adapter.with_b({n: rng.normal(0, 0.05, b.shape) for n, b in adapter.b.items()})
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    attach_adapters(ours, adapter, rank=8)
    expected = ours(input_ids=ids).logits

    out = export_peft(adapter, tmp_path / "peft", base_model_name_or_path=str(base_dir))
    peft_model = PeftModel.from_pretrained(load_model(base_dir), str(out))
    got = peft_model(input_ids=ids).logits

    plain = load_model(base_dir)(input_ids=ids).logits
    assert (expected - plain).abs().max().item() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8
