from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from estuary import __version__
from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode

REPO = Path(__file__).resolve().parents[4]
runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == ExitCode.OK
    assert result.stdout.strip() == f"estuary {__version__}"


@pytest.mark.parametrize(
    "argv", [["--help"], ["config", "--help"], ["config", "check", "--help"], ["status", "--help"]]
)
def test_help_on_every_level(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_help_lists_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    for code in ExitCode:
        assert f"{code.value} {code.name.lower()}" in " ".join(result.stdout.split())


def test_config_check_example_json() -> None:
    result = runner.invoke(
        app,
        [
            "config",
            "check",
            "coordinator",
            str(REPO / "deploy/config/coordinator.toml"),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    assert data["valid"] is True
    assert data["settings"]["state"]["url"] == "redis://redis:6379/0"
    assert data["settings"]["state"]["password"].startswith("<secret env:REDIS_PASSWORD")


def test_config_check_invalid_file_exits_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregation]\nbuffer_size = -3\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "check", "worker", str(bad)])
    assert result.exit_code == ExitCode.CONFIG
    assert "aggregation" in result.output  # worker has no aggregation section: unknown field


def test_config_check_strict_fails_on_missing_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        '[tls]\nallow_plaintext = true\n[state]\nurl = "redis://h:6379/0"\n'
        f'password = {{ env = "REDIS_PASSWORD" }}\nblob_dir = "{tmp_path / "blobs"}"\n',
        encoding="utf-8",
    )
    example = str(config)
    assert runner.invoke(app, ["config", "check", "coordinator", example]).exit_code == 0
    result = runner.invoke(app, ["config", "check", "coordinator", example, "--strict"])
    assert result.exit_code == ExitCode.CONFIG
    monkeypatch.setenv("REDIS_PASSWORD", "pw-value")
    result = runner.invoke(app, ["config", "check", "coordinator", example, "--strict"])
    assert result.exit_code == ExitCode.OK
    assert "pw-value" not in result.output


def test_status_memory_is_empty_json() -> None:
    result = runner.invoke(app, ["status", "--state", "memory://", "--format", "json"])
    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    assert data["versions"] == [] and data["cohorts"] == []
    assert data["workers"] == [] and data["devices"] == []


def test_status_bad_url_exits_config() -> None:
    result = runner.invoke(app, ["status", "--state", "ftp://x"])
    assert result.exit_code == ExitCode.CONFIG


def test_status_unreachable_redis_exits_state_unavailable() -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    result = runner.invoke(app, ["status", "--state", "redis://127.0.0.1:1/0"])
    assert result.exit_code == ExitCode.STATE_UNAVAILABLE


def test_console_script_runs_as_a_process() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "estuary.cli.app",
            "status",
            "--state",
            "memory://",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["devices"] == []
