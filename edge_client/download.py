"""Edge artifacts onto the device: resumable, verified downloads and their installation.

A task names an artifact by the SHA-256 of its manifest
(:class:`estuary.artifacts.EdgeArtifactManifest`); the manifest names the blobs of the
training directory (compressed base + adapter) and of the int8 ONNX export. Each blob
is fetched into the content-addressed cache of :class:`~edge_client.state.EdgeState`
only if it is not there, resuming a partial download from where it stopped, and is
committed only once its hash matches. The training files are then linked into one model
directory, the ONNX files into ``served/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from edge_client.errors import TaskAbandoned
from edge_client.rpc import EdgeRpc
from edge_client.state import ArtifactCorrupt, EdgeState, StateError
from estuary.artifacts import EdgeArtifactManifest, ManifestError
from estuary.proto.v1 import common_pb2, edge_pb2

__all__ = ["MAX_HASH_FAILURES", "ArtifactDownloader"]

logger = logging.getLogger(__name__)

#: Times a blob is downloaded again after failing its hash check before the task is
#: abandoned: one retry covers a torn .part after a crash; more means the server is bad.
MAX_HASH_FAILURES = 2


class ArtifactDownloader:
    """Fetches a task's artifact into the device's cache and installs it.

    Parameters
    ----------
    state
        The device's state directory (blob cache, model and serving directories).
    rpc
        The channel to the coordinator.
    """

    def __init__(self, state: EdgeState, rpc: EdgeRpc) -> None:
        self._state = state
        self._rpc = rpc

    async def fetch_training_files(
        self, ref: common_pb2.BlobRef
    ) -> tuple[EdgeArtifactManifest, Path]:
        """Fetch the manifest ``ref`` names and its training files; return both.

        Returns
        -------
        tuple
            The manifest, and the model directory holding its ``files`` under their
            names (compressed base + adapter).

        Raises
        ------
        TaskAbandoned
            If the task names no artifact, the manifest is invalid, a blob cannot be
            fetched or verified, or the directory cannot be made.
        """
        if not ref.sha256:
            raise TaskAbandoned("the task names no artifact")
        await self.fetch(ref.sha256, int(ref.size_bytes))
        try:
            manifest = EdgeArtifactManifest.from_json(self._state.read_artifact(ref.sha256))
        except ManifestError as exc:
            raise TaskAbandoned(f"artifact {ref.sha256}: {exc}") from None
        files = dict(manifest.files)
        for digest in sorted(set(files.values())):
            await self.fetch(digest, None)
        try:
            directory = self._state.materialise(ref.sha256, files)
        except StateError as exc:
            raise TaskAbandoned(str(exc)) from None
        return manifest, directory

    async def install_served(self, manifest: EdgeArtifactManifest) -> dict[str, str]:
        """Fetch the artifact's int8 ONNX export into ``served/`` (for edge infer).

        Returns
        -------
        dict
            File name → digest of the installed export; empty when the artifact has none.

        Raises
        ------
        TaskAbandoned
            If a blob cannot be fetched or the directory cannot be made.
        """
        onnx = dict(manifest.onnx)
        if not onnx:
            return {}
        for digest in sorted(set(onnx.values())):
            await self.fetch(digest, None)
        try:
            where = self._state.install_served(onnx)
        except StateError as exc:
            raise TaskAbandoned(str(exc)) from None
        logger.debug("serving model of version %s installed in %s", manifest.version, where)
        return onnx

    async def fetch(self, digest: str, size: int | None) -> None:
        """Download blob ``digest`` into the cache unless it is there (resumable, verified).

        Parameters
        ----------
        digest
            SHA-256 of the blob, hex.
        size
            Its size in bytes when known (a partial download longer than that is
            discarded); ``None`` when not.

        Raises
        ------
        TaskAbandoned
            If the digest is malformed, the coordinator refuses the fetch, or the blob
            fails its hash check :data:`MAX_HASH_FAILURES` times.
        """
        state = self._state
        rpc = self._rpc
        try:
            if state.has_artifact(digest):
                return
        except ValueError as exc:
            raise TaskAbandoned(f"bad artifact digest: {exc}") from None
        stub = rpc.stub()
        failures = 0
        attempt = 0
        while True:
            offset = state.partial_size(digest)
            if size is not None and offset > size:
                state.discard_partial(digest)
                offset = 0
            request = edge_pb2.FetchArtifactRequest(sha256=digest, offset=offset)
            rpc.sign("FetchArtifact", request)
            rpc.stats.bytes_up += request.ByteSize()
            total: int | None = None
            try:
                async for chunk in stub.FetchArtifact(request):
                    rpc.stats.bytes_down += chunk.ByteSize()
                    total = int(chunk.total_bytes)
                    try:
                        offset = state.append_partial(
                            digest, offset=int(chunk.offset), data=chunk.data
                        )
                    except StateError as exc:
                        raise TaskAbandoned(f"artifact {digest}: {exc}") from None
            except grpc.aio.AioRpcError as exc:
                if rpc.is_transient(exc):
                    await rpc.retry_pause("FetchArtifact", exc, attempt)
                    attempt += 1
                    continue
                raise rpc.refused("FetchArtifact", exc, in_task=True) from None
            if total is None:  # no chunk at all: an empty blob, or the resume point was the end
                total = offset
                state.append_partial(digest, offset=offset, data=b"")
            if offset < total:
                logger.warning("artifact %s: stream ended at %d of %d bytes", digest, offset, total)
                await rpc.wait_to_retry(rpc.backoff(attempt))
                attempt += 1
                continue
            try:
                state.commit_artifact(digest)
            except ArtifactCorrupt as exc:
                failures += 1
                logger.warning("%s", exc)
                if failures >= MAX_HASH_FAILURES:
                    raise TaskAbandoned(
                        f"artifact {digest} failed its hash check {failures} times"
                    ) from None
                continue
            logger.debug("fetched artifact %s (%d bytes)", digest, total)
            return
