"""A simulated run that falls short: its time limit, its pretraining, what it tells the user.

One real run (coordinator, local worker and three edge agents over loopback gRPC) whose
first version needs ten thousand updates, so it must stop at its time limit with no
version. The run's clock is a :class:`~estuary.clock.VirtualClock`: the limit is reached
after a fixed number of watch steps (40 of 0.5 s) however fast the machine is, and the
base's pretraining is made to take 5000 seconds of that clock, which neither the limit
nor ``federation_wall_time_s`` may count.
"""

from __future__ import annotations

import functools
import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest
import typer

import cloud_workers.local
import estuary.model.pretrain as pretrain_module
from cloud_workers.local import local_worker
from estuary.cli.exit_codes import ExitCode
from estuary.clock import VirtualClock
from estuary.config.models import SimulationSettings
from estuary.model.presets import build_preset
from simulation.cli import report_run
from simulation.run import PRETRAIN_STEPS, Simulation

pytestmark = [pytest.mark.slow]

PRETRAIN_S = 5000.0
TIME_LIMIT_S = 20.0
BUFFER = 10_000


def _settings(out_dir: Path) -> SimulationSettings:
    return SimulationSettings.model_validate(
        {
            "clients": 3,
            "versions": 1,
            "dropout": 0.0,
            "seed": 1,
            "baselines": False,
            "out_dir": out_dir,
            "time_limit_s": TIME_LIMIT_S,
            "model": {"preset": "tiny", "r_max": 4},
            "device_classes": [{"name": "phone", "rank": 4, "expected_task_s": 1.0}],
            # A version needs BUFFER updates: far more than three devices make while the
            # watch loop takes its 40 steps, however fast the machine.
            "aggregation": {"buffer_size": BUFFER},
            "cohort": {"min_size": 3, "max_size": 3, "formation_s": 0.3},
            "training": {"local_steps": 1, "batch_size": 2, "seq_len": 32},
        }
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Run the simulation once; return its folder and the log lines of its pretraining."""
    out_dir = tmp_path_factory.mktemp("runs")
    clock = VirtualClock()
    monkeypatch = pytest.MonkeyPatch()
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)

    def slow_pretraining(
        cache_dir: Path, name: str, *, steps: int, seed: int, progress: Any = None
    ) -> Path:
        # Pretraining that lasts PRETRAIN_S on the run's clock; the weights are untrained
        # (this test is about time, the pretraining itself has its own tests).
        target = pretrain_module.cached_preset_dir(cache_dir, name, steps=steps, seed=seed)
        build_preset(name, seed=seed).save_pretrained(str(target), safe_serialization=True)
        clock.advance(PRETRAIN_S / 2)
        progress(1, 7.5)
        clock.advance(PRETRAIN_S / 2)
        progress(steps, 3.0)
        return target

    monkeypatch.setattr(pretrain_module, "ensure_pretrained_preset", slow_pretraining)
    # Artifacts without the ONNX export: it runs in a spawned exporter process (tested on
    # its own), and a build in flight when this short run stops holds the coordinator's
    # stop for up to LOCAL_WORKER_JOIN_S.
    monkeypatch.setattr(
        cloud_workers.local, "local_worker", functools.partial(local_worker, onnx=False)
    )
    try:
        run_dir = Simulation(_settings(out_dir), live=False, clock=clock).run()
    finally:
        monkeypatch.undo()
        logging.getLogger().removeHandler(handler)
    return run_dir, handler.lines


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_pretraining_counts_neither_in_the_time_limit_nor_the_federation_time(
    short_run: tuple[Path, list[str]],
) -> None:
    run_dir, _ = short_run

    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["stopped_by"] == "time_limit"
    assert summary["pretrain_wall_time_s"] == PRETRAIN_S
    # The limit ran from the federation's start: it took its full 20 s, not 0.
    assert TIME_LIMIT_S <= summary["federation_wall_time_s"] <= TIME_LIMIT_S + 1.0
    assert summary["wall_time_s"] >= PRETRAIN_S + TIME_LIMIT_S
    assert summary["base_model"]["source"] == "pretrained"
    assert Path(summary["base_model"]["path"]).parent == run_dir.parent / ".cache"


def test_pretraining_logs_its_progress(short_run: tuple[Path, list[str]]) -> None:
    _, lines = short_run

    assert any(
        line.startswith("pretraining the tiny preset base once") and "not counted" in line
        for line in lines
    )
    progress = [line for line in lines if line.startswith("pretraining the tiny base: step")]
    assert progress[0] == (
        f"pretraining the tiny base: step 1/{PRETRAIN_STEPS}, loss 7.500 bits/byte, "
        f"{PRETRAIN_S / 2:.0f} s elapsed"
    )
    assert progress[-1].startswith(f"pretraining the tiny base: step {PRETRAIN_STEPS}/")


def test_a_short_run_says_why_and_exits_incomplete(
    short_run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = short_run
    summary = json.loads((run_dir / "summary.json").read_text())

    with pytest.raises(typer.Exit) as info:
        report_run(run_dir)

    assert info.value.exit_code == ExitCode.INCOMPLETE
    assert int(ExitCode.INCOMPLETE) == 7
    assert summary["versions"] == 0 and summary["versions_target"] == 1
    reason = summary["shortfall"]
    assert reason.startswith(
        "no version was committed, so there is nothing federated to compare: the time limit "
        "(time_limit_s = 20 s"
    )
    assert "pretraining the base is not counted" in reason
    assert f"Updates accepted: {summary['updates_accepted']} (a version needs" in reason
    assert f"aggregation.buffer_size = {BUFFER})" in reason
    out, err = capsys.readouterr()
    # No table of scores that would all equal the base's: the run says there is none.
    assert "federated (version" not in out and "local-only" not in out
    assert "no version was committed" in " ".join(out.split())
    assert summary["progress"]["text"] == "no version committed: the curve did not start"
    assert "one-off pretraining of the base 5000.0 s" in " ".join(out.split())
    assert reason.split(":")[0] in " ".join(err.split())


def test_the_staleness_histogram_counts_the_accepted_updates(
    short_run: tuple[Path, list[str]],
) -> None:
    run_dir, _ = short_run
    summary = json.loads((run_dir / "summary.json").read_text())

    assert sum(summary["staleness_histogram"].values()) == summary["updates_accepted"]
    assert (run_dir / "staleness.png").read_bytes().startswith(b"\x89PNG")


def test_run_files_share_one_mode(short_run: tuple[Path, list[str]]) -> None:
    run_dir, _ = short_run

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir() if p.is_file()}

    assert set(modes) == {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "bits_per_byte.png",
        "staleness.png",
    }
    assert len(set(modes.values())) == 1, modes
