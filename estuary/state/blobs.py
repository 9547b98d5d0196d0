"""Content-addressed filesystem blob store for artifacts and adapter versions.

A blob is named by the SHA-256 of its content (64 lowercase hex digits) and
lives at ``<root>/<first two hex digits>/<digest>``; the two-digit fan-out
keeps any one directory small. Writes go to a temporary file in the target
directory, are fsynced, then renamed over the final name with
``os.replace``, so a reader never sees a partial blob under a digest name.
Whole reads verify the hash; ranged reads (for chunked, resumable transfer)
do not — the receiver verifies the digest of what it assembled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from estuary.state.errors import StoreError

__all__ = ["BlobCorrupt", "BlobError", "BlobNotFound", "BlobStore"]

logger = logging.getLogger(__name__)

# 1 MiB: large enough that hashing and copying are not syscall-bound, small
# enough that streaming a multi-GB artifact holds only this much in memory.
CHUNK_BYTES = 1 << 20
# Blobs at most this large are read when following references (manifests are JSON of a
# few KB); larger ones are model weights and name no other blob.
MANIFEST_MAX_BYTES = 1 << 20

# Temporary files older than this are leftovers of a crashed writer: no single
# write of even a multi-GB artifact takes an hour on a local disk.
STALE_TEMP_S = 3600.0

_DIGEST = re.compile(r"[0-9a-f]{64}")
_DIGEST_IN_TEXT = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
_TEMP_PREFIX = ".tmp-"


class BlobError(StoreError):
    """Base class of blob store errors."""


class BlobNotFound(BlobError):
    """No blob with this digest is stored.

    Parameters
    ----------
    digest
        The requested digest.
    """

    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} not found")
        self.digest = digest


class BlobCorrupt(BlobError):
    """A stored blob's content no longer hashes to its name.

    Parameters
    ----------
    digest
        The blob's name (expected digest).
    actual
        The digest of the content found on disk.
    """

    def __init__(self, digest: str, *, actual: str) -> None:
        super().__init__(f"blob {digest} is corrupt: its content hashes to {actual}")
        self.digest = digest
        self.actual = actual


def _check_digest(digest: str) -> str:
    # Only 64 lowercase hex digits pass, so a crafted name ("../x", "/etc",
    # "a/b") can never resolve outside the root.
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise ValueError(f"digest must be 64 lowercase hex digits (sha256), got {digest!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; without it a crash can lose the new name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed (SHA-256) blobs under a directory.

    Safe for concurrent writers, threads or processes: two writers of the same
    content both succeed and leave one intact copy.

    Parameters
    ----------
    root
        Directory holding the blobs; created if missing.
    fsync
        Flush file content and directory entries to disk before a write
        returns. Turn off only for throwaway stores in tests.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"root must be a non-empty path, got {root!r}")
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._fsync = bool(fsync)

    @property
    def root(self) -> Path:
        """The directory holding the blobs."""
        return self._root

    def _location(self, digest: str) -> Path:
        return self._root / digest[:2] / digest

    # ------------------------------------------------------------------ writing

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` and return its digest.

        Parameters
        ----------
        data
            The blob's content.

        Returns
        -------
        str
            The SHA-256 hex digest naming the blob.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        view = memoryview(data)
        return self.put_stream(view[i : i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES))

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Store a file's content, reading it in chunks; return its digest.

        Parameters
        ----------
        path
            The file to copy in (left untouched).

        Returns
        -------
        str
            The SHA-256 hex digest naming the blob.
        """

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    yield chunk

        return self.put_stream(chunks())

    def put_stream(self, chunks: Iterable[bytes | bytearray | memoryview]) -> str:
        """Store the concatenation of ``chunks`` without holding it in memory.

        Parameters
        ----------
        chunks
            The content, in pieces of any size.

        Returns
        -------
        str
            The SHA-256 hex digest naming the blob.
        """
        staging = self._root / "incoming"
        staging.mkdir(exist_ok=True)
        temp = staging / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        hasher = hashlib.sha256()
        try:
            with open(temp, "xb") as out:
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                if self._fsync:
                    out.flush()
                    os.fsync(out.fileno())
            digest = hasher.hexdigest()
            final = self._location(digest)
            final.parent.mkdir(exist_ok=True)
            # Rename within the same filesystem (the root) is atomic: readers
            # see either no blob or the whole blob, never a prefix.
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self._fsync:
            _fsync_dir(final.parent)
        logger.debug("stored blob %s", digest)
        return digest

    # ------------------------------------------------------------------ reading

    def exists(self, digest: str) -> bool:
        """Return whether a blob with ``digest`` is stored."""
        return self._location(_check_digest(digest)).is_file()

    def path(self, digest: str) -> Path:
        """Return the file holding blob ``digest`` (for zero-copy serving).

        Raises
        ------
        BlobNotFound
            No such blob.
        """
        location = self._location(_check_digest(digest))
        if not location.is_file():
            raise BlobNotFound(digest)
        return location

    def size(self, digest: str) -> int:
        """Return the blob's size in bytes.

        Raises
        ------
        BlobNotFound
            No such blob.
        """
        try:
            return self._location(_check_digest(digest)).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def read(self, digest: str) -> bytes:
        """Return the blob's content after checking it still hashes to ``digest``.

        Raises
        ------
        BlobNotFound
            No such blob.
        BlobCorrupt
            The content on disk no longer matches its digest.
        """
        try:
            data = self._location(_check_digest(digest)).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            logger.error("blob %s is corrupt (content hashes to %s)", digest, actual)
            raise BlobCorrupt(digest, actual=actual)
        return data

    def verify(self, digest: str) -> None:
        """Check, streaming, that the blob still hashes to ``digest``.

        Raises
        ------
        BlobNotFound
            No such blob.
        BlobCorrupt
            The content on disk no longer matches its digest.
        """
        hasher = hashlib.sha256()
        try:
            with open(self._location(_check_digest(digest)), "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    hasher.update(chunk)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        actual = hasher.hexdigest()
        if actual != digest:
            logger.error("blob %s is corrupt (content hashes to %s)", digest, actual)
            raise BlobCorrupt(digest, actual=actual)

    def read_range(self, digest: str, *, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes starting at ``offset`` (shorter at the end).

        Not verified against the digest (a range cannot be); the receiver
        checks the digest of the assembled blob, or call :meth:`verify`.

        Parameters
        ----------
        digest
            The blob.
        offset
            First byte, 0 ≤ offset ≤ size.
        length
            Maximum number of bytes, ≥ 0.

        Raises
        ------
        BlobNotFound
            No such blob.
        """
        _check_digest(digest)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        try:
            with open(self._location(digest), "rb") as src:
                size = os.fstat(src.fileno()).st_size
                if offset > size:
                    raise ValueError(f"offset {offset} is past the end of blob {digest} ({size})")
                src.seek(offset)
                return src.read(length)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    # ------------------------------------------------------------------ housekeeping

    def delete(self, digest: str) -> bool:
        """Remove the blob; return whether it existed."""
        try:
            self._location(_check_digest(digest)).unlink()
        except FileNotFoundError:
            return False
        return True

    def digests(self) -> Iterator[str]:
        """Yield the digest of every stored blob, in no particular order."""
        for fan in self._root.iterdir():
            if len(fan.name) == 2 and fan.is_dir():
                for blob in fan.iterdir():
                    if _DIGEST.fullmatch(blob.name):
                        yield blob.name

    def reachable(self, roots: Iterable[str]) -> set[str]:
        """Return ``roots`` and every blob they name, followed through manifests.

        A root is any text (a store record's JSON, say): every 64-hex-digit word in it is
        taken for a digest. A named blob of at most ``MANIFEST_MAX_BYTES`` that is UTF-8
        text (an artifact or checkpoint manifest) is searched the same way, and so on. A
        word that only looks like a digest keeps nothing alive that exists.
        """
        found: set[str] = set()
        todo = [d for text in roots for d in _DIGEST_IN_TEXT.findall(text)]
        while todo:
            digest = todo.pop()
            if digest in found:
                continue
            found.add(digest)
            location = self._location(digest)
            try:
                if location.stat().st_size > MANIFEST_MAX_BYTES:
                    continue
                text = location.read_bytes().decode("utf-8")
            except (FileNotFoundError, UnicodeDecodeError):
                continue
            todo += _DIGEST_IN_TEXT.findall(text)
        return found

    def collect(self, keep: Collection[str], *, older_than_s: float) -> tuple[int, int]:
        """Delete every blob not in ``keep`` written ``older_than_s`` or more ago.

        The age is the file's modification time on the filesystem's clock (like
        :meth:`clean_temp`): a blob a job wrote but has not yet recorded is younger
        than any sane ``older_than_s`` and survives. Rewriting a blob renews its age.

        Returns
        -------
        tuple[int, int]
            Blobs deleted and the bytes they held.
        """
        if not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        cutoff = time.time() - older_than_s
        deleted = freed = 0
        for digest in list(self.digests()):
            if digest in keep:
                continue
            location = self._location(digest)
            try:
                stat = location.stat()
                if stat.st_mtime > cutoff:
                    continue
                location.unlink()
            except FileNotFoundError:
                continue
            deleted += 1
            freed += stat.st_size
        if deleted:
            logger.info("collected %d unreferenced blobs (%d bytes)", deleted, freed)
        return deleted, freed

    def clean_temp(self, *, older_than_s: float = STALE_TEMP_S) -> int:
        """Remove temporary files left by crashed writers; return how many.

        Parameters
        ----------
        older_than_s
            Only files not modified for this long are removed, so writes in
            progress are left alone.
        """
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        staging = self._root / "incoming"
        if not staging.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for temp in staging.glob(f"{_TEMP_PREFIX}*"):
            try:
                if temp.stat().st_mtime <= cutoff:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
