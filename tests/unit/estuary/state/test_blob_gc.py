"""Collecting unreferenced blobs (issue 11, item 9): what is named, directly or through a
manifest, stays; what nothing names goes once it is older than the grace period."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from estuary.state import BlobStore


def _age(blobs: BlobStore, digest: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(blobs.path(digest), (then, then))


def test_reachable_follows_manifests_and_ignores_what_only_looks_like_a_digest(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path, fsync=False)
    weights = blobs.put_bytes(b"\xff\xfe binary weights")
    base = blobs.put_bytes(b"base")
    inner = blobs.put_bytes(json.dumps({"files": {"w": weights}}).encode())
    outer = blobs.put_bytes(json.dumps({"files": {"base": base}, "onnx": inner}).encode())
    unrelated = blobs.put_bytes(b"unrelated")
    record = json.dumps({"artifact_sha256": outer, "job": "x" * 70, "missing": "0" * 64})
    found = blobs.reachable([record])
    assert {outer, inner, base, weights} <= found
    assert unrelated not in found
    assert "x" * 64 not in found  # 70 letters are no digest


def test_collect_deletes_only_old_unreferenced_blobs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path, fsync=False)
    kept = blobs.put_bytes(b"kept")
    old = blobs.put_bytes(b"old and unreferenced")
    young = blobs.put_bytes(b"being written by a job")
    for digest in (kept, old):
        _age(blobs, digest, 7200)
    assert blobs.collect({kept}, older_than_s=3600) == (1, len(b"old and unreferenced"))
    assert sorted(blobs.digests()) == sorted([kept, young])
    assert blobs.collect({kept}, older_than_s=3600) == (0, 0)
    # Writing the same content again renews its age.
    _age(blobs, young, 7200)
    blobs.put_bytes(b"being written by a job")
    assert blobs.collect(set(), older_than_s=3600) == (1, 4)  # only `kept` was old
    assert list(blobs.digests()) == [young]
    with pytest.raises(ValueError, match="older_than_s"):
        blobs.collect(set(), older_than_s=-1)
