"""A user's own local training data: a folder of text files or a JSONL file.

Text is read as raw bytes (the presets are byte-level), so any encoding works. Errors
name the offending path (and line, for JSONL) so a user can fix the source.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: Separator between documents: a blank line, so a window that straddles two documents
#: sees a natural boundary rather than two texts glued together mid-line.
DOCUMENT_SEPARATOR = b"\n\n"


#: Leading bytes of a file searched for a NUL to tell binary from text, as git and grep
#: do: compiled bytecode (``__pycache__/*.pyc`` beside every Python package), images and
#: archives have one early; text in any byte encoding (UTF-8, Latin-1, …) has none.
BINARY_SNIFF_BYTES = 8192


def _is_binary(content: bytes) -> bool:
    return b"\0" in content[:BINARY_SNIFF_BYTES]


def _read_folder(folder: Path) -> bytes:
    # Hidden files and everything under a hidden folder (.git, .venv) are not the user's
    # texts. Binary files are skipped: a byte-level model trained on bytecode or images
    # gets worse at text (a stdlib package folder is half .pyc by size).
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise ValueError(f"{folder}: data folder contains no files")
    parts: list[bytes] = []
    binary: list[Path] = []
    for path in files:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read data file: {exc}") from exc
        if _is_binary(content):
            binary.append(path)
        elif content:
            parts.append(content)
    if binary:
        logger.info(
            "skipped %d binary file(s) in %s (a NUL byte in the first %d bytes), e.g. %s",
            len(binary),
            folder,
            BINARY_SNIFF_BYTES,
            binary[0].relative_to(folder),
        )
    if not parts:
        what = "binary" if binary and len(binary) == len(files) else "empty or binary"
        raise ValueError(f"{folder}: every file in the data folder is {what}")
    logger.info(
        "read %d text files (%d non-empty) from %s", len(files) - len(binary), len(parts), folder
    )
    return DOCUMENT_SEPARATOR.join(parts)


def _read_jsonl(path: Path, *, field: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read JSONL file: {exc}") from exc
    parts: list[bytes] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{number}: record has no string field {field!r}")
        text: str = record[field]
        if text:
            parts.append(text.encode("utf-8"))
    if not parts:
        raise ValueError(f"{path}: JSONL file has no non-empty {field!r} records")
    return DOCUMENT_SEPARATOR.join(parts)


def load_user_data(source: str | Path, *, field: str = "text") -> bytes:
    """Return the training bytes of a user's local data source.

    Parameters
    ----------
    source
        A folder (every text file below it outside hidden files and folders, sorted by
        path, read as bytes; binary files such as ``__pycache__/*.pyc`` are skipped) or a
        ``.jsonl`` file with one JSON object per line carrying a string ``field``.
    field
        Name of the text field in JSONL records.

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist.
    ValueError
        If the source is empty, unreadable, not JSONL, or a record lacks ``field``;
        the message names the file (and line).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data source does not exist")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(path, field=field)
    raise ValueError(f"{path}: data source must be a folder or a .jsonl file")
