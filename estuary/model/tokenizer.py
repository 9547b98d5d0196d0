"""Tokenisers for Estuary models.

The built-in presets are byte-level: token id ``i`` *is* byte value ``i`` (vocabulary
of 256, no special tokens), so any text, in any encoding, round-trips exactly and the
held-out metric "bits per byte" is simply the mean next-token loss in bits. A model
loaded from a Hugging Face directory uses that directory's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

#: Vocabulary size of the byte-level presets: one token per byte value.
BYTE_VOCAB_SIZE = 256

#: Key written into a preset's ``config.json`` so a saved directory says how it tokenises.
TOKENIZER_CONFIG_KEY = "estuary_tokenizer"
BYTE_TOKENIZER_NAME = "bytes"


class Tokenizer(Protocol):
    """What Estuary needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str | bytes) -> list[int]:
        """Return the token ids of ``text`` (``str`` is encoded as UTF-8 first)."""
        ...

    def decode(self, ids: list[int]) -> bytes:
        """Return the bytes that ``ids`` stand for."""
        ...

    def byte_length(self, ids: list[int]) -> int:
        """Return how many bytes of text ``ids`` cover (the denominator of bits/byte)."""
        ...


class ByteTokenizer:
    """Identity map between bytes and token ids 0..255."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str | bytes) -> list[int]:
        """Return one id per byte of ``text`` (UTF-8 for ``str``)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def decode(self, ids: list[int]) -> bytes:
        """Return the bytes ``ids`` name; an id outside 0..255 is a ``ValueError``."""
        bad = [i for i in ids if not 0 <= i < BYTE_VOCAB_SIZE]
        if bad:
            raise ValueError(f"ids: {bad[:5]} are not byte-level token ids (0..255)")
        return bytes(ids)

    def byte_length(self, ids: list[int]) -> int:
        """Return ``len(ids)``: one byte per token."""
        return len(ids)


class HFTokenizer:
    """Adapter from a Hugging Face tokenizer to :class:`Tokenizer`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.vocab_size = len(inner)

    def encode(self, text: str | bytes) -> list[int]:
        """Return the ids the wrapped tokenizer gives, without special tokens."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._inner.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> bytes:
        """Return the UTF-8 bytes of the decoded text."""
        return str(self._inner.decode(ids)).encode("utf-8")

    def byte_length(self, ids: list[int]) -> int:
        """Return the UTF-8 length of the decoded text."""
        return len(self.decode(ids))


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Return the tokenizer that belongs to a saved model directory.

    A directory whose ``config.json`` names the byte tokenizer (every preset) gets
    :class:`ByteTokenizer`; any other directory must carry a Hugging Face tokenizer.

    Raises
    ------
    FileNotFoundError
        If ``model_dir`` has no ``config.json``, or no tokenizer files for a non-preset model.
    """
    import json

    path = Path(model_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json; not a model directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get(TOKENIZER_CONFIG_KEY) == BYTE_TOKENIZER_NAME:
        return ByteTokenizer()
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{path}: no tokenizer.json or tokenizer_config.json, and config.json does not "
            f"declare {TOKENIZER_CONFIG_KEY}={BYTE_TOKENIZER_NAME!r}"
        )
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
