from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from edge_client.state import ArtifactCorrupt, EdgeState, Progress, StateError
from estuary.auth import raw_public_key

BLOB = os.urandom(300_000)
DIGEST = hashlib.sha256(BLOB).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_key_is_private_and_stable(tmp_path: Path) -> None:
    state = EdgeState(tmp_path / "edge")

    key = state.identity_key(create=True)
    again = EdgeState(tmp_path / "edge").identity_key()

    assert mode(tmp_path / "edge") == 0o700
    assert mode(state.identity_path) == 0o600
    assert state.identity_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert raw_public_key(again) == raw_public_key(key)


def test_identity_key_errors_name_the_file(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    with pytest.raises(StateError, match="identity.pem: no identity key"):
        state.identity_key()
    state.identity_key(create=True)
    os.chmod(state.identity_path, 0o644)
    with pytest.raises(StateError, match="identity.pem: permissions 0644"):
        state.identity_key()
    os.chmod(state.identity_path, 0o600)
    state.identity_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(StateError, match="identity.pem: corrupt identity key"):
        state.identity_key()


def test_json_state_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    enrolment = state.new_enrolment(
        device_id="d" * 32,
        device_class="phone",
        rank=4,
        r_max=16,
        coordinator="h:1",
        now=1_700_000_000.0,
    )
    assert enrolment.enrolled_at == "2023-11-14T22:13:20+00:00"
    state.save_enrolment(enrolment)
    state.save_progress(Progress(task_id="t", cohort_id="c", phase="keys", tasks_done=3))

    assert state.load_enrolment() == enrolment
    progress = state.load_progress()
    assert (progress.task_id, progress.phase, progress.tasks_done) == ("t", "keys", 3)
    # No temporary files are left behind, and the files are private.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "artifacts",
        "enrolment.json",
        "progress.json",
    ]
    assert mode(state.progress_path) == 0o600


def test_corrupt_or_incomplete_state_files_raise_naming_the_file(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    state.progress_path.write_text("{not json")
    with pytest.raises(StateError, match="progress.json: corrupt JSON"):
        state.load_progress()
    state.progress_path.write_text('{"tasks_done": -1}')
    with pytest.raises(StateError, match="progress.json: field 'tasks_done'"):
        state.load_progress()
    state.enrolment_path.write_text('{"device_id": "x"}')
    with pytest.raises(StateError, match="enrolment.json: missing field 'device_class'"):
        state.load_enrolment()
    assert EdgeState(tmp_path / "fresh").load_enrolment() is None


def test_resumed_partial_download_is_verified_and_committed(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    # A first connection delivered 100 kB, then broke.
    state.append_partial(DIGEST, offset=0, data=BLOB[:100_000])
    resume = state.partial_size(DIGEST)

    state.append_partial(DIGEST, offset=resume, data=BLOB[resume:])
    path = state.commit_artifact(DIGEST)

    assert resume == 100_000
    assert path.read_bytes() == BLOB
    assert state.cached_artifacts() == [DIGEST] and state.has_artifact(DIGEST)
    assert not state.partial_path(DIGEST).exists()


def test_out_of_order_chunk_is_refused(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    state.append_partial(DIGEST, offset=0, data=BLOB[:10])
    with pytest.raises(StateError, match="chunk at offset 20, but 10 bytes"):
        state.append_partial(DIGEST, offset=20, data=BLOB[20:30])


def test_corrupt_download_is_deleted_so_the_next_fetch_starts_over(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    state.append_partial(DIGEST, offset=0, data=BLOB[:-1] + b"\x00")

    with pytest.raises(ArtifactCorrupt, match=DIGEST):
        state.commit_artifact(DIGEST)

    assert state.partial_size(DIGEST) == 0
    assert not state.has_artifact(DIGEST)


def test_cached_artifact_corruption_is_detected(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    state.append_partial(DIGEST, offset=0, data=BLOB)
    state.commit_artifact(DIGEST)
    assert state.verify_artifact(DIGEST)
    state.artifact_path(DIGEST).write_bytes(b"bitrot")
    assert not state.verify_artifact(DIGEST)
    assert not state.has_artifact(DIGEST)


def test_materialise_links_files_and_prune_keeps_only_what_is_named(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    other = b"other blob"
    other_digest = hashlib.sha256(other).hexdigest()
    for data, digest in ((BLOB, DIGEST), (other, other_digest)):
        state.append_partial(digest, offset=0, data=data)
        state.commit_artifact(digest)

    directory = state.materialise("m1", {"model.safetensors": DIGEST})
    removed = state.prune_artifacts({DIGEST})

    assert (directory / "model.safetensors").read_bytes() == BLOB
    assert removed == 1 and state.cached_artifacts() == [DIGEST]
    with pytest.raises(StateError, match="unsafe file"):
        state.materialise("m2", {"../evil": DIGEST})
    with pytest.raises(ValueError, match="sha256"):
        state.artifact_path("not-a-digest")


def test_install_served_swaps_whole_directories(tmp_path: Path) -> None:
    state = EdgeState(tmp_path)
    other = b"version two graph"
    other_digest = hashlib.sha256(other).hexdigest()
    for data, digest in ((BLOB, DIGEST), (other, other_digest)):
        state.append_partial(digest, offset=0, data=data)
        state.commit_artifact(digest)

    first = state.install_served({"model.int8.onnx": DIGEST, "old-only.json": DIGEST})
    second = state.install_served({"model.int8.onnx": other_digest})

    assert first == second == tmp_path / "served"
    assert (second / "model.int8.onnx").read_bytes() == other
    assert not (second / "old-only.json").exists()  # nothing of the previous version left
    with pytest.raises(StateError, match="unsafe file"):
        state.install_served({"../evil": DIGEST})
    assert (second / "model.int8.onnx").read_bytes() == other  # a refused install changes nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".served")) == []
