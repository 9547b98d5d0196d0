"""Cloud jobs: how they are queued, recognised as superseded, executed and recorded.

A job is a :class:`estuary.proto.v1.jobs_pb2.Job` serialised in field ``job`` of an
entry of the store stream :data:`JOB_STREAM`. Every worker group is one consumer of
the consumer group :data:`CONSUMER_GROUP`, so each job is delivered to one group; a
faster group simply pulls more.

Record layout (besides the ``version/`` and ``worker/`` records of
:mod:`estuary.state.keys`):

- ``joblatest/<kind key>`` → ``{"version": n}``: the newest version for which a job of
  that kind was submitted. A job whose version is lower is *superseded* and skipped.
- ``jobresult/<job_id>`` → the job's outcome (JSON), created with ``insert_if_absent``:
  exactly one completion is ever recorded per job id, however many times it ran.

Outputs are content-addressed blobs, so running a job twice (a reclaimed job whose first
runner was only slow) writes the same bytes under the same hash.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Store
from estuary.state.blobs import BlobCorrupt, BlobNotFound, BlobStore
from estuary.state.keys import version_key

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CONSUMER_GROUP",
    "JOB_STREAM",
    "JobExecutor",
    "JobInputError",
    "JobOutcome",
    "ModelJobExecutor",
    "decode_job",
    "job_kind",
    "latest_key",
    "make_job",
    "result_key",
    "submit_job",
    "supersede_key",
]

logger = logging.getLogger(__name__)

#: Stream every cloud job is appended to.
JOB_STREAM = "jobs"
#: The one consumer group all worker groups read through (each group is a consumer).
CONSUMER_GROUP = "workers"
#: ``joblatest/<kind key>``: newest submitted version per kind.
LATEST_PREFIX = "joblatest/"
#: ``jobresult/<job_id>``: the recorded outcome of a job, written once.
RESULT_PREFIX = "jobresult/"
#: Stream field holding the serialised Job.
JOB_FIELD = "job"

Kind = Literal["evaluate", "build_artifacts", "merge", "generate"]
Status = Literal["done", "skipped", "failed"]


class JobInputError(ValueError):
    """A job names something that does not exist or cannot be used.

    Unknown version, missing or corrupt adapter/checkpoint, unknown device class: the
    job fails with this message recorded, and the group goes on serving.
    """


def job_kind(job: jobs_pb2.Job) -> Kind:
    """Return the job's kind (the ``kind`` oneof).

    Raises
    ------
    JobInputError
        If the job sets no kind.
    """
    kind = job.WhichOneof("kind")
    if kind is None:
        raise JobInputError(f"job {job.job_id!r}: no kind set")
    return cast(Kind, kind)


def supersede_key(job: jobs_pb2.Job) -> str | None:
    """Return the key under which newer versions supersede ``job``, or ``None``.

    Evaluations and merges are superseded by any newer version; artifacts by a newer
    version for the same device class. ``generate`` is a person's request, never
    superseded.
    """
    kind = job_kind(job)
    if kind == "generate":
        return None
    if kind == "build_artifacts":
        return f"build_artifacts/{job.build_artifacts.device_class}"
    return kind


def latest_key(job: jobs_pb2.Job) -> str | None:
    """Return the store key of the newest submitted version of ``job``'s kind."""
    key = supersede_key(job)
    return None if key is None else f"{LATEST_PREFIX}{key}"


def result_key(job_id: str) -> str:
    """Return the store key of the recorded outcome of job ``job_id``."""
    if not job_id:
        raise ValueError("job_id: must be non-empty")
    return f"{RESULT_PREFIX}{job_id}"


def make_job(
    kind: Kind,
    *,
    version: int,
    adapter_sha256: str = "",
    adapter_size: int = 0,
    created_ms: int | None = None,
    device_class: str = "",
    prompt: str = "",
    max_new_tokens: int = 32,
    job_id: str | None = None,
) -> jobs_pb2.Job:
    """Return a :class:`Job` of ``kind`` for ``version``.

    The default job id is deterministic (``<kind>[-<class>]-v<version>``), so the
    coordinator submitting the same job twice names it once.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``version`` is negative, or ``build_artifacts`` has no
        device class.
    """
    if version < 0:
        raise ValueError(f"version: must be >= 0, got {version}")
    job = jobs_pb2.Job(
        version=version,
        created_ms=int(time.time() * 1000) if created_ms is None else created_ms,
    )
    if adapter_sha256:
        job.adapter.sha256 = adapter_sha256
        job.adapter.size_bytes = adapter_size
    if kind == "evaluate":
        job.evaluate.SetInParent()
    elif kind == "merge":
        job.merge.SetInParent()
    elif kind == "build_artifacts":
        if not device_class:
            raise ValueError("device_class: build_artifacts needs a device class")
        job.build_artifacts.device_class = device_class
    elif kind == "generate":
        job.generate.prompt = prompt
        job.generate.max_new_tokens = max_new_tokens
    else:
        raise ValueError(f"kind: unknown job kind {kind!r}")
    suffix = f"-{device_class}" if kind == "build_artifacts" else ""
    job.job_id = job_id or f"{kind}{suffix}-v{version}"
    return job


