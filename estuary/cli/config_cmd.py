"""``estuary config``: validate configuration files and show the effective settings."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.pretty import Pretty

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, err_console, fail, print_json
from estuary.config import ConfigError, effective_settings, load_settings, missing_secrets

app = typer.Typer(
    help="Validate configuration files and show the settings a role would run with.",
    no_args_is_help=True,
)


class Role(str, enum.Enum):
    """Roles that read a configuration file."""

    coordinator = "coordinator"
    worker = "worker"
    edge = "edge"
    simulation = "simulation"


@app.command("check")
def check(
    role: Annotated[Role, typer.Argument(help="Which role the file configures.")],
    file: Annotated[Path, typer.Argument(help="TOML configuration file.")],
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print as text or JSON.")
    ] = OutputFormat.text,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Also fail (exit 3) when a referenced secret cannot be read right now.",
        ),
    ] = False,
) -> None:
    """Validate FILE for ROLE and print the effective settings, secrets redacted.

    Environment overrides (`ESTUARY_<SECTION>__<FIELD>`) are applied, as the role would
    apply them. Secrets appear only as their reference (env:NAME or file:PATH) and
    whether they can be read. Exit code 3 when the file is invalid.
    """
    try:
        settings = load_settings(role.value, file)
    except ConfigError as exc:
        for problem in exc.problems:
            fail(str(problem))
        raise typer.Exit(ExitCode.CONFIG) from None
    data = effective_settings(settings)
    missing = missing_secrets(settings)
    if output is OutputFormat.json:
        print_json(
            {
                "role": role.value,
                "file": str(file),
                "valid": True,
                "missing_secrets": missing,
                "settings": data,
            }
        )
    else:
        console.print(f"[green]valid[/] {role.value} configuration: {file}")
        console.print(Pretty(data, expand_all=True))
        for name in missing:
            err_console.print(f"[yellow]warning:[/] secret {name} cannot be read right now")
    if strict and missing:
        raise typer.Exit(ExitCode.CONFIG)
