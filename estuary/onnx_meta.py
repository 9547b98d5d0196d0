"""The metadata file that makes a served ONNX directory self-describing.

A served directory (written by :func:`estuary.onnx_export.export_onnx`) holds the
fp32 graph, optionally its int8 quantisation, the model's ``config.json``, the tokenizer
files of a non-byte-level model, and :data:`METADATA_FILENAME`. The metadata is the only
thing :class:`edge_client.serving.OrtLM` needs besides the graph: how to tokenise, how
long a context the positional table allows, and where the model came from. This module
imports neither torch nor onnx, so the serving side stays light.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from estuary.model.tokenizer import BYTE_TOKENIZER_NAME

#: File names inside a served directory.
METADATA_FILENAME = "estuary_onnx.json"
FP32_FILENAME = "model.onnx"
INT8_FILENAME = "model.int8.onnx"

#: Version tag of the metadata layout; a reader refuses any other so that a future
#: layout change fails loudly instead of being half-understood.
METADATA_FORMAT = "estuary-onnx/1"

#: Tokenizer kinds: the presets' byte-level identity map, or a Hugging Face tokenizer whose
#: files were copied next to the graph.
TOKENIZER_BYTES = BYTE_TOKENIZER_NAME
TOKENIZER_HF = "hf"


@dataclass(frozen=True)
class ServedMetadata:
    """Contents of :data:`METADATA_FILENAME`.

    Attributes
    ----------
    tokenizer
        :data:`TOKENIZER_BYTES` or :data:`TOKENIZER_HF`.
    vocab_size
        Size of the ``logits`` last dimension.
    max_positions
        Longest input the model's positional table was built for, in tokens; ``None``
        when the config does not say (the graph then accepts any length).
    source
        Where the model came from: a directory path or a description such as a preset.
    model_type
        The Hugging Face ``model_type`` of the exported model (``llama``, ...).
    opset
        ONNX opset of the graph.
    fp32
        File name of the fp32 graph inside the directory.
    int8
        File name of the int8 graph, or ``None`` if the directory has not been quantised.
    eos_token_id
        Token that ends generation, or ``None`` (the byte presets have none).
    source_fingerprint
        Digest of the source directory's files when exported from one (used to notice that
        a cached export is stale); ``None`` for an in-memory model.
    """

    tokenizer: str
    vocab_size: int
    max_positions: int | None
    source: str
    model_type: str
    opset: int
    fp32: str = FP32_FILENAME
    int8: str | None = None
    eos_token_id: int | None = None
    source_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.tokenizer not in (TOKENIZER_BYTES, TOKENIZER_HF):
            raise ValueError(
                f"tokenizer: must be {TOKENIZER_BYTES!r} or {TOKENIZER_HF!r}, "
                f"got {self.tokenizer!r}"
            )
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size: must be positive, got {self.vocab_size}")
        if self.max_positions is not None and self.max_positions <= 0:
            raise ValueError(f"max_positions: must be positive or None, got {self.max_positions}")

    def with_int8(self, name: str | None) -> ServedMetadata:
        """Return a copy that names ``name`` as the int8 graph."""
        return replace(self, int8=name)

    def to_json(self) -> str:
        """Return the metadata as indented JSON with the format tag first."""
        return json.dumps({"format": METADATA_FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, origin: str = "metadata") -> ServedMetadata:
        """Parse :meth:`to_json` output.

        Raises
        ------
        ValueError
            Naming ``origin`` if the text is not valid metadata of this format.
        """
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{origin}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != METADATA_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{origin}: expected format {METADATA_FORMAT!r}, found {found!r}")
        fields = {k: v for k, v in raw.items() if k != "format"}
        try:
            return cls(**fields)
        except TypeError as exc:  # missing or unknown keys
            raise ValueError(f"{origin}: malformed metadata: {exc}") from exc


def read_metadata(directory: str | Path) -> ServedMetadata:
    """Read the metadata of served directory ``directory``.

    Raises
    ------
    FileNotFoundError
        If the directory has no :data:`METADATA_FILENAME`.
    ValueError
        If the file is not valid metadata; the message names the file.
    """
    path = Path(directory) / METADATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {METADATA_FILENAME}; not a served ONNX directory")
    return ServedMetadata.from_json(path.read_text(encoding="utf-8"), origin=str(path))


def write_metadata(directory: str | Path, metadata: ServedMetadata) -> Path:
    """Write ``metadata`` into ``directory`` and return the file's path."""
    path = Path(directory) / METADATA_FILENAME
    path.write_text(metadata.to_json(), encoding="utf-8")
    return path


def is_served_dir(directory: str | Path) -> bool:
    """Return whether ``directory`` looks like a served ONNX directory (has the metadata)."""
    return (Path(directory) / METADATA_FILENAME).is_file()
