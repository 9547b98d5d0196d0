from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from estuary.cli.exit_codes import ExitCode
from estuary.cli.model_cmd import app
from estuary.model import load_model


def test_init_writes_a_loadable_deterministic_model(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["init", "--preset", "tiny", "--pretrain-steps", "2", "--seed", "4", "--batch-size", "2"]

    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])

    assert first.exit_code == ExitCode.OK, first.output
    assert second.exit_code == ExitCode.OK, second.output
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert a.config.estuary_tokenizer == "bytes"


def test_init_refuses_existing_model_and_unknown_preset(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["init", "--out", str(tmp_path), "--pretrain-steps", "0"])

    again = runner.invoke(app, ["init", "--out", str(tmp_path), "--pretrain-steps", "0"])
    unknown = runner.invoke(app, ["init", "--preset", "huge", "--out", str(tmp_path / "x")])

    assert ok.exit_code == ExitCode.OK
    assert again.exit_code == ExitCode.INPUT
    assert "config.json" in again.output
    assert unknown.exit_code == ExitCode.USAGE
    assert "huge" in unknown.output


def test_init_redirected_logs_progress_on_stderr_and_only_the_result_on_stdout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # CliRunner's streams are not terminals: as under systemd or in a container job.
    runner = CliRunner()
    args = ["init", "--pretrain-steps", "3", "--batch-size", "2", "--out", str(tmp_path)]

    with caplog.at_level(logging.INFO, logger="estuary.model.pretrain"):
        result = runner.invoke(app, args)

    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout.strip().splitlines() == [
        f"saved tiny ({sum(p.numel() for p in load_model(tmp_path).parameters())} parameters)"
        f" to {tmp_path}"
    ]
    steps = [r.getMessage() for r in caplog.records if "pretraining tiny base" in r.getMessage()]
    assert steps[0].startswith("pretraining tiny base: step 1/3")
    assert steps[-1].startswith("pretraining tiny base: step 3/3")
