"""Models, presets and tokenisers shared by the cloud workers and the edge.

``load_model`` is imported lazily (it pulls in ``transformers``), so importing
``estuary.model.tokenizer`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from estuary.model.loading import CheckpointError, load_model

__all__ = ["CheckpointError", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from estuary.model import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'estuary.model' has no attribute {name!r}")
