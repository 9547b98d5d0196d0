"""``estuary config``: validate configuration files and show the effective settings."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.pretty import Pretty

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, err_console, fail, print_json
from estuary.config import ConfigError, effective_settings, load_settings, local_problems

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
            help=(
                "Treat what this machine lacks (an unreadable secret, a missing or "
                "unreadable certificate, key, CA or data path, a state directory that "
                "cannot be written) as errors and exit 3, instead of warnings."
            ),
        ),
    ] = False,
) -> None:
    """Validate FILE for ROLE and print the effective settings, secrets redacted.

    Environment overrides (`ESTUARY_<SECTION>__<FIELD>`) are applied, as the role would
    apply them. Secrets appear only as their reference (env:NAME or file:PATH) and
    whether they can be read. Then every secret and path the file names is tried on this
    machine: certificates, keys and CA files must be readable non-empty files, data and
    model paths readable, state and output directories writable or creatable. Those are
    warnings (the file may be checked on one machine and deployed on another), errors
    with --strict. Exit code 3 when the file is invalid, or with --strict when anything
    it names is unusable here.
    """
    try:
        settings = load_settings(role.value, file)
    except ConfigError as exc:
        for problem in exc.problems:
            fail(str(problem))
        raise typer.Exit(ExitCode.CONFIG) from None
    data = effective_settings(settings)
    problems = local_problems(settings)
    severity = "error" if strict else "warning"
    if output is OutputFormat.json:
        print_json(
            {
                "role": role.value,
                "file": str(file),
                "valid": True,
                "usable_here": not problems,
                "missing_secrets": [p.field for p in problems if p.kind == "secret"],
                "problems": [
                    {"field": p.field, "kind": p.kind, "severity": severity, "reason": p.reason}
                    for p in problems
                ],
                "settings": data,
            }
        )
    else:
        console.print(f"[green]valid[/] {role.value} configuration: {escape(str(file))}")
        console.print(Pretty(data, expand_all=True))
        for unusable in problems:
            if strict:
                fail(str(unusable))
            else:
                err_console.print(
                    f"[yellow]warning:[/] {escape(str(unusable))}", highlight=False, soft_wrap=True
                )
        if problems:
            noun = "secret or path" if len(problems) == 1 else "secrets or paths"
            summary = f"{len(problems)} {noun} named by {file} cannot be used on this machine"
            if strict:
                fail(summary)
            else:
                err_console.print(
                    f"[yellow]warning:[/] {escape(summary)} (--strict makes this an error)",
                    highlight=False,
                    soft_wrap=True,
                )
    if strict and problems:
        raise typer.Exit(ExitCode.CONFIG)
