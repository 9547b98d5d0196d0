"""Every command's ``--help`` reads right at 80 columns: no stray type labels, no markup eaten."""

from __future__ import annotations

from typing import Any

import pytest

from estuary.cli.app import command


def _all_commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, sub in getattr(cmd, "commands", {}).items():
        found.extend(_all_commands(sub, (*path, name)))
    return found


def _help(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    code = command().main(args=[*argv, "--help"], prog_name="estuary", standalone_mode=False)
    assert code in (0, None)
    return capsys.readouterr().out


def test_every_command_help_fits_80_columns_without_bool_labels(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    paths = _all_commands(command())
    assert ("model", "export-onnx") in paths and len(paths) > 8
    for argv in paths:
        text = _help(argv, capsys)
        assert "Usage" in text, argv
        assert "<bool>" not in text, (argv, text)  # a flag takes no value
        assert "{model}" not in text.lower() or "{MODEL}" in text
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert not wide, (argv, wide)


def test_brackets_and_placeholders_survive_markup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    export = " ".join(_help(("model", "export-onnx"), capsys).split())
    # rich markup used to swallow "[batch, seq]" and hand-wrapped lines stayed wrapped
    assert "maps input_ids [batch, seq] to logits [batch, seq, vocab], both axes dynamic" in export
    assert "MODEL" in export and "--int8" in export
    check = " ".join(_help(("config", "check"), capsys).split())
    assert "ESTUARY_<SECTION>__<FIELD>" in check


def test_simulate_names_its_run_folder(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if "simulate" not in getattr(command(), "commands", {}):
        pytest.skip("the sim extra is not installed here")
    monkeypatch.setenv("COLUMNS", "120")
    assert "runs/<id>/" in _help(("simulate",), capsys)
