"""BlobStore: content addressing, atomic writes, verified and ranged reads."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estuary.state import BlobCorrupt, BlobNotFound, BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blob_files(root: Path) -> list[Path]:
    """Files stored under a digest name (temporary files excluded)."""
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name != "incoming"]


def test_round_trip(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"adapter weights \x00\xff" * 1000
    digest = blobs.put_bytes(data)
    assert digest == _sha(data)
    assert blobs.exists(digest) and blobs.size(digest) == len(data)
    assert blobs.read(digest) == data
    assert blobs.path(digest) == tmp_path / "blobs" / digest[:2] / digest
    assert blobs.put_bytes(data) == digest  # same content, same name, still one file
    assert len(_blob_files(tmp_path / "blobs")) == 1
    empty = blobs.put_bytes(b"")
    assert empty == _sha(b"") and blobs.read(empty) == b"" and blobs.size(empty) == 0
    blobs.verify(digest)
    assert blobs.delete(digest) is True and blobs.delete(digest) is False
    assert not blobs.exists(digest)


def test_put_file_and_put_stream_match_put_bytes(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    data = os.urandom(3 * (1 << 20) + 17)  # spans several internal chunks
    source = tmp_path / "artifact.bin"
    source.write_bytes(data)
    assert blobs.put_file(source) == _sha(data)
    assert source.read_bytes() == data  # the source is left alone
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert blobs.put_stream(iter(pieces)) == _sha(data)
    assert blobs.read(_sha(data)) == data


def test_put_stream_does_not_hold_the_blob_in_memory(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    chunk = b"\xab" * (1 << 20)
    count = 48  # 48 MiB in total

    def chunks() -> Iterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        digest = blobs.put_stream(chunks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * (1 << 20), f"peak {peak} bytes: the blob was buffered"
    assert blobs.size(digest) == count * len(chunk)
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)
    assert digest == expected.hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=300),
    offset=st.integers(0, 300),
    length=st.integers(0, 400),
)
def test_read_range_matches_slices(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                   offset: int, length: int) -> None:  # fmt: skip
    blobs = BlobStore(tmp_path_factory.mktemp("ranges"), fsync=False)
    digest = blobs.put_bytes(data)
    if offset > len(data):
        with pytest.raises(ValueError, match="past the end"):
            blobs.read_range(digest, offset=offset, length=length)
    else:
        assert (
            blobs.read_range(digest, offset=offset, length=length) == data[offset : offset + length]
        )


def test_chunked_reassembly(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, fsync=False)
    data = os.urandom(10_000)
    digest = blobs.put_bytes(data)
    chunk = 4096
    assembled = b"".join(
        blobs.read_range(digest, offset=o, length=chunk) for o in range(0, len(data), chunk)
    )
    assert assembled == data
    assert blobs.read_range(digest, offset=len(data), length=chunk) == b""
    with pytest.raises(ValueError, match="offset"):
        blobs.read_range(digest, offset=-1, length=1)
    with pytest.raises(ValueError, match="length"):
        blobs.read_range(digest, offset=0, length=-1)


def test_corruption_is_detected(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = b"model version 7" * 100
    digest = blobs.put_bytes(data)
    path = blobs.path(digest)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"X")  # one flipped byte on disk
    with pytest.raises(BlobCorrupt) as info:
        blobs.read(digest)
    assert info.value.digest == digest and digest in str(info.value)
    assert info.value.actual == _sha(path.read_bytes())
    with pytest.raises(BlobCorrupt):
        blobs.verify(digest)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "A" * 64,  # uppercase is not the canonical form
        "a" * 63,
        "a" * 65,
        "a" * 62 + "/x",
        "g" * 64,
        "",
        "..",
    ],
)
def test_bad_digest_is_refused(tmp_path: Path, bad: str) -> None:
    blobs = BlobStore(tmp_path / "root")
    for call in (
        lambda: blobs.read(bad),
        lambda: blobs.exists(bad),
        lambda: blobs.size(bad),
        lambda: blobs.path(bad),
        lambda: blobs.delete(bad),
        lambda: blobs.verify(bad),
        lambda: blobs.read_range(bad, offset=0, length=1),
    ):
        with pytest.raises(ValueError, match="digest"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_missing_blob(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    missing = _sha(b"never stored")
    assert not blobs.exists(missing)
    for call in (
        lambda: blobs.read(missing),
        lambda: blobs.size(missing),
        lambda: blobs.path(missing),
        lambda: blobs.verify(missing),
        lambda: blobs.read_range(missing, offset=0, length=1),
    ):
        with pytest.raises(BlobNotFound) as info:
            call()
        assert info.value.digest == missing


def test_no_partial_blob_is_visible_while_writing_or_after_a_failure(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = BlobStore(root)
    seen_during_write: list[list[Path]] = []

    def chunks() -> Iterator[bytes]:
        for i in range(5):
            yield bytes([i]) * 1000
            seen_during_write.append(_blob_files(root))
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        blobs.put_stream(chunks())
    assert seen_during_write == [[]] * 5, "nothing under a digest name mid-write"
    assert _blob_files(root) == []
    assert list((root / "incoming").iterdir()) == [], "the temporary file is removed"


def test_clean_temp_removes_only_stale_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir(exist_ok=True)
    stale, fresh = incoming / ".tmp-stale", incoming / ".tmp-fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (0, 0))
    assert blobs.clean_temp(older_than_s=60) == 1
    assert not stale.exists() and fresh.exists()


def test_concurrent_writers_of_the_same_content(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, fsync=False)
    data = os.urandom(200_000)
    digests: list[str] = []
    threads = [
        threading.Thread(target=lambda: digests.append(blobs.put_bytes(data))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert digests == [_sha(data)] * 8
    assert blobs.read(_sha(data)) == data
    assert len(_blob_files(tmp_path)) == 1


def test_constructor_validates_root() -> None:
    with pytest.raises(ValueError, match="root"):
        BlobStore("")
