"""The ``estuary`` console script: core commands plus the role commands installed here.

The core's own commands (``config``, ``status``, ``model``, ``pki``) are imported; role commands
(``edge``, ``coordinator``, ``worker``, ``simulate``) are discovered through entry points
(:mod:`estuary.cli.plugins`), so the core imports no role and an install with one extra
offers that role's commands only. Exit codes come from
:class:`estuary.cli.exit_codes.ExitCode` and are listed in ``estuary --help``.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from estuary import __version__
from estuary.cli import config_cmd, model_cmd, pki_cmd, plugins, status_cmd
from estuary.cli.exit_codes import ExitCode
from estuary.cli.model_export_cmd import export_onnx_command
from estuary.log import init_logging

log = logging.getLogger(__name__)

_EXIT_CODES_HELP = ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode)

app = typer.Typer(
    name="estuary",
    help=(
        "Estuary: federated fine-tuning of language models on private edge data, with "
        "secure, asynchronous, staleness-aware aggregation.\n\n"
        f"Exit codes: {_EXIT_CODES_HELP}."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"estuary {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help="DEBUG, INFO, WARNING or ERROR. Default: $ESTUARY_LOG_LEVEL, else INFO.",
        ),
    ] = None,
    log_json: Annotated[
        bool,
        typer.Option(
            "--log-json", help="Log JSON lines instead of text (or ESTUARY_LOG_FORMAT=json)."
        ),
    ] = False,
) -> None:
    try:
        init_logging(level=log_level, fmt="json" if log_json else None)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from None


app.add_typer(config_cmd.app, name="config")
app.command("status")(status_cmd.status)
model_cmd.app.command("export-onnx")(export_onnx_command)
app.add_typer(model_cmd.app, name="model")
app.add_typer(pki_cmd.app, name="pki")
_absent = plugins.register(app, plugins.discover())
if _absent:
    app.info.epilog = "Not installed here: " + "; ".join(
        f"{c.name} ({c.install_hint})" for c in _absent
    )


def _tidy_help(command: Any) -> Any:
    """Label parameters in ``--help`` the way users read them, across every command.

    Typer labels every on/off flag ``<bool>`` (``--help`` included) although a flag takes no
    value, and shows arguments as ``{name}``; flags get no type label and arguments their
    upper-case name, the one the command's own help text refers to.
    """
    context = command.context_class(command, info_name=command.name)
    for param in command.get_params(context):  # includes the cached --help option
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)
    return command


def command() -> Any:
    """Build the ``estuary`` command tree as the console script runs it (help labels tidied)."""
    return _tidy_help(typer.main.get_command(app))


def main() -> None:
    """Run the CLI; an unexpected exception is logged and exits with ``FAILURE``."""
    try:
        command()(prog_name="estuary")
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    except Exception:  # SystemExit (typer's own exits) is not an Exception: it passes
        log.exception("unexpected error")
        sys.exit(ExitCode.FAILURE)


if __name__ == "__main__":
    main()
