"""Weight-only compression of a frozen base: int8 per channel and block-wise 4-bit NF4."""

from __future__ import annotations

from estuary.compress.quant import (
    SCHEMES,
    QuantEmbedding,
    QuantLinear,
    Scheme,
    compress_model,
    frozen_weight_bytes,
    load_compressed,
    save_compressed,
)

__all__ = [
    "SCHEMES",
    "QuantEmbedding",
    "QuantLinear",
    "Scheme",
    "compress_model",
    "frozen_weight_bytes",
    "load_compressed",
    "save_compressed",
]
