"""``estuary model``: create and inspect base models."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from estuary.cli.exit_codes import ExitCode

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Create base models (presets pretrained on the stdlib) and export them to ONNX."
)


@app.callback()
def _model() -> None:
    """Create base models: built-in presets pretrained on the standard library."""


@app.command("init")
def init(
    preset: Annotated[
        str, typer.Option(help="Built-in preset: tiny (~0.9 M) or small (~10 M).")
    ] = "tiny",
    out: Annotated[Path, typer.Option(help="Output directory (a Hugging Face model dir).")] = Path(
        "base"
    ),
    pretrain_steps: Annotated[
        int, typer.Option(min=0, help="Pretraining steps on the stdlib top-level modules.")
    ] = 300,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per pretraining step.")] = 16,
    seq_len: Annotated[int, typer.Option(min=8, help="Bytes per pretraining window.")] = 128,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model in --out.")] = False,
) -> None:
    """Create preset PRESET, pretrain it, and save it as a Hugging Face directory."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from estuary.model.presets import PRESETS, build_preset
    from estuary.model.pretrain import ProgressLog

    if preset not in PRESETS:
        typer.echo(
            f"--preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}", err=True
        )
        raise typer.Exit(ExitCode.USAGE)
    if (out / "config.json").exists() and not overwrite:
        typer.echo(f"{out / 'config.json'}: a model already exists; pass --overwrite", err=True)
        raise typer.Exit(ExitCode.INPUT)
    torch.set_num_threads(threads)
    if pretrain_steps == 0:
        model = build_preset(preset, seed=seed)
    elif sys.stderr.isatty():
        # A terminal gets a bar, on standard error: standard output carries the result.
        with Progress(
            TextColumn("pretraining {task.fields[preset]}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} · loss {task.fields[loss]:.3f} bits/byte"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("pretrain", total=pretrain_steps, preset=preset, loss=float("nan"))

            def report(step: int, loss: float) -> None:
                bar.update(task, completed=step, loss=loss)

            model = _pretrain(preset, pretrain_steps, seed, batch_size, seq_len, report)
    else:
        # Redirected, under systemd or in a container job: log lines (at most one per 10 s),
        # which a bar would not give until it ended.
        progress = ProgressLog(pretrain_steps, label=f"{preset} base")
        model = _pretrain(preset, pretrain_steps, seed, batch_size, seq_len, progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    typer.echo(f"saved {preset} ({sum(p.numel() for p in model.parameters())} parameters) to {out}")


def _pretrain(
    preset: str,
    steps: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    progress: Callable[[int, float], None],
) -> Any:
    from estuary.model.pretrain import pretrained_preset

    return pretrained_preset(
        preset, steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, progress=progress
    )
