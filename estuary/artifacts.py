"""The edge-artifact manifest: what a device downloads to train and serve one version.

Cloud workers write it (:meth:`EdgeArtifactManifest.to_json`), edge agents read it
(:meth:`EdgeArtifactManifest.from_json`); the format string and the file names are spelt
here only. The manifest is itself a content-addressed blob, and every file it names is a
blob digest, so a device verifies everything it installs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADAPTER_FILE",
    "FORMAT",
    "EdgeArtifactManifest",
    "ManifestError",
]

#: Format tag of the manifest; a reader refuses any other.
FORMAT = "estuary-edge-artifact/1"
#: The file of ``files`` holding the adapter version; every other file is the base.
ADAPTER_FILE = "adapter.safetensors"


class ManifestError(ValueError):
    """A manifest that does not parse or does not have the documented shape."""


def _file_map(value: Any, *, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(n, str) and isinstance(d, str) for n, d in value.items()
    ):
        raise ManifestError(f"{name!r} must map file names to digests")
    return dict(value)


@dataclass(frozen=True)
class EdgeArtifactManifest:
    """One device class's artifact of one version.

    Attributes
    ----------
    version
        The model version the adapter belongs to.
    device_class
        The device class it was built for.
    scheme
        Weight-only compression of the base (``int8`` or ``nf4``).
    files
        File name → blob digest of the training directory: the compressed base files and
        :data:`ADAPTER_FILE`.
    onnx
        File name → blob digest of the int8 ONNX export of the merged model, for serving;
        empty when the artifact carries none.
    """

    version: int
    device_class: str
    scheme: str
    files: Mapping[str, str]
    onnx: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_files(self) -> dict[str, str]:
        """The files of the compressed base (everything but the adapter)."""
        return {n: d for n, d in self.files.items() if n != ADAPTER_FILE}

    @property
    def adapter_digest(self) -> str:
        """Digest of the adapter file."""
        return self.files[ADAPTER_FILE]

    def to_json(self) -> bytes:
        """Return the manifest as deterministic JSON (same content → same digest)."""
        value: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "device_class": self.device_class,
            "scheme": self.scheme,
            "files": dict(self.files),
        }
        if self.onnx:
            value["onnx"] = dict(self.onnx)
        return json.dumps(value, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> EdgeArtifactManifest:
        """Parse and check a manifest.

        Raises
        ------
        ManifestError
            If it is not JSON, has another format, or a field has the wrong shape.
        """
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"not JSON: {exc}") from None
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            found = value.get("format") if isinstance(value, dict) else None
            raise ManifestError(f"format {found!r}, expected {FORMAT!r}")
        files = _file_map(value.get("files"), name="files")
        if ADAPTER_FILE not in files:
            raise ManifestError(f"'files' names no {ADAPTER_FILE}")
        onnx = _file_map(value.get("onnx") or {}, name="onnx")
        version = value.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ManifestError(f"'version' must be an integer >= 0, got {version!r}")
        return cls(
            version=version,
            device_class=str(value.get("device_class", "")),
            scheme=str(value.get("scheme", "")),
            files=files,
            onnx=onnx,
        )
