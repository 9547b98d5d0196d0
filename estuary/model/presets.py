"""Built-in model presets, created from a config with no download.

Both are Llama-style decoder-only transformers (RMSNorm, rotary positions, SwiGLU MLP)
over the byte-level vocabulary, built with ``transformers.LlamaForCausalLM`` so they are
ordinary Hugging Face models: they save with ``save_pretrained`` and load back with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from estuary.model.tokenizer import BYTE_TOKENIZER_NAME, BYTE_VOCAB_SIZE, TOKENIZER_CONFIG_KEY

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class PresetSpec:
    """Shape of a preset.

    Attributes
    ----------
    hidden_size
        Width of the residual stream.
    num_layers
        Number of decoder blocks.
    num_heads
        Attention heads; ``hidden_size / num_heads`` is the head dimension.
    intermediate_size
        Width of the SwiGLU MLP (≈ 8/3 × hidden, rounded to a multiple of 8).
    max_positions
        Longest sequence in tokens (= bytes) the rotary table is built for.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int


#: ``tiny`` ≈ 0.86 M parameters: trains in seconds on 2 CPU cores, for tests and the demo.
#: ``small`` ≈ 10 M parameters: for benchmarks where the tiny model is too weak.
PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344, max_positions=512
    ),
    "small": PresetSpec(
        hidden_size=320, num_layers=8, num_heads=5, intermediate_size=864, max_positions=1024
    ),
}


def preset_config(name: str) -> LlamaConfig:
    """Return the Hugging Face config of preset ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not a known preset.
    """
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[name]
    extra: dict[str, Any] = {TOKENIZER_CONFIG_KEY: BYTE_TOKENIZER_NAME, "estuary_preset": name}
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        # Byte 0 never occurs in text corpora; the presets have no real special tokens,
        # but generation utilities want the ids to exist.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )


def build_preset(name: str, *, seed: int = 0) -> LlamaForCausalLM:
    """Return a freshly initialised model of preset ``name``, deterministic for ``seed``."""
    import torch
    from transformers import LlamaForCausalLM

    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    torch.nn.Module.eval(model)  # inference mode until a trainer switches it
    return model
