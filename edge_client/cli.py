"""``estuary edge``: commands of the on-device agent.

``infer`` serves a model with onnxruntime. It takes either a served ONNX directory (from
``estuary model export-onnx``) or a Hugging Face model directory (from ``estuary model
init``); the latter is exported and quantised once into a cache subfolder, which later
runs reuse until the model's files change.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from edge_client.serving import DEFAULT_THREADS
from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, err_console, fail, print_json

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="On-device agent: serve the model with onnxruntime.",
    no_args_is_help=True,
)


@app.callback()
def _edge() -> None:
    """On-device agent: serve the model with onnxruntime."""


def _served_dir(model: Path, *, cache: Path | None, fp32: bool) -> Path:
    """Return the served directory for MODEL, exporting a Hugging Face directory first.

    Exits with ``INPUT`` naming the path when MODEL is neither kind of directory.
    """
    from edge_client.onnx_meta import is_served_dir

    if not model.is_dir():
        fail(f"{model}: model directory does not exist")
        raise typer.Exit(ExitCode.INPUT)
    if is_served_dir(model):
        return model
    if not (model / "config.json").is_file():
        fail(
            f"{model}: neither a served ONNX directory (no estuary_onnx.json) nor a Hugging "
            "Face model directory (no config.json)"
        )
        raise typer.Exit(ExitCode.INPUT)
    try:
        from edge_client.onnx_export import CACHE_DIRNAME, cached_export
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        fail(f"exporting {model} needs onnx and onnxscript (the 'worker' extra): {exc}")
        raise typer.Exit(ExitCode.FAILURE) from None
    target = cache if cache is not None else model / CACHE_DIRNAME
    started = time.perf_counter()
    try:
        served, exported = cached_export(model, cache_dir=target, int8=not fp32)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        fail(f"{model}: cannot export: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None
    except PermissionError as exc:
        fail(f"{target}: cannot write the export cache ({exc}); pass --cache DIR")
        raise typer.Exit(ExitCode.INPUT) from None
    if exported:
        err_console.print(
            f"exported {model} to ONNX{'' if fp32 else ' and quantised it to int8'} in "
            f"{time.perf_counter() - started:.1f} s (first use); cached in {served}",
            highlight=False,
        )
    return served


@app.command("infer")
def infer(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Served ONNX directory, or a Hugging Face model directory "
            "(exported and quantised into a cache subfolder on first use).",
        ),
    ],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=0, help="Tokens to generate.")
    ] = 64,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="onnxruntime intra-op threads.")
    ] = DEFAULT_THREADS,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print the completion as text or JSON.")
    ] = OutputFormat.text,
    fp32: Annotated[
        bool,
        typer.Option("--fp32", help="Serve the fp32 graph instead of the int8 one."),
    ] = False,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Where to cache the export of a Hugging Face directory "
            "(default: MODEL/.estuary-onnx).",
        ),
    ] = None,
) -> None:
    """Continue PROMPT greedily with the model in MODEL, served by onnxruntime.

    Text format writes only the completion's bytes to standard output; JSON adds the
    served directory, graph file, byte count and time taken. Exit code 5 when MODEL is
    missing or invalid.
    """
    from edge_client.serving import OrtLM

    served = _served_dir(model, cache=cache, fp32=fp32)
    try:
        lm = OrtLM(served, threads=threads, precision="fp32" if fp32 else "auto")
    except (ValueError, FileNotFoundError) as exc:
        fail(f"{served}: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None
    started = time.perf_counter()
    try:
        completion = lm.generate(prompt, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    seconds = time.perf_counter() - started
    if output is OutputFormat.json:
        print_json(
            {
                "model": str(served),
                "graph": lm.path.name,
                "prompt": prompt,
                "completion": completion.decode("utf-8", errors="replace"),
                "completion_bytes": len(completion),
                "seconds": round(seconds, 4),
                "threads": threads,
            }
        )
        return
    # Raw bytes: a byte-level model may emit a partial UTF-8 sequence at the end, which a
    # text stream would reject or mangle.
    sys.stdout.buffer.write(completion + b"\n")
    sys.stdout.flush()
