"""Executing cloud jobs on a process that holds the full-precision base model.

The job contract (ids, stream, outcomes, version records) is :mod:`estuary.jobs`; this
module is what a worker group runs for each job.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estuary.artifacts import ADAPTER_FILE, EdgeArtifactManifest
from estuary.jobs import (
    JobInputError,
    JobOutcome,
    job_kind,
    newest_done,
    result_key,
    update_version_record,
)
from estuary.proto.v1 import jobs_pb2
from estuary.state.base import Store
from estuary.state.blobs import BlobCorrupt, BlobNotFound, BlobStore
from estuary.state.keys import version_key

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModelJobExecutor"]

logger = logging.getLogger(__name__)


#: Weight-only scheme of the compressed base per device class; classes not listed get
#: int8, the scheme every edge runtime supports.
DEFAULT_SCHEME = "int8"


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
        Run ``export_onnx`` jobs: the int8 ONNX export of a version (a few seconds to
        a minute per version on the tiny preset, spent in an exporter process: see
        :mod:`estuary.onnx_export`), which later edge artifacts name for serving.
        False: an ``export_onnx`` job exports nothing and artifacts carry no export.
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
        # A group builds artifacts on two threads (its stream loop and the artifact
        # lane): the base of a scheme is compressed by one of them, once.
        self._compress_lock = threading.Lock()

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
        if kind == "export_onnx":
            return self.export_onnx(job)
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
        with self._compress_lock:
            return self._compressed_base_locked(scheme)

    def _compressed_base_locked(self, scheme: str) -> dict[str, str]:
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
        metadata), so building it twice gives the same hashes. It runs in an exporter
        process (:mod:`estuary.onnx_export`), so it is safe beside other groups, trainers
        and exports in this process.
        """
        if self._onnx[0] != digest:
            from estuary.onnx_export import export_onnx
            from estuary.onnx_meta import INT8_FILENAME, METADATA_FILENAME

            model = self.merged_model(job)
            tmp = Path(tempfile.mkdtemp(prefix="estuary-onnx-"))
            try:
                export_onnx(model, tmp, source=f"estuary adapter {digest}", int8=True)
                files = {
                    name: self.blobs.put_file(tmp / name)
                    for name in (INT8_FILENAME, METADATA_FILENAME, "config.json")
                }
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._onnx = (digest, files)
        return dict(self._onnx[1])

    def export_onnx(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Export the version's merged model to int8 ONNX, for serving.

        Output ``onnx``: file name → blob digest of the int8 graph with its
        served-directory metadata (the fp32 graph the metadata also names is left out:
        devices serve int8); empty when this executor was built with ``onnx=False``.
        """
        digest = self.adapter_digest(job)
        return {"onnx": self._served_onnx(job, digest) if self.onnx else {}}

    def newest_export(self) -> dict[str, str]:
        """Return the files of the newest completed ``export_onnx`` job; empty if none."""
        if not self.onnx:
            return {}
        done = newest_done(self.store, "export_onnx")
        if done is None:
            return {}
        record = self.store.get(result_key(done[1]))
        if record is None:  # the outcome was removed by retention after a newer one
            return {}
        files = JobOutcome.from_json(record.value).output.get("onnx") or {}
        return {str(name): str(digest) for name, digest in dict(files).items()}

    def build_artifacts(self, job: jobs_pb2.Job) -> dict[str, Any]:
        """Edge artifact of a device class, by manifest: what a device trains and serves.

        ``files``: the compressed base (scheme per class) and the adapter, materialised
        into one directory for training. ``onnx``: the newest int8 ONNX export completed
        so far (``export_onnx`` jobs; possibly of an older version), for
        ``estuary edge infer``. Nothing here exports: once the base of the class's
        scheme is compressed, a build is a manifest, so devices get every version as
        soon as it is committed (see :mod:`estuary.jobs`, training artifacts run ahead).
        """
        device_class = job.build_artifacts.device_class
        if not device_class:
            raise JobInputError("build_artifacts: no device_class")
        digest = self.adapter_digest(job)
        self.load_adapter(job, digest=digest)  # fail early on a missing or corrupt adapter
        scheme = self.schemes.get(device_class, DEFAULT_SCHEME)
        manifest = EdgeArtifactManifest(
            version=job.version,
            device_class=device_class,
            scheme=scheme,
            files={**self._compressed_base(scheme), ADAPTER_FILE: digest},
            onnx=self.newest_export(),
        )
        return {"artifact_sha256": self.blobs.put_bytes(manifest.to_json()), "scheme": scheme}

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
