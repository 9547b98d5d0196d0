"""``estuary model export-onnx``: turn a Hugging Face model directory into a served ONNX one.

A plain function, registered on the ``model`` group by :mod:`estuary.cli.app`. The export
code lives in :mod:`estuary.onnx_export` and is imported only when the command runs,
so the rest of the CLI does not pay for torch and onnx.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, fail, print_json

logger = logging.getLogger(__name__)


def export_onnx_command(
    model: Annotated[
        Path,
        typer.Argument(help="Hugging Face model directory (e.g. from 'estuary model init')."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Served ONNX directory to write (created if needed).")
    ],
    int8: Annotated[
        bool,
        typer.Option("--int8/--no-int8", help="Also write the int8 graph (dynamic quantisation)."),
    ] = True,
    example_batch: Annotated[
        int,
        typer.Option(
            "--example-batch",
            min=2,
            help="Batch of the example input; >= 2 or the batch axis becomes fixed.",
        ),
    ] = 2,
    opset: Annotated[
        int | None, typer.Option("--opset", min=1, help="ONNX opset (default: the exporter's).")
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print the result as text or JSON.")
    ] = OutputFormat.text,
) -> None:
    """Export MODEL to ONNX (fp32, optionally int8) as a self-describing served directory.

    The graph maps input_ids [batch, seq] to logits [batch, seq, vocab], both axes
    dynamic; it is checked against torch on a fresh shape before the command succeeds.
    Serve it with 'estuary edge infer --model OUT'. Exit code 5 when MODEL is missing or
    not a loadable model.
    """
    try:
        from estuary.onnx_export import export_model_dir
        from estuary.onnx_meta import FP32_FILENAME
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        fail(f"exporting needs torch, transformers, onnx and onnxscript: {exc}")
        raise typer.Exit(ExitCode.FAILURE) from None
    if not model.is_dir():
        fail(f"{model}: model directory does not exist")
        raise typer.Exit(ExitCode.INPUT)
    started = time.perf_counter()
    try:
        metadata = export_model_dir(model, out, int8=int8, example_batch=example_batch, opset=opset)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        fail(f"{model}: cannot export: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None
    seconds = time.perf_counter() - started
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    files = {"fp32": out / FP32_FILENAME}
    if metadata.int8 is not None:
        files["int8"] = out / metadata.int8
    sizes = {kind: path.stat().st_size for kind, path in files.items()}
    if output is OutputFormat.json:
        print_json(
            {
                "model": str(model),
                "out": str(out),
                "seconds": round(seconds, 2),
                "safetensors_bytes": weights,
                "files": {kind: str(path) for kind, path in files.items()},
                "bytes": sizes,
                "vocab_size": metadata.vocab_size,
                "max_positions": metadata.max_positions,
                "tokenizer": metadata.tokenizer,
                "opset": metadata.opset,
            }
        )
        return
    console.print(f"exported {model} to {out} in {seconds:.1f} s (opset {metadata.opset})")
    for kind, path in files.items():
        ratio = f" ({sizes[kind] / weights:.2f}x the safetensors weights)" if weights else ""
        console.print(f"  {kind}: {path} {sizes[kind]:,} bytes{ratio}", highlight=False)
