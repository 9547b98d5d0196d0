"""Role commands are discovered; one whose extra is absent explains itself."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from estuary.cli.exit_codes import ExitCode
from estuary.cli.plugins import RoleCommand, discover, register
from estuary.extras import install_hint, missing_for


def _app_with(command: RoleCommand) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Root."""

    register(app, [command])
    return app


def test_an_absent_command_names_its_extra_and_exits_config() -> None:
    absent = RoleCommand("coordinator", ("coordinator",), ("redis", "hiredis"), None)
    app = _app_with(absent)
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "serve", "--config", "x.toml"])
    assert result.exit_code == ExitCode.CONFIG
    # The hint is printed verbatim: rich must not swallow "[coordinator]" as markup.
    assert "pip install 'estuary-fl[coordinator]'" in result.output
    assert "missing: redis, hiredis" in result.output
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0 and "coordinator" not in listed.output


def test_an_available_command_is_offered() -> None:
    sub = typer.Typer()

    @sub.command()
    def hello() -> None:
        """Say hello."""
        typer.echo("hello")

    app = _app_with(RoleCommand("edge", ("edge",), (), sub))
    result = CliRunner().invoke(app, ["edge", "hello"])
    assert result.exit_code == 0 and result.output.strip() == "hello"


def test_every_role_command_is_registered_and_complete_in_the_dev_install() -> None:
    found = {c.name: c for c in discover()}
    assert set(found) == {"edge", "coordinator", "worker", "simulate", "simulate-fleet"}
    assert all(c.available for c in found.values()), {n: c.missing for n, c in found.items()}
    assert missing_for(["sim"]) == []


def test_missing_for_and_install_hint() -> None:
    assert missing_for(["edge"], dist="no-such-distribution") == []
    assert missing_for(["no-such-extra"]) == []
    assert install_hint(["edge", "worker"]) == "pip install 'estuary-fl[edge,worker]'"
    assert install_hint([]) == "pip install 'estuary-fl'"