def _raise_latest(store: Store, key: str, version: int) -> None:
    def raise_to(current: bytes | None) -> bytes | None:
        if current is not None and json.loads(current)["version"] >= version:
            return None
        return json.dumps({"version": version}).encode()

    store.update(key, raise_to)


def submit_job(store: Store, job: jobs_pb2.Job, *, stream: str = JOB_STREAM) -> str:
    """Queue ``job`` and mark its version as the newest of its kind; return the entry id.

    The newest-version record is raised *before* the job is appended, so by the time any
    group can see this job, every older job of the same kind already reads as superseded.
    """
    key = latest_key(job)
    if key is not None:
        _raise_latest(store, key, job.version)
    # Creating the consumer group here (idempotent) lets `status` list pending jobs
    # before any worker group has started.
    store.ensure_group(stream, CONSUMER_GROUP)
    return store.stream_add(stream, {JOB_FIELD: job.SerializeToString()})


def decode_job(fields: Mapping[str, bytes]) -> jobs_pb2.Job:
    """Parse a stream entry's fields into a :class:`Job`.

    Raises
    ------
    JobInputError
        If the entry has no ``job`` field, it does not parse, or the job has no id or
        no kind.
    """
    from google.protobuf.message import DecodeError

    raw = fields.get(JOB_FIELD)
    if raw is None:
        raise JobInputError(f"stream entry has no {JOB_FIELD!r} field (fields: {sorted(fields)})")
    job = jobs_pb2.Job()
    try:
        job.ParseFromString(raw)
    except DecodeError as exc:
        raise JobInputError(f"stream entry is not a Job: {exc}") from exc
    if not job.job_id:
        raise JobInputError("job has no job_id")
    job_kind(job)
    return job


