"""Where a base model comes from: the pretraining cache, its progress log, presets, examples.

A coordinator, its worker groups and ``estuary simulate`` must serve a *pretrained* base:
the example configs name a model directory, a preset says loudly that it is untrained,
and the cache that ``estuary simulate`` fills once is a plain Hugging Face directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from estuary.config import load_settings
from estuary.config.models import ModelSettings
from estuary.model import load_model
from estuary.model.loading import load_base
from estuary.model.pretrain import (
    ProgressLog,
    cached_preset_dir,
    ensure_pretrained_preset,
    pretrained_preset,
)

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "deploy" / "config"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ESTUARY_"):
            monkeypatch.delenv(name)


class _Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------ the cache


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A cache filled once (one pretraining step: its cost is the machine's, not ours)."""
    cache = tmp_path_factory.mktemp("cache")
    steps: list[int] = []
    base = ensure_pretrained_preset(
        cache, "tiny", steps=1, seed=4, progress=lambda s, _loss: steps.append(s)
    )
    return base, steps


def test_cache_pretrains_once_and_then_returns_the_directory(
    cached: tuple[Path, list[int]],
) -> None:
    first, steps = cached
    again: list[int] = []

    second = ensure_pretrained_preset(
        first.parent, "tiny", steps=1, seed=4, progress=lambda s, _loss: again.append(s)
    )

    assert first == second == cached_preset_dir(first.parent, "tiny", steps=1, seed=4)
    assert steps == [1] and again == []  # the second call pretrained nothing
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


def test_the_cache_holds_the_pretrained_weights(cached: tuple[Path, list[int]]) -> None:
    base, _ = cached

    loaded = load_model(base)
    fresh = pretrained_preset("tiny", steps=1, seed=4)

    assert loaded.config.estuary_preset == "tiny"
    for (name, a), b in zip(loaded.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cache_keys_on_steps_and_seed(tmp_path: Path) -> None:
    names = {
        cached_preset_dir(tmp_path, "tiny", steps=s, seed=d).name
        for s, d in ((200, 0), (201, 0), (200, 1))
    }
    assert len(names) == 3
    assert cached_preset_dir(tmp_path, "tiny", steps=200, seed=0).parent == tmp_path


def test_cache_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name: unknown preset 'huge'"):
        ensure_pretrained_preset(tmp_path, "huge", steps=1)
    with pytest.raises(ValueError, match="steps"):
        ensure_pretrained_preset(tmp_path, "tiny", steps=-1)
    assert not any(tmp_path.iterdir())


def test_cache_refuses_a_folder_that_is_no_model_before_pretraining(tmp_path: Path) -> None:
    spoilt = cached_preset_dir(tmp_path, "tiny", steps=5, seed=0)
    spoilt.mkdir()
    (spoilt / "model.safetensors").write_bytes(b"half")
    steps: list[int] = []

    with pytest.raises(OSError, match="without config.json") as info:
        ensure_pretrained_preset(tmp_path, "tiny", steps=5, progress=lambda s, _: steps.append(s))

    assert str(spoilt) in str(info.value)
    assert steps == []  # refused before any pretraining


# --------------------------------------------------------------------- progress log


def test_progress_log_shows_step_loss_and_elapsed_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    progress = ProgressLog(100, label="the tiny base", every_s=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="estuary.model.pretrain")

    for step in range(1, 101):
        clock.now += 0.5  # 50 s in all: the first line, one per 10 s, the last
        progress(step, 8.0 - step / 50)

    lines = [r.getMessage() for r in caplog.records if r.name == "estuary.model.pretrain"]
    assert lines[0] == "pretraining the tiny base: step 1/100, loss 7.980 bits/byte, 0 s elapsed"
    assert (
        lines[-1] == "pretraining the tiny base: step 100/100, loss 6.000 bits/byte, 50 s elapsed"
    )
    assert 5 <= len(lines) <= 7
    assert progress.elapsed_s == pytest.approx(50.0)


def test_progress_log_checks_arguments() -> None:
    with pytest.raises(ValueError, match="total"):
        ProgressLog(-1, label="x")
    with pytest.raises(ValueError, match="every_s"):
        ProgressLog(1, label="x", every_s=-1.0)


# ------------------------------------------------------------ presets and examples


def test_a_preset_base_is_announced_as_untrained(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="estuary.model.loading")

    load_base(ModelSettings(preset="tiny"))

    (record,) = [r for r in caplog.records if r.name == "estuary.model.loading"]
    assert record.levelno == logging.WARNING
    assert "UNTRAINED" in record.getMessage()
    assert "estuary model init --preset tiny" in record.getMessage()


def test_a_model_directory_loads_without_that_warning(
    cached: tuple[Path, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="estuary.model.loading")

    load_base(ModelSettings(path=cached[0]))

    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_example_coordinator_and_workers_serve_one_pretrained_base() -> None:
    coordinator = load_settings("coordinator", EXAMPLES / "coordinator.toml")
    worker = load_settings("worker", EXAMPLES / "worker.toml")

    assert coordinator.model.preset is None  # type: ignore[attr-defined]
    assert coordinator.model.path == Path("/var/lib/estuary/base")  # type: ignore[attr-defined]
    assert worker.model == coordinator.model.model_copy(  # type: ignore[attr-defined]
        update={"adapter_seed": worker.model.adapter_seed}  # type: ignore[attr-defined]
    )
    # The comment above `path` gives the command that makes the directory.
    text = (EXAMPLES / "coordinator.toml").read_text(encoding="utf-8")
    assert "estuary model init --preset tiny --out /var/lib/estuary/base" in text
