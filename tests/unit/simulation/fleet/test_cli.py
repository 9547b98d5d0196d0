"""``estuary simulate-fleet`` refuses bad input before any work, naming what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_helpers import HAND_TRACE
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode

runner = CliRunner()


def test_malformed_trace_exits_usage_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    broken = json.loads(json.dumps(HAND_TRACE))
    broken["classes"][0]["bandwidth_up"]["median"] = 0
    bad.write_text(json.dumps(broken))
    result = runner.invoke(app, ["simulate-fleet", "--trace", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == ExitCode.USAGE
    assert (
        "classes[0].bandwidth_up.median: must be in (0" in result.output + capsys.readouterr().err
    )
    assert not any(tmp_path.glob("fleet-*"))  # nothing was run


def test_unknown_policy_exits_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = runner.invoke(
        app, ["simulate-fleet", "--policies", "fedavg,estuary", "--out", str(tmp_path)]
    )
    assert result.exit_code == ExitCode.USAGE
    assert "fedavg" in result.output + capsys.readouterr().err


def test_help_names_the_shipped_traces() -> None:
    result = runner.invoke(app, ["simulate-fleet", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("phones-laptops", "phones-laptops-slow", "stragglers", "--ray"):
        assert name in result.output
