"""``estuary simulate``: a whole federation on one machine (the main job of ``make demo``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import fail

logger = logging.getLogger(__name__)


def simulate_command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Simulation TOML (see deploy/config/simulation.toml). Default: built-in.",
        ),
    ] = None,
    clients: Annotated[
        int | None, typer.Option(min=2, help="Simulated devices (stdlib packages).")
    ] = None,
    versions: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many new versions.")
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(min=0.0, max=0.99, help="Chance a device vanishes mid-task.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of every random choice.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help="State store URL: memory:// (default) or redis://host:port/db."),
    ] = None,
    baselines: Annotated[
        bool | None,
        typer.Option(
            "--baselines/--no-baselines",
            help="Also train local-only and centralized adapters with the same sample budget.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Parent folder of `runs/<id>/`.")] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live progress display.")] = True,
) -> None:
    """Run a whole federation on this machine and write `runs/<id>/`.

    The coordinator, a local cloud worker and one edge agent per client run in this
    process and talk real gRPC over loopback, secure aggregation on. The run folder gets
    the effective config, metrics.jsonl, summary.json and PNG plots.

    Unless `model.path` names a base, the first run pretrains the preset base once,
    logging its progress, and caches it in `OUT/.cache` for later runs; `time_limit_s`
    counts the federation only, never that pretraining.

    The federation's deadlines and `time_limit_s` run on a clock that slows down while
    other processes hold the cores (measured twice a second from the kernel's scheduler
    counters), so a busy machine takes longer instead of timing out. The summary says
    how far along the learning curve the run got. A run that commits fewer versions than
    asked still writes its folder, then says why and exits 7 (incomplete); one with no
    version at all prints no score table.
    """
    from estuary.config import ConfigError, load_settings
    from estuary.config.models import SimulationSettings

    try:
        loaded = load_settings("simulation", config)
        assert isinstance(loaded, SimulationSettings)
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "clients": clients,
                "versions": versions,
                "dropout": dropout,
                "seed": seed,
                "baselines": baselines,
                "out_dir": out,
            }.items()
            if v is not None
        }
        data = loaded.model_dump()
        data.update(overrides)
        if state is not None:
            data["state"] = {**data["state"], "url": state}
        settings = SimulationSettings.model_validate(data)
    except ConfigError as exc:
        for problem in exc.problems:
            fail(str(problem))
        raise typer.Exit(ExitCode.CONFIG) from None
    except ValueError as exc:  # pydantic: an override out of range or inconsistent
        fail(f"invalid option: {exc}")
        raise typer.Exit(ExitCode.USAGE) from None

    from estuary.state.errors import StoreUnavailable
    from simulation.run import run_simulation

    try:
        run_dir = run_simulation(settings, live=live)
    except KeyboardInterrupt:
        fail("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except StoreUnavailable as exc:
        fail(f"state store unavailable: {exc}")
        raise typer.Exit(ExitCode.STATE_UNAVAILABLE) from None
    report_run(run_dir)


def report_run(run_dir: Path) -> None:
    """Print the outcome of the run in ``run_dir``; exit 7 if it fell short of its target.

    Raises
    ------
    typer.Exit
        With :attr:`ExitCode.INCOMPLETE` after printing the summary's ``shortfall``, when
        the run committed fewer versions than asked.
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    _print_summary(run_dir, summary)
    if summary.get("shortfall"):
        fail(f"{run_dir}: {summary['shortfall']}")
        raise typer.Exit(ExitCode.INCOMPLETE)


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if summary["versions"] == 0:
        # Every score would be the base's: no version to score, no client budget for
        # the baselines. The shortfall (printed next) says why.
        console.print(
            f"{run_dir}: no version was committed; base (no adapter) "
            f"{summary['initial']['union']:.4f} bits/byte, nothing to compare it with.",
            markup=False,
            highlight=False,
        )
        _print_totals(console, summary)
        return
    table = Table(title=f"held-out bits/byte on the union of clients ({run_dir})")
    table.add_column("model")
    table.add_column("bits/byte", justify="right")
    table.add_row("base (no adapter)", f"{summary['initial']['union']:.4f}")
    for name in ("local_only", "centralized"):
        if name in summary.get("baselines", {}):
            table.add_row(name.replace("_", "-"), f"{summary['baselines'][name]['union']:.4f}")
    table.add_row(
        f"federated (version {summary['versions']} of {summary['versions_target']})",
        f"{summary['final']['union']:.4f}",
    )
    console.print(table)
    progress = summary.get("progress") or {}
    if progress.get("text"):
        console.print(progress["text"], markup=False, highlight=False)
    _print_totals(console, summary)


def _print_totals(console: Any, summary: dict[str, Any]) -> None:
    pretrain = summary["pretrain_wall_time_s"]
    console.print(
        f"updates accepted {summary['updates_accepted']}"
        + (
            f" ({summary['updates_dropped']} later dropped at a commit)"
            if summary.get("updates_dropped")
            else ""
        )
        + f", rejected {summary['updates_rejected']}, dropouts {summary['dropouts']}; wall time "
        f"{summary['wall_time_s']} s (federation {summary['federation_wall_time_s']} s"
        + (f", one-off pretraining of the base {pretrain} s" if pretrain else "")
        + ")",
        markup=False,
        highlight=False,
    )
    load = summary.get("machine_load") or {}
    if load.get("adjusted") and load.get("mean_speed", 1.0) < 0.95:
        console.print(
            f"the machine was busy: the federation ran at {load['mean_speed']:.0%} of an idle "
            f"machine's speed on average ({load['min_speed']:.0%} at worst), and its deadlines "
            "were stretched to match",
            markup=False,
            highlight=False,
        )
