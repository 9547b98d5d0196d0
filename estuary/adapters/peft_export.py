"""Export the global adapter as a standard PEFT LoRA checkpoint.

A rank-``r_max`` adapter with zero-padded ``B`` is an ordinary LoRA:
``lora_A = A`` (r_max × in), ``lora_B = B`` (out × r_max), and ``lora_alpha = r_max`` so
PEFT's scaling ``alpha / r`` is 1, as in Estuary. A user loads it with
``PeftModel.from_pretrained(base, dir)`` onto the original base.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from estuary.adapters.lora import GlobalAdapter

#: Prefix PEFT puts in front of the base model's module names in saved keys.
PEFT_PREFIX = "base_model.model."


def export_peft(
    adapter: GlobalAdapter, out_dir: str | Path, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``.

    Parameters
    ----------
    adapter
        The global adapter (module names as in the base model's ``named_modules``).
    out_dir
        Destination directory (created).
    base_model_name_or_path
        Recorded in the config so ``peft`` can find the base; optional.

    Returns
    -------
    Path
        ``out_dir``.
    """
    from safetensors.numpy import save_file

    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    r_max = adapter.config.r_max
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(adapter.shapes):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(adapter.a(name))
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(adapter.b[name])
    present = sorted({n.rpartition(".")[2] for n in adapter.shapes})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_max,
        "lora_alpha": r_max,
        "lora_dropout": 0.0,
        "target_modules": present,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path
