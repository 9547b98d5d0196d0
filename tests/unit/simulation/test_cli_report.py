"""What ``estuary simulate`` prints at the end of a run, from the run's ``summary.json``.

A run that committed no version has nothing federated to compare: it must say so and
why, never print a table in which base, local-only, centralized and "federated" all show
the base's score (what a busy machine used to get after 20 minutes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer

from estuary.cli.exit_codes import ExitCode
from simulation.cli import report_run


def _summary(versions: int, **extra: Any) -> dict[str, Any]:
    base = {"union": 3.3532, "per_client": {"json": 3.3532}}
    return {
        "initial": base,
        "final": base if versions == 0 else {"union": 3.0, "per_client": {"json": 3.0}},
        "versions": versions,
        "versions_target": 6,
        "updates_accepted": 0,
        "updates_rejected": 0,
        "dropouts": 0,
        "staleness_histogram": {},
        "bytes_up_per_client": {},
        "bytes_down_per_client": {},
        "wall_time_s": 1242.0,
        "federation_wall_time_s": 1200.0,
        "pretrain_wall_time_s": 0.0,
        "config": "config.json",
        **extra,
    }


def _write(tmp_path: Path, summary: dict[str, Any]) -> Path:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_a_run_without_a_version_says_so_instead_of_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    why = (
        "no version was committed, so there is nothing federated to compare: the time limit "
        "ran out. Cohorts aborted: 7× # clients answered ADVERTISE_KEYS, threshold #."
    )
    run_dir = _write(
        tmp_path,
        _summary(
            0,
            shortfall=why,
            baselines=None,
            machine_load={"adjusted": True, "mean_speed": 0.2, "min_speed": 0.1},
        ),
    )

    with pytest.raises(typer.Exit) as info:
        report_run(run_dir)

    out, err = capsys.readouterr()
    out, err = " ".join(out.split()), " ".join(err.split())
    assert info.value.exit_code == ExitCode.INCOMPLETE
    assert "federated (version" not in out and "local-only" not in out
    assert out.count("3.3532") == 1  # the base's score, once
    assert "no version was committed" in out
    assert "ran at 20% of an idle machine's speed on average (10% at worst)" in out
    assert "ADVERTISE_KEYS" in err


def test_a_run_with_versions_prints_its_table_and_how_far_it_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _write(
        tmp_path,
        _summary(
            6,
            versions_target=6,
            shortfall=None,
            baselines={
                "local_only": {"union": 3.2, "per_client": {}},
                "centralized": {"union": 2.9, "per_client": {}},
            },
            progress={"text": "version 6: 0.353 bits/byte below the base"},
            machine_load={"adjusted": True, "mean_speed": 1.0, "min_speed": 1.0},
        ),
    )

    report_run(run_dir)

    out = " ".join(capsys.readouterr().out.split())
    assert "federated (version 6 of 6)" in out and "3.2000" in out and "3.0000" in out
    assert "version 6: 0.353 bits/byte below the base" in out
    assert "the machine was busy" not in out
