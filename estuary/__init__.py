"""Estuary: federated edge-cloud fine-tuning of language models.

The shared core imported by every role: CLI entry point, configuration,
logging, the wire protocol, the model/adapter/compression code and the state
store interface.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("estuary-fl")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
