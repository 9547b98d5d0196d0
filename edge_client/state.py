"""The device's local state directory: identity key, enrolment, artifact cache, progress.

Layout of ``state_dir`` (mode 0700)::

    identity.pem          Ed25519 identity key, PKCS8 PEM, mode 0600; generated here
    enrolment.json        {device_id, device_class, rank, r_max, coordinator, enrolled_at}
    progress.json         current task (id, cohort, version, phase), tasks done/abandoned, bytes
    artifacts/<sha256>    verified, content-addressed blobs
    artifacts/<sha256>.part  a download in progress, resumed from its size
    models/<manifest>/    a materialised artifact (hard links into artifacts/)

Every small file is written atomically (temporary file, fsync, rename, fsync of the
directory), so a device killed at any moment finds either the old or the new content,
never a torn file. Artifact downloads append to ``.part`` without an fsync per chunk:
after a power loss the tail may be garbage, which the SHA-256 check before the rename
catches (the file is then deleted and fetched again).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

__all__ = [
    "ArtifactCorrupt",
    "EdgeState",
    "Enrolment",
    "Progress",
    "StateError",
]

logger = logging.getLogger(__name__)

IDENTITY_FILE = "identity.pem"
ENROLMENT_FILE = "enrolment.json"
PROGRESS_FILE = "progress.json"
ARTIFACTS_DIR = "artifacts"
SERVED_DIR = "served"
MODELS_DIR = "models"
PART_SUFFIX = ".part"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: Bytes read at a time when hashing a cached file: large enough to be fast, small
#: enough to keep a phone's memory use flat.
_HASH_BLOCK = 1024 * 1024


class StateError(Exception):
    """A state file is missing, unreadable or corrupt; the message names the file."""


class ArtifactCorrupt(StateError):
    """A downloaded artifact does not hash to its name; the partial file was deleted."""


@dataclass(frozen=True)
class Enrolment:
    """What the coordinator told this device at enrolment.

    Attributes
    ----------
    device_id
        Id derived from the identity public key (:func:`estuary.auth.device_id_for`).
    device_class
        Name of the class the device enrolled as.
    rank
        Adapter rank the class trains.
    r_max
        The federation's largest adapter rank.
    coordinator
        host:port the device enrolled with.
    enrolled_at
        When, as ISO 8601 UTC.
    """

    device_id: str
    device_class: str
    rank: int
    r_max: int
    coordinator: str
    enrolled_at: str


@dataclass
class Progress:
    """The agent's durable progress counters and the task under way, if any.

    Attributes
    ----------
    task_id, cohort_id, version, phase
        The task under way (``None`` when idle): the training task while ``phase`` is
        ``artifact``, ``training`` or ``trained`` (its update held in memory, waiting for
        a cohort; ``cohort_id`` ``None``), then the cohort task through ``keys``,
        ``upload`` and ``unmasking``.
    tasks_done, tasks_abandoned
        Tasks completed (the cohort reached DONE) and abandoned, over the device's life.
    bytes_up, bytes_down
        Serialised request / response bytes exchanged with the coordinator, in total.
    """

    task_id: str | None = None
    cohort_id: str | None = None
    version: int | None = None
    phase: str | None = None
    tasks_done: int = 0
    tasks_abandoned: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _utc_iso(unix_s: float) -> str:
    return _dt.datetime.fromtimestamp(unix_s, _dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (tmp + fsync + rename), file mode ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _check_sha(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"sha256: not a lowercase hex SHA-256 digest: {sha256!r}")
    return sha256


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class EdgeState:
    """One device's state directory (created with mode 0700 if missing).

    Parameters
    ----------
    state_dir
        The directory; its parent must exist or be creatable.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by the umask and ignored for an existing directory.
        os.chmod(self.root, 0o700)
        self.artifacts = self.root / ARTIFACTS_DIR
        self.artifacts.mkdir(mode=0o700, exist_ok=True)
        self.models = self.root / MODELS_DIR

    # ------------------------------------------------------------------ identity

    @property
    def identity_path(self) -> Path:
        """Path of the identity key file."""
        return self.root / IDENTITY_FILE

    def has_identity(self) -> bool:
        """Return whether an identity key file exists."""
        return self.identity_path.exists()

    def identity_key(self, *, create: bool = False) -> Ed25519PrivateKey:
        """Return the device's Ed25519 identity key, generating it if ``create``.

        The key never leaves the device: only its public half is sent, at enrolment.

        Raises
        ------
        StateError
            If the key is missing (and not ``create``), readable by others, corrupt, or
            not an Ed25519 key; the message names the file.
        """
        path = self.identity_path
        if not path.exists():
            if not create:
                raise StateError(f"{path}: no identity key; enrol the device first")
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            atomic_write(path, pem, mode=0o600)
            logger.info("generated a new identity key in %s", path)
            return key
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise StateError(
                f"{path}: permissions {mode:04o} let other users read the identity key; "
                "run chmod 600 on it"
            )
        try:
            loaded = load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise StateError(f"{path}: corrupt identity key: {exc}") from None
        except OSError as exc:
            raise StateError(f"{path}: cannot read identity key: {exc.strerror}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise StateError(f"{path}: not an Ed25519 key ({type(loaded).__name__})")
        return loaded

    # ------------------------------------------------------------------ JSON files

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"{path}: corrupt JSON: {exc}") from None
        if not isinstance(value, dict):
            raise StateError(f"{path}: expected a JSON object, got {type(value).__name__}")
        return value

    def _write_json(self, path: Path, value: dict[str, Any]) -> None:
        atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())

    @property
    def enrolment_path(self) -> Path:
        """Path of ``enrolment.json``."""
        return self.root / ENROLMENT_FILE

    def load_enrolment(self) -> Enrolment | None:
        """Return the enrolment, or ``None`` if the device has not enrolled.

        Raises
        ------
        StateError
            If the file is corrupt or lacks a field.
        """
        path = self.enrolment_path
        value = self._read_json(path)
        if value is None:
            return None
        try:
            return Enrolment(
                device_id=str(value["device_id"]),
                device_class=str(value["device_class"]),
                rank=int(value["rank"]),
                r_max=int(value["r_max"]),
                coordinator=str(value["coordinator"]),
                enrolled_at=str(value["enrolled_at"]),
            )
        except KeyError as exc:
            raise StateError(f"{path}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise StateError(f"{path}: bad field value: {exc}") from None

    def save_enrolment(self, enrolment: Enrolment) -> None:
        """Write ``enrolment.json`` atomically."""
        self._write_json(self.enrolment_path, asdict(enrolment))

    @staticmethod
    def new_enrolment(
        *,
        device_id: str,
        device_class: str,
        rank: int,
        r_max: int,
        coordinator: str,
        now: float,
    ) -> Enrolment:
        """Return an :class:`Enrolment` stamped ``now`` (Unix seconds, the agent's clock)."""
        return Enrolment(
            device_id=device_id,
            device_class=device_class,
            rank=rank,
            r_max=r_max,
            coordinator=coordinator,
            enrolled_at=_utc_iso(now),
        )

    @property
    def progress_path(self) -> Path:
        """Path of ``progress.json``."""
        return self.root / PROGRESS_FILE

    def load_progress(self) -> Progress:
        """Return the progress record (all zero when the file does not exist yet).

        Raises
        ------
        StateError
            If the file is corrupt or a field has the wrong type.
        """
        path = self.progress_path
        value = self._read_json(path)
        if value is None:
            return Progress()
        known = {f.name for f in fields(Progress)}
        progress = Progress(extra={k: v for k, v in value.items() if k not in known})
        for name in ("task_id", "cohort_id", "phase"):
            item = value.get(name)
            if item is not None and not isinstance(item, str):
                raise StateError(f"{path}: field {name!r} must be a string or null")
            setattr(progress, name, item)
        version = value.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise StateError(f"{path}: field 'version' must be an integer or null")
        progress.version = version
        for name in ("tasks_done", "tasks_abandoned", "bytes_up", "bytes_down"):
            item = value.get(name, 0)
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise StateError(f"{path}: field {name!r} must be a non-negative integer")
            setattr(progress, name, item)
        return progress

    def save_progress(self, progress: Progress) -> None:
        """Write ``progress.json`` atomically."""
        value = asdict(progress)
        extra = value.pop("extra")
        self._write_json(self.progress_path, {**extra, **value})

    # ------------------------------------------------------------------ artifacts

    def artifact_path(self, sha256: str) -> Path:
        """Path of the verified blob ``sha256`` (which may not exist)."""
        return self.artifacts / _check_sha(sha256)

    def partial_path(self, sha256: str) -> Path:
        """Path of the in-progress download of ``sha256``."""
        return self.artifacts / (_check_sha(sha256) + PART_SUFFIX)

    def has_artifact(self, sha256: str) -> bool:
        """Return whether the verified blob ``sha256`` is cached."""
        return self.artifact_path(sha256).is_file()

    def cached_artifacts(self) -> list[str]:
        """Return the digests of every verified cached blob, sorted."""
        return sorted(p.name for p in self.artifacts.iterdir() if _SHA256.match(p.name))

    def cached_bytes(self) -> int:
        """Return the total size of the verified cached blobs."""
        return sum(self.artifact_path(d).stat().st_size for d in self.cached_artifacts())

    def partial_size(self, sha256: str) -> int:
        """Return how many bytes of ``sha256`` are already downloaded (the resume offset)."""
        try:
            return self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def discard_partial(self, sha256: str) -> None:
        """Delete the in-progress download of ``sha256``, if any."""
        self.partial_path(sha256).unlink(missing_ok=True)

    def append_partial(self, sha256: str, *, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset`` of the download of ``sha256``; return the new size.

        Raises
        ------
        StateError
            If ``offset`` is not the current end of the partial file (a chunk out of
            order would corrupt the blob silently until the final hash check).
        """
        path = self.partial_path(sha256)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as handle:
            end = handle.tell()
            if offset != end:
                raise StateError(f"{path}: chunk at offset {offset}, but {end} bytes are on disk")
            handle.write(data)
            return handle.tell()

    def commit_artifact(self, sha256: str) -> Path:
        """Verify the finished download of ``sha256`` and move it into the cache.

        Raises
        ------
        ArtifactCorrupt
            If the partial file does not hash to ``sha256``; it is deleted, so the next
            attempt starts from offset 0.
        StateError
            If there is no partial file.
        """
        part = self.partial_path(sha256)
        if not part.is_file():
            raise StateError(f"{part}: no download in progress")
        actual = file_sha256(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise ArtifactCorrupt(
                f"{part}: downloaded bytes hash to {actual}, not {sha256}; deleted"
            )
        with part.open("rb") as handle:
            os.fsync(handle.fileno())
        final = self.artifact_path(sha256)
        os.replace(part, final)
        _fsync_dir(self.artifacts)
        return final

    def verify_artifact(self, sha256: str) -> bool:
        """Re-hash the cached blob ``sha256``; delete it and return False if it is corrupt."""
        path = self.artifact_path(sha256)
        if not path.is_file():
            return False
        if file_sha256(path) != sha256:
            logger.warning("cached artifact %s is corrupt; deleted", path)
            path.unlink(missing_ok=True)
            return False
        return True

    def read_artifact(self, sha256: str) -> bytes:
        """Return the cached blob ``sha256`` (verified when it was committed).

        Raises
        ------
        StateError
            If it is not cached.
        """
        path = self.artifact_path(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"{path}: artifact not in the cache") from None

    def prune_artifacts(self, keep: set[str]) -> int:
        """Delete cached blobs (and stale partial downloads) not in ``keep``; return the count.

        Old adapter versions are useless once a newer one is cached, and a phone's disk
        is small, so only what the current artifact needs is kept.
        """
        removed = 0
        for path in self.artifacts.iterdir():
            name = path.name.removesuffix(PART_SUFFIX)
            if _SHA256.match(name) and name not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def materialise(self, name: str, files: dict[str, str]) -> Path:
        """Return ``models/<name>/`` holding each cached blob under its file name.

        Files are hard links into the cache (a copy where links are not possible);
        other materialised directories are removed.

        Raises
        ------
        StateError
            If a named blob is not cached, or a file name is not a plain name.
        """
        if not re.match(r"^[0-9a-zA-Z_.-]+$", name):
            raise ValueError(f"name: not a plain directory name: {name!r}")
        self.models.mkdir(mode=0o700, exist_ok=True)
        for old in self.models.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        target = self.models / name
        target.mkdir(mode=0o700, exist_ok=True)
        self._link(target, files)
        return target

    def _link(self, target: Path, files: dict[str, str]) -> None:
        for filename, digest in sorted(files.items()):
            if filename in ("", ".", "..") or "/" in filename or "\\" in filename:
                raise StateError(f"manifest names an unsafe file {filename!r}")
            source = self.artifact_path(digest)
            if not source.is_file():
                raise StateError(f"{source}: artifact {filename} not in the cache")
            dest = target / filename
            if dest.exists():
                if os.path.samefile(dest, source):
                    continue
                dest.unlink()
            try:
                os.link(source, dest)
            except OSError:
                shutil.copyfile(source, dest)

    def install_served(self, files: dict[str, str]) -> Path:
        """Make ``served/`` the ONNX directory of ``files`` (for ``estuary edge infer``).

        Built beside it and swapped in by rename, so ``served/`` is always a complete
        directory of one version. Raises :class:`StateError` like :meth:`materialise`.
        """
        target = self.root / SERVED_DIR
        staging = self.root / f".{SERVED_DIR}.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            self._link(staging, files)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = self.root / f".{SERVED_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return target
