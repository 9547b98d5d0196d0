"""Regenerate the committed protobuf/gRPC Python code from the ``.proto`` files.

Run ``python -m estuary.proto.generate`` (``make proto``) after editing a ``.proto``;
a test regenerates into a temporary folder and fails if the committed files differ.
Needs the ``dev`` extra (grpcio-tools, pinned so the output is reproducible).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Repository root: the import root of the generated modules (``estuary.proto.v1``).
ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path(__file__).resolve().parent / "v1"


def proto_files() -> list[Path]:
    """Return the ``.proto`` sources, sorted."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_root``.

    Returns
    -------
    list of Path
        The generated files, relative to ``out_root``.

    Raises
    ------
    RuntimeError
        If protoc reports an error.
    """
    from grpc_tools import protoc  # dev-only dependency

    sources = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    rel_dir = PROTO_DIR.relative_to(ROOT)
    return sorted(
        p.relative_to(out_root) for p in (out_root / rel_dir).iterdir() if "_pb2" in p.name
    )


def main() -> int:
    """Regenerate in place."""
    written = generate(ROOT)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
