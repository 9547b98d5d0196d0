from __future__ import annotations

import json
from pathlib import Path

import pytest

from estuary.data import load_user_data


def test_folder_is_read_as_bytes_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes("zweite Datei \xe4".encode("latin-1"))
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / ".hidden").write_text("skip me")

    data = load_user_data(tmp_path)

    assert data == b"first file\n\nzweite Datei \xe4"


def test_jsonl_text_fields_are_joined(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in ({"text": "héllo"}, {"text": "world", "id": 2})) + "\n"
    )

    assert load_user_data(path) == "héllo\n\nworld".encode()


def test_empty_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{tmp_path}: data folder contains no files"):
        load_user_data(tmp_path)


def test_folder_of_empty_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"")

    with pytest.raises(ValueError, match="empty"):
        load_user_data(tmp_path)


def test_missing_source_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_user_data(tmp_path / "nope")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\n{not json}\n', r"d\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"d\.jsonl:2: .*'text'"),
        ("\n\n", r"d\.jsonl: .*no non-empty"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)

    with pytest.raises(ValueError, match=match):
        load_user_data(path)


def test_unsupported_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b")

    with pytest.raises(ValueError, match=r"x\.csv"):
        load_user_data(path)


def test_binary_files_and_hidden_folders_are_skipped(tmp_path: Path) -> None:
    # A Python package folder as installed: sources beside their compiled bytecode.
    (tmp_path / "mod.py").write_text("def f():\n    return 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "mod.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00code\x00\xe3")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "notes.txt").write_bytes("caf\xe9 latin-1, no NUL".encode("latin-1"))

    data = load_user_data(tmp_path)

    assert data == b"def f():\n    return 1\n\n\ncaf\xe9 latin-1, no NUL"
    assert b"\x00" not in data


def test_folder_of_only_binary_files_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.pyc").write_bytes(b"\x00\x01\x02")

    with pytest.raises(ValueError, match=rf"{tmp_path}: every file in the data folder is binary"):
        load_user_data(tmp_path)
