"""``estuary config check``: referenced files are tried, and the wording matches the exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("ESTUARY_"):
            monkeypatch.delenv(name)


def tls_coordinator(tmp_path: Path, *, cert: Path, key: Path) -> Path:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'[state]\nblob_dir = "{tmp_path / "blobs"}"\n',
        encoding="utf-8",
    )
    return config


def test_missing_certificate_is_a_warning_then_an_error_with_strict(tmp_path: Path) -> None:
    # Prepare: a coordinator config whose certificate does not exist; its key does.
    key = tmp_path / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    cert = tmp_path / "server.crt"
    config = tls_coordinator(tmp_path, cert=cert, key=key)
    argv = ["config", "check", "coordinator", str(config)]

    # Execute
    plain = runner.invoke(app, argv)
    strict = runner.invoke(app, [*argv, "--strict"])

    # Assert: named in both; a warning at exit 0, an error at exit 3, never the other way.
    line = f"tls.cert_file: server certificate {cert} does not exist"
    assert plain.exit_code == ExitCode.OK, plain.output
    assert f"warning: {line}" in plain.stderr
    assert "error:" not in plain.stderr
    assert strict.exit_code == ExitCode.CONFIG, strict.output
    assert f"error: {line}" in strict.stderr
    assert "warning:" not in strict.stderr
    assert str(key) not in plain.stderr  # the readable key is not reported


def test_json_lists_problems_with_their_severity(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("", encoding="utf-8")  # empty: as useless as missing
    key = tmp_path / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    config = tls_coordinator(tmp_path, cert=cert, key=key)
    argv = ["config", "check", "coordinator", str(config), "--format", "json"]

    plain = runner.invoke(app, argv)
    strict = runner.invoke(app, [*argv, "--strict"])

    assert plain.exit_code == ExitCode.OK and strict.exit_code == ExitCode.CONFIG
    for result, severity in ((plain, "warning"), (strict, "error")):
        data = json.loads(result.stdout)
        assert data["valid"] is True and data["usable_here"] is False
        assert data["problems"] == [
            {
                "field": "tls.cert_file",
                "kind": "path",
                "severity": severity,
                "reason": f"server certificate {cert} is empty",
            }
        ]


def test_edge_data_and_state_paths_are_checked(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    config = tmp_path / "edge.toml"
    config.write_text(
        f'state_dir = "{blocker / "state"}"\ndata_dir = "{tmp_path / "no-data"}"\n'
        "[tls]\nallow_plaintext = true\n",
        encoding="utf-8",
    )

    result = runner.invoke(app, ["config", "check", "edge", str(config), "--strict"])

    assert result.exit_code == ExitCode.CONFIG
    assert f"error: data_dir: training data {tmp_path / 'no-data'} does not exist" in (
        result.stderr
    )
    assert f"error: state_dir: state directory {blocker / 'state'} does not exist" in (
        result.stderr
    )


def test_usable_config_passes_strict(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\ndata_dir = "{data}"\n[tls]\nallow_plaintext = true\n',
        encoding="utf-8",
    )

    result = runner.invoke(app, ["config", "check", "edge", str(config), "--strict"])

    assert result.exit_code == ExitCode.OK, result.output
    assert "warning:" not in result.stderr and "error:" not in result.stderr


def test_help_says_strict_makes_errors() -> None:
    result = runner.invoke(app, ["config", "check", "--help"])
    text = " ".join(result.stdout.split())
    assert "errors and exit 3" in text


def test_unreadable_secret_wording_matches_the_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_TOKEN_FOR_TEST", raising=False)
    config = tmp_path / "edge.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        'enrolment_token = { env = "EDGE_TOKEN_FOR_TEST" }\n[tls]\nallow_plaintext = true\n',
        encoding="utf-8",
    )
    argv = ["config", "check", "edge", str(config)]

    plain = runner.invoke(app, argv)
    strict = runner.invoke(app, [*argv, "--strict"])

    line = "enrolment_token: environment variable EDGE_TOKEN_FOR_TEST is unset or empty"
    assert plain.exit_code == ExitCode.OK and f"warning: {line}" in plain.stderr
    assert strict.exit_code == ExitCode.CONFIG and f"error: {line}" in strict.stderr
    assert "warning:" not in strict.stderr