def is_superseded(store: Store, job: jobs_pb2.Job) -> bool:
    """Return whether a newer version of ``job``'s kind has been submitted."""
    key = latest_key(job)
    if key is None:
        return False
    record = store.get(key)
    return record is not None and int(json.loads(record.value)["version"]) > job.version


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job; stored as JSON at :func:`result_key`.

    Attributes
    ----------
    job_id, kind, version
        The job.
    status
        ``done``, ``skipped`` (superseded) or ``failed`` (bad input; see ``error``).
    group
        The worker group that recorded it.
    output
        Kind-specific results (``eval_bpb``, ``artifact_sha256``, ``text``, ...).
    error
        Why it failed; ``None`` unless ``failed``.
    committed_ms
        When the version was committed (the job's ``created_ms``).
    finished_ms
        When the outcome was recorded (Unix ms).
    deliveries
        How many times the job had been delivered when this outcome was recorded.
    """

    job_id: str
    kind: str
    version: int
    status: Status
    group: str
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    committed_ms: int = 0
    finished_ms: int = 0
    deliveries: int = 1

    def to_json(self) -> bytes:
        """Return the outcome as compact UTF-8 JSON."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobOutcome:
        """Parse an outcome written by :meth:`to_json`."""
        return cls(**json.loads(raw))


class JobExecutor(Protocol):
    """Runs one job and returns its kind-specific output."""

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Run ``job``; raise :class:`JobInputError` for bad inputs."""
        ...


def update_version_record(
    store: Store, version: int, updates: Mapping[str, Any], *, stamp: str | None = None
) -> None:
    """Merge ``updates`` into the JSON record of ``version`` (compare-and-set loop).

    With ``stamp``, that field is set to the current time when (and only when) the
    record changes, so a re-run of the same job leaves the record as it was.

    Raises
    ------
    JobInputError
        If the version has no record.
    """
    key = version_key(version)

    def merge(current: bytes | None) -> bytes | None:
        if current is None:
            raise JobInputError(f"version {version}: unknown (no {key} record)")
        value = json.loads(current)
        if all(value.get(k) == v for k, v in updates.items()):
            return None  # already written, by an earlier run of the same job
        value.update(updates)
        if stamp is not None:
            value[stamp] = round(time.time(), 3)
        return json.dumps(value, sort_keys=True).encode()

    store.update(key, merge)


#: Weight-only scheme of the compressed base per device class; classes not listed get
#: int8, the scheme every edge runtime supports.
DEFAULT_SCHEME = "int8"
#: File names of the served ONNX part of an edge artifact (see edge_client.onnx_meta).
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_METADATA_FILE = "estuary_onnx.json"


class ModelJobExecutor:
    """Executes jobs on one process holding the full-precision base model.

    Parameters
    ----------
    store
        State store: version records are read and ``eval_bpb`` written back.
    blobs
        Blob store holding adapter versions; outputs are written here.
    base
        The full-precision base model (kept unmodified: every job works on a copy).
    eval_windows
        ``(n, seq_len + 1)`` held-out token windows for ``evaluate``.
    schemes
        Compression scheme per device class (``int8`` or ``nf4``); others get int8.
    evaluate_fn
        ``f(model, windows) -> bits/byte``; default
        :func:`estuary.model.evaluate.bits_per_byte`. A multi-stage group passes its
        pipelined evaluation here.
    onnx
        Put the int8 ONNX export of each version into its edge artifacts (a few seconds
        per version on the tiny preset); False leaves it out.
    """

    def __init__(
        self,
        store: Store,
        *,
        blobs: BlobStore,
        base: nn.Module,
        eval_windows: torch.Tensor,
        schemes: Mapping[str, str] | None = None,
        evaluate_fn: Callable[[jobs_pb2.Job, nn.Module, torch.Tensor], float] | None = None,
        onnx: bool = True,
    ) -> None:
        if eval_windows.ndim != 2 or eval_windows.shape[0] == 0 or eval_windows.shape[1] < 2:
            raise ValueError(
                f"eval_windows: need shape (n>0, seq_len+1>=2), got {tuple(eval_windows.shape)}"
            )
        for name, scheme in (schemes or {}).items():
            if scheme not in ("int8", "nf4"):
                raise ValueError(f"schemes: {name!r} has unknown scheme {scheme!r}")
        self.store = store
        self.blobs = blobs
        self.base = base
        self.eval_windows = eval_windows
        self.schemes = dict(schemes or {})
        self.evaluate_fn = evaluate_fn
        self.onnx = onnx
        self._compressed: dict[str, dict[str, str]] = {}
        self._onnx: tuple[str, dict[str, str]] = ("", {})

    # ---------------------------------------------------------------- inputs

    def version_record(self, version: int) -> dict[str, Any]:
        """Return the JSON record of ``version``; :class:`JobInputError` if unknown."""
        record = self.store.get(version_key(version))
        if record is None:
            raise JobInputError(f"version {version}: unknown (no {version_key(version)} record)")
        value: dict[str, Any] = json.loads(record.value)
        return value

    def adapter_digest(self, job: jobs_pb2.Job) -> str:
        """Return the adapter blob digest of the job (its BlobRef, else the version's)."""
        record = self.version_record(job.version)
        digest = job.adapter.sha256 or str(record.get("adapter_sha256") or "")
        if not digest:
            raise JobInputError(f"version {job.version}: no adapter checkpoint named")
        return digest

    def load_adapter(self, job: jobs_pb2.Job, *, digest: str | None = None) -> Any:
        """Return the version's :class:`~estuary.adapters.lora.GlobalAdapter`.

        ``digest``: the job's adapter digest if the caller already resolved it.
        """
        from estuary.adapters import get_adapter
        from estuary.model.loading import CheckpointError

        digest = digest or self.adapter_digest(job)
        try:
            return get_adapter(self.blobs, digest)  # hash verified before use
        except CheckpointError as exc:
            raise JobInputError(
                f"version {job.version}: adapter checkpoint unusable: {exc}"
            ) from exc
        except ValueError as exc:
            raise JobInputError(f"version {job.version}: bad adapter digest: {exc}") from exc
        except BlobNotFound as exc:
            # A blob error is a StoreError, which the loop treats as an outage and leaves
            # the job pending; a blob that is simply absent is this job's bad input.
            raise JobInputError(
                f"version {job.version}: adapter checkpoint {digest} is missing from the blob store"
            ) from exc
        except BlobCorrupt as exc:
            raise JobInputError(
                f"version {job.version}: adapter checkpoint {digest} is corrupt in the blob store"
            ) from exc

    def merged_model(self, job: jobs_pb2.Job) -> nn.Module:
        """Return a copy of the base with the job's adapter merged in."""
        from estuary.adapters.lora import merge_into_base

        adapter = self.load_adapter(job)
        model = copy.deepcopy(self.base)
        try:
            merge_into_base(model, adapter)
        except ValueError as exc:
            raise JobInputError(
                f"version {job.version}: adapter does not fit the base: {exc}"
            ) from exc
        return model

    # ---------------------------------------------------------------- kinds

    def execute(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Run ``job``; return its output."""
        kind = job_kind(job)
        if kind == "evaluate":
            return self.evaluate(job)
        if kind == "merge":
            return self.merge(job)
        if kind == "build_artifacts":
            return self.build_artifacts(job)
        return self.generate(job)

    def evaluate(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Held-out bits/byte of the version, written to its version record."""
        from estuary.model.evaluate import bits_per_byte

        model = self.merged_model(job)
        if self.evaluate_fn is not None:
            bpb = self.evaluate_fn(job, model, self.eval_windows)
        else:
            bpb = bits_per_byte(model, self.eval_windows)
        bpb = round(bpb, 6)
        update_version_record(self.store, job.version, {"eval_bpb": bpb}, stamp="eval_at")
        return {"eval_bpb": bpb, "eval_windows": int(self.eval_windows.shape[0])}

    def _put_dir(self, directory: Path) -> dict[str, str]:
        return {f.name: self.blobs.put_file(f) for f in sorted(directory.iterdir()) if f.is_file()}

    def _manifest(self, manifest: dict[str, Any]) -> str:
        return self.blobs.put_bytes(json.dumps(manifest, sort_keys=True, indent=1).encode())

    def merge(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Full-precision merged checkpoint in Hugging Face format, as blobs + manifest."""
        model = self.merged_model(job)
        tmp = Path(tempfile.mkdtemp(prefix="estuary-merge-"))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
            files = self._put_dir(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        digest = self._manifest({"format": "hf", "version": job.version, "files": files})
        return {"checkpoint_sha256": digest, "files": files}

    def _compressed_base(self, scheme: str) -> dict[str, str]:
        # The frozen base is the same for every version: compress it once per scheme.
        if scheme not in self._compressed:
            from estuary.compress.quant import compress_model, save_compressed

            model = compress_model(copy.deepcopy(self.base), scheme=scheme)  # type: ignore[arg-type]
            tmp = Path(tempfile.mkdtemp(prefix="estuary-compress-"))
            try:
                save_compressed(model, tmp)
                self._compressed[scheme] = self._put_dir(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._compressed[scheme]

    def _served_onnx(self, job: jobs_pb2.Job, digest: str) -> dict[str, str]:
        """Return the int8 ONNX export of the version's merged model, as blob digests.

        The same for every device class of a version, so it is exported once per adapter
        digest. The export is deterministic (no paths or times in the graph or its
        metadata), so building it twice gives the same hashes.
        """
        if self._onnx[0] != digest:
            from edge_client.onnx_export import export_onnx, quantize_int8

            model = self.merged_model(job)
            tmp = Path(tempfile.mkdtemp(prefix="estuary-onnx-"))
            try:
                export_onnx(model, tmp, source=f"estuary adapter {digest}")
                quantize_int8(tmp / "model.onnx", tmp / ONNX_INT8_FILE)
                files = {
                    name: self.blobs.put_file(tmp / name)
                    for name in (ONNX_INT8_FILE, ONNX_METADATA_FILE, "config.json")
                }
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._onnx = (digest, files)
        return dict(self._onnx[1])

    def build_artifacts(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Edge artifact of a device class, by manifest: what a device trains and serves.

        ``files``: the compressed base (scheme per class) and the adapter, materialised
        into one directory for training. ``onnx``: the int8 ONNX export of the merged
        model with its served-directory metadata, for ``estuary edge infer`` (the fp32
        graph the metadata also names is left out: devices serve int8).
        """
        device_class = job.build_artifacts.device_class
        if not device_class:
            raise JobInputError("build_artifacts: no device_class")
        digest = self.adapter_digest(job)
        self.load_adapter(job, digest=digest)  # fail early on a missing or corrupt adapter
        scheme = self.schemes.get(device_class, DEFAULT_SCHEME)
        files = dict(self._compressed_base(scheme))
        files["adapter.safetensors"] = digest
        manifest = {
            "format": "estuary-edge-artifact/1",
            "version": job.version,
            "device_class": device_class,
            "scheme": scheme,
            "files": files,
        }
        if self.onnx:
            manifest["onnx"] = self._served_onnx(job, digest)
        return {"artifact_sha256": self._manifest(manifest), "scheme": scheme}

    def generate(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Greedy continuation of the prompt by the version's merged model."""
        import torch

        from estuary.model.tokenizer import ByteTokenizer

        request = job.generate
        if not 1 <= request.max_new_tokens <= 4096:
            raise JobInputError(
                f"generate: max_new_tokens must be in 1..4096, got {request.max_new_tokens}"
            )
        tokenizer = ByteTokenizer()
        model = self.merged_model(job)
        ids = tokenizer.encode(request.prompt) or [ord("\n")]
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                torch.tensor([ids]),
                max_new_tokens=request.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        new = out[0, len(ids) :].tolist()
        return {"text": tokenizer.decode(new).decode("utf-8", errors="replace")}
