"""Adapter versions in the content-addressed blob store.

An adapter version is stored as the file :meth:`GlobalAdapter.save` writes
(``adapter.safetensors``: ``B`` per module, the shared-A config in the metadata), so the
coordinator that commits a version and the workers and devices that load it agree on
one format, and its digest names exactly that file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from estuary.adapters.lora import GlobalAdapter
from estuary.state.blobs import BlobStore


def put_adapter(blobs: BlobStore, adapter: GlobalAdapter) -> str:
    """Store ``adapter`` and return its sha256 digest (the same adapter, the same digest)."""
    with tempfile.TemporaryDirectory(prefix="estuary-adapter-") as tmp:
        return blobs.put_file(adapter.save(Path(tmp)))


def get_adapter(blobs: BlobStore, digest: str) -> GlobalAdapter:
    """Return the adapter stored under ``digest``, after checking its hash.

    Raises
    ------
    estuary.state.blobs.BlobNotFound
        No such blob.
    estuary.state.blobs.BlobCorrupt
        The stored file no longer hashes to ``digest``.
    estuary.model.loading.CheckpointError
        The blob is not an Estuary adapter.
    """
    blobs.verify(digest)
    return GlobalAdapter.load(blobs.path(digest))
