from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from estuary.config import (
    ConfigError,
    CoordinatorSettings,
    EdgeSettings,
    SecretRef,
    effective_settings,
    load_settings,
    local_problems,
    missing_secrets,
    reserved_for_overrides,
)
from estuary.config.checks import PathUse, check_path

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
    assert settings.state.password.env == "REDIS_PASSWORD"


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
            "[aggregation]\nbuffer_size = 2\n[pacing]\ntarget_staleness = 1.0\n",
            "pacing.target_staleness",  # 2 may train at once; a cohort needs min_size 4
            "could only fill across several rounds of training",
        ),
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


# From 2: with 1, K × the default target staleness (2) is below the default cohort size 4.
@given(k=st.integers(min_value=2, max_value=10_000), lr=st.floats(min_value=1e-3, max_value=10))
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


# --------------------------------------------------------------------------- secrets vs overrides

_NAME_TAIL = st.from_regex(r"[A-Za-z0-9_]{0,20}", fullmatch=True)


@given(
    prefix=st.sampled_from(["ESTUARY_", "estuary_", "Estuary_"]),
    tail=_NAME_TAIL,
    nested=st.booleans(),
)
def test_secret_variable_under_the_override_prefix_is_refused(
    prefix: str, tail: str, nested: bool
) -> None:
    # At any depth (edge.enrolment_token at the top, coordinator state.password nested).
    name = prefix + tail
    if nested:
        role, field = "coordinator", "state.password.env"
        text = f'[tls]\nallow_plaintext = true\n[state]\npassword = {{ env = "{name}" }}\n'
    else:
        role, field = "edge", "enrolment_token.env"
        text = f'enrolment_token = {{ env = "{name}" }}\n'
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cfg.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_settings(role, path)
    [problem] = info.value.problems
    assert problem.field == field
    assert "prefix of settings overrides" in problem.reason
    assert reserved_for_overrides(name)


@given(
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True),
    value=st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
    ),
)
def test_a_secret_variable_never_changes_a_setting(name: str, value: str) -> None:
    # Any variable a secret may name holds the secret and nothing else: set to any value,
    # every setting stays as it was and the secret reads back as that value.
    import os

    if reserved_for_overrides(name):
        with pytest.raises(ValueError, match="prefix of settings overrides"):
            SecretRef(env=name)
        return
    assume(name not in os.environ)
    before = EdgeSettings(enrolment_token={"env": name})
    os.environ[name] = value
    try:
        after = EdgeSettings(enrolment_token={"env": name})
    finally:
        del os.environ[name]
    assert after == before
    assert after.enrolment_token is not None
    os.environ[name] = value
    try:
        assert after.enrolment_token.reveal() == value
    finally:
        del os.environ[name]


def test_scalar_override_of_a_secret_field_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "[tls]\nallow_plaintext = true\n")
    monkeypatch.setenv("ESTUARY_STATE__PASSWORD", "hunter2")
    with pytest.raises(ConfigError) as info:
        load_settings("coordinator", path)
    [problem] = info.value.problems
    assert problem.source == "env:ESTUARY_STATE__PASSWORD"
    assert problem.field == "state.password"
    assert "ESTUARY_STATE__PASSWORD__ENV=VAR" in problem.reason
    assert "rename it" in problem.reason
    assert "hunter2" not in str(info.value)
    # The form it suggests works.
    monkeypatch.delenv("ESTUARY_STATE__PASSWORD")
    monkeypatch.setenv("ESTUARY_STATE__PASSWORD__ENV", "REDIS_PW")
    settings = load_settings("coordinator", path)
    assert settings.state.password == SecretRef(env="REDIS_PW")  # type: ignore[attr-defined]


def test_unparseable_section_override_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "[tls]\nallow_plaintext = true\n")
    monkeypatch.setenv("ESTUARY_STATE", '{"url": "memory://"')  # missing brace
    with pytest.raises(ConfigError) as info:
        load_settings("coordinator", path)
    [problem] = info.value.problems
    assert (problem.source, problem.field) == ("env:ESTUARY_STATE", "state")
    assert "JSON" in problem.reason


# --------------------------------------------------------------------------- paths on this machine


def test_local_problems_name_each_unusable_path(tmp_path: Path) -> None:
    # Prepare: one of each way a path can be unusable, and one usable of each kind.
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    good = tmp_path / "ca.pem"
    good.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    settings = EdgeSettings(
        tls={"ca_file": good, "cert_file": empty, "key_file": tmp_path},
        state_dir=a_file / "state",
        data_dir=tmp_path / "missing-data",
        enrolment_token={"file": tmp_path / "no-token"},
    )

    # Execute
    problems = {p.field: (p.kind, p.reason) for p in local_problems(settings)}

    # Assert
    assert problems == {
        "tls.cert_file": ("path", f"client certificate {empty} is empty"),
        "tls.key_file": ("path", f"client private key {tmp_path} is a directory, not a file"),
        "state_dir": (
            "path",
            f"state directory {a_file / 'state'} does not exist and cannot be created: "
            f"{a_file} is not a directory",
        ),
        "data_dir": ("path", f"training data {tmp_path / 'missing-data'} does not exist"),
        "enrolment_token": (
            "secret",
            f"secret file {tmp_path / 'no-token'}: No such file or directory",
        ),
    }
    usable = EdgeSettings(
        tls={"ca_file": good}, state_dir=tmp_path / "new" / "state", data_dir=good
    )
    assert local_problems(usable) == []


@pytest.mark.parametrize("use", list(PathUse))
def test_check_path_of_a_missing_path(tmp_path: Path, use: PathUse) -> None:
    reason = check_path(tmp_path / "nope", use)
    if use is PathUse.WRITE_DIR:
        assert reason is None  # created on first use, and tmp_path is writable
    else:
        assert reason == "does not exist"


def test_a_simulation_whose_pacer_cannot_fill_a_cohort_is_refused(tmp_path: Path) -> None:
    # 3 × 1 devices may train at once; the simulation's cohorts need 4.
    path = _write(tmp_path, "[aggregation]\nbuffer_size = 3\n[pacing]\ntarget_staleness = 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_settings("simulation", path)
    assert "could only fill across several rounds of training" in str(info.value)
    assert "raise target_staleness to at least 1.33333" in str(info.value)
