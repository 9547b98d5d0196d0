"""Nested-rank LoRA adapters with a frozen shared A, exact aggregation and PEFT export."""

from __future__ import annotations

from estuary.adapters.blobs import get_adapter, put_adapter
from estuary.adapters.lora import (
    COLUMN_RULES,
    DEFAULT_TARGETS,
    AdapterConfig,
    GlobalAdapter,
    LoRALinear,
    aggregate,
    attach_adapters,
    coverage_scale,
    delta_b,
    derive_a,
    detach_adapters,
    mean_from_sum,
    merge_into_base,
    owned_columns,
    rank_learning_rate,
    trained_columns,
    weighted_sum,
)
from estuary.adapters.peft_export import export_peft

__all__ = [
    "COLUMN_RULES",
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "GlobalAdapter",
    "LoRALinear",
    "aggregate",
    "attach_adapters",
    "coverage_scale",
    "delta_b",
    "derive_a",
    "detach_adapters",
    "export_peft",
    "get_adapter",
    "mean_from_sum",
    "merge_into_base",
    "owned_columns",
    "put_adapter",
    "rank_learning_rate",
    "trained_columns",
    "weighted_sum",
]
