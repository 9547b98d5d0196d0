"""``estuary worker`` commands: launch command, exit codes, generate, a one-stage run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worker_fixtures import publish_version

from cloud_workers.cli import _run_forwarding_signals, app
from estuary.cli.exit_codes import ExitCode
from estuary.jobs import make_job, submit_job
from estuary.model.presets import build_preset
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key, worker_key

runner = CliRunner()


def write_config(
    tmp_path: Path, *, url: str, stages: int = 1, model: str = 'preset = "tiny"'
) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(
        f'group = "g1"\nstages = {stages}\nheartbeat_s = 0.2\nreclaim_idle_s = 1.0\n'
        f'[state]\nurl = "{url}"\nblob_dir = "{tmp_path / "blobs"}"\n[model]\n{model}\n'
    )
    return path


def test_run_with_stages_builds_the_torchrun_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = write_config(tmp_path, url="memory://", stages=2)
    result = runner.invoke(app, ["run", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "cloud_workers.cli", "run", "--config", str(config),
    ]  # fmt: skip


def test_invalid_config_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("stages = 0\n")
    result = runner.invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == ExitCode.CONFIG
    assert "stages" in result.output


def test_topology_that_does_not_divide_the_model_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, url="memory://", stages=3)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as if this were rank 0 under torchrun
    monkeypatch.setenv("RANK", "0")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == ExitCode.CONFIG
    assert "does not divide the model's 4 decoder layers" in result.output


def test_missing_base_checkpoint_exits_5(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Built in code: a TOML file cannot unset the default preset (TOML has no null).
    from cloud_workers.cli import _serve
    from estuary.config.models import ModelSettings, WorkerSettings

    settings = WorkerSettings(model=ModelSettings(preset=None, path=tmp_path / "nope"))
    assert _serve(settings, idle_exit_s=0.1) == ExitCode.INPUT
    assert "config.json" in capsys.readouterr().err


def test_generate_uses_the_versions_adapter_and_refuses_unknown_versions(tmp_path: Path) -> None:
    url = f"memory://cli-{uuid.uuid4().hex}"
    store = open_store(url)
    publish_version(store, BlobStore(tmp_path / "blobs"), build_preset("tiny", seed=0), 3)
    config = write_config(tmp_path, url=url)
    ok = runner.invoke(
        app,
        [
            "generate",
            "--config",
            str(config),
            "--version",
            "3",
            "--prompt",
            "import ",
            "--max-new-tokens",
            "8",
        ],
    )
    assert ok.exit_code == 0, ok.output
    # the text is the one stdout line; log lines (the untrained-preset warning) may share
    # the captured output on some click versions
    [text] = [line for line in ok.output.splitlines() if line.startswith("import ")]
    assert len(text) > len("import ")
    bad = runner.invoke(
        app, ["generate", "--config", str(config), "--version", "4", "--prompt", "x"]
    )
    assert bad.exit_code == ExitCode.INPUT
    assert "version 4: unknown" in bad.output


def test_run_serves_one_stage_group_until_idle(tmp_path: Path) -> None:
    url = f"memory://cli-{uuid.uuid4().hex}"
    store = open_store(url)
    publish_version(store, BlobStore(tmp_path / "blobs"), build_preset("tiny", seed=0), 1)
    submit_job(store, make_job("evaluate", version=1))
    config = write_config(tmp_path, url=url)
    result = runner.invoke(app, ["run", "--config", str(config), "--idle-exit-s", "0.5"])
    assert result.exit_code == 0, result.output
    record = json.loads(store.get(version_key(1)).value)
    assert 5.0 < record["eval_bpb"] < 10.0
    assert json.loads(store.get(worker_key("g1")).value)["jobs_done"] == 1


def test_launcher_forwards_sigterm_to_torchrun(tmp_path: Path) -> None:
    # In a container only PID 1 (the launcher) gets SIGTERM; torchrun and its stages must
    # hear it too, or they are SIGKILLed instead of stopping within their grace period.
    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))\n"
        f"pathlib.Path({str(ready)!r}).write_text('up')\n"
        "time.sleep(60)\n"
        "sys.exit(1)\n"
    )

    def signal_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=signal_when_ready, daemon=True).start()
    # torchrun exits 1 on a stop signal: the launcher reports the stop (130)
    assert _run_forwarding_signals([sys.executable, "-c", child]) == ExitCode.INTERRUPTED
    assert ready.read_text() == "up"
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handlers are restored
