from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estuary.config import (
    ConfigError,
    CoordinatorSettings,
    effective_settings,
    load_settings,
    missing_secrets,
)

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = REPO / "deploy" / "config"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ESTUARY_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("role", ["coordinator", "worker", "edge", "simulation"])
def test_example_files_load(role: str) -> None:
    settings = load_settings(role, EXAMPLES / f"{role}.toml")
    assert type(settings).__name__.lower().startswith(role[:5])


def test_example_coordinator_values() -> None:
    settings = load_settings("coordinator", EXAMPLES / "coordinator.toml")
    assert isinstance(settings, CoordinatorSettings)
    assert settings.state.url == "redis://redis:6379/0"
    assert settings.aggregation.buffer_size == 8
    assert [c.name for c in settings.device_classes] == ["phone", "laptop"]
    assert settings.state.password is not None
    assert settings.state.password.env == "ESTUARY_REDIS_PASSWORD"


@pytest.mark.parametrize(
    ("text", "field", "reason_part"),
    [
        ("[aggregation]\nbuffer_size = 0\n", "aggregation.buffer_size", "greater than or equal"),
        ("[aggregation]\nbuffer_sise = 4\n", "aggregation.buffer_sise", "unknown field"),
        ('[state]\nurl = "postgres://x"\n', "state.url", "unsupported scheme"),
        ('[state]\nurl = "redis://:hunter2@h:6379/0"\n', "state.url", "secrets are never inline"),
        ('[state]\npassword = "hunter2"\n', "state.password", ""),
        ("[state]\npassword = { }\n", "state.password", "exactly one"),
        ("[tls]\nallow_plaintext = false\n", "tls.cert_file", "allow_plaintext"),
        ("[cohort]\nmin_size = 9\nmax_size = 4\n", "cohort.min_size", "exceeds max_size"),
        ("[cohort]\nthreshold_fraction = 0.5\n", "cohort.threshold_fraction", "greater than"),
        (
            '[tls]\nallow_plaintext = true\n[[device_classes]]\nname = "big"\nrank = 64\n',
            "device_classes",  # r_max defaults to 16
            "rank above model.r_max",
        ),
    ],
)
def test_invalid_files_name_file_and_field(
    tmp_path: Path, text: str, field: str, reason_part: str
) -> None:
    tls = "" if text.startswith("[tls]") else "[tls]\nallow_plaintext = true\n"
    path = _write(tmp_path, tls + text)
    with pytest.raises(ConfigError) as info:
        load_settings("coordinator", path)
    message = str(info.value)
    assert str(path) in message
    assert any(p.field == field or p.field.startswith(field + ".") for p in info.value.problems), (
        message
    )
    assert reason_part in message


def test_inline_secret_value_is_never_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, '[state]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError) as info:
        load_settings("coordinator", path)
    assert "hunter2" not in str(info.value)


def test_bad_toml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[state\nurl=1")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_settings("worker", path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings("edge", tmp_path / "nope.toml")


def test_unknown_role(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown role"):
        load_settings("gardener", None)


def test_env_override_wins_and_merges_with_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path, "[tls]\nallow_plaintext = true\n[aggregation]\nbuffer_size = 4\nserver_lr = 2.0\n"
    )
    monkeypatch.setenv("ESTUARY_AGGREGATION__SERVER_LR", "0.5")
    settings = load_settings("coordinator", path)
    assert isinstance(settings, CoordinatorSettings)
    assert settings.aggregation.server_lr == 0.5  # env wins
    assert settings.aggregation.buffer_size == 4  # file value kept beside the override


def test_invalid_env_override_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "[tls]\nallow_plaintext = true\n")
    monkeypatch.setenv("ESTUARY_AGGREGATION__SERVER_LR", "-1")
    with pytest.raises(ConfigError) as info:
        load_settings("coordinator", path)
    assert "env:ESTUARY_AGGREGATION__SERVER_LR" in str(info.value)
    assert "aggregation.server_lr" in str(info.value)


def test_secret_refs_are_redacted_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cret-from-file\n", encoding="utf-8")
    path = _write(
        tmp_path,
        f'[state]\nurl = "redis://h:6379/0"\npassword = {{ file = "{secret_file}" }}\n'
        "[tls]\nallow_plaintext = true\n",
    )
    settings = load_settings("coordinator", path)
    shown = effective_settings(settings)
    assert "s3cret" not in repr(shown)
    assert shown["state"]["password"] == f"<secret file:{secret_file} (set)>"
    assert missing_secrets(settings) == []
    assert settings.state.password is not None
    assert settings.state.password.reveal() == "s3cret-from-file"
    secret_file.unlink()
    assert missing_secrets(settings) == ["state.password"]


@given(k=st.integers(min_value=1, max_value=10_000), lr=st.floats(min_value=1e-3, max_value=10))
def test_valid_numbers_round_trip(k: int, lr: float) -> None:
    settings = CoordinatorSettings(
        tls={"allow_plaintext": True}, aggregation={"buffer_size": k, "server_lr": lr}
    )
    assert settings.aggregation.buffer_size == k
    assert settings.aggregation.server_lr == lr
    assert effective_settings(settings)["aggregation"]["buffer_size"] == k


def test_model_source_path_or_preset(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\npath = "/models/llama"\n')
    settings = load_settings("worker", path)
    assert settings.model.path == Path("/models/llama")  # type: ignore[attr-defined]
    assert settings.model.preset is None  # type: ignore[attr-defined]
    assert load_settings("worker", None).model.preset == "tiny"  # type: ignore[attr-defined]
    both = _write(tmp_path, '[model]\npath = "/m"\npreset = "small"\n')
    with pytest.raises(ConfigError, match="model.preset: set preset or path, not both"):
        load_settings("worker", both)
