from __future__ import annotations

from pathlib import Path

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
